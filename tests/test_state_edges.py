"""Edge cases of the filter's state between chunks (docs/math.md section 7): an inf or NaN at a
valid token of an earlier chunk, sign codes out of the int8 range, and per-sequence advantages of
a context-parallel stream."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import kpo_kernels
from kpo_kernels import FilterState
from kpo_kernels.context_parallel import Pieces, context_parallel_kpo_loss

from conftest import triton_backend

OPTIONS = {"q": 1e-2, "r": 0.5}
CUTS = (0, 1, 5, 6, 12)


def _data(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(3, 12, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    mask = torch.rand(3, 12, generator=gen) > 0.3
    mask[1, 5] = False  # the chunk [5, 6) of row 1 has no valid token
    old = -torch.rand(3, 12, generator=gen, dtype=torch.float64).to(dtype)
    return z, mask, old


def _in_chunks(call, tensors, **kwargs):
    state, results = None, []
    for start, end in zip(CUTS[:-1], CUTS[1:]):
        *result, state = call(*(t[:, start:end] if t.dim() == 2 else t for t in tensors), initial_state=state,
                              return_state=True, **kwargs)
        results.append(result)
    return results, state


@pytest.mark.parametrize("mask_mode", ["skip", "position"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_token_of_an_earlier_chunk_stays_in_its_sequence(mask_mode, bad):
    """An inf or NaN at a valid token makes every later filtered value of its sequence NaN, in
    later chunks too (the entering state is inf or NaN), and nothing of the other sequences
    (the torch backend scans the packed stream: the state must not leak past a reset)."""
    z, mask, old = _data()
    z[0, 2], mask[0, 2] = bad, True
    kwargs = {**OPTIONS, "mask_mode": mask_mode, "p0": math.inf, "backend": "torch"}
    whole = kpo_kernels.kalman_filter(z, mask, **kwargs)
    parts, _ = _in_chunks(kpo_kernels.kalman_filter, (z, mask), **kwargs)
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), whole, rtol=0, atol=1e-13, equal_nan=True)
    assert torch.isfinite(whole[1:]).all()

    advantages = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    loss_kwargs = {**kwargs, "agg": "token-sum", "clip_low": 0.05, "clip_high": 0.05}
    log_prob = (old + z).requires_grad_()
    whole_loss, whole_metrics = kpo_kernels.kpo_loss(log_prob, old, advantages, mask, **loss_kwargs)
    whole_loss.backward()
    chunked = (old + z).requires_grad_()
    parts, _ = _in_chunks(kpo_kernels.kpo_loss, (chunked, old, advantages, mask), **loss_kwargs)
    sum(loss for loss, _ in parts).backward()
    torch.testing.assert_close(chunked.grad, log_prob.grad, rtol=0, atol=1e-13, equal_nan=True)
    assert torch.isfinite(chunked.grad[1:]).all()
    for name in ("sign_flip_pairs", "num_tokens", "innovation_tokens"):
        assert sum(float(m[name]) for _, m in parts) == float(whole_metrics[name])
    raw = sum(float(m["sign_flip_raw"] * m["sign_flip_pairs"]) for _, m in parts)
    assert raw == pytest.approx(float(whole_metrics["sign_flip_raw"] * whole_metrics["sign_flip_pairs"]), rel=1e-12)


@pytest.mark.parametrize("tile_size", [None, 8])
@pytest.mark.parametrize("x", [math.nan, math.inf])
def test_triton_sign_code_of_a_nonfinite_entering_state(tile_size, x):
    """The Triton loss kernel pairs a chunk's first valid token with the entering sign code even
    when the entering x is inf or NaN (its zeros were x * 0: NaN, and the code garbage)."""
    z = torch.tensor([[-0.0316, -0.2115, 0.0322, -0.1263, 0.0350, 0.0308] * 3])
    mask = torch.tensor([[False, False, True, True, False, True] * 3])
    old = torch.zeros_like(z)
    expected = {}
    for name, backend in (("torch", "torch"), ("triton", triton_backend(block_size=8, tile_size=tile_size))):
        for code in (6, 9):
            state = FilterState(torch.tensor([x]), torch.tensor([3]), torch.tensor([code], dtype=torch.int8))
            _, metrics = kpo_kernels.kpo_loss(z, old, torch.ones(1), mask, initial_state=state, backend=backend, **OPTIONS)
            counts = [float(metrics["sign_flip_pairs"]), float(metrics["sign_flip_raw"] * metrics["sign_flip_pairs"])]
            expected.setdefault(code, counts)
            assert counts == pytest.approx(expected[code], rel=1e-6), (name, code)


def test_sign_codes_out_of_the_int8_range_are_refused():
    """A wide last_sign is not narrowed to int8 before its values are checked (265 would read 9)."""
    z = torch.zeros(2, 5)
    for value in (265, -247, 10):
        state = FilterState(torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.full((2,), value, dtype=torch.int64))
        with pytest.raises(ValueError, match="last_sign must be a sign code"):
            kpo_kernels.kalman_filter(z, initial_state=state, backend="torch")
    state = FilterState(torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.full((2,), 9, dtype=torch.int64))
    kpo_kernels.kalman_filter(z, initial_state=state, backend="torch")


@pytest.mark.parametrize("q", [0.0, 1e-20, 1e-6])
def test_a_count_beyond_any_table_is_refused_or_clamped(q):
    """An entering count the gains have not saturated by needs a table of count + length
    entries: past tables.MAX_TABLE_ENTRIES (a garbage count, say) a ValueError naming
    initial_state.count, not an allocator error after gigabytes (q = 0 never saturates, 1e-20
    only after ~1e11 observations). A q whose gains saturate early clamps any count."""
    z = torch.full((1, 8), 0.1)
    state = FilterState(torch.zeros(1), torch.tensor([2**40]), torch.full((1,), 9, dtype=torch.int8))
    for backend in ("torch", triton_backend()):
        call = lambda: kpo_kernels.kalman_filter(z, q=q, initial_state=state, backend=backend)  # noqa: E731
        if q < 1e-14:
            refused = r"initial_state.count \(or the sequence length\): the gains at q / r = .* do not saturate"
            with pytest.raises(ValueError, match=refused):
                call()
        else:
            saturated = kpo_kernels.kalman_filter(z, q=q, initial_state=state._replace(count=torch.tensor([10**7])),
                                                  backend=backend)
            assert torch.equal(call(), saturated)


def test_triton_tables_on_cuda_are_sized_by_saturation_or_by_the_count():
    """On CUDA the Triton backend sizes an entering state's tables to the gains' saturation (no
    host read) unless they saturate past tables.MAX_TABLE_ENTRIES (q = 0, or q below ~1e-14):
    then by the largest count, read once (a stand-in for a CUDA count tensor: no GPU here)."""
    import types

    from kpo_kernels.backends.triton_backend import TritonBackend
    from kpo_kernels.gains import saturation_index

    reads = []
    count = types.SimpleNamespace(numel=lambda: 2, device=torch.device("cuda", 0),
                                  max=lambda: reads.append(1) or torch.tensor(5))
    tiling = types.SimpleNamespace(longest=100)
    for q, want in ((1e-6, saturation_index(1e-6, 1.0, 0.0) + 1), (1e-20, 105), (0.0, 105)):
        options = types.SimpleNamespace(q=q, r=1.0, p0=0.0)
        assert TritonBackend._table_longest(tiling, options, count) == want
    assert len(reads) == 2


def test_context_parallel_stream_refuses_per_sequence_advantages_of_shape_s():
    """(S,) advantages of a 1-D stream would read as one per token on a rank whose token count
    happens to be S (and as one per sequence elsewhere): refused, as kpo_loss refuses them for a
    packed batch; (S, 1) is one per sequence."""
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        log_prob = torch.tensor([-0.5, -0.7], dtype=torch.float64)
        old = log_prob + torch.tensor([0.01, -0.02], dtype=torch.float64)
        advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
        # Two sequences of one token, in the stream in reverse order: the per-token reading of
        # (S,) would give sequence 1's advantage to sequence 0's token.
        pieces = Pieces(torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor([0, 0]), 2)
        with pytest.raises(ValueError, match=r"advantages has shape \(2,\).*advantages\[:, None\]"):
            three = Pieces(torch.tensor([2, 1]), torch.tensor([1, 0]), torch.tensor([0, 0]), 2)
            context_parallel_kpo_loss(torch.zeros(3), torch.zeros(3), advantages, layout=three, backend="torch")
        # The same (S,) where the rank's token count is S: one per token (the shape decides).
        loss, _ = context_parallel_kpo_loss(log_prob, old, advantages[:, None], layout=pieces, q=1e-2, backend="torch")
        expected, _ = kpo_kernels.kpo_loss(log_prob.flip(0), old.flip(0), advantages[:, None], q=1e-2, backend="torch",
                                           cu_seqlens=torch.tensor([0, 1, 2]))
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
        per_token, _ = context_parallel_kpo_loss(log_prob, old, advantages.flip(0), layout=pieces, q=1e-2, backend="torch")
        torch.testing.assert_close(per_token, expected, rtol=0, atol=1e-15)
    finally:
        dist.destroy_process_group()
