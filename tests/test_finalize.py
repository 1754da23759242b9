"""The finalize (triton_finalize.finalize) sums each sequence's tiles 1, 16 or 128 at a time
(many sequences of one tile; a few cut into tens, or into hundreds of tiles).

- The finalize kernel alone (what a batch without tiles launches), on made-up tile statistics:
  every (tiles per step, sequences per step), with several steps over the tiles and over the
  sequences, empty sequences and every aggregation, gives what one tile per step gives.
- Through `kpo_loss`, where the forward's last program finalizes (its layout from
  triton_launch._fused_finalize_launch: at 16-token blocks, one warp, at most 32 tiles a step):
  rows cut into many tiles give the torch backend's loss, metrics and gradient.
- The forward's finish count: launch after launch, and per stream, thread and graph capture.
"""

import pytest
import torch

import kpo_kernels
from conftest import DEVICE, triton_backend
from helpers import grid
from kpo_kernels.backends.aggregation import NUM_STATS
from kpo_kernels.backends.triton_backend import _finalize_launch
from kpo_kernels.options import AGG_MODES, METRIC_NAMES



def finalize(stats, tiles, sequences, tiles_per_seq, offsets, agg, per_step):
    """Run the finalize kernel alone: (out, row_scale)."""
    from kpo_kernels.backends import triton_kernels as kernels

    out = torch.full((1 + len(METRIC_NAMES),), float("nan"), device=DEVICE)
    row_scale = torch.full((sequences,), float("nan"), device=DEVICE)
    dummy = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    varlen = offsets is not None
    # Packed: made-up sequence lengths (the horizon of seq-mean-token-sum-norm is the longest).
    cu_seqlens = torch.arange(sequences + 1, dtype=torch.int32, device=DEVICE) ** 2 if varlen else dummy
    kernels.kpo_loss_finalize_kernel[(1,)](
        stats, offsets if varlen else dummy, cu_seqlens, row_scale, out[0:1], out[1:], sequences, tiles, tiles_per_seq, 77,
        1.0, 0.0, 0.0, dummy, dummy, 0.0,
        AGG=kernels.AGG_CODES[agg], TOKEN_COUNT=0, SEQUENCE_COUNT=0, HAS_SCALE_FACTOR=False, IS_VARLEN=varlen,
        BLOCK_S=1024, **_finalize_launch(per_step),
    )
    return out, row_scale


def made_up_stats(tiles_of, seed):
    """Statistics of tiles: valid-token counts (some tiles and sequences empty) and sums."""
    gen = torch.Generator().manual_seed(seed)
    tiles = sum(tiles_of)
    stats = torch.rand(NUM_STATS, tiles, generator=gen) * 10 - 3
    stats[0] = torch.randint(0, 40, (tiles,), generator=gen).float()
    stats[0, torch.rand(tiles, generator=gen) < 0.2] = 0
    start = 0
    for seq, count in enumerate(tiles_of):
        if seq % 7 == 3:  # an empty sequence
            stats[0, start : start + count] = 0
        start += count
    return stats.to(DEVICE)


# (sequences, tiles each (0: from 1 to 150), packed)
SHAPES = {
    "one-tile": (5, 1, False),
    "many-rows": (40, 20, False),
    "hundreds": (3, 256, False),
    "packed-short": (300, 2, True),
    "packed-mixed": (40, 0, True),
    "packed-hundreds": (2, 260, True),
}


@pytest.mark.parametrize("shape, agg", grid(list(SHAPES), AGG_MODES))
def test_every_width_of_the_finalize_gives_the_same_results(shape, agg):
    sequences, tiles_each, packed = SHAPES[shape]
    triton_backend()  # skips when Triton cannot run here
    if tiles_each == 0:  # lengths in tiles from 1 to 150
        tiles_of = [1 + (37 * s) % 150 for s in range(sequences)]
    else:
        tiles_of = [tiles_each] * sequences
    stats = made_up_stats(tiles_of, seed=sequences)
    offsets = None
    if packed:
        offsets = torch.tensor([0, *torch.tensor(tiles_of).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    args = (stats, stats.shape[1], sequences, 0 if packed else tiles_each, offsets, agg)
    want_out, want_scale = finalize(*args, per_step=1)
    assert not want_out.isnan().any() and not want_scale.isnan().any()
    assert want_out[0] != 0 and (want_scale != 0).any()  # the sequences' sums are not all empty
    for per_step in (16, 128):
        out, scale = finalize(*args, per_step=per_step)
        torch.testing.assert_close(out, want_out, rtol=2e-6, atol=1e-6, msg=f"{per_step} tiles per step")
        torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0, msg=f"{per_step} tiles per step")


# (rows, tiles per row, tiles per step _finalize_tiles_per_step picks): 16 tokens per block and per
# tile (the forward's one-warp finalize then takes min(that, 32) tiles a step).
CASES = {"sixteen": (3, 6, 16), "hundred-and-twenty-eight": (2, 19, 128)}


@pytest.mark.parametrize("case, packed", grid(list(CASES), [False, True]))
def test_the_wider_finalize_paths_match_the_torch_backend(case, packed):
    rows, tiles, per_step = CASES[case]
    width = tiles * 16
    gen = torch.Generator().manual_seed(rows * 100 + tiles)
    old = -torch.rand(rows, width, generator=gen) * 2
    log_prob = old + torch.randn(rows, width, generator=gen) * 0.05
    mask = torch.rand(rows, width, generator=gen) > 0.2
    advantages = torch.randn(rows, generator=gen)
    inputs = dict(log_prob=log_prob, old_log_prob=old, advantages=advantages, mask=mask)
    if packed:  # sequence i keeps its first lengths[i] tokens
        lengths = torch.tensor([width] + [width - 16 * (i + 1) + 5 for i in range(rows - 1)])
        keep = torch.arange(width)[None, :] < lengths[:, None]
        cu_seqlens = torch.tensor([0, *lengths.cumsum(0).tolist()], dtype=torch.int32)
        inputs = dict(
            log_prob=log_prob[keep], old_log_prob=old[keep], advantages=advantages.repeat_interleave(lengths),
            mask=mask[keep], cu_seqlens=cu_seqlens,
        )
    impl = triton_backend(block_size=16, tile_size=16)
    cu_seqlens = inputs["cu_seqlens"].to(DEVICE) if packed else None
    tiling = impl._plan(inputs["log_prob"].shape, cu_seqlens, DEVICE)[2]
    assert kpo_kernels.backends.triton_backend._finalize_tiles_per_step(tiling) == per_step
    results = {}
    for name, backend in (("torch", "torch"), ("triton", impl)):
        log_prob = inputs["log_prob"].to(DEVICE).requires_grad_()
        rest = {k: v.to(DEVICE) for k, v in inputs.items() if k != "log_prob"}
        loss, metrics = kpo_kernels.kpo_loss(log_prob, q=1e-3, agg="seq-mean-token-mean", backend=backend, **rest)
        loss.backward()
        results[name] = (loss.detach(), {k: v.detach() for k, v in metrics.items()}, log_prob.grad)
    (loss, metrics, grad), (want_loss, want_metrics, want_grad) = results["triton"], results["torch"]
    torch.testing.assert_close(loss.double(), want_loss.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-7)
    for key in want_metrics:
        torch.testing.assert_close(metrics[key].double(), want_metrics[key].double(), rtol=1e-5, atol=1e-7, msg=key)


# ----------------------------------------------------------------------------- the forward's last program


def _loss(backend, inputs):
    log_prob = inputs["log_prob"].to(DEVICE).requires_grad_()
    rest = {k: v.to(DEVICE) for k, v in inputs.items() if k != "log_prob"}
    loss, metrics = kpo_kernels.kpo_loss(log_prob, q=1e-3, backend=backend, **rest)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, log_prob.grad


def test_the_forward_finalizes_in_its_last_program_launch_after_launch():
    """The last forward program to finish finalizes, then sets the count back to 0: launches
    one after another with other grids (tiles of 16, 48 and whole rows; padded and packed; a
    batch of rows without tokens, which the finalize kernel takes alone) each write every
    output (the buffers start as NaN) and give the torch backend's results."""
    from kpo_kernels.backends.triton_launch import FINISH_COUNTERS

    gen = torch.Generator().manual_seed(7)
    old = -torch.rand(4, 90, generator=gen)
    padded = dict(log_prob=old + 0.05 * torch.randn(4, 90, generator=gen), old_log_prob=old,
                  advantages=torch.randn(4, generator=gen), mask=torch.rand(4, 90, generator=gen) > 0.3)
    lengths = torch.tensor([90, 1, 57, 33])
    keep = torch.arange(90)[None, :] < lengths[:, None]
    packed = dict(log_prob=padded["log_prob"][keep], old_log_prob=old[keep],
                  advantages=padded["advantages"].repeat_interleave(lengths), mask=padded["mask"][keep],
                  cu_seqlens=torch.tensor([0, *lengths.cumsum(0).tolist()], dtype=torch.int32))
    empty = dict(log_prob=torch.zeros(3, 0), old_log_prob=torch.zeros(3, 0), advantages=torch.ones(3))
    for inputs, tile_size in [(padded, 16), (packed, 48), (padded, None), (empty, None), (packed, 16), (padded, 48)]:
        got = _loss(triton_backend(block_size=16, tile_size=tile_size), inputs)
        want = _loss("torch", inputs)
        torch.testing.assert_close(got[0].double(), want[0].double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2].double(), want[2].double(), rtol=1e-5, atol=1e-7)
        for key in want[1]:
            torch.testing.assert_close(got[1][key].double(), want[1][key].double(), rtol=1e-5, atol=1e-7, msg=key)
        assert FINISH_COUNTERS.get(torch.device(DEVICE)).tolist() == [0, 0]  # the count and the mask flag


def test_finish_counters_per_stream_thread_and_capture(monkeypatch):
    """One count per device and stream on CUDA (per thread where kernels run in the calling
    thread), kept between calls and at most MOST of them; a fresh zero while a graph is captured."""
    from kpo_kernels import tables
    from kpo_kernels.backends import triton_launch
    from kpo_kernels.backends.triton_launch import FinishCounters

    counters = FinishCounters()
    device = torch.device("cpu")
    here = counters.get(device)
    assert counters.get(device) is here and here.dtype == torch.int32 and here.tolist() == [0, 0]
    others = []
    thread = __import__("threading").Thread(target=lambda: others.append(counters.get(device)))
    thread.start()
    thread.join()
    assert others[0] is not here
    monkeypatch.setattr(tables, "capturing", lambda device: True)
    first, second = counters.get(device), counters.get(device)
    assert first is not second and first is not here and first.tolist() == [0, 0]
    monkeypatch.undo()
    idents = iter(range(10**6, 10**6 + FinishCounters.MOST + 5))  # threads that come and go (idents are reused)
    monkeypatch.setattr(triton_launch, "_thread_key", lambda: next(idents))
    for _ in range(FinishCounters.MOST + 5):
        counters.get(device)
    monkeypatch.undo()
    assert len(counters._counts) == FinishCounters.MOST  # the least recently used went first: this thread's
    assert counters.get(device) is not here and len(counters._counts) == FinishCounters.MOST


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_a_loss_near_float32s_largest_stays_finite(agg):
    """The finalize sums each sequence's loss times its own factor and scales the sum once: that
    sum, in float32, passed float32's range (advantages of 2e38, one token a row: -inf) where
    the loss is -2e38. It is summed in float64."""
    mask = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    mask[:, 0] = True
    zeros, advantages = torch.zeros(2, 4, device=DEVICE), torch.tensor([2e38, 2e38], device=DEVICE)
    got = kpo_kernels.kpo_loss(zeros, zeros, advantages, mask, agg=agg, backend=triton_backend())[0]
    want = kpo_kernels.kpo_loss(zeros, zeros, advantages, mask, agg=agg, backend="torch")[0]
    assert torch.isfinite(got) and torch.equal(got, want)
