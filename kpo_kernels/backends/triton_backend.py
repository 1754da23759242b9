"""Triton backend: launches the kernels of `triton_kernels` (CUDA, or CPU under TRITON_INTERPRET=1)."""

import dataclasses
import functools
import math
import os

import torch

from .. import tables
from ..gains import saturation_index
from ..options import METRIC_NAMES
from ..state import ChunkMaps
from ..validation import check_bool, check_count
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

# Tokens per scan block. Up to 512: 2 per thread (at most 8 warps). Rows longer than 512 use
# 1024-token blocks at 4 warps, 8 tokens per thread: on an H200 (tune sweep of 2026-12-04,
# benchmarks/RESULTS.md) the fused step was 1.07x (512 x 8192 fp32), 1.16x (bf16) and 1.14x
# (64 x 4096) faster than 512-token blocks at 8 warps, the best of blocks 512-2048 x 4/8 warps.
MAX_BLOCK = 1024
WIDE_BLOCK_WARPS = 4
PREFIX = 64  # earlier tiles folded per scan step
UNDERFILLED_ROWS_PER_SM = 2  # fewer rows than this per SM: split rows into tiles
PROGRAMS_PER_SM = 3  # tiles are sized for about this many programs per SM (see MAX_BLOCK)
INT32_OFFSETS = 2**31  # kernels index tokens with int32 positions times strides
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_TENSOR_NUMEL = 2**20  # Triton's limit on the elements of one block
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MAX_BLOCKS_PER_TILE = 1023  # the loss kernel counts tokens per lane in 10-bit fields


def triton_import_error():
    """The exception raised while importing Triton, or None if it imported."""
    return _IMPORT_ERROR


def _derivative_dtype(dtype):
    """The per-token derivative waits for backward in float32, or in bfloat16 for bfloat16
    inputs: the gradient ends in bfloat16 anyway and the round trip then moves half the bytes.
    (float16 keeps float32: an unweighted -A * rt can exceed its range.)"""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


def _finalize_tiles_per_step(tiling):
    """How many tiles of each sequence the finalize kernel sums per step: 1 when sequences are
    one tile (or two) each, more for a few long sequences cut into many tiles (2 x 131072 on an
    H200: 128 tiles each, 36 us of a 63 us step with one tile per step). Padded batches know
    their tiles per sequence; for packed ones slots / sequences overestimates the mean by < 1."""
    mean = 1.0 if tiling is None else tiling.num_slots / max(1, tiling.num_seqs)
    return 1 if mean <= 2 else 16 if mean <= 17 else 128


def _finalize_launch(tiles):
    """The finalize kernel's per-sequence layout for `tiles` tiles per step: SEQ_BLOCK, TILES
    and num_warps (sequences x tiles per step within 4096 values, 1024 sequences for one tile)."""
    if tiles == 1:
        return dict(SEQ_BLOCK=1024, TILES=1, num_warps=4)
    return dict(SEQ_BLOCK=4096 // tiles, TILES=tiles, num_warps=8)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclasses.dataclass
class _Tiling:
    """How the tokens of a batch are cut into tiles (see triton_kernels)."""

    varlen: bool
    num_seqs: int
    width: int  # T for padded batches (0 for packed ones)
    tile_size: int
    num_slots: int
    grid: tuple
    multi_tile: bool
    search_steps: int
    cu_seqlens: torch.Tensor  # the packed offsets (a dummy for padded batches)
    tile_offsets: torch.Tensor  # first tile slot of each sequence (a dummy for padded batches)
    longest: int  # a bound of the sequence length (T; packed: the longest, or N): the gain table's length

    @property
    def tiles_per_seq(self):
        return self.grid[1] if not self.varlen else 0

    def launch_args(self):
        return self.cu_seqlens, self.tile_offsets


class TritonBackend(Backend):
    """The fused Triton kernels: pass an instance as `backend=` to choose their launch settings.

    `backend="triton"` (or "auto" on CUDA) uses `TritonBackend()`, the tuned defaults. Runs on
    CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests). Create it
    outside a compiled function. docs/api.md lists where each backend runs.

    Args:
        block_size: tokens per scan block, a power of two from 2 (default: the rows' typical
            length rounded up to a power of two, at most 1024).
        tile_size: tokens per program, an int >= 1; sequences longer than a tile are split across
            programs (default on CUDA: whole rows when there are enough rows to fill the GPU,
            else tiles sized for about PROGRAMS_PER_SM (3) programs per SM; under the interpreter:
            whole sequences).
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

    # ------------------------------------------------------------------ launch configuration

    def _block(self, typical_length):
        if self.block_size is not None:
            return self.block_size
        return min(MAX_BLOCK, max(16, _pow2_at_least(typical_length)))

    def _warps(self, block):
        if self.num_warps is not None:
            return self.num_warps
        if block >= 1024:
            return WIDE_BLOCK_WARPS
        return max(1, min(8, block // 64))  # two tokens per thread

    def _tile(self, rows, tokens, longest, block, device):
        """Tokens per tile, a multiple of the block."""
        if self.tile_size is not None:
            wanted = self.tile_size
        elif device.type != "cuda":
            wanted = longest  # the interpreter runs programs one at a time: no point splitting
        else:
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            if rows >= UNDERFILLED_ROWS_PER_SM * sms:
                wanted = longest
            else:
                wanted = max(block, _pow2_at_least(_cdiv(tokens, PROGRAMS_PER_SM * sms)))
        wanted = min(wanted, MAX_BLOCKS_PER_TILE * block)
        return _cdiv(max(1, min(wanted, longest)), block) * block

    def _plan(self, shape, cu_seqlens, device):
        """(block, warps, tiling) of a padded (B, T) or packed (N,) batch."""
        if cu_seqlens is None:
            typical = shape[1]
        else:
            typical = _cdiv(shape[0], max(1, cu_seqlens.numel() - 1))  # mean sequence length
        block = self._block(typical)
        return block, self._warps(block), self._tiling(shape, cu_seqlens, device, block)

    def _tiling(self, shape, cu_seqlens, device, block):
        if cu_seqlens is None:
            rows, width = shape
            tile = self._tile(rows, rows * width, width, block, device)
            tiles = _cdiv(width, tile)
            dummy = torch.empty(1, dtype=torch.int32, device=device)
            return _Tiling(False, rows, width, tile, rows * tiles, (rows, tiles), tiles > 1, 1, dummy, dummy, width)
        tokens, sequences = shape[0], cu_seqlens.numel() - 1
        tile = self._tile(sequences, tokens, max(tokens, 1), block, device)
        slots = _cdiv(tokens, tile) + sequences
        offsets = torch.empty(sequences + 1, dtype=torch.int32, device=device)
        kernels.tile_offsets_kernel[(1,)](cu_seqlens, offsets, sequences, tile, BLOCK_S=1024)
        steps = max(1, sequences.bit_length())
        longest = tables.packed_longest(cu_seqlens, tokens)  # the tables' length bound
        return _Tiling(True, sequences, 0, tile, slots, (slots,), tokens > tile, steps, cu_seqlens, offsets, max(longest, 1))

    def _empty(self, shape, dtype, device):
        if self.poison:
            poison = float("nan") if dtype.is_floating_point else max(-(2**30), torch.iinfo(dtype).min)
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

    def _tile_passes(self, tiling, new, old, mask, gains, options, block, warps, latest=False, count=None, every_tile=False):
        """Passes 1 and 2 for sequences longer than a tile: (valid counts, tile maps). latest:
        also each tile's map to its last valid token and that token's sign (the loss's sign flips).
        count: observations each sequence consumed before (an entering state). every_tile: also
        the last tile of each sequence, even when it is the only one (chunk_maps)."""
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
                num_warps=warps, **({"EVERY_TILE": True} if every_tile else {}),
            )
        aggregates = self._empty((5 if latest else 2, tiling.num_slots), torch.float32, device)
        kernels.tile_aggregate_kernel[tiling.grid](
            new, old if old is not None else new, mask_arg if mask is not None else new, gains, gains.numel() - 1,
            *tiling.launch_args(), counts, aggregates, count, tiling.num_seqs, tiling.num_slots, tiling.width,
            tiling.tile_size, tiling.search_steps, *self._strides(new, tiling.varlen),
            *self._strides(old if old is not None else new, tiling.varlen), *self._strides(mask, tiling.varlen),
            HAS_OLD=old is not None, HAS_MASK=mask is not None, SKIP=options.skip, IS_VARLEN=tiling.varlen,
            PREFIX=PREFIX, BLOCK=block, STORE_LATEST=latest, num_warps=warps, **state_kwargs,
        )
        return counts, aggregates

    # ------------------------------------------------------------------ an entering state

    @staticmethod
    def _table_longest(tiling, options, count):
        """The sequence-length bound the tables are sized by: the batch's (tiling.longest), plus
        the observations consumed before when sequences enter with a state (the gain index
        runs up to count + length). Counts on the CPU give it exactly; on CUDA, without a host
        synchronisation, the tables run to the gains' saturation (q > 0), past which every
        gain index is clamped. q = 0 never saturates: there the largest count is read (one
        synchronisation)."""
        if count is None or count.numel() == 0:
            return tiling.longest
        if count.device.type == "cpu":
            return tiling.longest + max(0, int(count.max()))
        saturation = saturation_index(options.q, options.r, options.p0)
        if saturation is not None:
            return max(tiling.longest, saturation + 1)
        return tiling.longest + max(0, int(count.max()))  # q = 0 on CUDA: the one synchronisation

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
        slots = 0 if empty else tiling.num_slots
        stats = self._empty((NUM_STATS, slots), torch.float32, device)
        grad = self._empty(batch.shape, _derivative_dtype(batch.log_prob.dtype), device) if need_grad else None
        if slots > 0:
            self._launch_loss(batch, options, tiling, stats, grad, block, warps, state)
        row_scale = self._empty((sequences,), torch.float32, device)
        loss, metrics = self._empty((), torch.float32, device), self._empty((len(METRIC_NAMES),), torch.float32, device)
        self._launch_finalize(batch, options, tiling, stats, row_scale, loss, metrics)
        return LossForward(loss=loss, metrics=metrics, grad=grad, row_scale=row_scale)

    def _launch_loss(self, batch, options, tiling, stats, grad, block, warps, state=None):
        filt = options.filter
        varlen = tiling.varlen
        state_x, state_count, state_sign = self._state_args(state)
        longest = self._table_longest(tiling, filt, state_count)
        gains = tables.gain_table(longest, filt.q, filt.r, filt.p0, batch.device, torch.float32)
        lp, old, adv, mask, weights = (
            self._addressable(t) for t in (batch.log_prob, batch.old_log_prob, batch.advantages, batch.mask, batch.is_weights)
        )
        ratios = tables.variance_ratio_table(longest, filt.q, filt.r, filt.p0, batch.device, torch.float32)
        counts, aggregates = self._tile_passes(tiling, lp, old, mask, gains, filt, block, warps, latest=True, count=state_count)
        adv_per_token = batch.advantages_per_token
        adv_strides = self._strides(adv, varlen) if adv_per_token else (adv.stride(0), 0)
        kernels.kpo_loss_fwd_kernel[tiling.grid](
            lp, old, self._mask(mask) if mask is not None else lp, adv, weights if weights is not None else lp,
            gains, gains.numel() - 1, ratios, ratios.numel() - 1, *tiling.launch_args(), counts, aggregates, grad if grad is not None else stats, stats,
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
            BLOCK=block,
            num_warps=warps,
            **(dict(HAS_STATE=True) if state is not None else {}),
        )

    def _launch_finalize(self, batch, options, tiling, stats, row_scale, loss, metrics):
        device = batch.device
        varlen = batch.cu_seqlens is not None
        dummy = torch.empty(1, dtype=torch.int32, device=device)

        def count(value):  # (mode, scalar, pointer): see kpo_loss_finalize_kernel
            if value is None:
                return 0, 0.0, dummy
            if isinstance(value, torch.Tensor):
                return 2, 0.0, value
            return 1, float(value), dummy

        tiles = _finalize_tiles_per_step(tiling)
        token_mode, token_value, token_ptr = count(options.batch_num_tokens)
        sequence_mode, sequence_value, sequence_ptr = count(options.global_batch_size)
        kernels.kpo_loss_finalize_kernel[(1,)](
            stats,
            tiling.tile_offsets if tiling is not None else dummy,
            batch.cu_seqlens if varlen else dummy,
            row_scale,
            loss,
            metrics,
            batch.num_sequences,
            stats.shape[1],
            tiling.tiles_per_seq if tiling is not None else 0,
            0 if varlen else batch.shape[1],
            float(options.dp_size),
            token_value,
            sequence_value,
            token_ptr,
            sequence_ptr,
            options.loss_scale_factor or 0.0,
            AGG=kernels.AGG_CODES[options.agg],
            TOKEN_COUNT=token_mode,
            SEQUENCE_COUNT=sequence_mode,
            HAS_SCALE_FACTOR=options.loss_scale_factor is not None,
            IS_VARLEN=varlen,
            BLOCK_S=1024,
            **_finalize_launch(tiles),
        )

    def loss_backward(self, grad, row_scale, grad_output, cu_seqlens, dtype):
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
        if out.numel() == 0:
            return out
        _, _, tiling = self._plan(grad.shape, cu_seqlens, grad.device)
        if not tiling.varlen:  # elementwise: any split will do, so use many small tiles
            tile = min(1024, _pow2_at_least(tiling.width))
            tiling = dataclasses.replace(tiling, tile_size=tile, grid=(tiling.num_seqs, _cdiv(tiling.width, tile)))
        kernels.kpo_loss_bwd_kernel[tiling.grid](
            grad, row_scale, grad_output.reshape(1), out, *tiling.launch_args(),
            tiling.num_seqs, tiling.width, tiling.tile_size, tiling.search_steps, IS_VARLEN=tiling.varlen,
            BLOCK=min(1024, _pow2_at_least(tiling.tile_size)), num_warps=4,
        )
        return out
