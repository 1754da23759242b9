"""Inputs a trainer can hand over that once broke the package (an adversarial review).

Each test names the class of inputs it covers. Every input is either computed exactly or refused
before any kernel runs with an error that names the argument, on both backends.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import kpo_kernels
import reference
from conftest import DEVICE, triton_backend
from helpers import assert_close, examples, grid, make_batch, oracle, run_loss
from kpo_kernels import tables
from kpo_kernels.gains import gain_schedule, saturation_index

# ----------------------------------------------------------------------------- views and strides


def _views(tensor):
    """The same values as non-contiguous tensors: a strided slice of a wider buffer, a transposed
    copy read back through .t() (2-D), and for tensors whose values repeat, 0-stride expansions
    are made by the callers."""
    wide = torch.empty(tensor.shape[:-1] + (2 * tensor.shape[-1],), dtype=tensor.dtype, device=tensor.device)
    wide.fill_(7 if not tensor.dtype.is_floating_point and tensor.dtype != torch.bool else math.nan)
    if tensor.dtype == torch.bool:
        wide.fill_(True)
    wide[..., ::2] = tensor
    out = {"strided": wide[..., ::2]}
    if tensor.dim() == 2:
        out["transposed"] = tensor.t().contiguous().t()
    return out


def _contiguous_call(batch, backend, cu_seqlens=None, **options):
    return run_loss(backend, {**batch, **({"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {})}, **options)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("argument", ["log_prob", "old_log_prob", "advantages", "mask", "is_weights", "cu_seqlens"])
def test_every_tensor_argument_as_a_view(backend, packed, argument):
    """Finding 1: a strided cu_seqlens was read as contiguous (wrong values, a heap abort)."""
    if argument == "cu_seqlens" and not packed:
        pytest.skip("cu_seqlens exists only for packed batches")
    batch = make_batch(4, 21, layout="holes", seed=3, device=DEVICE, adv_per_token=argument == "advantages", is_weights=True)
    cu_seqlens = None
    if packed:
        batch = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in batch.items()}
        cu_seqlens = torch.tensor([0, 0, 17, 40, 84], dtype=torch.int32, device=DEVICE)
        if batch["advantages"].shape != batch["log_prob"].shape:
            batch["advantages"] = torch.tensor([[0.5], [1.0], [-2.0], [0.25]], device=DEVICE)
    options = dict(q=1e-2, agg="seq-mean-token-mean", dual_clip=3.0)
    want = _contiguous_call(batch, backend, cu_seqlens, **options)
    originals = {**batch, "cu_seqlens": cu_seqlens}
    for kind, view in _views(originals[argument]).items():
        assert not view.is_contiguous()
        changed = {**batch, **({"cu_seqlens": cu_seqlens} if packed else {}), argument: view}
        got = run_loss(backend, changed, **options)
        for name, a, b in (("loss", got[0], want[0]), ("grad", got[2], want[2])):
            assert_close(f"{argument} {kind} {name}", a, b, rtol=1e-6)
        for metric in kpo_kernels.METRIC_NAMES:
            assert_close(f"{argument} {kind} {metric}", got[1][metric], want[1][metric], rtol=1e-6)
    if argument == "cu_seqlens":  # the exact case of the review
        offsets = torch.tensor([0, 0, 4, 0, 8, 0], dtype=torch.int32, device=DEVICE)[::2]
        x = kpo_kernels.kalman_filter(torch.full((8,), 0.25, device=DEVICE), cu_seqlens=offsets, q=1e8, backend=backend)
        assert_close("strided offsets", x, torch.full((8,), 0.25), rtol=1e-6)


def test_zero_stride_advantages_and_mask(backend):
    """Per-token tensors made by expand() (stride 0 along the tokens)."""
    batch = make_batch(3, 19, layout="none", seed=5, device=DEVICE)
    per_row = batch["advantages"]
    expanded = {**batch, "advantages": per_row[:, None].expand(3, 19), "mask": torch.ones(1, 19, dtype=torch.bool, device=DEVICE).expand(3, 19)}
    got = run_loss(backend, expanded, q=1e-2)
    want = run_loss(backend, batch, q=1e-2)
    assert_close("loss", got[0], want[0], rtol=1e-6)
    assert_close("grad", got[2], want[2], rtol=1e-6)


# ----------------------------------------------------------------------------- gains at the extremes


def _exact_gains(n, q, p0):
    """K_1..K_n by the recursion in exact rational arithmetic (q, p0 in units of R)."""
    out, p = [], None if math.isinf(p0) else Fraction(p0)
    q = Fraction(q)
    for _ in range(n):
        if p is None:  # diffuse prior: K = 1, posterior variance R
            k, p = Fraction(1), Fraction(1)
        else:
            k = (p + q) / (p + q + 1)
            p = k
        out.append(float(k))
    return torch.tensor(out, dtype=torch.float64)


EXTREME_Q = [0.0, 2.3e-308, 1e-300, 1e-220, 1e-20, 1e-6, 1.0, 1e8, 1e100, 1e300, 1.7e308]
EXTREME_P0 = [0.0, 2.3e-308, 1e-3, 1.0, 1e100, 1e303, 1e308, math.inf]


@pytest.mark.parametrize("q", EXTREME_Q)
def test_gains_are_exact_over_the_whole_accepted_range(q):
    """Findings 2 and 3: q = 0 with a huge p0 gave [1, 0, 0, 0]; q >= 9e307 gave NaN; q <= 1e-220
    gave 0 instead of n q. Against exact rational arithmetic: 1e-12 relative."""
    for p0 in EXTREME_P0:
        got = kpo_kernels.kalman_gains(24, q=q, p0=p0)
        want = _exact_gains(24, q, p0)
        assert torch.isfinite(got).all()
        if (want == 0).all():
            assert (got == 0).all()
            continue
        rel = float(((got - want).abs() / want.abs()).max())
        assert rel < 1e-12, f"q={q} p0={p0}: relative error {rel:.2e}"


@pytest.mark.parametrize("q, p0", [(0.0, 1e303), (0.0, 1e308), (1e-300, 1e308), (1.7e308, 0.0), (1e-6, math.inf)])
def test_gains_stay_exact_at_2_to_the_20(q, p0):
    n = 1 << 20
    got = kpo_kernels.kalman_gains(n, q=q, p0=p0)
    assert torch.isfinite(got).all() and (got > 0).all()
    if q == 0.0:  # p_n = 1 / (1 / p0 + n) exactly
        steps = torch.arange(1, n + 1, dtype=torch.float64)
        assert_close("gains", got, 1.0 / (1.0 / p0 + steps), rtol=1e-15)
    else:
        want = reference.kalman_gains(4096, q=q, p0=p0)
        assert_close("gains", got[:4096], want, rtol=1e-12)


def test_r_scales_extreme_values():
    """q = 1e300 with r = 1e-8 is q / r = 1e308: finite, and the same as q = 1e308, r = 1."""
    torch.testing.assert_close(kpo_kernels.kalman_gains(8, q=1e300, r=1e-8), kpo_kernels.kalman_gains(8, q=1e308), rtol=1e-15, atol=0)


@pytest.mark.parametrize("q, r", [(1e308, 1.0), (1e300, 1e-8), (1e-300, 1.0), (0.0, 1.0)])
def test_extreme_noise_ratios_give_finite_losses(backend, q, r):
    batch = make_batch(3, 20, layout="holes", seed=2, device=DEVICE)
    loss, metrics, grad = run_loss(backend, batch, q=q, r=r, clip=False)
    want_loss, _, want_grad = oracle(batch, q=q, r=r, clip=False)
    assert_close("loss", loss, want_loss, rtol=2e-6)
    assert_close("grad", grad, want_grad, rtol=2e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"q": 1e-310}, "q / r"),
        ({"q": 1e-200, "r": 1e120}, "q / r"),
        ({"q": 1e300, "r": 1e-10}, "q / r"),
        ({"p0": 1e-310}, "p0 / r"),
    ],
)
def test_ratios_outside_the_supported_range_are_refused_with_the_range(kwargs, name):
    with pytest.raises(ValueError, match=r"q / r|p0 / r") as info:
        kpo_kernels.kalman_gains(4, **kwargs)
    assert name in str(info.value) and ("2.225e-308" in str(info.value) or "1.798e+308" in str(info.value))
    with pytest.raises(ValueError, match=name.split()[0]):
        kpo_kernels.kpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), **kwargs)


# ----------------------------------------------------------------------------- gain tables


@pytest.mark.parametrize("q", [1e-10, 1e-6, 1e-2, 1.0, 1e8])
@pytest.mark.parametrize("p0", [0.0, 1.0, math.inf])
def test_gains_beyond_the_saturation_index_equal_the_last_table_entry(q, p0):
    """Tables may stop at the saturation index and be read with a clamped index."""
    n = saturation_index(q, 1.0, p0)
    length = tables.table_length(10 * n + 5, q, 1.0, p0)
    assert n <= length <= 2 * n + 1
    full = gain_schedule(min(10 * n + 5, 1 << 22), q, 1.0, p0)
    last = full[length - 1]
    tail = full[length - 1 :]
    assert float(((tail - last).abs() / last).max()) <= 2.0**-52


def test_packed_tables_are_sized_by_the_longest_sequence_and_bounded_in_bytes(backend, monkeypatch):
    """Finding 5: tables were sized by all N tokens of a packed stream, 16 kept whatever their
    size. 32 sequences of 64 tokens, 20 distinct q (q = 0 never saturates: its table is as
    long as the longest sequence, 64, against 2048 tokens)."""
    cu = torch.arange(0, 32 * 64 + 1, 64, dtype=torch.int32, device=DEVICE)
    z = torch.randn(32 * 64, device=DEVICE) * 0.1
    cache = tables.TableCache()
    monkeypatch.setattr(tables, "cache", cache)
    for i in range(20):
        kpo_kernels.kalman_filter(z, cu_seqlens=cu, q=0.0 if i == 0 else 10.0 ** -(i % 9 + 1), backend=backend)
        for device, held in cache._devices.items():
            if device.type == "cpu":
                assert all(entry.table.numel() <= 64 for entry in held.lru.values())
    small = tables.TableCache(max_bytes=10_000)
    for i in range(10):
        small.get(tables.GAINS, 1000, 10.0 ** -(i + 1), 1.0, 0.0, "cpu", torch.float64)  # 1024 entries, 8 kB
        assert small.nbytes() <= 10_000
    assert small.entries() == 1


# ----------------------------------------------------------------------------- exact resets


def test_a_sequence_start_is_an_exact_reset_on_the_float64_torch_backend():
    """Finding 6: a floor of e^-36 carried 2.3e-16 x the previous state into the next packed
    sequence. Packed must equal each sequence alone to float64 rounding of its own values."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(40, generator=gen, dtype=torch.float64) * 1e10 + 1e12
    small = torch.randn(37, generator=gen, dtype=torch.float64) * 1e-6
    stream = torch.cat([big, small])
    cu = torch.tensor([0, 40, 77], dtype=torch.int32)
    for q, p0, x0 in ((1e-2, 0.0, 0.0), (1.0, 0.0, 0.3), (1e-4, math.inf, 5.0)):
        packed = kpo_kernels.kalman_filter(stream, cu_seqlens=cu, q=q, p0=p0, x0=x0, backend="torch")
        alone = kpo_kernels.kalman_filter(small[None], q=q, p0=p0, x0=x0, backend="torch")[0]
        assert_close("second sequence", packed[40:], alone, rtol=1e-15, atol=1e-15 * float(alone.abs().max()))
        # The reference's update xhat + K (z - xhat) rounds at the scale of x0 (5 eps = 1e-15).
        want = reference.kalman_filter(small[None], q=q, p0=p0, x0=x0)[0]
        assert_close("reference", alone, want, rtol=1e-12, atol=4 * 2.0**-52 * max(abs(x0), float(want.abs().max())))


def test_a_diffuse_prior_forgets_x0_exactly(backend):
    """With p0 = inf the first gain is 1: x0 must leave no trace, not 1e-16 of it."""
    z = torch.randn(2, 33, dtype=torch.float64 if backend.name == "torch" else torch.float32).to(DEVICE)
    a = kpo_kernels.kalman_filter(z, q=1e-3, p0=math.inf, x0=0.0, backend=backend)
    b = kpo_kernels.kalman_filter(z, q=1e-3, p0=math.inf, x0=1e6, backend=backend)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_masked_gradients_are_exactly_zero_after_a_non_finite_log_ratio(backend, value):
    """Finding 7: the torch backend returned NaN gradients at masked tokens of such a row."""
    batch = make_batch(3, 24, layout="holes", seed=8, device=DEVICE)
    mask = batch["mask"].cpu()
    row = 0
    col = int(mask[row].nonzero()[0])
    log_prob = batch["log_prob"].clone()
    log_prob[row, col] = value
    _, _, grad = run_loss(backend, {**batch, "log_prob": log_prob}, q=1e-2, clip=False)
    assert (grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- higher derivatives


@pytest.mark.parametrize("variant", [{"clip": False}, {"dual_clip": 2.0, "clip_low": 0.01, "clip_high": 0.01}])
def test_second_derivatives_match_the_reference(backend, variant):
    """Finding 8: create_graph=True gave a gradient without grad_fn, a zero Hessian."""
    batch = make_batch(3, 9, layout="holes", seed=4, device=DEVICE, is_weights=True)
    options = dict(q=1e-2, agg="seq-mean-token-mean", **variant)
    dtype = torch.float64 if backend.name == "torch" else torch.float32
    lp = batch["log_prob"].to(dtype)
    rest = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in batch.items() if k != "log_prob"}

    def loss_of(x):
        return kpo_kernels.kpo_loss(x, **rest, backend=backend, **options)[0]

    x = lp.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
    assert g.grad_fn is not None
    hessian = torch.autograd.functional.hessian(loss_of, lp.detach())
    ref_rest = {k: (v.double().cpu() if v is not None and v.is_floating_point() else (v.cpu() if v is not None else None)) for k, v in rest.items()}
    want = torch.autograd.functional.hessian(lambda y: reference.kpo_loss(y, **ref_rest, **options)[0], lp.detach().double().cpu())
    mask = batch["mask"].cpu().reshape(-1)
    flat_h = hessian.reshape(lp.numel(), lp.numel()).cpu().double()
    flat_w = want.reshape(lp.numel(), lp.numel())
    assert_close("hessian", flat_h, flat_w, rtol=2e-6)
    assert (flat_h[~mask] == 0).all() and (flat_h[:, ~mask] == 0).all()
    # grad of (grad . v): the Hessian-vector product, through the gradient of the gradient.
    v = torch.randn(lp.shape, dtype=dtype, device=DEVICE)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    assert_close("hvp", hv.cpu().reshape(-1), flat_w @ v.cpu().double().reshape(-1), rtol=2e-6)


def test_torch_func_grad_and_refusals(backend):
    """Finding 9: torch.func raised "must override setup_context". grad (and grad of grad) work;
    vmap and forward-mode AD are refused with a message saying what to do."""
    batch = make_batch(2, 11, layout="right", seed=6, device=DEVICE)
    rest = {k: v for k, v in batch.items() if k != "log_prob"}

    def loss_of(x):
        return kpo_kernels.kpo_loss(x, **rest, backend=backend, q=1e-2)[0]

    _, _, want = run_loss(backend, batch, q=1e-2)
    assert_close("func.grad", torch.func.grad(loss_of)(batch["log_prob"]).cpu(), want, rtol=1e-6)
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(loss_of)(batch["log_prob"][None])
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(lambda x: kpo_kernels.kalman_filter(x, backend=backend))(batch["log_prob"][None])
    with pytest.raises(NotImplementedError, match="forward mode AD .* use reverse mode"):
        torch.func.jvp(loss_of, (batch["log_prob"],), (torch.ones_like(batch["log_prob"]),))


# ----------------------------------------------------------------------------- masks


MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype, packed", grid(MASK_DTYPES, [False, True]))
def test_every_mask_dtype_in_every_kernel(dtype, packed):
    """Finding 10: bf16/fp16 masks crashed the Triton loss (Triton 3.9's interpreter). Signed
    zeros of float masks are zeros."""
    batch = make_batch(3, 40, layout="holes", seed=1, device=DEVICE)
    mask = batch["mask"]
    typed = mask.to(dtype)
    if dtype.is_floating_point:
        typed = torch.where(mask, typed, torch.tensor(-0.0, dtype=dtype, device=DEVICE))
    cu = None
    if packed:
        batch = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in batch.items()}
        batch["advantages"] = batch["advantages"][:, None]
        typed = typed.reshape(-1)
        cu = torch.tensor([0, 40, 80, 120], dtype=torch.int32, device=DEVICE)
    for impl in ("torch", triton_backend(block_size=16), triton_backend(block_size=16, tile_size=16)):
        extra = {"cu_seqlens": cu} if packed else {}
        want = run_loss(impl, {**batch, **extra}, q=1e-2)
        got = run_loss(impl, {**batch, **extra, "mask": typed}, q=1e-2)
        assert_close(f"{impl!r} loss", got[0], want[0], rtol=1e-7)
        assert_close(f"{impl!r} grad", got[2], want[2], rtol=1e-7)
        z = batch["log_prob"] - batch["old_log_prob"]
        assert_close(
            f"{impl!r} filter",
            kpo_kernels.kalman_filter(z, typed, q=1e-2, backend=impl, **extra),
            kpo_kernels.kalman_filter(z, batch["mask"], q=1e-2, backend=impl, **extra),
            rtol=1e-7,
        )


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_masks_other_than_zero_and_one_are_refused(bad, dtype):
    """Finding 16: 0.5, 2, -1 and NaN silently counted as 1."""
    if not dtype.is_floating_point and bad != int(bad) if math.isfinite(bad) else not dtype.is_floating_point:
        pytest.skip("integer masks hold only integers")
    mask = torch.ones(2, 6, dtype=dtype)
    mask[1, 3] = bad
    for call in (
        lambda: kpo_kernels.kpo_loss(torch.zeros(2, 6), torch.zeros(2, 6), torch.ones(2), mask),
        lambda: kpo_kernels.kalman_filter(torch.zeros(2, 6), mask),
    ):
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            call()


# ----------------------------------------------------------------------------- precision per dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradient_rounding_bound_per_dtype(backend, dtype):
    """Finding 11. The torch backend rounds the gradient once. The Triton backend keeps the
    per-token derivative in bfloat16 for bfloat16 inputs (half the bytes between forward and
    backward) and rounds again after scaling: at most 2 bfloat16 roundings, 2 x 2^-8 relative
    (round-to-nearest on GPUs gives half that; the interpreter truncates). float16 and float32
    keep a float32 derivative: one rounding."""
    batch = make_batch(4, 50, layout="right", seed=9, dtype=dtype, device=DEVICE, spikes=False)
    _, _, grad = run_loss(backend, batch, q=1e-2, clip=False)
    _, _, want = oracle(batch, q=1e-2, clip=False)
    eps = torch.finfo(dtype).eps  # 2^-7 for bfloat16, 2^-10 for float16, 2^-23 for float32
    roundings = 2 if backend.name == "triton" and dtype == torch.bfloat16 else 1
    # One rounding: eps / 2 to nearest, eps when truncated; plus the float32 filter and exp.
    bound = roundings * eps + 2e-6
    nonzero = want != 0
    rel = ((grad.double() - want).abs()[nonzero] / want.abs()[nonzero]).max()
    assert float(rel) <= bound, f"{dtype}: relative error {float(rel):.3e} > {bound:.3e}"


# ----------------------------------------------------------------------------- x0


def test_x0_beyond_float32_is_refused_by_triton_and_exact_on_torch():
    """Finding 12: x0 = 1e300 overflowed float32 to NaN on Triton."""
    z = torch.zeros(1, 4, dtype=torch.float64)
    got = kpo_kernels.kalman_filter(z, q=1e-6, x0=1e300, backend="torch")
    assert_close("filter", got, reference.kalman_filter(z, q=1e-6, x0=1e300), rtol=1e-12)
    with pytest.raises(ValueError, match="x0"):
        kpo_kernels.kalman_filter(z.float().to(DEVICE), x0=1e300, backend=triton_backend())
    with pytest.raises(ValueError, match="x0"):
        kpo_kernels.kpo_loss(torch.zeros(1, 4, device=DEVICE), torch.zeros(1, 4, device=DEVICE), torch.ones(1, device=DEVICE), x0=-1e39, backend=triton_backend())
    x = kpo_kernels.kalman_filter(z.float().to(DEVICE), q=1e-6, x0=3e38, backend=triton_backend())
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------- ppo_kl, counts, module


def test_ppo_kl_clamps_the_log_ratio_at_20_as_verl_does(backend):
    """Finding 13: verl's PPO losses clamp z to [-20, 20] before averaging -z."""
    lp = torch.tensor([[-30.0, 0.5, 25.0, -1.0]], device=DEVICE)
    _, metrics = kpo_kernels.kpo_loss(lp, torch.zeros_like(lp), torch.ones(1, device=DEVICE), backend=backend)
    assert_close("ppo_kl", metrics["ppo_kl"], torch.tensor((20.0 - 0.5 - 20.0 + 1.0) / 4), rtol=1e-6)
    nan = lp.clone()
    nan[0, 1] = math.nan
    _, metrics = kpo_kernels.kpo_loss(nan, torch.zeros_like(lp), torch.ones(1, device=DEVICE), backend=backend)
    assert math.isnan(float(metrics["ppo_kl"]))


@pytest.mark.parametrize("counts", [{"batch_num_tokens": 0, "agg": "token-mean"}, {"global_batch_size": 0}, {"global_batch_size": np.int64(0)}])
def test_an_empty_global_batch_gives_loss_zero(backend, counts):
    batch = make_batch(2, 8, layout="right", seed=1, device=DEVICE)
    loss, _, grad = run_loss(backend, batch, dp_size=2, **counts)
    assert float(loss) == 0.0 and (grad == 0).all()


def test_module_checks_at_construction_only_what_is_fixed_there():
    """Finding 14: KPOLoss(dp_size=2, agg="token-mean") asked for the per-step token count."""
    module = kpo_kernels.KPOLoss(dp_size=2, agg="token-mean")
    batch = make_batch(2, 8, layout="right", seed=1)
    args = (batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"])
    with pytest.raises(ValueError, match="batch_num_tokens"):
        module(*args)
    loss, _ = module(*args, batch_num_tokens=12)
    want, _ = kpo_kernels.kpo_loss(*args, dp_size=2, agg="token-mean", batch_num_tokens=12)
    assert torch.equal(loss, want)
    with pytest.raises(ValueError, match="dp_size"):
        kpo_kernels.KPOLoss(dp_size=0)


# ----------------------------------------------------------------------------- argument types


def test_numpy_scalars_of_the_right_kind_are_accepted():
    """Finding 15: clip=np.bool_(True) was "not a bool", kalman_gains(np.int64(3)) refused."""
    batch = make_batch(2, 8, layout="right", seed=1)
    args = (batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"])
    a, _ = kpo_kernels.kpo_loss(*args, clip=np.bool_(True), q=np.float32(1e-3), dp_size=np.int64(1), dual_clip=np.float64(3.0))
    b, _ = kpo_kernels.kpo_loss(*args, clip=True, q=float(np.float32(1e-3)), dp_size=1, dual_clip=3.0)
    assert torch.equal(a, b)
    assert torch.equal(kpo_kernels.kalman_gains(np.int64(3)), kpo_kernels.kalman_gains(3))
    kpo_kernels.TritonBackend(block_size=np.int64(16), tile_size=np.int32(32), num_warps=np.int64(2))


@pytest.mark.parametrize(
    "build, name, exc",
    [
        (lambda: kpo_kernels.TritonBackend(block_size=16.0), "block_size", TypeError),
        (lambda: kpo_kernels.TritonBackend(block_size=24), "block_size", ValueError),
        (lambda: kpo_kernels.TritonBackend(block_size=True), "block_size", TypeError),
        (lambda: kpo_kernels.TritonBackend(tile_size="64"), "tile_size", TypeError),
        (lambda: kpo_kernels.TritonBackend(tile_size=0), "tile_size", ValueError),
        (lambda: kpo_kernels.TritonBackend(num_warps=3), "num_warps", ValueError),
        (lambda: kpo_kernels.TritonBackend(num_warps=4.0), "num_warps", TypeError),
        (lambda: kpo_kernels.TritonBackend(poison=1), "poison", TypeError),
        (lambda: kpo_kernels.kalman_gains(np.float64(3.0)), "n", TypeError),
        (lambda: kpo_kernels.kalman_gains(True), "n", TypeError),
        (lambda: kpo_kernels.kpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), clip=np.int64(1)), "clip", TypeError),
        (lambda: kpo_kernels.kpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), q=np.bool_(True)), "q", TypeError),
        (lambda: kpo_kernels.kpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), q=torch.tensor(True)), "q", TypeError),
        (lambda: kpo_kernels.kpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), dp_size=np.bool_(True)), "dp_size", TypeError),
    ],
)
def test_wrong_kinds_are_refused_naming_the_argument(build, name, exc):
    with pytest.raises(exc, match=name):
        build()


# ----------------------------------------------------------------------------- property sweep

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def trainer_inputs(draw):
    """A batch as a trainer hands it over: layout, views, dtypes and options drawn together."""
    rows = draw(st.integers(1, 4))
    length = draw(st.sampled_from([1, 2, 15, 16, 17, 33]))
    layout = draw(st.sampled_from(["none", "right", "left", "holes", "empty_rows"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    per_token = draw(st.booleans())
    batch = make_batch(rows, length, layout=layout, seed=draw(st.integers(0, 999)), dtype=dtype, adv_per_token=per_token, is_weights=draw(st.booleans()))
    options = dict(
        q=draw(st.sampled_from([0.0, 1e-9, 1e-4, 1e-1, 10.0, 1e12])),
        p0=draw(st.sampled_from([0.0, 0.3, math.inf])),
        x0=draw(st.sampled_from([0.0, 0.05])),
        mask_mode=draw(st.sampled_from(["skip", "position"])),
        clip=draw(st.booleans()),
        dual_clip=draw(st.sampled_from([None, 3.0])),
        log_ratio_cap=draw(st.sampled_from([10.0, 0.02, None])),
        agg=draw(st.sampled_from(kpo_kernels.AGG_MODES)),
        clip_low=0.02,
        clip_high=0.03,
    )
    packed = draw(st.booleans()) and options["mask_mode"] == "skip"
    view = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    return batch, options, packed, view


def _as_view(tensor, view):
    if tensor is None or view == "contiguous" or tensor.dim() != 2:
        return tensor
    return _views(tensor)[view] if view in _views(tensor) else tensor


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trainer_inputs())
def test_property_both_backends_agree_with_the_reference(drawn):
    batch, options, packed, view = drawn
    want_loss, want_metrics, want_grad = oracle(batch, **options)
    rows, length = batch["log_prob"].shape
    dtype = batch["log_prob"].dtype
    # bf16/fp16 inputs: the result is rounded once (torch) or twice (Triton bf16) at the end.
    rtol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    data = {k: _as_view(v.to(DEVICE) if v is not None else None, view) for k, v in batch.items()}
    if packed:  # rows become packed sequences; a per-row advantage becomes (S, 1)
        data = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in data.items()}
        if data["advantages"].dim() == 1 and data["advantages"].numel() == rows and data["log_prob"].numel() != rows:
            data["advantages"] = data["advantages"][:, None]
        elif data["advantages"].dim() == 1 and data["advantages"].shape != data["log_prob"].shape:
            data["advantages"] = data["advantages"][:, None]
        data["cu_seqlens"] = torch.arange(0, rows * length + 1, length, dtype=torch.int32, device=DEVICE)
        if options["agg"] == "seq-mean-token-sum-norm":
            options = {**options, "loss_scale_factor": float(length)}  # the padded horizon
            want_loss = oracle(batch, **{k: v for k, v in options.items() if k != "loss_scale_factor"})[0]
    results = {}
    for impl in ("torch", triton_backend(block_size=16), triton_backend(block_size=16, tile_size=16)):
        if isinstance(impl, kpo_kernels.TritonBackend) and abs(options["x0"]) > 3e38:
            continue
        loss, metrics, grad = run_loss(impl, data, **options)
        results[repr(impl)] = (loss, metrics, grad)
        grad = grad.reshape(rows, length)
        # Tokens within rounding of a branch bound may take either branch.
        from helpers import near_branch_boundary

        near = near_branch_boundary(batch, width=1e-5 if dtype == torch.float32 else 1e-2, **options)
        assert_close(f"{impl!r} grad", torch.where(near, want_grad, grad.double()), want_grad, rtol=rtol)
        if int(near.sum()) == 0:
            assert_close(f"{impl!r} loss", loss, want_loss, rtol=rtol, atol=rtol * (1 + float(want_loss.abs())))
        assert torch.isfinite(loss) == torch.isfinite(want_loss)
        if batch["mask"] is not None:
            assert (grad[~batch["mask"]] == 0).all()
        assert_close(f"{impl!r} num_tokens", metrics["num_tokens"], want_metrics["num_tokens"], rtol=0)
        assert_close(f"{impl!r} ppo_kl", metrics["ppo_kl"], want_metrics["ppo_kl"], rtol=rtol, atol=rtol)


# ----------------------------------------------------------------------------- a second review


def test_the_loss_can_be_updated_in_place(backend):
    """verl's ppo_loss does `policy_loss -= entropy_coeff * entropy`: the loss must be its own
    tensor on every backend, not a view of a buffer shared with the metrics."""
    batch = make_batch(2, 8, layout="right", seed=1, device=DEVICE)
    log_prob = batch["log_prob"].clone().requires_grad_()
    loss, metrics = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], backend=backend)
    before = metrics["clipfrac"].clone()
    loss -= 0.01 * log_prob.sum()
    loss += 1.0
    loss.backward()
    assert torch.equal(metrics["clipfrac"], before) and torch.isfinite(log_prob.grad).all()


@pytest.mark.parametrize("grad_on", ["old_log_prob", "advantages", "is_weights"])
def test_inputs_other_than_log_prob_get_no_gradient_and_no_error(backend, grad_on):
    batch = make_batch(2, 8, layout="right", seed=1, device=DEVICE, is_weights=True)
    batch[grad_on] = batch[grad_on].clone().requires_grad_()
    loss, _ = kpo_kernels.kpo_loss(**batch, backend=backend)
    assert not loss.requires_grad  # log_prob needs none: nothing to differentiate
    log_prob = batch["log_prob"].clone().requires_grad_()
    loss, _ = kpo_kernels.kpo_loss(**{**batch, "log_prob": log_prob}, backend=backend)
    grads = torch.autograd.grad(loss, [log_prob, batch[grad_on]], allow_unused=True)
    assert grads[1] is None and torch.isfinite(grads[0]).all()


def test_a_diffuse_prior_has_a_first_gain_of_exactly_one():
    qs = torch.logspace(-12, 12, 400, dtype=torch.float64).tolist() + [0.3, 10.0, 0.0]
    assert all(float(kpo_kernels.kalman_gains(1, q=q, p0=math.inf)[0]) == 1.0 for q in qs)
    z = torch.tensor([[1e-20, 2e-20]], dtype=torch.float64)
    a = kpo_kernels.kalman_filter(z, q=0.3, p0=math.inf, x0=1000.0, backend="torch")
    b = kpo_kernels.kalman_filter(z, q=0.3, p0=math.inf, x0=0.0, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"q": 10**400}, "q"),
        ({"dp_size": 10**400, "global_batch_size": 2}, "dp_size"),
        ({"dp_size": 2**40, "global_batch_size": 2}, "dp_size"),
        ({"agg": "token-mean", "batch_num_tokens": 1e39}, "batch_num_tokens"),
        ({"agg": "token-mean", "batch_num_tokens": 1e-46}, "batch_num_tokens"),
        ({"global_batch_size": 1e39}, "global_batch_size"),
        ({"global_batch_size": 1e-46}, "global_batch_size"),
        ({"agg": "seq-mean-token-sum-norm", "loss_scale_factor": 1e-300}, "loss_scale_factor"),
        ({"agg": "seq-mean-token-sum-norm", "loss_scale_factor": 1e39}, "loss_scale_factor"),
    ],
)
def test_numbers_beyond_what_the_kernels_can_weigh_are_refused(kwargs, name):
    batch = make_batch(2, 8, layout="right", seed=1)
    with pytest.raises(ValueError, match=name):
        kpo_kernels.kpo_loss(**batch, **kwargs)


@pytest.mark.parametrize("clip", [{"clip_low": 1e39}, {"clip_high": 1e39}, {"clip_low": 1e308, "clip_high": 1e308}])
def test_clip_bounds_beyond_float32_never_bind_on_either_backend(backend, clip):
    batch = make_batch(3, 12, layout="holes", seed=2, device=DEVICE)
    loss, _, grad = run_loss(backend, batch, q=1e-2, **clip)
    want_loss, _, want_grad = oracle(batch, q=1e-2, **clip)
    assert_close("loss", loss, want_loss, rtol=2e-6)
    assert_close("grad", grad, want_grad, rtol=2e-6)


def test_block_sizes_beyond_tritons_limit_are_refused_at_construction():
    with pytest.raises(ValueError, match="block_size"):
        kpo_kernels.TritonBackend(block_size=2**21)

def test_forward_mode_is_refused_not_silently_zero(backend):
    """A tangent through log_prob without requires_grad must not come back as 0."""
    import torch.autograd.forward_ad as forward_ad

    batch = make_batch(2, 8, layout="right", seed=1, device=DEVICE)
    rest = {k: v for k, v in batch.items() if k != "log_prob"}
    with pytest.raises(NotImplementedError, match="forward mode AD .* use reverse mode"):
        torch.func.jvp(lambda x: kpo_kernels.kpo_loss(x, **rest, backend=backend)[0], (batch["log_prob"],), (torch.ones_like(batch["log_prob"]),))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(batch["log_prob"], torch.ones_like(batch["log_prob"]))
        with pytest.raises(NotImplementedError, match="forward mode AD .* use reverse mode"):
            kpo_kernels.kpo_loss(dual, **rest, backend=backend)
    for transform in (torch.func.jacfwd, torch.func.hessian):
        with pytest.raises(NotImplementedError, match="forward mode AD .* use reverse mode"):
            transform(lambda x: kpo_kernels.kpo_loss(x, **rest, backend=backend)[0])(batch["log_prob"])
