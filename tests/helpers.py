"""Batches that look like RL data, the float64 oracle, and comparisons."""

import itertools
import math
import os

import pytest
import torch

import reference

LAYOUTS = ("none", "right", "left", "holes", "empty_rows")


def tier():
    """The test tier conftest.py was given: 'fast', 'slow' or 'all'."""
    return os.environ.get("KPO_TEST_TIER", "all")


def examples(full):
    """max_examples for a property test: `full` in the slow and all tiers, a few in the fast one."""
    return full if tier() != "fast" else max(2, full // 8)


def grid(*axes):
    """Every combination of the axes, as pytest params for one parametrize call. The combinations
    on the diagonal (combination i takes value i mod len of each axis) cover every value of every
    axis at least once and run in every tier; the others are marked slow."""
    diagonal = {tuple(i % len(axis) for axis in axes) for i in range(max(len(axis) for axis in axes))}
    return [
        pytest.param(
            *(axis[i] for axis, i in zip(axes, index)),
            marks=() if index in diagonal else pytest.mark.slow,
            id="-".join(str(axis[i]) for axis, i in zip(axes, index)),
        )
        for index in itertools.product(*(range(len(axis)) for axis in axes))
    ]


def make_mask(batch, length, layout, generator):
    """A (B, T) bool mask, or None for layout 'none'.

    right/left: padding after/before a random-length response; holes: multi-turn responses
    whose tool-output spans are masked; empty_rows: right padding with some rows fully masked.
    """
    if layout == "none":
        return None
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    lengths[0] = length  # one full row
    pos = torch.arange(length)[None, :]
    if layout == "right":
        return pos < lengths[:, None]
    if layout == "left":
        return pos >= (length - lengths)[:, None]
    if layout == "empty_rows":
        mask = pos < lengths[:, None]
        mask[1::3] = False
        return mask
    if layout == "holes":
        mask = pos < lengths[:, None]
        for row in range(batch):
            for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
                start = int(torch.randint(0, max(length, 1), (1,), generator=generator))
                width = int(torch.randint(1, max(2, length // 4), (1,), generator=generator))
                mask[row, start : start + width] = False
        return mask
    raise ValueError(layout)


def make_batch(
    batch,
    length,
    *,
    layout="right",
    seed=0,
    dtype=torch.float32,
    device="cpu",
    adv_per_token=False,
    is_weights=False,
    noise=0.05,
    spikes=True,
    garbage=True,
):
    """Synthetic off-policy RL batch. Masked positions hold NaN/inf garbage when `garbage`."""
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(batch, length, layout, gen)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    drift = torch.randn(batch, 1, generator=gen, dtype=torch.float64) * noise * 0.2
    log_ratio = drift + torch.randn(batch, length, generator=gen, dtype=torch.float64) * noise
    if spikes:  # Occasional large per-token ratios, as stale or low-probability tokens produce.
        spike = torch.rand(batch, length, generator=gen) < 0.02
        log_ratio = log_ratio + spike * torch.randn(batch, length, generator=gen, dtype=torch.float64) * 2
    new = old + log_ratio
    if adv_per_token:
        adv = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    else:
        adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    weights = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 2 if is_weights else None
    if garbage and mask is not None:
        pattern = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=torch.float64)
        fill = pattern[torch.arange(batch * length) % 4].view(batch, length)
        new = torch.where(mask, new, fill)
        old = torch.where(mask, old, fill.roll(1))
        if adv_per_token:
            adv = torch.where(mask, adv, fill.roll(2))
        if weights is not None:
            weights = torch.where(mask, weights, fill.roll(3))
    out = {
        "log_prob": new.to(dtype).to(device),
        "old_log_prob": old.to(dtype).to(device),
        "advantages": adv.to(dtype).to(device),
        "mask": None if mask is None else mask.to(device),
    }
    if weights is not None:
        out["is_weights"] = weights.to(dtype).to(device)
    return out


def as_float64(batch):
    return {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in batch.items()}


def oracle(batch, **options):
    """(loss, metrics, gradient) of the sequential float64 reference on the same inputs."""
    data = {k: (v.detach().cpu() if v is not None else None) for k, v in as_float64(batch).items()}
    log_prob = data.pop("log_prob").requires_grad_()
    loss, metrics = reference.kpo_loss(log_prob, **data, **options)
    (grad,) = torch.autograd.grad(loss, log_prob)
    metrics = {k: v.detach() for k, v in metrics.items()}
    diagnostic_options = {k: options[k] for k in DIAGNOSTIC_OPTIONS if k in options}
    metrics.update(
        reference.diagnostics(log_prob.detach(), data["old_log_prob"], data["advantages"], data["mask"], **diagnostic_options)
    )
    return loss.detach(), metrics, grad


# The options of kpo_loss that the diagnostics (reference.diagnostics) depend on.
DIAGNOSTIC_OPTIONS = ("q", "r", "p0", "x0", "mask_mode", "clip", "clip_low", "clip_high", "log_ratio_cap")
# Metrics that count tokens on either side of a branch bound or of 0 (see near_branch_boundary,
# near_zero_filtered): a float32 backend may count such a token differently and be right.
BRANCH_COUNTS = ("clipfrac", "clipfrac_lower", "clipfrac_high", "clipfrac_low", "capfrac")


def near_zero_filtered(batch, width=1e-6, **options):
    """Valid tokens whose float64 filtered log-ratio is within `width` of 0: the sign a float32
    backend sees there may differ (each such token is in at most 2 sign-flip pairs)."""
    data = as_float64(batch)
    valid = data["mask"].cpu() if data["mask"] is not None else torch.ones(data["log_prob"].shape, dtype=torch.bool)
    z = torch.where(valid, data["log_prob"].cpu() - data["old_log_prob"].cpu(), 0.0)
    filter_opts = {k: options[k] for k in ("q", "r", "p0", "x0", "mask_mode") if k in options}
    return (reference.kalman_filter(z, valid, **filter_opts).abs() < width) & valid


def run_loss(impl, batch, **options):
    """(loss, metrics, gradient) of kpo_kernels with backend `impl`, moved to the CPU."""
    import kpo_kernels

    log_prob = batch["log_prob"].detach().clone().requires_grad_()
    rest = {k: v for k, v in batch.items() if k != "log_prob"}
    loss, metrics = kpo_kernels.kpo_loss(log_prob, **rest, backend=impl, **options)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, grad.cpu()


def assert_close(name, actual, expected, rtol, atol=None):
    """Elementwise |actual - expected| <= atol + rtol |expected|; NaN and +-inf exactly where
    expected.

    atol defaults to rtol times the largest |expected| (errors relative to the data's scale).
    """
    actual = torch.as_tensor(actual, dtype=None if isinstance(actual, torch.Tensor) else torch.float64).detach().cpu().double()
    expected = torch.as_tensor(expected, dtype=None if isinstance(expected, torch.Tensor) else torch.float64).detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at {nan_a.sum()} positions, expected at {nan_e.sum()}"
    inf_e = torch.isinf(expected)
    assert torch.equal(actual[inf_e], expected[inf_e]), f"{name}: infinities differ"
    finite = ~nan_e & ~inf_e
    a, e = actual[finite], expected[finite]
    if e.numel() == 0:
        return
    if atol is None:
        atol = rtol * float(e.abs().max())
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: max error {float(err.max()):.3e}; worst element {float(a[worst])!r} vs "
        f"{float(e[worst])!r} (bound {float(bound[worst]):.3e})"
    )


def near_branch_boundary(batch, width=1e-6, **options):
    """Tokens whose float64 filtered log-ratio is within `width` of a branch bound (cap, clip,
    dual clip): a float32 backend may take the other branch there and be right to rounding."""
    data = as_float64(batch)
    valid = data["mask"].cpu() if data["mask"] is not None else torch.ones(data["log_prob"].shape, dtype=torch.bool)
    z = torch.where(valid, data["log_prob"].cpu() - data["old_log_prob"].cpu(), 0.0)
    filter_opts = {k: options[k] for k in ("q", "r", "p0", "x0", "mask_mode") if k in options}
    x = reference.kalman_filter(z, valid, **filter_opts)
    bounds = [options.get("log_ratio_cap", 10.0)]
    if options.get("clip", True):
        bounds += [math.log1p(-min(options.get("clip_low", 3e-4), 1 - 1e-300)), math.log1p(options.get("clip_high", 4e-4))]
    if options.get("dual_clip") is not None:
        bounds.append(math.log(options["dual_clip"]))
    near = torch.zeros_like(valid)
    for bound in bounds:
        if bound is not None and math.isfinite(bound):
            near |= (x - bound).abs() < width
    return near & valid
