"""The float64 yardstick and the error columns: is an implementation right on a batch?

1. The yardstick, in float64: the filter by a float64 sequential recursion on the CPU
   (`baselines.float64_filter`, numpy, vectorized over rows, bitwise equal to the sequential
   reference's `kalman_filter` in float64), and loss, metrics and gradient from the sequential
   reference's `kpo_loss` (`kpo_kernels._reference`, the repository's `reference/`) on float64
   inputs, on the batch's device, with that recursion as its filter: the same definition minus
   its per-token Python loop, so that T = 131072 is affordable. Nothing in it comes from the
   package's backends. `reference_agrees` checks that the reference's own filter gives the
   recursion's values.
2. Errors of each implementation against it:
   - err_filter: max |x - x64| / max |x64| over valid tokens (x: the filtered log-ratio);
   - err_loss: |loss - loss64| / max(|loss64|, aggregated |advantage|) (a GRPO loss is near 0,
     its advantages summing to 0 per group, so it is measured on the scale of its terms);
   - err_grad: max |g - g64| / max |g64| over tokens, where the float64 filtered log-ratio is
     not within FILTER_TOL * max |x64| of a branch bound (clip bounds, cap): at those "ties"
     float32 cannot decide the branch and either gradient is right; their count is grad_ties.
     Implementations that clip the ratio exp(x) in float32 (`sequential-reference`, the
     reference evaluated in the case's float32, and `vectorized-cumsum`) also tie within
     RATIO_TIE_WINDOW of a clip bound: there -A exp(x) and -A (1 +- clip) round to the same
     float32 number, and torch.maximum gives each term half the gradient. (At 8 x 512, seed 0,
     one token 7.6e-8 below log(1 - 3e-4) made the reference's err_grad 8.3e-2 before these
     ties were counted: its gradient there is exactly half of float64's.) The reference in
     float64 is the yardstick itself;
   - err_metrics (this package and the reference only): the worst metric error, fractions in
     absolute terms (less ties / tokens), ppo_kl relative to mean |z|, the others relative.
   NaN anywhere gives a NaN error. `grpo-eager` computes a different loss: its errors are None.
"""

import math
from dataclasses import dataclass
from unittest import mock

import torch

import kpo_kernels
from kpo_kernels import _reference as reference
from kpo_kernels._reference import loss as reference_loss

from . import baselines
from .cases import DTYPES
from .implementations import DEFAULT, IMPLEMENTATIONS, filtered, forward_backward

FILTER_TOL = 1e-5
LOSS_TOL = 1e-5
METRIC_TOL = 1e-5
YARDSTICK = "float64 recursion (filter) + reference/ loss in float64"
# |x - log(1 +- clip)| within which float32 cannot order -A exp(x) and -A (1 +- clip): exp's
# rounding (1 unit), the bound's (1/2), the two products' (1/2 each), with a margin.
RATIO_TIE_WINDOW = 4 * torch.finfo(torch.float32).eps


def grad_tol(dtype):
    """Gradients come back in the input dtype: float32 to 1e-5, 16-bit to one unit of rounding."""
    return max(1e-5, torch.finfo(dtype).eps)


@dataclass
class Yardstick:
    valid: torch.Tensor  # (B, T) bool, CPU
    x: torch.Tensor  # filtered log-ratio, float64
    loss: float
    loss_scale: float
    grad: torch.Tensor  # d loss / d log_prob, float64
    metrics: dict
    ties: torch.Tensor  # (B, T) bool: x within the filter tolerance of a branch bound
    ratio_ties: torch.Tensor  # ties, and x within RATIO_TIE_WINDOW of a clip bound
    mean_abs_z: float


def yardstick(batch, settings=DEFAULT):
    """float64 filter, loss, gradient and metrics of a batch (module docstring, item 1).

    The filter runs on the CPU (numpy); the reference's loss runs in float64 on the batch's
    device (elementwise and cheap there); everything is returned on the CPU.
    """
    valid_device = batch["mask"].detach().bool()
    new, old, adv = (batch[k].detach().double() for k in ("log_prob", "old_log_prob", "advantages"))
    filtered_states = []

    def recursion_filter(z, mask=None, *, q, r=1.0, p0=0.0, x0=0.0, mask_mode="skip"):
        """The reference's `kalman_filter` signature, computed by the float64 recursion."""
        x = baselines.float64_filter(z, mask, q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
        filtered_states.append(x)
        return x.to(z.device, z.dtype)

    log_prob = new.clone().requires_grad_()
    with mock.patch.object(reference_loss, "kalman_filter", recursion_filter):
        loss, metrics = reference.kpo_loss(
            log_prob, old, adv, valid_device, q=settings.q, clip_low=settings.clip_low,
            clip_high=settings.clip_high, agg=settings.agg, log_ratio_cap=settings.log_ratio_cap,
        )
    loss.backward()
    (x,) = filtered_states
    abs_adv = adv.abs()[:, None].expand(valid_device.shape) if adv.dim() == 1 else adv.abs()
    scale = reference.aggregate(abs_adv, valid_device, settings.agg)
    valid = valid_device.cpu()
    z = torch.where(valid, new.cpu() - old.cpu(), 0.0)
    scale_x = float(x[valid].abs().max()) if bool(valid.any()) else 0.0
    window = FILTER_TOL * scale_x
    bounds = [math.log1p(-settings.clip_low), math.log1p(settings.clip_high), settings.log_ratio_cap]
    ties = torch.zeros_like(valid)
    for bound in bounds:
        ties |= (x - bound).abs() <= window
    ties &= valid
    ratio_ties = ties.clone()
    for bound in bounds[:2]:
        ratio_ties |= ((x - bound).abs() <= RATIO_TIE_WINDOW) & valid
    return Yardstick(
        valid=valid,
        x=x,
        loss=float(loss.detach()),
        loss_scale=float(scale),
        grad=log_prob.grad.detach().cpu(),
        metrics={k: _value(v) for k, v in metrics.items()},
        ties=ties,
        ratio_ties=ratio_ties,
        mean_abs_z=float(z[valid].abs().mean()) if bool(valid.any()) else 0.0,
    )


def reference_agrees(batch, yard, settings=DEFAULT, max_length=4096):
    """max |reference kalman_filter (float64, its Python loop) - float64 recursion| on a prefix."""
    length = min(batch["mask"].shape[-1], max_length)
    cpu = {k: v.detach().to("cpu") for k, v in batch.items()}
    z = (cpu["log_prob"].double() - cpu["old_log_prob"].double())[:, :length]
    x = reference.kalman_filter(z, cpu["mask"][:, :length], q=settings.q)
    return float((x - yard.x[:, :length]).abs().max()), length


def _value(metric):
    """A metric (a 0-dim tensor, or a float) as a Python float, without autograd's involvement."""
    return float(metric.detach()) if isinstance(metric, torch.Tensor) else float(metric)


def _rel(diff, scale):
    diff = float(diff)
    return diff / scale if scale > 0 else diff


def _metric_error(name, got, want, yard, tokens, ties):
    if name in ("clipfrac", "clipfrac_lower"):  # fractions: absolute, less the tie tokens
        return max(0.0, abs(got - want) - int(ties.sum()) / max(tokens, 1)) if math.isfinite(got) else math.nan
    if name == "ppo_kl":
        return _rel(abs(got - want), yard.mean_abs_z)
    return _rel(abs(got - want), abs(want))


NO_ERRORS = dict(err_filter=None, err_loss=None, err_grad=None, err_metrics=None, worst_metric=None, grad_ties=None)


def measure_errors(name, batch, yard, settings=DEFAULT):
    """err_filter, err_loss, err_grad, err_metrics, grad_ties of `name` against the yardstick."""
    impl = IMPLEMENTATIONS[name]
    if impl.run is None or impl.filter is None:  # copy, grpo-eager: not this loss
        return dict(NO_ERRORS)
    loss, metrics, grad = forward_backward(name, batch, settings)
    x = filtered(name, batch, settings)
    with_metrics = name == "sequential-reference" or impl.kpo
    ties = yard.ratio_ties if impl.clips_float32_ratio else yard.ties
    return errors_against(yard, loss, grad, x, metrics if with_metrics else None, ties=ties)


def errors_against(yard, loss, grad, x=None, metrics=None, ties=None):
    """The error columns (module docstring, item 2) of one result against the yardstick; ties:
    the tokens left out of err_grad (default yard.ties)."""
    valid = yard.valid
    ties = yard.ties if ties is None else ties
    out = dict(err_filter=None, err_metrics=None, worst_metric=None, grad_ties=int(ties.sum()))
    out["err_loss"] = _rel(abs(float(loss.detach()) - yard.loss), max(abs(yard.loss), yard.loss_scale))

    grad = grad.detach().to("cpu", torch.float64)
    diff = (grad - yard.grad).abs()
    diff = torch.where(ties & torch.isfinite(diff), 0.0, diff)
    out["err_grad"] = _rel(diff.max(), float(yard.grad.abs().max())) if diff.numel() else 0.0

    if x is not None:
        x = x.detach().to("cpu", torch.float64)
        scale = float(yard.x[valid].abs().max()) if bool(valid.any()) else 0.0
        out["err_filter"] = _rel((x - yard.x)[valid].abs().max(), scale) if bool(valid.any()) else 0.0
    if metrics is not None:
        tokens = int(valid.sum())
        errors = {
            k: _metric_error(k, _value(metrics[k]), yard.metrics[k], yard, tokens, ties)
            for k in kpo_kernels.METRIC_NAMES
            # The diagnostics (nis_mean, sign flips, ...) have their own float64 oracle,
            # reference.diagnostics, in tests/test_diagnostics.py; too slow for long rows here.
            if k in metrics and k in yard.metrics
        }
        worst = max(errors, key=lambda k: math.inf if math.isnan(errors[k]) else errors[k])
        out["err_metrics"], out["worst_metric"] = errors[worst], worst
    return out


def _limits(row):
    return {
        "err_filter": FILTER_TOL,
        "err_loss": LOSS_TOL,
        "err_grad": grad_tol(DTYPES[row["dtype"]]),
        "err_metrics": METRIC_TOL,
    }


def check(row):
    """'pass' / 'fail' for this package's implementations, None for the others."""
    if not IMPLEMENTATIONS[row["impl"]].kpo:
        return None
    return "fail" if failures(row) else "pass"


def failures(row):
    """Why a row of this package fails its check: ['metrics 6.1e-05 > 1e-05', ...] (NaN fails)."""
    if row["status"] != "ok":
        return [row["status"]]
    out = []
    for key, tol in _limits(row).items():
        value = row.get(key)
        if value is None or not value <= tol:
            name = key[4:] + (f" ({row['worst_metric']})" if key == "err_metrics" and row.get("worst_metric") else "")
            out.append(f"{name} {value if value is None else format(value, '.1e')} > {tol:g}")
    return out
