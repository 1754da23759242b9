"""Triton backend: launches the kernels of `triton_kernels` (CUDA, or CPU under TRITON_INTERPRET=1)."""

import dataclasses
import math

import torch

from .. import tables
from ..gains import saturation_index
from ..options import METRIC_NAMES
from ..state import ChunkMaps
from ..tensor_checks import assert_cu_seqlens_values, assert_mask_values
from ..validation import check_bool, check_count
from .aggregation import NUM_STATS
from .base import Backend, LossForward, log1p_neg
from .triton_launch import (  # noqa: F401 (facts of the backend that tests and benchmarks read here)
    FLOAT32_MAX,
    INT32_OFFSETS,
    INTERPRETED,
    MAX_TENSOR_NUMEL,
    PREFIX,
    PROGRAMS_PER_SM,
    LaunchPlan,
    _cdiv,
    _derivative_dtype,
    _finalize_launch,
    _finalize_tiles_per_step,
    _fused_finalize_launch,
    FINISH_COUNTERS,
    finalize_arguments,
    float_one_bits,
    _IMPORT_ERROR,
    _pow2_at_least,
    _SAME_SIZE_INT,
    kernels,
    triton_import_error,
)
from .triton_layout import flat_layout, layout_anchor, statistic_run
from .triton_noise import NoiseFitLaunch


class TritonBackend(LaunchPlan, NoiseFitLaunch, Backend):
    """The fused Triton kernels: pass an instance as `backend=` to choose their launch settings.

    `backend="triton"` (or "auto" on CUDA) uses `TritonBackend()`, the tuned defaults. Runs on
    CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests). Create it
    outside a compiled function. docs/api.md lists where each backend runs.

    Args:
        block_size: tokens per scan block, a power of two from 2 (default: the rows' typical
            length rounded up to a power of two, at most 1024, and 256 a warp with num_warps).
        tile_size: tokens per program, an int >= 1; sequences longer than a tile are split across
            programs (default on CUDA: whole rows when there are enough rows to fill the GPU,
            else tiles sized for about PROGRAMS_PER_SM (2) programs per SM, or for what fits at
            255 registers a thread with a chosen block_size or num_warps: one program of 8 or
            more warps; under the interpreter: whole sequences).
        num_warps: warps per program, a power of two up to 32 (default: two tokens per thread
            up to 8 warps, and 4 warps for 1024-token blocks).
        poison: fill every output buffer with NaN before the kernels run, so that a position a
            kernel forgot to write shows up (the tests use it). Default False.

    Raises:
        TypeError, ValueError: an argument of the wrong kind or out of its range, named.
    """

    name = "triton"

    def __init__(self, block_size=None, tile_size=None, num_warps=None, poison=False):
        if block_size is not None:
            block_size = check_count("block_size", block_size, minimum=2)
            if block_size & (block_size - 1) or block_size > MAX_TENSOR_NUMEL:
                raise ValueError(f"block_size must be a power of two from 2 to {MAX_TENSOR_NUMEL} (Triton's largest block), got {block_size}")
        if tile_size is not None:
            tile_size = check_count("tile_size", tile_size, minimum=1)
        if num_warps is not None:
            num_warps = check_count("num_warps", num_warps, minimum=1)
            if num_warps & (num_warps - 1) or num_warps > 32:
                raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
        self.block_size = block_size
        self.tile_size = tile_size
        self.num_warps = num_warps
        self.poison = check_bool("poison", poison)
        # The key as a string made here: under torch.compile(dynamic=True) Dynamo would treat
        # the int settings as symbolic and cannot format them into a string.
        self._settings_key = f"triton:{block_size}:{tile_size}:{num_warps}:{int(self.poison)}"

    def check_options(self, options):
        """The kernels take x0 as a float32 scalar: refuse what float32 cannot hold."""
        if abs(options.x0) > FLOAT32_MAX:
            raise ValueError(
                f"x0 = {options.x0:.3g} is outside the Triton backend's float32 range "
                f"(|x0| <= {FLOAT32_MAX:.4g}); use backend='torch' for float64"
            )

    def __repr__(self):
        return f"TritonBackend(block_size={self.block_size}, tile_size={self.tile_size}, num_warps={self.num_warps})"

    def prepare(self, length, q, r, p0, device):
        tables.gain_table(length, q, r, p0, device, torch.float32)
        tables.variance_ratio_table(length, q, r, p0, device, torch.float32)
        tables.log_variance_ratio_table(length, q, r, p0, device, torch.float32)

    def output_dtypes(self, dtype):
        return {**super().output_dtypes(dtype), "grad": _derivative_dtype(dtype)}

    def key(self):
        if type(self) is not TritonBackend:
            return super().key()
        return self._settings_key

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

    def _empty(self, shape, dtype, device):
        if self.poison:
            poison = float("nan") if dtype.is_floating_point or dtype.is_complex else max(-(2**30), torch.iinfo(dtype).min)
            return torch.full(shape, poison, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def _strides(tensor, varlen):
        """(row stride, token stride) of a (B, T) tensor or of a packed (N,) one."""
        if tensor is None:
            return 0, 0
        return (0, tensor.stride(0)) if varlen else (tensor.stride(0), tensor.stride(1))

    @staticmethod
    def _addressable(tensor):
        """The tensor, or a contiguous copy when a position times the token stride would
        overflow the kernels' int32 offsets (a transposed view of 2^31 elements or more)."""
        if tensor is None or tensor.numel() == 0:
            return tensor
        if (tensor.shape[-1] - 1) * abs(tensor.stride(-1)) < INT32_OFFSETS:
            return tensor
        return tensor.contiguous()

    @staticmethod
    def _mask(mask):
        """The mask as integers for the kernels: bools as bytes, floats as their bit patterns
        (a view, no copy; the kernels compare with 0 ignoring the sign bit). Kernels then never
        compare floats of the mask's dtype, which Triton's interpreter gets wrong for 16-bit
        floats."""
        if mask is None or not mask.dtype.is_floating_point and mask.dtype != torch.bool:
            return mask
        return mask.view(_SAME_SIZE_INT[mask.element_size()])

    def _tile_passes(self, tiling, new, old, mask, gains, options, block, warps, latest=False, count=None, every_tile=False,
                     flat=False):
        """Passes 1 and 2 for sequences longer than a tile: (valid counts, tile maps). latest:
        also each tile's map to its last valid token and that token's sign (the loss's sign flips).
        count: observations each sequence consumed before (an entering state). every_tile: also
        the last tile of each sequence, even when it is the only one (chunk_maps). flat: the
        tiles of kpo_loss_fwd_kernel's FLAT (the loss's own choice: every reader of these
        counts and maps must place its tiles alike)."""
        device = new.device
        if not tiling.multi_tile and not every_tile:  # placeholders the kernels never read
            return torch.empty(1, dtype=torch.int32, device=device), torch.empty(1, dtype=torch.float32, device=device)
        counts = self._empty((tiling.num_slots,), torch.int32, device)
        mask_arg = self._mask(mask)
        state_kwargs = dict(HAS_STATE=True) if count is not None else {}  # stateless launches as before
        if every_tile:
            state_kwargs["EVERY_TILE"] = True
        if options.skip and mask is not None:
            kernels.tile_count_kernel[tiling.grid](
                mask_arg, *tiling.launch_args(), counts, tiling.num_seqs, tiling.width, tiling.tile_size,
                tiling.search_steps, *self._strides(mask, tiling.varlen), IS_VARLEN=tiling.varlen, BLOCK=block,
                num_warps=warps, FLAT=flat, **({"EVERY_TILE": True} if every_tile else {}),
            )
        aggregates = self._empty((5 if latest else 2, tiling.num_slots), torch.float32, device)
        kernels.tile_aggregate_kernel[tiling.grid](
            new, old if old is not None else new, mask_arg if mask is not None else new, gains, gains.numel() - 1,
            *tiling.launch_args(), counts, aggregates, count, tiling.num_seqs, tiling.num_slots, tiling.width,
            tiling.tile_size, tiling.search_steps, *self._strides(new, tiling.varlen),
            *self._strides(old if old is not None else new, tiling.varlen), *self._strides(mask, tiling.varlen),
            HAS_OLD=old is not None, HAS_MASK=mask is not None, SKIP=options.skip, IS_VARLEN=tiling.varlen,
            PREFIX=PREFIX, BLOCK=block, STORE_LATEST=latest, num_warps=warps, FLAT=flat, **state_kwargs,
            **layout_anchor(device, block, warps, (new, old, mask), flat),
        )
        return counts, aggregates

    # ------------------------------------------------------------------ an entering state

    @staticmethod
    def _table_longest(tiling, options, count):
        """The sequence-length bound the tables are sized by: the batch's (tiling.longest), plus
        the observations consumed before when sequences enter with a state (the gain index
        runs up to count + length). Counts on the CPU give it exactly; on CUDA, without a host
        synchronisation, the tables run to the gains' saturation (q > 0), past which every
        gain index is clamped. q = 0 never saturates, and a q below about 1e-14 saturates past
        tables.MAX_TABLE_ENTRIES: there the largest count is read (one synchronisation)."""
        if count is None or count.numel() == 0:
            return tiling.longest
        if count.device.type == "cpu":
            return tiling.longest + max(0, int(count.max()))
        saturation = saturation_index(options.q, options.r, options.p0)
        if saturation is not None and saturation < tables.MAX_TABLE_ENTRIES:
            return max(tiling.longest, saturation + 1)
        return tiling.longest + max(0, int(count.max()))  # q = 0 (or tiny) on CUDA: the one synchronisation

    @staticmethod
    def _state_args(state):
        """(x as float32, count, last_sign) of a FilterState for the kernels, or Nones (the
        kernels' stateless variants: HAS_STATE=False compiles them as without a state)."""
        if state is None:
            return None, None, None
        return state.x.to(torch.float32).contiguous(), state.count.contiguous(), state.last_sign.contiguous()

    # ------------------------------------------------------------------ the filter

    def filter(self, log_ratio, mask, options, cu_seqlens=None, state=None):
        log_ratio, mask = self._addressable(log_ratio), self._addressable(mask)
        device = log_ratio.device
        out = self._empty(log_ratio.shape, torch.float32, device)
        if log_ratio.numel() == 0:
            return out
        block, warps, tiling = self._plan(log_ratio.shape, cu_seqlens, device)
        state_x, state_count, state_sign = self._state_args(state)
        longest = self._table_longest(tiling, options, state_count)
        gains = tables.gain_table(longest, options.q, options.r, options.p0, device, torch.float32)
        counts, aggregates = self._tile_passes(tiling, log_ratio, None, mask, gains, options, block, warps, count=state_count)
        kernels.kalman_filter_kernel[tiling.grid](
            log_ratio, self._mask(mask) if mask is not None else log_ratio, gains, gains.numel() - 1, *tiling.launch_args(),
            counts, aggregates, out, state_x, state_count, state_sign, tiling.num_seqs, tiling.num_slots, tiling.width,
            tiling.tile_size, tiling.search_steps, *self._strides(log_ratio, tiling.varlen),
            *self._strides(mask, tiling.varlen), options.x0, HAS_MASK=mask is not None, SKIP=options.skip,
            IS_VARLEN=tiling.varlen, PREFIX=PREFIX, BLOCK=block, num_warps=warps,
            **(dict(HAS_STATE=True) if state is not None else {}),
        )
        return out

    # ------------------------------------------------------------------ a chunk's maps

    def chunk_maps(self, log_prob, old_log_prob, mask, options, cu_seqlens, count):
        """state.ChunkMaps per sequence (docs/math.md section 7): passes 1 and 2 over every tile
        (the tile maps at the sequences' entering counts), then their in-order composition per
        sequence. No host synchronisation (but _table_longest's for q = 0 on CUDA)."""
        log_prob, old_log_prob, mask = (self._addressable(t) for t in (log_prob, old_log_prob, mask))
        device = log_prob.device
        sequences = cu_seqlens.numel() - 1 if cu_seqlens is not None else log_prob.shape[0]
        maps = self._empty((4, sequences), torch.float32, device)
        raw_sign = self._empty((sequences,), torch.int8, device)
        consumed = self._empty((sequences,), torch.int64, device)
        if sequences == 0:
            return ChunkMaps(*maps, raw_sign, consumed)
        if cu_seqlens is None and log_prob.shape[1] == 0:  # no token: identity maps
            maps.zero_()
            return ChunkMaps(*maps, raw_sign.fill_(3), consumed.zero_())
        block, warps, tiling = self._plan(log_prob.shape, cu_seqlens, device)
        count = count.contiguous()
        longest = self._table_longest(tiling, options, count)
        gains = tables.gain_table(longest, options.q, options.r, options.p0, device, torch.float32)
        counts, aggregates = self._tile_passes(
            tiling, log_prob, old_log_prob, mask, gains, options, block, warps, latest=True, count=count, every_tile=True
        )
        kernels.chunk_maps_kernel[(sequences,)](
            *tiling.launch_args(), counts, aggregates, maps, raw_sign, consumed, sequences, tiling.num_slots,
            tiling.width, tiling.tiles_per_seq, USE_COUNTS=options.skip and mask is not None, IS_VARLEN=tiling.varlen,
            PREFIX=PREFIX, num_warps=1,
        )
        return ChunkMaps(*maps, raw_sign, consumed)

    # ------------------------------------------------------------------ the loss

    def loss_forward(self, batch, options, need_grad, state=None):
        device = batch.device
        sequences = batch.num_sequences
        # Packed batches need their tile table even without tokens (the finalize reads it).
        empty = batch.log_prob.numel() == 0 and batch.cu_seqlens is None
        block, warps, tiling = (None, None, None) if empty else self._plan(batch.shape, batch.cu_seqlens, device)
        if tiling is not None and tiling.varlen:  # before any kernel reads the tiles (on the CPU the op checked before)
            assert_cu_seqlens_values(tiling.offsets_valid, batch.shape[0])
        slots = 0 if empty else tiling.num_slots
        stats = self._empty((NUM_STATS, slots), torch.float32, device)
        grad = self._empty(batch.shape, _derivative_dtype(batch.log_prob.dtype), device) if need_grad else None
        row_scale = self._empty((sequences,), torch.float32, device)
        loss, metrics = self._empty((), torch.float32, device), self._empty((len(METRIC_NAMES),), torch.float32, device)
        finish, finish_settings = finalize_arguments(batch, options, tiling, stats, row_scale, loss, metrics)
        if slots > 0:  # the forward's last program finalizes
            # a mask other than bool: its values checked on the way (on the CPU also before, by
            # the op: this confirms the kernel's check, which CUDA relies on)
            check = batch.mask is not None and batch.mask.dtype != torch.bool
            mask_ok = torch.empty(1, dtype=torch.int32, device=device) if check else None
            self._launch_loss(batch, options, tiling, stats, grad, block, warps, finish, finish_settings, state, mask_ok)
            if check:
                assert_mask_values(mask_ok)
        else:
            tiles = _finalize_tiles_per_step(tiling)
            kernels.kpo_loss_finalize_kernel[(1,)](stats, *finish, **finish_settings, IS_VARLEN=batch.cu_seqlens is not None,
                                                   BLOCK_S=1024, **_finalize_launch(tiles))
        plan = tiling.plan if need_grad and tiling is not None else None  # packed: backward's tile table
        return LossForward(loss=loss, metrics=metrics, grad=grad, row_scale=row_scale, plan=plan)

    def backward_plan_shape(self, cu_seqlens, need_grad):
        """A packed batch's tile table and its flag (S + 2 int32) when a gradient is wanted:
        backward then launches no tile_offsets_kernel of its own."""
        return (cu_seqlens.shape[0] + 1,) if cu_seqlens is not None and need_grad else (0,)

    def checks_cu_seqlens_values(self, cu_seqlens):
        """On CUDA the tile-offsets kernel checks packed offsets as it reads them (one flag and one
        asynchronous assertion before the loss's other kernels, where
        tensor_checks.check_cu_seqlens_values launches eight); elsewhere the op checks them first."""
        return cu_seqlens is not None and cu_seqlens.device.type == "cuda"

    def checks_mask_values(self, mask):
        """On CUDA the forward checks the values of a mask other than bool as it reads them (one
        flag and one asynchronous assertion, where tensor_checks.check_mask_values costs four
        passes over the mask); elsewhere the mask is checked before any kernel runs."""
        return mask is not None and mask.dtype != torch.bool and mask.device.type == "cuda"

    def _launch_loss(self, batch, options, tiling, stats, grad, block, warps, finish, finish_settings, state=None,
                     mask_ok=None):
        filt = options.filter
        varlen = tiling.varlen
        state_x, state_count, state_sign = self._state_args(state)
        longest = self._table_longest(tiling, filt, state_count)
        gains = tables.gain_table(longest, filt.q, filt.r, filt.p0, batch.device, torch.float32)
        lp, old, adv, mask, weights = (
            self._addressable(t) for t in (batch.log_prob, batch.old_log_prob, batch.advantages, batch.mask, batch.is_weights)
        )
        ratios, log_ratios = gains, gains  # placeholders: metrics="basic" reads neither
        if options.diagnostics:
            ratios = tables.variance_ratio_table(longest, filt.q, filt.r, filt.p0, batch.device, torch.float32)
            log_ratios = tables.log_variance_ratio_table(longest, filt.q, filt.r, filt.p0, batch.device, torch.float32)
        adv_per_token = batch.advantages_per_token
        flat = flat_layout(varlen, tiling.width, block, (lp, old, mask, adv if adv_per_token else None, weights),
                           tile=tiling.tile_size, warps=warps)
        # The tiles' maps to their last valid token serve the sign flips only (metrics="full").
        counts, aggregates = self._tile_passes(
            tiling, lp, old, mask, gains, filt, block, warps, latest=options.diagnostics, count=state_count, flat=flat
        )
        adv_strides = self._strides(adv, varlen) if adv_per_token else (adv.stride(0), 0)
        ratio_last = min(ratios.numel(), log_ratios.numel()) - 1  # the cache may hand back longer tables
        finish_settings = {**finish_settings, **_fused_finalize_launch(_finalize_tiles_per_step(tiling), warps, block)}
        kernels.kpo_loss_fwd_kernel[tiling.grid](
            lp, old, self._mask(mask) if mask is not None else lp, adv, weights if weights is not None else lp,
            gains, gains.numel() - 1, ratios, log_ratios, ratio_last, *tiling.launch_args(), counts, aggregates, grad if grad is not None else stats, stats,
            state_x, state_count, state_sign, tiling.num_seqs, tiling.num_slots, tiling.width, tiling.tile_size, tiling.search_steps,
            *self._strides(lp, varlen), *self._strides(old, varlen), *self._strides(mask, varlen),
            *adv_strides, *self._strides(weights, varlen),
            filt.x0,
            options.log_ratio_cap if options.log_ratio_cap is not None else 0.0,
            1.0 - options.clip_low,
            1.0 + options.clip_high,
            log1p_neg(options.clip_low),
            math.log1p(options.clip_high),
            options.dual_clip if options.dual_clip is not None else 0.0,
            math.log(options.dual_clip) if options.dual_clip is not None else 0.0,
            math.log(2 * math.pi * filt.r),
            1.0 / filt.r,
            FINISH_COUNTERS.get(batch.device), mask_ok if mask_ok is not None else stats,
            float_one_bits(mask.dtype) if mask is not None and mask.dtype.is_floating_point else 1,
            finish.row_scale, finish.loss, finish.metrics,
            *finish[finish._fields.index("dp_size"):],  # dp_size .. loss_scale_factor
            HAS_MASK=mask is not None,
            SKIP=filt.skip,
            ADV_PER_TOKEN=adv_per_token,
            HAS_WEIGHTS=weights is not None,
            HAS_CAP=options.log_ratio_cap is not None,
            CLIP=options.clip,
            DUAL_CLIP=options.dual_clip is not None,
            STORE_GRAD=grad is not None,
            IS_VARLEN=varlen,
            PREFIX=PREFIX,
            BLOCK=block, RUN=statistic_run(block, warps),
            num_warps=warps,
            **(dict(HAS_STATE=True) if state is not None else {}),
            DIAGNOSTICS=options.diagnostics,
            FLAT=flat,
            **finish_settings,
            CHECK_MASK=mask_ok is not None,
            FLOAT_MASK=mask is not None and mask.dtype.is_floating_point,
            **layout_anchor(batch.device, block, warps, (lp, old, mask), flat),
        )

    def loss_backward(self, grad, row_scale, grad_output, cu_seqlens, dtype, plan=None):
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
        if out.numel() == 0:
            return out
        wanted = self.backward_plan_shape(cu_seqlens, True)
        kept = plan if plan is not None and wanted[0] and tuple(plan.shape) == wanted else None
        _, _, tiling = self._plan(grad.shape, cu_seqlens, grad.device, kept)  # packed: the forward's tile table
        if not tiling.varlen:  # elementwise: any split will do, so use many small tiles
            tile = min(1024, _pow2_at_least(tiling.width))
            tiling = dataclasses.replace(tiling, tile_size=tile, grid=(tiling.num_seqs, _cdiv(tiling.width, tile)))
        kernels.kpo_loss_bwd_kernel[tiling.grid](
            grad, row_scale, grad_output.reshape(1), out, *tiling.launch_args(),
            tiling.num_seqs, tiling.width, tiling.tile_size, tiling.search_steps, IS_VARLEN=tiling.varlen,
            BLOCK=min(1024, _pow2_at_least(tiling.tile_size)), num_warps=4,
        )
        return out
