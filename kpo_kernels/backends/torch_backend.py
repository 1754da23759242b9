"""Vectorized, exact PyTorch backend (any device; the default on CPUs).

Computed in float64 where it matters (the filter, the branch decisions, the diagnostics), and
returned in float32 (float64 for float64 inputs). Split by job:

- torch_scan.py: the filter's scan in float64 (shared coefficients: chunked cumulative sums;
  otherwise the blocked recursion), no floor, exact resets; the compaction of rows with holes.
- torch_layouts.py: padded rows and packed streams, their reductions and diagnostic columns.
- torch_rows.py: the loss of a padded CPU batch in few passes (the fast path).
- this file: the backend, and the general loss path (packed batches, accelerators, garbage under
  the mask, per-token advantages that vary within a sequence).
"""

import math

import torch

from .. import tables
from ..options import KL_CLAMP
from . import aggregation
from ..options import TokenBatch
from .base import Backend, LossForward, expand_rows, log1p_neg
from .torch_layouts import _Packed, _Rows, _valid, diagnostic_columns, innovation_terms  # noqa: F401 (noise.py)
from .torch_chunks import packed_chunk_maps
from .torch_rows import _bounds, rows_loss
from .torch_scan import COMPUTE


class TorchBackend(Backend):
    """The vectorized PyTorch backend: exact to float64 rounding, on any device torch runs on.

    `backend="torch"` (or "auto" on a CPU, and for float64 inputs) uses it. It computes in
    float64 internally (the gains and the scan), so float64 inputs give float64 results; it is
    the backend of the CPU and the reference the Triton kernels are compared with in the tests.
    No arguments. docs/api.md lists where each backend runs.
    """

    name = "torch"

    def filter(self, log_ratio, mask, options, cu_seqlens=None, state=None):
        if state is not None and cu_seqlens is None:  # rows with a state: the packed path
            flat = _flatten(log_ratio, mask)
            return self.filter(*flat, options, _row_offsets(log_ratio), state).view(log_ratio.shape)
        valid = _valid(mask, log_ratio.shape, log_ratio.device)
        z = torch.where(valid, log_ratio.to(COMPUTE), 0.0)
        layout = _Rows(log_ratio.shape) if cu_seqlens is None else _Packed(cu_seqlens, log_ratio.shape[0], state)
        out_dtype = torch.float64 if log_ratio.dtype == torch.float64 else torch.float32
        return torch.where(valid, layout.filter(z, valid, options), 0.0).to(out_dtype)

    def loss_forward(self, batch, options, need_grad, state=None):
        # The scan and every branch decision (cap, clip, dual clip) use the float64 filtered
        # log-ratio, so decisions agree with a float64 definition token for token; values are
        # computed in the result dtype. Garbage under the mask is replaced once; after that
        # every masked quantity is finite and multiplying by the mask zeroes it (cheaper than
        # `where` on CPUs). Arithmetic is in place where it can be: fresh multi-megabyte CPU
        # allocations cost page faults. Padded CPU batches take the fast path (torch_rows).
        if state is not None and batch.cu_seqlens is None:  # rows with a state: the packed path
            result = self.loss_forward(_packed_rows(batch), options, need_grad, state)
            grad = None if result.grad is None else result.grad.view(batch.shape)
            return LossForward(result.loss, result.metrics, grad, result.row_scale)
        fast = rows_loss(batch, options, need_grad) if state is None else None
        if fast is not None:
            return fast
        dtype = batch.result_dtype
        layout = _Rows(batch.shape) if batch.cu_seqlens is None else _Packed(batch.cu_seqlens, batch.shape[0], state)
        valid = _valid(batch.mask, batch.shape, batch.device)
        invalid = ~valid
        valid_f = valid.to(dtype)
        z = batch.log_prob.to(COMPUTE, copy=True).sub_(batch.old_log_prob).masked_fill_(invalid, 0.0)
        x = layout.filter(z, valid, options.filter)
        diagnostics = diagnostic_columns(layout, z, x, valid, options.filter) if options.diagnostics else {}

        capped = None
        if options.log_ratio_cap is not None:
            capped = x > options.log_ratio_cap
            diagnostics["capped"] = layout.count(capped & valid)
            x.clamp_(max=options.log_ratio_cap)
        rt = x.to(dtype, copy=True).mul_(valid_f).exp_()  # filtered ratio; 1 at invalid tokens

        neg_adv = batch.advantages.to(dtype)
        if not batch.advantages_per_token:  # one advantage per sequence
            neg_adv = layout.per_token(torch.where(layout.any_valid(valid), neg_adv, 0.0))
        else:
            neg_adv = neg_adv.masked_fill(invalid, 0.0)
        neg_adv = neg_adv.neg_()
        token_loss = rt * neg_adv
        frozen = capped  # tokens whose loss does not depend on log_prob
        clipped = lower = None
        if options.clip:
            clipped_loss = torch.clamp(rt, *_bounds(1 - options.clip_low, 1 + options.clip_high, dtype)).mul_(neg_adv)
            torch.maximum(token_loss, clipped_loss, out=token_loss)
            clipped_high = (x > math.log1p(options.clip_high)) & (neg_adv < 0)
            clipped_low = (x < log1p_neg(options.clip_low)) & (neg_adv > 0)
            diagnostics["clipped_high"] = layout.count(clipped_high & valid)
            diagnostics["clipped_low"] = layout.count(clipped_low & valid)
            clipped = clipped_high | clipped_low
            frozen = clipped if frozen is None else frozen | clipped
        if options.dual_clip is not None:
            negative = neg_adv > 0
            torch.minimum(token_loss, torch.where(negative, neg_adv * options.dual_clip, math.inf), out=token_loss)
            lower = (x > math.log(options.dual_clip)) & negative
            frozen = lower if frozen is None else frozen | lower
        weight = valid_f
        if batch.is_weights is not None:
            weight = batch.is_weights.to(dtype).masked_fill(invalid, 0.0)
        token_loss.mul_(weight)

        stats = layout.row_stats(
            valid=valid_f,
            token_loss=token_loss,
            clipped=clipped,
            clipped_lower=lower,
            log_ratio=z.clamp(-KL_CLAMP, KL_CLAMP),  # ppo_kl as verl computes it
            ratio=rt,
            raw_ratio=z.to(dtype, copy=True).exp_(),
            diagnostics=diagnostics,
        )
        row_scale, loss, metrics = aggregation.finalize(stats, options, layout.horizon)
        grad = None
        if need_grad:  # d token_loss / d log_prob = -A * rt * w where the loss is not frozen
            grad = rt.mul_(neg_adv).mul_(weight)
            # Exactly 0 at masked tokens, even where rt is NaN (after an infinite log-ratio).
            grad.masked_fill_(invalid if frozen is None else frozen | invalid, 0.0)
        return LossForward(loss, metrics, grad, row_scale)

    def chunk_maps(self, log_prob, old_log_prob, mask, options, cu_seqlens, count):
        if cu_seqlens is None:  # rows: the packed path
            flat_old = None if old_log_prob is None else old_log_prob.reshape(-1)
            return self.chunk_maps(log_prob.reshape(-1), flat_old, _flat(mask), options, _row_offsets(log_prob), count)
        return packed_chunk_maps(log_prob, old_log_prob, mask, options, cu_seqlens, count)

    def loss_backward(self, grad, row_scale, grad_output, cu_seqlens, dtype, plan=None):
        scale = expand_rows(grad_output.to(row_scale.dtype) * row_scale, grad.shape, cu_seqlens)
        return (grad * scale).to(dtype)

    def prepare(self, length, q, r, p0, device):
        tables.gain_table(length, q, r, p0, device, COMPUTE)
        tables.variance_ratio_table(length, q, r, p0, device, COMPUTE)

    def output_dtypes(self, dtype):
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return {**dict.fromkeys(("filter", "loss", "grad", "row_scale"), wide), "maps": torch.float64}

    def key(self):
        return "torch" if type(self) is TorchBackend else super().key()


def _flat(tensor):
    return None if tensor is None else tensor.reshape(-1)


def _flatten(log_ratio, mask):
    return log_ratio.reshape(-1), _flat(mask)


def _row_offsets(tokens):
    """cu_seqlens of the rows of a (B, T) tensor seen as B packed sequences of T tokens."""
    rows, width = tokens.shape
    return torch.arange(rows + 1, device=tokens.device, dtype=torch.int64) * width


def _packed_rows(batch):
    """A padded TokenBatch as the packed batch of its rows (docs/math.md section 1: the same
    per-token quantities; the horizon of `seq-mean-token-sum-norm`, the longest sequence, is T)."""
    advantages = batch.advantages
    if batch.advantages_per_token:
        advantages = advantages.reshape(-1)
    return TokenBatch(
        _flat(batch.log_prob), _flat(batch.old_log_prob), advantages, _flat(batch.mask), _flat(batch.is_weights),
        _row_offsets(batch.log_prob), batch.advantages_per_token,
    )
