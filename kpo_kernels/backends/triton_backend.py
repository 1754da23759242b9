"""Triton backend: launches the kernels of `triton_kernels` (CUDA, or CPU under TRITON_INTERPRET=1)."""

import math
import os

import torch

from ..gains import gain_tables
from ..options import METRIC_NAMES
from .aggregation import NUM_STATS
from .base import Backend, LossForward, log1p_neg

_IMPORT_ERROR = None
try:
    from . import triton_kernels as kernels
except Exception as error:  # noqa: BLE001 - any failure means "no Triton here"
    kernels = None
    _IMPORT_ERROR = error

# Triton decides at import time whether @triton.jit functions are interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error():
    """The exception raised while importing Triton, or None if it imported."""
    return _IMPORT_ERROR


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


class TritonBackend(Backend):
    """Fused Triton kernels.

    block_size: tokens per scan block (a power of two; default: up to 1024, fitted to T).
    num_warps: warps per program. poison: fill every output buffer with NaN before the kernels
    run, so that a position a kernel forgot to write shows up (tests use it).
    """

    name = "triton"

    def __init__(self, block_size=None, num_warps=None, poison=False):
        if block_size is not None and (block_size < 2 or block_size & (block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 2, got {block_size}")
        self.block_size = block_size
        self.num_warps = num_warps
        self.poison = poison

    def unavailable_reason(self, device):
        if kernels is None:
            return f"Triton failed to import: {_IMPORT_ERROR}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and INTERPRETED:
            return None
        return (
            f"it runs on CUDA tensors (got {device.type}); on CPU tensors only with "
            "TRITON_INTERPRET=1 set before kpo_kernels is imported"
        )

    def _block(self, length):
        if self.block_size is not None:
            return self.block_size
        return min(512, max(16, _pow2_at_least(length)))

    def _warps(self, block):
        # Two tokens per thread: 64 registers and no spills for the fused loss on sm_90.
        if self.num_warps is not None:
            return self.num_warps
        return max(1, min(8, block // 64))

    def _empty(self, shape, dtype, device):
        if self.poison:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def _mask_args(mask, dummy):
        if mask is None:
            return dummy, 0, 0
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        return mask, mask.stride(0), mask.stride(1)

    def filter(self, log_ratio, mask, options):
        rows, length = log_ratio.shape
        out = self._empty((rows, length), torch.float32, log_ratio.device)
        if rows == 0 or length == 0:
            return out.zero_()
        gains = gain_tables.get(length, options.q, options.r, options.p0, log_ratio.device, torch.float32)
        mask_arg, mask_row, mask_tok = self._mask_args(mask, log_ratio)
        block = self._block(length)
        kernels.kalman_filter_kernel[(rows,)](
            log_ratio,
            mask_arg,
            gains,
            out,
            length,
            log_ratio.stride(0),
            log_ratio.stride(1),
            mask_row,
            mask_tok,
            options.x0,
            HAS_MASK=mask is not None,
            SKIP=options.skip,
            BLOCK=block,
            num_warps=self._warps(block),
        )
        return out

    def loss_forward(self, batch, options, need_grad):
        rows, length = batch.shape
        device = batch.device
        stats = self._empty((NUM_STATS, rows), torch.float32, device)
        grad = self._empty((rows, length), torch.float32, device) if need_grad else None
        if rows > 0:
            self._launch_rows(batch, options, stats, grad)
        row_scale = self._empty((rows,), torch.float32, device)
        out = self._empty((1 + len(METRIC_NAMES),), torch.float32, device)
        self._launch_finalize(options, stats, row_scale, out, rows, length)
        return LossForward(loss=out[0], metrics=out[1:], grad=grad, row_scale=row_scale)

    def _launch_rows(self, batch, options, stats, grad):
        rows, length = batch.shape
        filt = options.filter
        gains = gain_tables.get(max(length, 1), filt.q, filt.r, filt.p0, batch.device, torch.float32)
        lp, old, adv = batch.log_prob, batch.old_log_prob, batch.advantages
        mask_arg, mask_row, mask_tok = self._mask_args(batch.mask, lp)
        weights = batch.is_weights
        block = self._block(length)
        kernels.kpo_loss_fwd_kernel[(rows,)](
            lp,
            old,
            mask_arg,
            adv,
            weights if weights is not None else lp,
            gains,
            grad if grad is not None else stats,
            stats,
            rows,
            length,
            lp.stride(0),
            lp.stride(1),
            old.stride(0),
            old.stride(1),
            mask_row,
            mask_tok,
            adv.stride(0),
            adv.stride(1) if adv.dim() == 2 else 0,
            weights.stride(0) if weights is not None else 0,
            weights.stride(1) if weights is not None else 0,
            filt.x0,
            options.log_ratio_cap if options.log_ratio_cap is not None else 0.0,
            1.0 - options.clip_low,
            1.0 + options.clip_high,
            log1p_neg(options.clip_low),
            math.log1p(options.clip_high),
            options.dual_clip if options.dual_clip is not None else 0.0,
            math.log(options.dual_clip) if options.dual_clip is not None else 0.0,
            HAS_MASK=batch.mask is not None,
            SKIP=filt.skip,
            ADV_PER_TOKEN=adv.dim() == 2,
            HAS_WEIGHTS=weights is not None,
            HAS_CAP=options.log_ratio_cap is not None,
            CLIP=options.clip,
            DUAL_CLIP=options.dual_clip is not None,
            STORE_GRAD=grad is not None,
            BLOCK=block,
            num_warps=self._warps(block),
        )

    def _launch_finalize(self, options, stats, row_scale, out, rows, length):
        norm = options.loss_scale_factor if options.loss_scale_factor is not None else float(length)
        kernels.kpo_loss_finalize_kernel[(1,)](
            stats,
            row_scale,
            out,
            rows,
            float(options.dp_size),
            options.batch_num_tokens or 0.0,
            options.global_batch_size or 0.0,
            norm if norm > 0 else 1.0,
            AGG=kernels.AGG_CODES[options.agg],
            HAS_TOKEN_COUNT=options.batch_num_tokens is not None,
            HAS_SEQUENCE_COUNT=options.global_batch_size is not None,
            BLOCK_B=min(1024, max(16, _pow2_at_least(rows))),
            num_warps=4,
        )

    def loss_backward(self, saved, grad_output, dtype):
        rows, length = saved.grad.shape
        out = torch.empty((rows, length), dtype=dtype, device=saved.grad.device)
        if out.numel() == 0:
            return out
        block = min(1024, max(16, _pow2_at_least(length)))
        grid = (rows, triton_cdiv(length, block))
        kernels.kpo_loss_bwd_kernel[grid](
            saved.grad, saved.row_scale, grad_output.reshape(1), out, length, BLOCK=block, num_warps=4
        )
        return out


def triton_cdiv(a, b):
    return -(-a // b)
