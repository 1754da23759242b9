"""The finalize kernel sums each sequence's tiles 1, 16 or 128 at a time (many sequences of one
tile; a few cut into tens, or into hundreds of tiles).

- The kernel alone, on made-up tile statistics: every (tiles per step, sequences per step),
  with several steps over the tiles and over the sequences, empty sequences and every
  aggregation, gives what one tile per step gives (the path the rest of the suite checks
  against the torch backend).
- Through `kpo_loss`: the launcher picks the wider paths for rows cut into many tiles, and they
  give the torch backend's loss, metrics and gradient.
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


# (rows, tiles per row, tiles per step the launcher picks): 16 tokens per block and per tile.
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
