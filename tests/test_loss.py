"""kpo_loss: value, gradient and metrics on both backends against the float64 reference."""

import math

import pytest
import torch

import kpo_kernels
from conftest import DEVICE, SMALL_BLOCK, triton_backend
from helpers import (
    BRANCH_COUNTS,
    LAYOUTS,
    as_float64,
    assert_close,
    grid,
    make_batch,
    near_branch_boundary,
    near_zero_filtered,
    oracle,
    run_loss,
)

AGGS = kpo_kernels.AGG_MODES
VARIANTS = {
    "default": {},
    "unclipped": {"clip": False},
    "dual_clip": {"dual_clip": 3.0, "clip_low": 0.2, "clip_high": 0.28},
    "wide_clip_q": {"q": 1e-2, "clip_low": 0.2, "clip_high": 0.3},
    "small_cap": {"q": 1.0, "log_ratio_cap": 0.02, "clip": False},
    "no_cap_position": {"q": 1e-3, "log_ratio_cap": None, "mask_mode": "position"},
    "prior": {"q": 1e-4, "p0": 0.5, "x0": 0.01, "r": 2.0},
}


def loss_scale(batch, **options):
    """Size of the terms the loss sums (the loss with |A|): float32 rounding is relative to it."""
    positive = {**batch, "advantages": batch["advantages"].abs()}
    return float(oracle(positive, **options)[0].abs())


def check_against_oracle(impl, batch, rtol, **options):
    loss, metrics, grad = run_loss(impl, batch, **options)
    want_loss, want_metrics, want_grad = oracle(batch, **options)
    near = near_branch_boundary(batch, **options)
    valid_tokens = max(1, int(want_metrics["num_tokens"]))
    # Near a bound the branch taken may differ by rounding; everything else must match.
    grad_ok = torch.where(near, want_grad, grad.double())
    assert_close("grad", grad_ok, want_grad, rtol=rtol)
    slack = int(near.sum())
    assert_close("loss", loss, want_loss, rtol=rtol, atol=rtol * loss_scale(batch, **options) + slack * 1e-6)
    pairs = max(1, int(want_metrics["sign_flip_pairs"]))
    flip_slack = 2 * int(near_zero_filtered(batch, **options).sum()) / pairs
    for name in kpo_kernels.METRIC_NAMES:
        tol = rtol
        if name in BRANCH_COUNTS:
            tol = slack / valid_tokens + 1e-7
        elif name == "sign_flip_filtered":
            tol = flip_slack + 1e-7
        assert_close(name, metrics[name], want_metrics[name], rtol=rtol, atol=tol * (1 + float(want_metrics[name].abs())))
    assert grad.dtype == batch["log_prob"].dtype
    if batch["mask"] is not None:
        assert (grad[~batch["mask"].cpu()] == 0).all()
    return loss, metrics, grad


@pytest.mark.parametrize("agg, variant", grid(AGGS, list(VARIANTS)))
def test_options_and_aggregations(backend, agg, variant):
    batch = make_batch(6, 37, layout="holes", seed=list(VARIANTS).index(variant), device=DEVICE)
    check_against_oracle(backend, batch, rtol=2e-6, agg=agg, **VARIANTS[variant])


@pytest.mark.parametrize("length, layout", grid([1, 2, SMALL_BLOCK - 1, SMALL_BLOCK, SMALL_BLOCK + 1, 50], LAYOUTS))
def test_shapes_and_layouts(backend, length, layout):
    batch = make_batch(5, length, layout=layout, seed=length, device=DEVICE, adv_per_token=length % 2 == 0)
    check_against_oracle(backend, batch, rtol=2e-6, q=1e-2, dual_clip=2.0)


@pytest.mark.parametrize("layout, tile, variant", [
    ("holes", None, "default"), ("holes", 256, "dual_clip"), ("right", 256, "small_cap"), ("left", None, "prior"),
    ("holes", None, "basic"),
])
def test_statistics_summed_per_thread_first(layout, tile, variant):
    """Blocks of 8 tokens a thread, as the wide blocks: each thread sums its run of tokens
    before its statistics take them (RUN), whole rows and tiles, with empty rows, a NaN at a
    valid token in one row of a copy: the oracle's loss, metrics and gradient, and NaN where
    the sums and maxima hold it."""
    impl = triton_backend(block_size=256, num_warps=1, tile_size=tile)
    assert impl._warps(256) == 1  # 256 / 32: 8 a thread
    batch = make_batch(6, 600, layout=layout, seed=31, device=DEVICE, adv_per_token=True, is_weights=True)
    batch["mask"] = batch["mask"].clone()
    batch["mask"][2] = False  # a row, and in tiles of 256 its tiles, without a valid token
    if variant == "basic":  # the oracle computes every metric: the torch backend's basic ones
        options = {"metrics": "basic"}
        (loss, metrics, grad), want = run_loss(impl, batch, **options), run_loss(kpo_kernels.TorchBackend(), batch, **options)
        assert_close("loss", loss, want[0], rtol=1e-5, atol=1e-7)
        assert_close("grad", grad, want[2], rtol=1e-5, atol=1e-9)
        assert set(metrics) == set(want[1])
        for name in want[1]:
            assert_close(name, metrics[name], want[1][name], rtol=1e-5, atol=1e-6)
    else:
        options = VARIANTS[variant]
        check_against_oracle(impl, batch, rtol=2e-6, **options)
    poisoned = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    valid = poisoned["mask"][4].nonzero()[-1].item()
    poisoned["old_log_prob"][4, valid] = math.nan  # the last valid token of row 4
    loss, metrics, _ = run_loss(impl, poisoned, **options)
    assert torch.isnan(loss)
    for name in ("ppo_kl", "ratio_mean", "ratio_max", "raw_ratio_mean", "raw_ratio_max"):
        assert torch.isnan(metrics[name]), name


@pytest.mark.parametrize("length, tile", [(175, None), (191, 32), (175, 160), (335, 160)])
def test_unaligned_rows_whose_last_block_reaches_back(length, tile, monkeypatch):
    """Padded rows of T % 16 != 0 whose last block takes a step more for FLAT's reach-back
    (T % block + 15 > block), on tiles of enough steps that the launcher takes FLAT all the
    same (10 at these 16-token blocks of 1 warp): whole rows, and tiles of 10 blocks whose
    last holds the extra step; tiles of 2 blocks keep the unaligned layout. Holes, per-token
    advantages and weights, every metric."""
    import kpo_kernels.backends.triton_backend as launcher

    chosen = []
    real = launcher.flat_layout
    monkeypatch.setattr(launcher, "flat_layout", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    impl = triton_backend(tile_size=tile)
    assert length % SMALL_BLOCK + 15 > SMALL_BLOCK and impl._warps(SMALL_BLOCK) == 1
    batch = make_batch(6, length, layout="holes", seed=length, device=DEVICE, adv_per_token=True, is_weights=True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        check_against_oracle(impl, batch, rtol=2e-6, agg=agg, q=1e-3, dual_clip=3.0)
    assert chosen and all(flat == (tile != 32) for flat in chosen), chosen  # what the launches took


@pytest.mark.parametrize("agg", AGGS)
def test_per_token_advantages_and_is_weights(backend, agg):
    batch = make_batch(5, 40, layout="holes", seed=11, device=DEVICE, adv_per_token=True, is_weights=True)
    check_against_oracle(backend, batch, rtol=2e-6, agg=agg, q=1e-3, dual_clip=3.0)


@pytest.mark.parametrize("q", [1e-10, 1e-6, 1e-2, 30.0, 1e8])
@pytest.mark.parametrize("mask_mode", ["skip", "position"])
def test_noise_ratios(backend, q, mask_mode):
    batch = make_batch(4, 33, layout="holes", seed=3, device=DEVICE)
    check_against_oracle(backend, batch, rtol=2e-6, q=q, mask_mode=mask_mode, clip_low=0.2, clip_high=0.2)


@pytest.mark.parametrize(
    "counts",
    [
        {"dp_size": 4, "batch_num_tokens": 1000, "global_batch_size": 32},
        {"dp_size": 2, "batch_num_tokens": 77.0, "global_batch_size": 9, "loss_scale_factor": 512},
        {"loss_scale_factor": 100},
    ],
)
@pytest.mark.parametrize("agg", AGGS)
def test_global_batch_counts(backend, counts, agg):
    batch = make_batch(4, 21, layout="empty_rows", seed=5, device=DEVICE)
    check_against_oracle(backend, batch, rtol=2e-6, agg=agg, **counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    """bf16/fp16 inputs: the rounded inputs are the data; math in fp32; grad in the input dtype."""
    batch = make_batch(5, 40, layout="holes", seed=7, device=DEVICE, dtype=dtype, is_weights=True)
    loss, metrics, grad = run_loss(backend, batch, q=1e-2, clip_low=0.2, clip_high=0.2)
    want_loss, want_metrics, want_grad = oracle(batch, q=1e-2, clip_low=0.2, clip_high=0.2)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    near = near_branch_boundary(batch, q=1e-2, clip_low=0.2, clip_high=0.2)
    assert_close("loss", loss, want_loss, rtol=1e-5)
    # The gradient is rounded once to the input dtype.
    assert_close("grad", torch.where(near, want_grad, grad.double()), want_grad, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert_close("ratio_mean", metrics["ratio_mean"], want_metrics["ratio_mean"], rtol=1e-5)


def test_float64_on_torch_backend_is_float64_exact():
    batch = make_batch(5, 60, layout="holes", seed=8, dtype=torch.float64, adv_per_token=True, is_weights=True)
    loss, metrics, grad = run_loss("torch", batch, q=1e-3, dual_clip=3.0, agg="token-mean")
    want_loss, want_metrics, want_grad = oracle(batch, q=1e-3, dual_clip=3.0, agg="token-mean")
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close("loss", loss, want_loss, rtol=1e-12)
    assert_close("grad", grad, want_grad, rtol=1e-12)
    for name in kpo_kernels.METRIC_NAMES:
        assert_close(name, metrics[name], want_metrics[name], rtol=1e-12)


def vanilla_ppo_loss(batch, agg, clip_low, clip_high, dual_clip):
    """verl's `vanilla` token-ratio PPO-clip loss (with dual clip), float64, autograd."""
    data = as_float64({k: v.cpu() if v is not None else None for k, v in batch.items()})
    log_prob = data["log_prob"].requires_grad_()
    mask = data["mask"]
    adv = data["advantages"][:, None].expand_as(log_prob)
    ratio = torch.exp(torch.clamp(log_prob - data["old_log_prob"], -20, 20))
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    lower = torch.min(-adv * dual_clip, clipped)
    token_loss = torch.where(adv < 0, lower, clipped)
    import reference

    loss = reference.aggregate(token_loss, mask, agg)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad


@pytest.mark.parametrize("agg", AGGS)
def test_huge_q_is_the_token_ratio_ppo_loss(backend, agg):
    """q = 1e8 makes K = 1: KPO reduces to GRPO's token-ratio PPO-clip loss (verl `vanilla`)."""
    batch = make_batch(5, 30, layout="right", seed=9, device=DEVICE, spikes=False, garbage=False)
    opts = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}
    loss, _, grad = run_loss(backend, batch, q=1e8, agg=agg, **opts)
    want_loss, want_grad = vanilla_ppo_loss(batch, agg, **opts)
    assert_close("loss", loss, want_loss, rtol=1e-5)
    assert_close("grad", grad, want_grad, rtol=1e-5)


def test_position_equals_skip_on_right_padding(backend):
    batch = make_batch(6, 40, layout="right", seed=10, device=DEVICE)
    a = run_loss(backend, batch, q=1e-2, mask_mode="skip")
    b = run_loss(backend, batch, q=1e-2, mask_mode="position")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)


def test_garbage_under_the_mask_changes_nothing(backend):
    dirty = make_batch(5, 37, layout="holes", seed=12, device=DEVICE, adv_per_token=True, is_weights=True)
    clean = {k: (v.masked_fill(~dirty["mask"], 0.0) if v is not None and v.dim() == 2 and k != "mask" else v) for k, v in dirty.items()}
    assert torch.isnan(dirty["log_prob"]).any() and torch.isinf(dirty["old_log_prob"]).any()
    a = run_loss(backend, dirty, q=1e-2, dual_clip=3.0)
    b = run_loss(backend, clean, q=1e-2, dual_clip=3.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    for name in kpo_kernels.METRIC_NAMES:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize("where", ["log_prob", "old_log_prob", "advantages", "is_weights"])
def test_nan_at_a_valid_token_is_never_hidden(backend, where):
    batch = make_batch(4, 30, layout="right", seed=13, device=DEVICE, is_weights=True, adv_per_token=True)
    batch[where] = batch[where].clone()
    batch[where][0, 3] = math.nan  # row 0 is full: token 3 is valid
    loss, metrics, _ = run_loss(backend, batch, dual_clip=3.0)
    assert torch.isnan(loss)
    if where in ("log_prob", "old_log_prob"):
        for name in ("ppo_kl", "ratio_mean", "ratio_max", "raw_ratio_mean", "raw_ratio_max"):
            assert torch.isnan(metrics[name]), name


@pytest.mark.parametrize("layout", ["holes", "right"])
def test_maxima_below_one_with_empty_rows(backend, layout):
    """Every valid ratio below 1 and two rows without a valid token: the maxima are the largest
    valid ratios, whatever masked tokens and empty rows or tiles hold (neither 0 nor 1)."""
    batch = make_batch(6, 37, layout=layout, seed=21, device=DEVICE)
    gen = torch.Generator().manual_seed(21)
    shift = (0.5 + torch.rand(batch["mask"].shape, generator=gen)).to(DEVICE)
    batch["log_prob"] = batch["old_log_prob"].nan_to_num(0.0, 0.0, 0.0) - shift  # z in (-1.5, -0.5] where valid
    batch["mask"] = batch["mask"].clone()
    batch["mask"][[1, 4]] = False
    loss, metrics, grad = run_loss(backend, batch, q=1e-2)
    valid = batch["mask"].cpu()
    z = (batch["log_prob"] - batch["old_log_prob"]).cpu()[valid].double()
    raw_max = float(metrics["raw_ratio_max"])
    assert raw_max == pytest.approx(float(z.exp().max()), rel=1e-6) and raw_max < 1.0
    want = run_loss(kpo_kernels.TorchBackend(), {k: v.cpu() if v is not None else v for k, v in batch.items()}, q=1e-2)
    assert float(metrics["ratio_max"]) == pytest.approx(float(want[1]["ratio_max"]), rel=1e-6)
    assert float(metrics["ratio_max"]) < 1.0
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))


def test_inputs_are_not_modified(backend):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        if dtype == torch.float64 and not isinstance(backend, kpo_kernels.TorchBackend):
            continue
        batch = make_batch(4, 25, layout="holes", seed=14, device=DEVICE, dtype=dtype, adv_per_token=True, is_weights=True)
        before = {k: v.clone() for k, v in batch.items() if v is not None}
        log_prob = batch["log_prob"].requires_grad_()
        loss, _ = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], is_weights=batch["is_weights"], backend=backend)
        loss.backward()
        for k, v in before.items():
            now = batch[k].detach()
            assert torch.equal(now.isnan(), v.isnan()) and torch.equal(now.nan_to_num(), v.nan_to_num()), k


def test_fully_masked_batch(backend):
    batch = make_batch(3, 20, layout="right", seed=15, device=DEVICE)
    batch["mask"] = torch.zeros_like(batch["mask"])
    for agg in AGGS:
        loss, metrics, grad = run_loss(backend, batch, agg=agg)
        assert float(loss) == 0.0 and (grad == 0).all()
        assert all(float(v) == 0.0 for v in metrics.values())


def test_backward_scales_with_grad_output_and_retains(backend):
    batch = make_batch(4, 30, layout="holes", seed=16, device=DEVICE)
    log_prob = batch["log_prob"].clone().requires_grad_()
    loss, _ = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], backend=backend)
    (g1,) = torch.autograd.grad(loss, log_prob, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, log_prob, retain_graph=True)
    (g1_again,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(g3, 3 * g1)
    assert torch.equal(g1, g1_again)


def test_no_gradient_work_without_requires_grad(backend):
    batch = make_batch(4, 30, layout="holes", seed=17, device=DEVICE)
    loss, metrics = kpo_kernels.kpo_loss(**batch, backend=backend)
    assert loss.grad_fn is None and not loss.requires_grad
    result = backend.loss_forward(
        kpo_kernels.validation.check_token_batch(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], None),
        kpo_kernels.validation.check_loss_options(
            q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=3e-4, clip_high=4e-4,
            dual_clip=None, log_ratio_cap=10.0, agg="token-mean", dp_size=1, batch_num_tokens=None,
            global_batch_size=None, loss_scale_factor=None,
        ),
        need_grad=False,
    )
    assert result.grad is None
    assert torch.isclose(result.loss.float().cpu(), kpo_kernels.kpo_loss(**batch, agg="token-mean", backend=backend)[0].cpu())


def test_advantages_shapes_agree(backend):
    batch = make_batch(4, 30, layout="right", seed=18, device=DEVICE)
    per_row = run_loss(backend, batch)
    column = run_loss(backend, {**batch, "advantages": batch["advantages"][:, None]})
    per_token = run_loss(backend, {**batch, "advantages": batch["advantages"][:, None].expand(4, 30)})
    for other in (column, per_token):
        torch.testing.assert_close(other[0], per_row[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(other[2], per_row[2], rtol=1e-6, atol=0)


def test_metric_names_and_types(backend):
    batch = make_batch(3, 20, seed=19, device=DEVICE)
    loss, metrics = kpo_kernels.kpo_loss(**batch, backend=backend)
    for name in ("clipfrac", "ppo_kl", "ratio_mean", "raw_ratio_mean", "raw_ratio_max"):
        assert name in metrics
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad and value.device == loss.device
    assert loss.dim() == 0 and loss.dtype == torch.float32


def test_module_matches_function(backend):
    batch = make_batch(4, 30, layout="holes", seed=20, device=DEVICE)
    module = kpo_kernels.KPOLoss(q=1e-3, agg="token-mean", dual_clip=3.0, backend=backend)
    assert "q=0.001" in repr(module)
    a = run_loss(backend, batch, q=1e-3, agg="token-mean", dual_clip=3.0)
    log_prob = batch["log_prob"].clone().requires_grad_()
    loss, metrics = module(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"])
    assert torch.equal(loss.detach().cpu(), a[0])
    loss_override, _ = module(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], agg="token-sum")
    assert torch.equal(loss_override.detach().cpu(), run_loss(backend, batch, q=1e-3, agg="token-sum", dual_clip=3.0)[0])


def test_default_block_sizes_on_triton():
    """The launcher's own block choice (one block per row or several) gives the same result."""
    batch = make_batch(3, 700, layout="holes", seed=21, device=DEVICE)
    default = run_loss(triton_backend(block_size=None), batch, q=1e-3)
    small = run_loss(triton_backend(block_size=64), batch, q=1e-3)
    torch.testing.assert_close(default[0], small[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(default[2], small[2], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_counts_given_as_device_tensors(backend, agg):
    """Global counts may stay on the device (read by the kernels, no host sync). CPU tensors are
    read on the host by the checks, so this drives the backends directly."""
    import dataclasses

    from kpo_kernels.validation import check_loss_options, check_token_batch

    batch = make_batch(4, 30, layout="holes", seed=22, device=DEVICE)
    checked = check_token_batch(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], None)
    options = check_loss_options(
        q=1e-3, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=0.1, clip_high=0.1, dual_clip=None,
        log_ratio_cap=10.0, agg=agg, dp_size=2, batch_num_tokens=250, global_batch_size=9, loss_scale_factor=None,
    )
    as_numbers = backend.loss_forward(checked, options, need_grad=True)
    tensors = dataclasses.replace(
        options,
        batch_num_tokens=torch.tensor(250, device=DEVICE),
        global_batch_size=torch.tensor(9.0, dtype=torch.float64, device=DEVICE),
    )
    as_tensors = backend.loss_forward(checked, tensors, need_grad=True)
    assert torch.equal(as_numbers.loss, as_tensors.loss)
    assert torch.equal(as_numbers.row_scale, as_tensors.row_scale)
