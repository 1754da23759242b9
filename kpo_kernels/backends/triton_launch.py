"""The Triton backend's launch configuration: block, warps and the cut of sequences into tiles
(`LaunchPlan`, mixed into `TritonBackend`), and the kernels' module, imported once here."""

import collections
import dataclasses
import functools
import math
import struct
import threading

import torch

from .. import tables
from .triton_env import INTERPRETED

_IMPORT_ERROR = None
try:
    from . import triton_kernels as kernels
except Exception as error:  # noqa: BLE001 - any failure means "no Triton here"
    kernels = None
    _IMPORT_ERROR = error


# Tokens per scan block. Up to 512: 2 per thread (at most 8 warps). Rows longer than 512 use
# 1024-token blocks at 4 warps, 8 tokens per thread: on an H200 (tune sweep of 2026-12-04,
# benchmarks/RESULTS.md) the fused step was 1.07x (512 x 8192 fp32), 1.16x (bf16) and 1.14x
# (64 x 4096) faster than 512-token blocks at 8 warps, the best of blocks 512-2048 x 4/8 warps.
MAX_BLOCK = 1024
WIDE_BLOCK_WARPS = 4
PREFIX = 64  # earlier tiles folded per scan step
UNDERFILLED_ROWS_PER_SM = 2  # fewer rows than this per SM: split rows into tiles
# Tiles are sized for about this many programs per SM: what every fused forward gets with the
# 1024-token blocks at 4 warps of split rows (128-255 registers a thread on sm_90: at least 2
# programs of 4 warps fit the register file, 3 or 4 for some; tests/test_compile_sm90.py holds
# every forward variant to 2).
PROGRAMS_PER_SM = 2
# Warps an SM holds at 255 registers a thread (65536 registers, 256 a thread allocated): the
# occupancy every kernel reaches whatever its register count (_programs_per_sm).
WORST_CASE_WARPS_PER_SM = 65536 // (256 * 32)
INT32_OFFSETS = 2**31  # kernels index tokens with int32 positions times strides
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_TENSOR_NUMEL = 2**20  # Triton's limit on the elements of one block
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# The loss kernel counts tokens per lane in 10-bit fields (at most 1023 a lane), and the last tile
# of a FLAT sequence (triton_common._locate) holds up to 15 tokens more than tile_size: one block
# more, so tiles of at most 1022 blocks.
MAX_BLOCKS_PER_TILE = 1022


def triton_import_error():
    """The exception raised while importing Triton, or None if it imported."""
    return _IMPORT_ERROR


def _derivative_dtype(dtype):
    """The per-token derivative waits for backward in float32, or in bfloat16 for bfloat16
    inputs: the gradient ends in bfloat16 anyway and the round trip then moves half the bytes.
    (float16 keeps float32: an unweighted -A * rt can exceed its range.)"""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def float64_parts(value):
    """Three float32 numbers whose float64 sum is `value` (a finite float64 within float32's
    range): kernels take Python floats as float32 (Triton's interpreter rounds them so even
    where a float64 parameter is declared), and three times 24 bits hold float64's 53."""
    parts = []
    for _ in range(3):
        part = struct.unpack("f", struct.pack("f", value))[0]
        parts.append(part)
        value -= part
    return parts


def float64_parts_fit(value):
    """Whether `float64_parts` carries `value` exactly (not so beyond float32's range, nor below
    its normal numbers, ~1e-30 and less, whose parts lose bits or round to 0)."""
    if not math.isfinite(value) or abs(value) >= 3.4e38:
        return False
    parts = float64_parts(value)
    return (parts[0] + parts[1]) + parts[2] == value


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


def _finalize_tiles_per_step(tiling):
    """How many tiles of each sequence the finalize sums per step: 1 when sequences are
    one tile (or two) each, more for a few long sequences cut into many tiles (2 x 131072 on an
    H200: 128 tiles each, 36 us of a 63 us step with one tile per step). Padded batches know
    their tiles per sequence; for packed ones slots / sequences overestimates the mean by < 1."""
    mean = 1.0 if tiling is None else tiling.num_slots / max(1, tiling.num_seqs)
    return 1 if mean <= 2 else 16 if mean <= 17 else 128


def _finalize_launch(tiles):
    """The finalize kernel's per-sequence layout (a batch without tiles; in the forward:
    _fused_finalize_launch) for `tiles` tiles per step: SEQ_BLOCK, TILES
    and num_warps (sequences x tiles per step within 4096 values; 512 sequences for one tile:
    at 1024 and 4 warps ptxas spilled 20-32 bytes in some specialisations)."""
    if tiles == 1:
        return dict(SEQ_BLOCK=512, TILES=1, num_warps=4)
    return dict(SEQ_BLOCK=4096 // tiles, TILES=tiles, num_warps=8)


# triton_finalize.finalize's arguments after stats_ptr, in its order
FinalizeArguments = collections.namedtuple("FinalizeArguments", (
    "tile_offsets", "cu_seqlens", "row_scale", "loss", "metrics", "num_seqs", "num_slots", "tiles_per_seq", "T",
    "dp_size", "token_count", "sequence_count", "token_count_ptr", "sequence_count_ptr", "loss_scale_factor",
))


def finalize_arguments(batch, options, tiling, stats, row_scale, loss, metrics):
    """(arguments, settings) of triton_finalize.finalize after `stats`, as the finalize
    kernel takes them (the forward takes the same, less those it has itself), less IS_VARLEN
    (the forward's own) and the layout of its loops (_finalize_launch, _fused_finalize_launch)."""
    device = batch.device
    varlen = batch.cu_seqlens is not None
    dummy = torch.empty(1, dtype=torch.int32, device=device)

    def count(value):  # (mode, scalar, pointer): see triton_finalize.finalize
        if value is None:
            return 0, 0.0, dummy
        if isinstance(value, torch.Tensor):
            return 2, 0.0, value
        return 1, float(value), dummy

    token_mode, token_value, token_ptr = count(options.batch_num_tokens)
    sequence_mode, sequence_value, sequence_ptr = count(options.global_batch_size)
    arguments = FinalizeArguments(
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
    )
    settings = dict(
        AGG=kernels.AGG_CODES[options.agg],
        TOKEN_COUNT=token_mode,
        SEQUENCE_COUNT=sequence_mode,
        HAS_SCALE_FACTOR=options.loss_scale_factor is not None,
    )
    return arguments, settings


def _fused_finalize_launch(tiles, warps, block):
    """The finalize's layout inside the fused forward's last program of `warps` warps: each step
    waits for its loads from L2 while the other SMs idle, so steps, not instructions, set its
    time, and it takes as many values a step as registers allow. The 1024-token blocks' forward
    holds 128-255 registers a thread, room for 4 values a thread (17 statistics rows of tile
    slots, and sequence x tile values); other forwards hold 52-96 at 1 or 8 warps, room for 1
    (tests/test_compile_sm90.py holds every variant to its programs per SM without the finalize)."""
    values = 32 * warps * (4 if block >= 1024 else 1)
    return dict(BLOCK_S=values, SEQ_BLOCK=max(1, values // tiles), TILES=min(tiles, values))


@functools.lru_cache(maxsize=None)
def float_one_bits(dtype):
    """The bits of 1.0 in a float dtype, as the signed integer of its size (how the kernels read
    a float mask: TritonBackend._mask)."""
    return int(torch.tensor(1.0, dtype=dtype).view(_SAME_SIZE_INT[torch.finfo(dtype).bits // 8]))


class FinishCounters:
    """The fused forward's count of finished programs and its mask-values flag
    (kpo_loss_fwd_kernel's done_ptr: two int32), 0 between launches (the last program sets them
    back). On CUDA one pair per device and stream:
    launches in one stream run one after another, so they take turns with it, and never share
    it with another stream's. While a CUDA graph is captured, a count of that launch alone,
    zeroed inside the graph. Under the interpreter (kernels run in the calling thread) one per
    thread."""

    MOST = 64  # streams remembered; a forgotten count is freed in its stream's order, as any tensor

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.OrderedDict()

    def get(self, device):
        if tables.capturing(device):
            return torch.zeros(2, dtype=torch.int32, device=device)
        if device.type == "cuda":
            key = (device, torch.cuda.current_stream(device).cuda_stream)
        else:
            key = (device, _thread_key())
        with self._lock:
            count = self._counts.get(key)
            if count is None:
                count = self._counts[key] = torch.zeros(2, dtype=torch.int32, device=device)
                while len(self._counts) > self.MOST:
                    self._counts.popitem(last=False)
            self._counts.move_to_end(key)
            return count


_thread_key = threading.get_ident
FINISH_COUNTERS = FinishCounters()


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
    offsets_valid: torch.Tensor = None  # packed: 1 if cu_seqlens's values are valid, else 0 (tile_offsets_kernel)
    plan: torch.Tensor = None  # packed: tile_offsets and offsets_valid in one buffer, which backward reuses

    @property
    def tiles_per_seq(self):
        return self.grid[1] if not self.varlen else 0

    def launch_args(self):
        return self.cu_seqlens, self.tile_offsets


class LaunchPlan:
    """Block, warps and tiling of a batch, from a backend's `block_size`, `tile_size` and
    `num_warps` settings (None: the tuned defaults above)."""

    def _block(self, typical_length):
        if self.block_size is not None:
            return self.block_size
        # With chosen warps, at most the wide blocks' 8 tokens a thread: 16 a thread (1024
        # tokens at 2 warps) spill the fused forward's registers on sm_90.
        widest = MAX_BLOCK if self.num_warps is None else MAX_BLOCK // WIDE_BLOCK_WARPS * self.num_warps
        return min(MAX_BLOCK, widest, max(16, _pow2_at_least(typical_length)))

    def _warps(self, block):
        if self.num_warps is not None:
            return self.num_warps
        if block >= 1024:
            return WIDE_BLOCK_WARPS
        return max(1, min(8, block // 64))  # two tokens per thread

    def _programs_per_sm(self, block):
        """The programs of the fused forward resident per SM that tiles are sized for. The
        defaults' compiled variants all reach PROGRAMS_PER_SM on sm_90 (tests/test_compile_sm90.py
        holds them to it). With a chosen block size or warp count the variant is the user's, so
        the tiles assume what fits at the most registers a thread can have (255, allocated as 256:
        8 warps an SM), capped at PROGRAMS_PER_SM: never more than the compiled kernel reaches."""
        if self.block_size is None and self.num_warps is None:
            return PROGRAMS_PER_SM
        return max(1, min(PROGRAMS_PER_SM, WORST_CASE_WARPS_PER_SM // self._warps(block)))

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
                wanted = max(block, _pow2_at_least(_cdiv(tokens, self._programs_per_sm(block) * sms)))
        wanted = min(wanted, MAX_BLOCKS_PER_TILE * block)
        return _cdiv(max(1, min(wanted, longest)), block) * block

    def _plan(self, shape, cu_seqlens, device, plan=None):
        """(block, warps, tiling) of a padded (B, T) or packed (N,) batch; `plan`: a packed
        batch's tile table from an earlier plan of the same batch (`_Tiling.plan`), not rebuilt."""
        if cu_seqlens is None:
            typical = shape[1]
        else:
            typical = _cdiv(shape[0], max(1, cu_seqlens.numel() - 1))  # mean sequence length
        block = self._block(typical)
        return block, self._warps(block), self._tiling(shape, cu_seqlens, device, block, plan)

    def _tiling(self, shape, cu_seqlens, device, block, plan=None):
        if cu_seqlens is None:
            rows, width = shape
            tile = self._tile(rows, rows * width, width, block, device)
            tiles = _cdiv(width, tile)
            dummy = torch.empty(1, dtype=torch.int32, device=device)
            return _Tiling(False, rows, width, tile, rows * tiles, (rows, tiles), tiles > 1, 1, dummy, dummy, width)
        tokens, sequences = shape[0], cu_seqlens.numel() - 1
        tile = self._tile(sequences, tokens, max(tokens, 1), block, device)
        slots = _cdiv(tokens, tile) + sequences
        offsets = plan
        if offsets is None:
            offsets = torch.empty(sequences + 2, dtype=torch.int32, device=device)  # and the offsets' validity
            kernels.tile_offsets_kernel[(1,)](cu_seqlens, offsets, offsets[sequences + 1:], sequences, tokens, tile, BLOCK_S=1024)
        steps = max(1, sequences.bit_length())
        longest = tables.packed_longest(cu_seqlens, tokens)  # the tables' length bound
        return _Tiling(True, sequences, 0, tile, slots, (slots,), tokens > tile, steps, cu_seqlens, offsets[: sequences + 1],
                       max(longest, 1), offsets[sequences + 1:], offsets)
