"""Vectorized, exact PyTorch backend (any device; the default on CPUs).

The filter is the inclusive scan of the affine maps x -> (1 - c_t) x + b_t. Inside chunks of 16
tokens it is evaluated in closed form in float64, x_t = P_t * cumsum_s(b_s / P_s) with P_t the
product of (1 - c) since the chunk start; across chunks the same scan runs recursively on the
chunk totals. Factors (1 - c) are floored at e^-36 (below float64 resolution, so the result is
unchanged), which bounds 1 / P by e^(16 * 36) < float64 max: no overflow, no underflow, and no
cancellation (every rounding error is relative to sum_s |b_s| P_t / P_s). No Python loop over
tokens, O(T) work, in-place arithmetic (CPU allocations of large tensors are slow). The loss and
its gradient are computed in float32 (float64 for float64 inputs).
"""

import torch
import torch.nn.functional as F

from ..gains import gain_tables
from .base import Backend, LossForward
from . import aggregation

COMPUTE = torch.float64
CHUNK = 16
LOG_FLOOR = -36.0  # 16 * 36 = 576 < log(float64 max) = 709


def affine_scan(c, b, need_c=True):
    """(C, B) with x_t = (1 - C_t) x_0 + B_t for x_t = (1 - c_t) x_{t-1} + b_t along dim -1.

    c and b (float64, c in [0, 1]) are overwritten: pass temporaries. C is None unless need_c.
    """
    length = c.shape[-1]
    chunks = -(-length // CHUNK)
    pad = chunks * CHUNK - length  # (0, 0) is the identity map
    if pad:
        c, b = F.pad(c, (0, pad)), F.pad(b, (0, pad))
    c, b = c.unflatten(-1, (chunks, CHUNK)), b.unflatten(-1, (chunks, CHUNK))

    log_p = c.neg_().log1p_().clamp_(min=LOG_FLOOR).cumsum_(-1)  # log P_t within each chunk
    log_p_end = log_p[..., -1].clone()
    c_local = torch.expm1(log_p).neg_() if need_c else None  # 1 - P_t, without cancellation
    inv_p = log_p.neg_().exp_()
    b.mul_(inv_p).cumsum_(-1).div_(inv_p)  # B_t within each chunk

    if chunks > 1:
        # State entering chunk k: the scan of the chunk totals, shifted by one chunk.
        c_through, b_through = affine_scan(torch.expm1(log_p_end).neg_(), b[..., -1].clone(), need_c)
        b.addcdiv_(F.pad(b_through[..., :-1], (1, 0))[..., None], inv_p)
        if need_c:
            c_local.addcdiv_(F.pad(c_through[..., :-1], (1, 0))[..., None], inv_p)
    b = b.flatten(-2)[..., :length]
    return (c_local.flatten(-2)[..., :length] if need_c else None), b


def filter_states(z, valid, options):
    """Filtered log-ratio (float64) of z (float64, 0 where invalid). At invalid tokens the
    value is the state carried over them (callers mask it)."""
    batch, length = z.shape
    gains = gain_tables.get(length, options.q, options.r, options.p0, z.device, COMPUTE)
    if options.skip:
        observations = torch.cumsum(valid, dim=-1)  # gain index n(t) of spec section 2
        c = gains[(observations - 1).clamp_min(0)] * valid
    else:
        c = gains[:length].expand(batch, length)
    c_total, b_total = affine_scan(c, c * z, need_c=options.x0 != 0)
    return b_total if options.x0 == 0 else options.x0 - c_total * options.x0 + b_total


def _valid(mask, shape, device):
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return mask if mask.dtype == torch.bool else mask != 0


class TorchBackend(Backend):
    name = "torch"

    def filter(self, log_ratio, mask, options):
        valid = _valid(mask, log_ratio.shape, log_ratio.device)
        z = torch.where(valid, log_ratio.to(COMPUTE), 0.0)
        out_dtype = torch.float64 if log_ratio.dtype == torch.float64 else torch.float32
        return torch.where(valid, filter_states(z, valid, options), 0.0).to(out_dtype)

    def loss_forward(self, batch, options, need_grad):
        # The scan runs in float64; the per-token loss in the result dtype (float32 unless the
        # inputs are float64). Garbage under the mask is replaced once, with `where`; after that
        # every masked quantity is finite and multiplying by the float mask zeroes it (cheaper
        # than `where` on CPUs). A NaN at a valid token still propagates.
        dtype = batch.result_dtype
        valid = _valid(batch.mask, batch.shape, batch.device)
        weight = valid.to(dtype)
        z = torch.where(valid, batch.log_prob.to(COMPUTE) - batch.old_log_prob.to(COMPUTE), 0.0)
        x = filter_states(z, valid, options.filter).to(dtype) * weight

        # Filtered ratio; d rt / d log_prob is rt below the cap and 0 above it (torch.clamp).
        if options.log_ratio_cap is None:
            rt = torch.exp(x)
            drt = rt
        else:
            rt = torch.exp(torch.clamp(x, max=options.log_ratio_cap))
            drt = rt * (x <= options.log_ratio_cap)

        adv = batch.advantages.to(dtype)
        if adv.dim() == 1:
            adv = torch.where(valid.any(-1), adv, 0.0)[:, None]
        else:
            adv = torch.where(valid, adv, 0.0)
        token_loss, dloss_drt = -adv * rt, -adv
        clipped = lower = None
        if options.clip:
            clipped_loss = -adv * torch.clamp(rt, 1 - options.clip_low, 1 + options.clip_high)
            clipped = (clipped_loss > token_loss).to(dtype)
            token_loss = torch.maximum(token_loss, clipped_loss)
            dloss_drt = dloss_drt * (1 - clipped)
        if options.dual_clip is not None:
            floor = torch.where(adv < 0, -adv * options.dual_clip, float("inf"))
            lower = (token_loss > floor).to(dtype)
            tie = (token_loss == floor).to(dtype)  # torch.minimum splits a tie's gradient
            token_loss = torch.minimum(token_loss, floor)
            dloss_drt = dloss_drt * (1 - lower - 0.5 * tie)
        if batch.is_weights is not None:
            weight = torch.where(valid, batch.is_weights.to(dtype), 0.0)
        token_loss, dloss_drt = token_loss * weight, dloss_drt * weight

        stats = aggregation.row_stats(
            valid=valid,
            token_loss=token_loss,
            clipped=clipped,
            clipped_lower=lower,
            log_ratio=z.to(dtype),
            ratio=rt,
            raw_ratio=torch.exp(z).to(dtype),
        )
        row_scale, loss, metrics = aggregation.finalize(stats, options, batch.shape[-1])
        grad = dloss_drt * drt if need_grad else None
        return LossForward(loss, metrics, grad, row_scale)

    def loss_backward(self, saved, grad_output, dtype):
        scale = grad_output.to(COMPUTE) * saved.row_scale
        return (saved.grad * scale[:, None]).to(dtype)
