"""The KPO policy loss, its aggregation and its metrics (docs/math.md sections 3 to 5).

Plain PyTorch with autograd: the gradient comes from differentiating these lines, not from a
formula. Inputs in float64 give an oracle; bfloat16/float16 inputs are computed in float32.
"""

import torch

from .filter import kalman_filter

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def _div(num, den):
    """num / den, and 0 for an empty denominator (a micro-batch without valid tokens)."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), num * 0)


def aggregate(
    token_loss,
    valid,
    agg,
    *,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """Reduce a (B, T) per-token loss to a scalar as verl's `agg_loss` does (docs/math.md section 4)."""
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}")
    row_sum = torch.where(valid, token_loss, torch.zeros_like(token_loss)).sum(-1)
    row_tokens = valid.sum(-1)
    nonempty_rows = (row_tokens > 0).sum()
    if agg == "token-mean":
        tokens = row_tokens.sum() if batch_num_tokens is None else batch_num_tokens
        return _div(row_sum.sum(), tokens) * dp_size
    if agg == "token-sum":
        return row_sum.sum() * dp_size
    sequences = nonempty_rows if global_batch_size is None else global_batch_size
    if agg == "seq-mean-token-mean":
        return _div(_div(row_sum, row_tokens).sum(), sequences) * dp_size
    loss = _div(row_sum.sum(), sequences) * dp_size
    if agg == "seq-mean-token-sum-norm":
        horizon = valid.shape[-1] if loss_scale_factor is None else loss_scale_factor
        loss = loss / horizon
    return loss


def _masked_mean(values, valid):
    return _div(torch.where(valid, values, torch.zeros_like(values)).sum(), valid.sum())


def kpo_loss(
    log_prob,
    old_log_prob,
    advantages,
    mask=None,
    *,
    q=1e-6,
    r=1.0,
    p0=0.0,
    x0=0.0,
    clip=True,
    clip_low=3e-4,
    clip_high=4e-4,
    dual_clip=None,
    log_ratio_cap=10.0,
    agg="seq-mean-token-mean",
    mask_mode="skip",
    is_weights=None,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """KPO loss of a right-, left- or hole-masked (B, T) batch; returns (loss, metrics)."""
    dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    valid = torch.ones(log_prob.shape, dtype=torch.bool, device=log_prob.device)
    if mask is not None:
        valid = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)

    # Padding is often garbage (NaN, inf). Replace it before anything reads it, so that it
    # can reach neither the loss nor, through autograd, the gradient.
    new = torch.where(valid, log_prob.to(dtype), zero)
    old = torch.where(valid, old_log_prob.to(dtype), zero)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = torch.where(valid, adv.expand(valid.shape), zero)

    z = (new - old).detach()
    xhat = kalman_filter(z, valid, q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)

    # Stop-gradient trick: the value is the filtered ratio, the gradient that of the current token.
    log_rt = new - new.detach() + xhat
    if log_ratio_cap is not None:
        log_rt = torch.clamp(log_rt, max=log_ratio_cap)
    rt = torch.exp(log_rt)

    loss_unclipped = -adv * rt
    if clip:
        loss_clipped = -adv * torch.clamp(rt, 1 - clip_low, 1 + clip_high)
        token_loss = torch.maximum(loss_unclipped, loss_clipped)
        clipped = loss_clipped > loss_unclipped
    else:
        token_loss = loss_unclipped
        clipped = torch.zeros_like(valid)
    if dual_clip is not None:
        loss_floor = -adv * dual_clip
        clipped_lower = (token_loss > loss_floor) & (adv < 0)
        token_loss = torch.where(adv < 0, torch.minimum(loss_floor, token_loss), token_loss)
    else:
        clipped_lower = torch.zeros_like(valid)
    if is_weights is not None:
        token_loss = token_loss * torch.where(valid, is_weights.to(dtype), zero)

    loss = aggregate(
        token_loss,
        valid,
        agg,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )

    raw_ratio = torch.exp(z)
    metrics = {
        "clipfrac": _masked_mean(clipped.to(dtype), valid),
        "clipfrac_lower": _masked_mean(clipped_lower.to(dtype), valid),
        # verl's definition: the log-ratio clamped to [-20, 20] (NaN stays NaN).
        "ppo_kl": _masked_mean(-torch.clamp(z, -20.0, 20.0), valid),
        "ratio_mean": _masked_mean(rt.detach(), valid),
        "ratio_max": _masked_max(rt.detach(), valid),
        "raw_ratio_mean": _masked_mean(raw_ratio, valid),
        "raw_ratio_max": _masked_max(raw_ratio, valid),
        "num_tokens": valid.sum().to(dtype),
    }
    return loss, metrics


def _masked_max(values, valid):
    """Max over valid tokens (NaN if any is NaN; 0 for no valid token)."""
    if not bool(valid.any()):
        return torch.zeros((), dtype=values.dtype, device=values.device)
    chosen = values[valid]
    if bool(torch.isnan(chosen).any()):
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    return chosen.max()
