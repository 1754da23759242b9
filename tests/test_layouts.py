"""Every layout trainers hand over: packed cu_seqlens streams, holes, left padding, long rows.

In skip mode the filter, the gradient and the loss depend only on each sequence's ordered
stream of valid tokens, so every layout of the same streams must agree token for token.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kpo_kernels
import reference
from conftest import DEVICE, triton_backend
from helpers import assert_close, examples, grid

AGGS_WITHOUT_WIDTH = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")


# ----------------------------------------------------------------------------- building layouts


def streams(lengths, seed):
    """One stream of valid tokens per sequence: (log_prob, old_log_prob) float64 pairs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        old = -torch.rand(n, generator=gen, dtype=torch.float64) * 2
        ratio = torch.randn(n, generator=gen, dtype=torch.float64) * 0.05
        ratio += (torch.rand(n, generator=gen) < 0.05) * torch.randn(n, generator=gen, dtype=torch.float64)
        out.append((old + ratio, old))
    return out


def scatter(stream_pairs, layout, seed, width=None, hole_rate=0.3):
    """Place the streams in a layout; invalid slots hold NaN/inf garbage.

    Returns dict(log_prob, old_log_prob, mask, [cu_seqlens]) and, per sequence, the indices of
    its valid tokens in the layout (flat indices for packed, (row, col) for padded).
    """
    gen = torch.Generator().manual_seed(seed)
    positions = []  # per sequence: sorted slots of its valid tokens, and its slot count
    for new, _ in stream_pairs:
        n = new.numel()
        if layout in ("holes", "packed_holes"):
            slots = n + int(torch.binomial(torch.tensor(float(n) + 1), torch.tensor(hole_rate), generator=gen))
            chosen = torch.sort(torch.randperm(slots, generator=gen)[:n]).values
        else:
            slots, chosen = n, torch.arange(n)
        positions.append((chosen, slots))
    if layout.startswith("packed"):
        lengths = [slots for _, slots in positions]
        cu = torch.tensor([0] + lengths).cumsum(0)
        total = int(cu[-1])
        new = torch.full((total,), math.nan, dtype=torch.float64)
        old = torch.full((total,), math.inf, dtype=torch.float64)
        mask = torch.zeros(total, dtype=torch.bool)
        index = []
        for s, ((n_vals, o_vals), (chosen, _)) in enumerate(zip(stream_pairs, positions)):
            flat = int(cu[s]) + chosen
            new[flat], old[flat], mask[flat] = n_vals, o_vals, True
            index.append(flat)
        return {"log_prob": new, "old_log_prob": old, "mask": mask, "cu_seqlens": cu.to(torch.int32)}, index
    width = max([slots for _, slots in positions] + [width or 0, 1])
    rows = len(stream_pairs)
    new = torch.full((rows, width), math.nan, dtype=torch.float64)
    old = torch.full((rows, width), -math.inf, dtype=torch.float64)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    index = []
    for row, ((n_vals, o_vals), (chosen, slots)) in enumerate(zip(stream_pairs, positions)):
        cols = chosen + (width - slots if layout == "left" else 0)
        new[row, cols], old[row, cols], mask[row, cols] = n_vals, o_vals, True
        index.append((torch.full_like(cols, row), cols))
    return {"log_prob": new, "old_log_prob": old, "mask": mask}, index


def gather(values, index):
    """Per-sequence values at the valid tokens of a layout, concatenated."""
    parts = [values[i] if isinstance(i, torch.Tensor) else values[i[0], i[1]] for i in index]
    return torch.cat(parts) if parts else values.new_zeros(0)


def to_device(data, dtype=torch.float32):
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).to(DEVICE) if isinstance(v, torch.Tensor) else v
        for k, v in data.items()
    }


def run(data, impl, adv, **options):
    """(loss, metrics, grad) of kpo_loss on a layout."""
    log_prob = data["log_prob"].clone().requires_grad_()
    rest = {k: v for k, v in data.items() if k != "log_prob"}
    loss, metrics = kpo_kernels.kpo_loss(log_prob, advantages=adv, backend=impl, **rest, **options)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, grad.cpu()


def canonical_filter(stream_pairs, dtype=torch.float32, **options):
    """The float64 reference filter of each stream on its own (no padding at all), of the
    log-probs rounded to `dtype` as `to_device` hands them to the backends: the filter of the
    inputs the backends see. (Of the unrounded ones it can differ by more than the tolerance:
    with q = 1e-8 a short stream's filtered values are ~1e-10 and the rounding of log-probs
    near -2 moves them by ~3e-15.)"""
    parts = []
    for new, old in stream_pairs:
        if new.numel():
            z = new.to(dtype).double() - old.to(dtype).double()
            parts.append(reference.kalman_filter(z[None], **options)[0])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------- property tests

LAYOUTS = ("right", "left", "holes", "packed", "packed_holes")


def backends():
    return [kpo_kernels.TorchBackend(), triton_backend(block_size=16), triton_backend(block_size=16, tile_size=32)]


@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 45), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
    q=st.sampled_from([1e-8, 1e-4, 1e-2, 1.0]),
)
def test_every_layout_gives_the_same_valid_tokens(lengths, seed, q):
    pairs = streams(lengths, seed)
    want = canonical_filter(pairs, q=q)
    adv = torch.randn(len(lengths), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    losses = {}
    for impl in backends():
        for layout in LAYOUTS:
            data, index = scatter(pairs, layout, seed + 1)
            dev = to_device(data)
            z = dev["log_prob"] - dev["old_log_prob"]
            x = kpo_kernels.kalman_filter(z, dev["mask"], q=q, cu_seqlens=dev.get("cu_seqlens"), backend=impl).cpu()
            assert_close(f"{impl!r} {layout} filter", gather(x, index), want, rtol=2e-6)
            agg = AGGS_WITHOUT_WIDTH[seed % len(AGGS_WITHOUT_WIDTH)]
            loss, _, grad = run(dev, impl, adv[:, None].float().to(DEVICE), q=q, agg=agg, clip_low=0.05, clip_high=0.05)
            losses.setdefault(agg, []).append((f"{impl!r} {layout}", loss, gather(grad, index)))
    # The loss is a mean of terms -A_t r_t with r_t near 1 that cancel (here to 1e-4 of max |A|):
    # float32 sums in another order differ by ulps of max |A|, not of the loss.
    loss_atol = 1e-6 * float(adv.abs().max())
    for agg, results in losses.items():
        name0, loss0, grad0 = results[0]
        for name, loss, grad in results[1:]:
            assert_close(f"{agg} loss {name} vs {name0}", loss, loss0, rtol=1e-5, atol=loss_atol)
            assert_close(f"{agg} grad {name} vs {name0}", grad, grad0, rtol=1e-5)


@pytest.mark.parametrize("impl, agg, mask_mode", grid(["torch", "triton", "triton-tiled"], kpo_kernels.AGG_MODES, ["skip", "position"]))
def test_packed_matches_the_reference_on_uneven_boundaries(impl, agg, mask_mode):
    """Boundaries [0, 15, 100, 300, 1200, 2000] and an empty sequence, against the float64
    reference on the equivalent right-padded batch (same horizon: the longest sequence)."""
    backend = {"torch": "torch", "triton": triton_backend(block_size=64), "triton-tiled": triton_backend(block_size=64, tile_size=128)}[impl]
    cu = torch.tensor([0, 15, 100, 100, 300, 1200, 2000], dtype=torch.int32)
    lengths = (cu[1:] - cu[:-1]).tolist()
    gen = torch.Generator().manual_seed(3)
    pairs = streams(lengths, 4)
    data, index = scatter(pairs, "packed", 5)
    data["mask"] &= torch.rand(data["mask"].shape, generator=gen) > 0.1  # holes inside sequences
    adv = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    options = dict(q=1e-3, agg=agg, mask_mode=mask_mode, dual_clip=3.0, clip_low=0.05, clip_high=0.05)
    loss, metrics, grad = run(to_device(data), backend, adv[:, None].float().to(DEVICE), **options)

    padded, padded_index = scatter(pairs, "right", 5)
    padded_mask = torch.zeros_like(padded["mask"])
    for (rows, cols), flat in zip(padded_index, index):
        padded_mask[rows, cols] = data["mask"][flat]
    log_prob = torch.where(padded_mask, padded["log_prob"], 0.0).requires_grad_()
    want_loss, want_metrics = reference.kpo_loss(log_prob, padded["old_log_prob"], adv, padded_mask, **options)
    (want_grad,) = torch.autograd.grad(want_loss, log_prob)
    assert_close("loss", loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_close("grad", gather(grad, index), gather(want_grad, padded_index), rtol=1e-5)
    for name in ("ppo_kl", "ratio_mean", "raw_ratio_max", "num_tokens"):
        assert_close(name, metrics[name], want_metrics[name], rtol=1e-5)


@pytest.mark.parametrize("length", [31, 32, 33, 63, 64, 65, 97])
def test_tile_boundaries(length):
    """Rows whose length is a tile boundary +/- 1, on the multi-tile path (tile 32, block 16)."""
    gen = torch.Generator().manual_seed(length)
    z = torch.randn(3, length, generator=gen, dtype=torch.float64) * 0.1
    mask = torch.rand(3, length, generator=gen) > 0.25
    want = reference.kalman_filter(z, mask, q=1e-3)
    for mode_mask in (mask, None):
        impl = triton_backend(block_size=16, tile_size=32)
        got = kpo_kernels.kalman_filter(z.float().to(DEVICE), None if mode_mask is None else mode_mask.to(DEVICE), q=1e-3, backend=impl)
        expected = want if mode_mask is not None else reference.kalman_filter(z, None, q=1e-3)
        assert_close("filter", got, expected, rtol=2e-6)


@pytest.mark.parametrize("cu", [[0], [0, 0], [0, 0, 0], [0, 5, 5, 9], [0, 3]])
def test_empty_and_tiny_sequences(backend, cu):
    cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(total)
    new = (torch.randn(total, generator=gen) * 0.1).to(DEVICE)
    old = torch.zeros(total, device=DEVICE)
    adv = torch.ones(cu.numel() - 1, 1, device=DEVICE)
    log_prob = new.clone().requires_grad_()
    loss, metrics = kpo_kernels.kpo_loss(log_prob, old, adv, cu_seqlens=cu, q=1.0, agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and log_prob.grad.shape == (total,)
    assert float(metrics["num_tokens"]) == total
    if total == 0:
        assert float(loss.detach()) == 0.0


def test_per_token_advantages_and_weights_when_packed(backend):
    cu = torch.tensor([0, 7, 7, 30, 41], dtype=torch.int32)
    pairs = streams((cu[1:] - cu[:-1]).tolist(), 9)
    data, index = scatter(pairs, "packed_holes", 10)
    total = data["log_prob"].numel()
    gen = torch.Generator().manual_seed(11)
    data["advantages"] = torch.randn(total, generator=gen, dtype=torch.float64)
    data["is_weights"] = torch.rand(total, generator=gen, dtype=torch.float64)
    adv = data.pop("advantages")
    loss, _, grad = run(to_device(data), backend, adv.float().to(DEVICE), q=1e-2, agg="token-mean")
    padded, padded_index = scatter(pairs, "right", 12)
    flat_to_padded = {}
    for (rows, cols), flat in zip(padded_index, index):
        for r, c, f in zip(rows.tolist(), cols.tolist(), flat.tolist()):
            flat_to_padded[f] = (r, c)
    adv_p = torch.zeros(padded["mask"].shape, dtype=torch.float64)
    w_p = torch.zeros(padded["mask"].shape, dtype=torch.float64)
    for f, (r, c) in flat_to_padded.items():
        adv_p[r, c], w_p[r, c] = adv[f], data["is_weights"][f]
    log_prob = torch.where(padded["mask"], padded["log_prob"], 0.0).requires_grad_()
    want, _ = reference.kpo_loss(log_prob, padded["old_log_prob"], adv_p, padded["mask"], is_weights=w_p, q=1e-2, agg="token-mean")
    (want_grad,) = torch.autograd.grad(want, log_prob)
    assert_close("loss", loss, want.detach(), rtol=1e-5, atol=1e-7)
    assert_close("grad", gather(grad, index), gather(want_grad, padded_index), rtol=1e-5)


def test_long_rows_on_the_multi_tile_path():
    """A 4096-token row cut into 16 tiles of 256 (64-token blocks), holes in the mask."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(1, 4096, generator=gen, dtype=torch.float64) * 0.1
    mask = torch.rand(1, 4096, generator=gen) > 0.1
    for q in (1e-9, 1.0):
        got = kpo_kernels.kalman_filter(z.float().to(DEVICE), mask.to(DEVICE), q=q, backend=triton_backend(block_size=64, tile_size=256))
        assert_close("filter", got, reference.kalman_filter(z.float().double(), mask, q=q), rtol=1e-5)


def float64_recursion(z, q):
    """The filter of one unmasked sequence, token by token in Python floats."""
    out, x, p = [], 0.0, 0.0
    for value in z.tolist():
        p_pred = p + q
        k = p_pred / (p_pred + 1.0)
        p = p_pred / (p_pred + 1.0)
        x += k * (value - x)
        out.append(x)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.slow
def test_one_sequence_of_2_to_the_20_tokens_on_the_torch_backend():
    n = 1 << 20
    gen = torch.Generator().manual_seed(14)
    z = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1 + 0.01
    cu = torch.tensor([0, n], dtype=torch.int32)
    for q in (1e-9, 1e-6):
        want = float64_recursion(z, q)
        got64 = kpo_kernels.kalman_filter(z, cu_seqlens=cu, q=q, backend="torch")
        assert torch.isfinite(got64).all()
        assert_close("float64 filter", got64, want, rtol=1e-9)
        got32 = kpo_kernels.kalman_filter(z.float(), cu_seqlens=cu, q=q, backend="torch")
        assert_close("float32 filter", got32, float64_recursion(z.float().double(), q), rtol=1e-5)
    log_prob = z.float().clone().requires_grad_()
    loss, metrics = kpo_kernels.kpo_loss(log_prob, torch.zeros(n), torch.ones(1, 1), cu_seqlens=cu, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_prob.grad).all() and float(metrics["num_tokens"]) == n


# ----------------------------------------------------------------------------- bad input


def packed_inputs():
    return {
        "log_prob": torch.zeros(10),
        "old_log_prob": torch.zeros(10),
        "advantages": torch.ones(3, 1),
        "cu_seqlens": torch.tensor([0, 4, 4, 10], dtype=torch.int32),
    }


@pytest.mark.parametrize(
    "override, name, exc",
    [
        ({"cu_seqlens": torch.tensor([0.0, 4.0, 10.0])}, "cu_seqlens", TypeError),
        ({"cu_seqlens": [0, 4, 10]}, "cu_seqlens", TypeError),
        ({"cu_seqlens": torch.tensor([1, 4, 4, 10], dtype=torch.int32)}, "start at 0", ValueError),
        ({"cu_seqlens": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}, "non-decreasing", ValueError),
        ({"cu_seqlens": torch.tensor([0, 4, 4, 9], dtype=torch.int32)}, "end at", ValueError),
        ({"cu_seqlens": torch.tensor([[0, 4, 10]], dtype=torch.int32)}, "cu_seqlens", ValueError),
        ({"cu_seqlens": torch.tensor([0, 4, 4, 10], dtype=torch.int32, device="meta")}, "cu_seqlens", ValueError),
        ({"advantages": torch.ones(4)}, "advantages", ValueError),
        ({"advantages": torch.ones(3)}, r"advantages\[:, None\]", ValueError),
        ({"advantages": torch.ones(3, 2)}, "advantages", ValueError),
        ({"advantages": torch.ones(10, 1)}, "advantages", ValueError),
        ({"mask": torch.ones(9, dtype=torch.bool)}, "mask", ValueError),
        ({"is_weights": torch.ones(3)}, "is_weights", ValueError),
        ({"old_log_prob": torch.zeros(2, 5)}, "old_log_prob", ValueError),
        ({"log_prob": torch.zeros(2, 5)}, "log_prob", ValueError),
    ],
)
def test_bad_packed_input(override, name, exc):
    with pytest.raises(exc, match=name):
        kpo_kernels.kpo_loss(**{**packed_inputs(), **override}, backend="torch")


def test_one_dimensional_input_needs_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens"):
        kpo_kernels.kpo_loss(torch.zeros(10), torch.zeros(10), torch.ones(10))
    with pytest.raises(ValueError, match="cu_seqlens"):
        kpo_kernels.kalman_filter(torch.zeros(10))


def test_advantages_per_token_or_per_sequence_packed():
    base = packed_inputs()
    per_seq, _ = kpo_kernels.kpo_loss(**base, backend="torch")
    per_token, _ = kpo_kernels.kpo_loss(**{**base, "advantages": torch.ones(10)}, backend="torch")
    assert torch.equal(per_seq, per_token)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mask_mode", ["skip", "position"])
def test_non_finite_observation_at_a_valid_token(backend, value, mask_mode):
    """IEEE semantics of the recursion, as the reference: inf (or NaN) at that token, NaN after it
    in its sequence, nothing in other sequences, whatever the layout."""
    cu = torch.tensor([0, 20, 20, 45], dtype=torch.int32)
    gen = torch.Generator().manual_seed(15)
    z = torch.randn(45, generator=gen, dtype=torch.float64) * 0.1
    mask = torch.rand(45, generator=gen) > 0.2
    mask[7] = True
    z[7] = value
    padded = torch.zeros(3, 25, dtype=torch.float64)
    padded_mask = torch.zeros(3, 25, dtype=torch.bool)
    padded[0, :20], padded_mask[0, :20] = z[:20], mask[:20]
    padded[2, :25], padded_mask[2, :25] = z[20:], mask[20:]
    want = reference.kalman_filter(padded, padded_mask, q=1e-2, mask_mode=mask_mode)
    want_packed = torch.cat([want[0, :20], want[2, :25]])
    packed = kpo_kernels.kalman_filter(z.float().to(DEVICE), mask.to(DEVICE), q=1e-2, mask_mode=mask_mode, cu_seqlens=cu.to(DEVICE), backend=backend)
    rows = kpo_kernels.kalman_filter(padded.float().to(DEVICE), padded_mask.to(DEVICE), q=1e-2, mask_mode=mask_mode, backend=backend)
    assert_close("packed", packed, want_packed, rtol=2e-6)
    assert_close("rows", rows, want, rtol=2e-6)
    assert not torch.isnan(packed[20:].cpu()).any()


@pytest.mark.parametrize("cu", [[0, 0, 2, 2, 4], [0, 2, 2, 3], [0, 1, 2]])
def test_advantages_shape_alone_decides_when_as_many_sequences_as_tokens(backend, cu):
    """S == N: (N,) still means per token and (S, 1) per sequence, exactly as in every other
    batch; the data (cu_seqlens) never changes the meaning of a shape."""
    cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    n = int(cu[-1])
    new = torch.tensor([0.1, -0.2, 0.3, 0.05][:n], device=DEVICE)
    old = torch.zeros(n, device=DEVICE)
    per_seq = torch.tensor([5.0, 1.0, 7.0, -1.0][: cu.numel() - 1], device=DEVICE)
    lengths = (cu[1:] - cu[:-1]).long()
    per_token = torch.repeat_interleave(per_seq, lengths)
    options = dict(q=1.0, agg="token-mean", cu_seqlens=cu, backend=backend)
    packed_seq, _ = kpo_kernels.kpo_loss(new, old, per_seq[:, None], **options)
    packed_tok, _ = kpo_kernels.kpo_loss(new, old, per_token, **options)
    assert_close("per sequence vs per token", packed_seq, packed_tok, rtol=1e-6)
    # Without filtering (q = 1e8: K = 1) and with token-mean, the loss is a flat token average,
    # so a reference row of the N tokens checks that a (N,) tensor was read per token.
    unfiltered = {**options, "q": 1e8, "clip": False}
    values = torch.linspace(-2.0, 3.0, n, device=DEVICE)
    got, _ = kpo_kernels.kpo_loss(new, old, values, **unfiltered)
    want, _ = reference.kpo_loss(new.double().cpu()[None], old.double().cpu()[None], values.double().cpu()[None], q=1e8, clip=False, agg="token-mean")
    assert_close("(N,) is per token", got, want, rtol=1e-6)


def test_result_does_not_depend_on_the_order_of_reductions(monkeypatch):
    """On GPUs tl.reduce combines lanes in butterfly order (it assumes commutativity); the
    interpreter folds in order. Re-run the multi-tile path with the interpreter's custom
    reductions folding in the sm_90 butterfly order: nothing may change."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if DEVICE.type != "cpu":
        pytest.skip("checks the interpreter; on a GPU the other tests run the real order")
    original = interpreter.ReduceOps.generic_reduce
    calls = []

    def butterfly(self, inputs):
        calls.append(1)
        size = inputs[0].handle.data.shape[0] if inputs[0].handle.data.ndim == 1 else 0
        if size and size & (size - 1) == 0:
            bits = max(1, size.bit_length() - 1)
            order = [int(f"{i:0{bits}b}"[::-1], 2) for i in range(size)]
            inputs = tuple(
                interpreter.tl.core.tensor(interpreter.TensorHandle(t.handle.data[order].copy(), t.handle.dtype), t.type)
                for t in inputs
            )
        return original(self, inputs)

    gen = torch.Generator().manual_seed(16)
    z = (torch.randn(2, 600, generator=gen) * 0.05 + 0.02).to(DEVICE)
    mask = (torch.rand(2, 600, generator=gen) > 0.2).to(DEVICE)
    impl = triton_backend(block_size=16, tile_size=32)  # 19 tiles a row
    in_order = kpo_kernels.kalman_filter(z, mask, q=1e-3, backend=impl)
    monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", butterfly)
    permuted = kpo_kernels.kalman_filter(z, mask, q=1e-3, backend=impl)
    torch.testing.assert_close(permuted, in_order, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=examples(12), suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.sampled_from([0, 1, 2, 3, 17, 1023, 1024, 1025, 2500]), min_size=1, max_size=12), seed=st.integers(0, 99))
def test_packed_backward_finds_each_tokens_sequence(dtype, lengths, seed):
    """The Triton backward of a packed batch, called directly: each token's derivative times
    grad_output and its own sequence's weight, whatever the sequences next to each other (empty
    ones, one-token ones, boundaries at 1024-token block edges +/- 1)."""
    backend = triton_backend()
    if backend is None:
        pytest.skip("Triton is not importable")
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(seed)
    tokens, sequences = int(cu[-1]), len(lengths)
    grad = torch.randn(tokens, generator=gen)
    row_scale = torch.randn(sequences, generator=gen)
    grad_output = torch.tensor(0.75)
    got = backend.loss_backward(grad.to(DEVICE), row_scale.to(DEVICE), grad_output.to(DEVICE), cu.to(DEVICE), dtype).cpu()
    owner = torch.repeat_interleave(torch.arange(sequences), torch.tensor(lengths))
    want = grad * (grad_output * row_scale[owner])
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # one rounding to bfloat16 (the interpreter truncates where a GPU rounds to nearest)
        assert ((got.float() - want).abs() <= want.abs() * 2.0**-7).all()
