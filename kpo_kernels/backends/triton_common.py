"""Compile-time constants and the device functions the Triton kernels share: the scan's affine
maps, the diagnostics of docs/math.md section 5b, and where a program's tile lies
(triton_kernels.py describes the work split)."""

import triton
import triton.language as tl

from ..options import AGG_MODES
from ..options import KL_CLAMP as _KL_CLAMP
from .triton_env import NVIDIA_PTX

# Aggregation modes as compile-time constants, numbered in options.AGG_MODES order.
AGG_TOKEN_MEAN = tl.constexpr(0)
AGG_TOKEN_SUM = tl.constexpr(1)
AGG_SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)  # the default branch of the weights
AGG_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
AGG_SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)
AGG_CODES = {name: code for code, name in enumerate(AGG_MODES)}
KL_CLAMP = tl.constexpr(_KL_CLAMP)


_NVIDIA_PTX = tl.constexpr(NVIDIA_PTX)  # compiled for an NVIDIA GPU (triton_env)
_LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    """exp(x) of float32 x, on a GPU as 2^(x log2 e) in one ex2.approx.ftz: tl.exp's ex2.approx
    without .ftz takes three instructions more to keep results below 2^-126 (denormal), which
    this flushes to 0 (docs/numerics.md). The interpreter cannot run PTX, nor an AMD GPU:
    tl.exp there."""
    if _NVIDIA_PTX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * _LOG2_E], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.exp(x)


# ----------------------------------------------------------------------------- the scan


@triton.jit
def _compose(c1, b1, c2, b2):
    """Affine map (c1, b1) followed by (c2, b2), with x -> (1 - c) x + b.

    Carrying c = 1 - a instead of a keeps the digits of tiny gains (docs/math.md section 2). Both parts
    are exact resets: c1 = 1 (a gain of 1, e.g. the first token under a diffuse prior) gives
    c = 1 whatever c2, and c2 = 1 gives b = b2; the state before them leaves no trace.
    """
    return c1 + c2 * (1.0 - c1), b1 - c2 * b1 + b2


@triton.jit
def _block_maps(z, valid, in_bounds, pos, gains_ptr, gains_last, seen, SKIP: tl.constexpr):
    """Inclusive composition of the affine maps of one block: (C, B) with
    x_t = (1 - C_t) x_before + B_t, and the observations consumed after the block.

    z: log-ratios, 0 where not valid. seen: observations consumed before the block (skip mode).
    pos: positions in the sequence (the gain index in position mode). Out-of-bounds tokens are
    identity maps. Gain indices are clamped to gains_last, the table's last entry: the table
    ends where the gains have saturated (tables.table_length).
    """
    if SKIP:
        count = seen + tl.cumsum(valid.to(tl.int32), 0)
        gain = tl.load(gains_ptr + tl.minimum(count - 1, gains_last), mask=valid, other=0.0)
        seen = seen + tl.sum(valid.to(tl.int32), 0)
    else:
        gain = tl.load(gains_ptr + tl.minimum(pos, gains_last), mask=in_bounds, other=0.0)
    c, b = tl.associative_scan((gain, gain * z), 0, _compose)
    return c, b, seen


@triton.jit
def _last(values, BLOCK: tl.constexpr):
    """The last element of a block (NaN elsewhere in the block cannot leak into it)."""
    return tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, values, 0.0), 0)


@triton.jit
def _run_sum(values, BLOCK: tl.constexpr, RUN: tl.constexpr):
    """Sums of each RUN consecutive tokens of a block: with RUN the tokens a thread holds
    (triton_layout.statistic_run), within each thread, so that an accumulator of BLOCK // RUN
    lanes takes one register a thread. Any RUN dividing BLOCK gives the same sums, only at
    another cost: in the order the lanes are summed, which floats may round differently."""
    return tl.sum(tl.reshape(values, [BLOCK // RUN, RUN]), 1)


@triton.jit
def _run_max(values, BLOCK: tl.constexpr, RUN: tl.constexpr):
    """Maxima of each RUN consecutive tokens of a block, as _run_sum's sums."""
    return tl.max(tl.reshape(values, [BLOCK // RUN, RUN]), 1)


# ----------------------------------------------------------------------------- diagnostics (docs/math.md section 5b)

NO_TOKEN = tl.constexpr(9)  # sign code of "no valid token yet" (FilterState.last_sign's form, 0..9)
NO_SIGNS = tl.constexpr(15)  # the same in the fused forward's form (_sign_code: two 2-bit fields)


@triton.jit
def _variance_ratio(ratio_ptr, log_ratio_ptr, valid, pos, seen, last, SKIP: tl.constexpr):
    """(w, log w), w = R / S = 1 - K of each valid token's observation (innovation.py), from
    their tables, indexed like its gain (seen: observations before the block; indices clamped
    to the tables' last entry `last`, as _block_maps clamps the gains); (1, 0) at other tokens
    (never used). log w from a table: a float32 log costs the fused forward about one
    instruction a token (sm_90a), a second load a fraction of that."""
    if SKIP:
        index = tl.minimum(seen + tl.cumsum(valid.to(tl.int32), 0) - 1, last)
    else:
        index = tl.minimum(pos, last)
    return tl.load(ratio_ptr + index, mask=valid, other=1.0), tl.load(log_ratio_ptr + index, mask=valid, other=0.0)


@triton.jit
def _shift_in(values, first, BLOCK: tl.constexpr):
    """values moved one lane up: lane t gets lane t - 1's value, lane 0 gets `first`."""
    lanes = tl.arange(0, BLOCK)
    return tl.where(lanes == 0, first, tl.gather(values, tl.maximum(lanes - 1, 0), 0))


@triton.jit
def _sign(v):
    """-1, 0 or 1 (0 for 0 and NaN)."""
    return tl.where(v > 0, 1, tl.where(v < 0, -1, 0))


@triton.jit
def _sign_code(z, x, valid):
    """4 (sign(z) + 1) + sign(x) + 1 at valid tokens (two 2-bit fields), NO_SIGNS elsewhere."""
    return tl.where(valid, 4 * (_sign(z) + 1) + _sign(x) + 1, NO_SIGNS)


@triton.jit
def _bit_code(code):
    """A sign code of the 0..9 form (3 (sign(z) + 1) + sign(x) + 1, or NO_TOKEN) in _sign_code's."""
    return tl.where(code == NO_TOKEN, NO_SIGNS, 4 * (code // 3) + code % 3)


@triton.jit
def _latest(a, b):
    """The later valid sign code (a scan of it gives the latest valid token so far)."""
    return tl.where(b != NO_SIGNS, b, a)


@triton.jit
def _flips(code, previous):
    """(pair, raw flip, filtered flip) of each token against the previous valid token's code.
    Two signs + 1 in 0..2 are strictly opposite exactly when their XOR is 2 (0 ^ 2)."""
    pair = (code != NO_SIGNS) & (previous != NO_SIGNS)
    both = code ^ previous
    return pair, pair & ((both >> 2) == 2), pair & ((both & 3) == 2)


@triton.jit
def _pack3(a, b, c):
    """Three flags as one int32 increment, 10 bits a field."""
    return a.to(tl.int32) + (b.to(tl.int32) << 10) + (c.to(tl.int32) << 20)


@triton.jit
def _unpack3_sum(packed, field: tl.constexpr):
    """The sum over lanes of one 10-bit field of _pack3 counts, as float32."""
    return tl.sum((packed >> (10 * field)) & 1023, 0).to(tl.float32)


@triton.jit
def _compose_latest(c1, b1, cl1, bl1, k1, c2, b2, cl2, bl2, k2):
    """Tile summaries (M, L, k) composed in order: M the tile's map, L the map from its entry to
    the state after its last valid token, k that token's sign(z) + 1 (3: no valid token)."""
    c, b = _compose(c1, b1, c2, b2)
    later = k2 != 3.0
    cl, bl = _compose(c1, b1, cl2, bl2)
    return c, b, tl.where(later, cl, cl1), tl.where(later, bl, bl1), tl.where(later, k2, k1)


@triton.jit
def _fold_tiles(agg_ptr, num_slots, first, tiles, zero, PREFIX: tl.constexpr):
    """The (M, L, k) summaries (rows 0-4 of agg) of a sequence's tiles 0..tiles-1 composed in
    order, with a scan (the composition is not commutative: never tl.reduce). zero: a float32
    0 of the caller's shape."""
    c_in = zero
    b_in = zero
    cl_in = zero
    bl_in = zero
    k_in = zero + 3.0
    for k in range(0, tiles, PREFIX):
        ks = k + tl.arange(0, PREFIX)
        earlier = ks < tiles
        c = tl.load(agg_ptr + first + ks, mask=earlier, other=0.0)
        b = tl.load(agg_ptr + num_slots + first + ks, mask=earlier, other=0.0)
        cl = tl.load(agg_ptr + 2 * num_slots + first + ks, mask=earlier, other=0.0)
        bl = tl.load(agg_ptr + 3 * num_slots + first + ks, mask=earlier, other=0.0)
        kk = tl.load(agg_ptr + 4 * num_slots + first + ks, mask=earlier, other=3.0)
        c, b, cl, bl, kk = tl.associative_scan((c, b, cl, bl, kk), 0, _compose_latest)
        c_in, b_in, cl_in, bl_in, k_in = _compose_latest(
            c_in, b_in, cl_in, bl_in, k_in,
            _last(c, PREFIX), _last(b, PREFIX), _last(cl, PREFIX), _last(bl, PREFIX), _last(kk, PREFIX),
        )
    return c_in, b_in, cl_in, bl_in, k_in


@triton.jit
def _tile_state_and_latest(agg_ptr, num_slots, first, tile, x0, entering, PREFIX: tl.constexpr):
    """(state entering the tile, sign code of the sequence's last valid token before the tile):
    x0 pushed through the earlier tiles' maps (_fold_tiles); `entering` (the code before the
    sequence's first tile: NO_TOKEN, or the entering FilterState's) when they have no valid token."""
    # The zeros from the tile index, not x0 * 0.0: an entering state may be inf or NaN (an
    # earlier chunk's token was), and its NaN would make k_in, hence the sign code, garbage.
    c_in, b_in, cl_in, bl_in, k_in = _fold_tiles(agg_ptr, num_slots, first, tile, tile.to(tl.float32) * 0.0, PREFIX)
    x_latest = x0 - cl_in * x0 + bl_in
    code = tl.where(k_in != 3.0, 3 * k_in.to(tl.int32) + _sign(x_latest) + 1, entering)
    return x0 - c_in * x0 + b_in, code


@triton.jit
def _entering_state(x_ptr, count_ptr, sign_ptr, seq, last):
    """A sequence's entering FilterState (docs/math.md section 7): (x as float32, observations
    consumed as int32, sign code as int32). The count is clamped to the tables' last index
    `last`: every gain index is count + something >= 0, clamped to `last` anyway, so this
    changes no index and keeps int32 from overflowing."""
    x = tl.load(x_ptr + seq).to(tl.float32)
    count = tl.minimum(tl.load(count_ptr + seq).to(tl.int64), last).to(tl.int32)
    return x, count, tl.load(sign_ptr + seq).to(tl.int32)


# ----------------------------------------------------------------------------- layout


@triton.jit
def _locate(cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN: tl.constexpr,
            FLAT: tl.constexpr = False):
    """Where this program works.

    Returns (sequence, tile index in the sequence, slot of the sequence's first tile, this
    tile's slot, token offset of the sequence in the packed stream, tile start, tile end,
    sequence length); start/end are positions inside the sequence. Padded batches use a 2-D grid (row, tile).
    Packed batches use a 1-D grid over tile slots, an upper bound of the tile count;
    tile_offsets[s] is the first slot of sequence s, found by binary search. Programs past the
    last tile get an empty range. FLAT (kpo_loss_fwd_kernel's): the boundaries between a
    sequence's tiles sit at flat token indices that are multiples of 16 (tile_size is a multiple
    of 16), so that only its first tile's blocks reach back before it: the first tile is up to 15
    tokens shorter and the last up to 15 longer. Every kernel that reads another's per-tile
    counts or maps must locate with the same FLAT.
    """
    if IS_VARLEN:
        slot = tl.program_id(0)
        lo = slot * 0
        hi = lo + num_seqs
        for _ in range(search_steps):  # largest s < num_seqs with tile_offsets[s] <= slot
            mid = (lo + hi) // 2
            right = tl.load(tile_offsets_ptr + mid) <= slot
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        seq = lo
        first = tl.load(tile_offsets_ptr + seq)
        active = slot < tl.load(tile_offsets_ptr + num_seqs)
        tile = tl.where(active, slot - first, 0)  # spare programs: an empty first tile, no prefix reads
        seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        length = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    else:
        seq = tl.program_id(0)
        tile = tl.program_id(1)
        first = seq * tl.num_programs(1)
        slot = first + tile
        seq_start = seq.to(tl.int64) * T
        length = T
        active = tile >= 0
    tile_start = tile * tile_size
    tile_end = tl.where(active, tl.minimum(tile_start + tile_size, length), tile_start)
    if FLAT:
        shift = (seq_start % 16).to(tl.int32)
        last = tile_end == length
        tile_start = tl.maximum(tile_start - shift, 0)
        tile_end = tl.where(last, tile_end, tl.maximum(tile_end - shift, tile_start))
    return seq, tile, first, slot, seq_start, tile_start, tile_end, length


@triton.jit
def _first_block_start(seq_start, tile_start, tile_end, FLAT: tl.constexpr):
    """Where a tile's loop over blocks starts: its start, or with FLAT the flat index that is a
    multiple of 16 at or before it (the lanes before tile_start out of bounds); an empty tile
    (an emptied last tile of pass 2, a spare program) runs no block."""
    if FLAT:
        return tl.where(tile_end > tile_start, tile_start - ((seq_start + tile_start) % 16).to(tl.int32), tile_end)
    return tile_start


@triton.jit
def _anchored(valid, anchor_ptr, lanes, ANCHOR: tl.constexpr):
    """valid, and with ANCHOR a block of zero bytes loaded for the register layout they give
    the block (triton_layout.needs_layout_anchor): the result is valid itself."""
    if ANCHOR:
        return valid & (tl.load(anchor_ptr + lanes) == 0)
    return valid


@triton.jit
def _seq_base(ptr, seq, seq_start, stride_row, stride_tok, IS_VARLEN: tl.constexpr):
    """Pointer to token 0 of a sequence of an input (padded: row stride; packed: flat)."""
    if IS_VARLEN:
        return ptr + seq_start * stride_tok
    return ptr + seq.to(tl.int64) * stride_row


@triton.jit
def _load_valid(mask_row, stride, pos, in_bounds, HAS_MASK: tl.constexpr):
    """The mask as bools. Masks arrive as integers (float masks as their bit patterns, see
    TritonBackend._mask); the shift drops the sign bit, so that -0.0 reads as 0."""
    if HAS_MASK:
        return ((tl.load(mask_row + pos * stride, mask=in_bounds, other=0) << 1) != 0) & in_bounds
    return in_bounds


@triton.jit
def _load_checked_valid(mask_row, stride, pos, in_bounds, one, FLOAT_MASK: tl.constexpr):
    """(the mask as bools, as _load_valid reads it; where its value is neither 0 nor 1, NaN
    included). Integer masks: any value but 0 and 1 has a bit set above the lowest. Float masks (as the integers of their
    bits): bits other than the sign's set, and not `one`, the bits of 1.0 in the mask's dtype."""
    value = tl.load(mask_row + pos * stride, mask=in_bounds, other=0)
    if FLOAT_MASK:
        nonzero = (value << 1) != 0
        return nonzero & in_bounds, nonzero & (value != one)
    return (value != 0) & in_bounds, (value >> 1) != 0


@triton.jit
def _load_log_ratio(new_row, old_row, stride_new, stride_old, pos, valid, HAS_OLD: tl.constexpr):
    """z = new - old (or new alone), 0 where not valid. Garbage under the mask is never read."""
    z = tl.load(new_row + pos * stride_new, mask=valid, other=0.0).to(tl.float32)
    if HAS_OLD:
        z = z - tl.load(old_row + pos * stride_old, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, z, 0.0)


@triton.jit
def _tile_seen(counts_ptr, first, tile, tile_start, USE_COUNTS: tl.constexpr, PREFIX: tl.constexpr):
    """Observations consumed before the tile: the valid tokens of the sequence's earlier tiles,
    or the tile start when every token counts (no mask, or position mode)."""
    if USE_COUNTS:
        seen = tile_start * 0
        for k in range(0, tile, PREFIX):
            ks = k + tl.arange(0, PREFIX)
            seen += tl.sum(tl.load(counts_ptr + first + ks, mask=ks < tile, other=0), 0)
        return seen
    return tile_start


@triton.jit
def _tile_state(agg_ptr, num_slots, first, tile, x0, PREFIX: tl.constexpr):
    """State entering the tile: x0 pushed through the composed maps of the sequence's earlier
    tiles, PREFIX tiles at a time.

    The composition is not commutative, so it is folded with a scan, which keeps the order, and
    never with tl.reduce: on GPUs tl.reduce combines lanes in butterfly order (it assumes a
    commutative operation), which the interpreter's in-order fold would not reveal.
    """
    c_in = tile.to(tl.float32) * 0.0  # not x0 * 0.0: an entering state may be inf or NaN
    b_in = tile.to(tl.float32) * 0.0
    for k in range(0, tile, PREFIX):
        ks = k + tl.arange(0, PREFIX)
        earlier = ks < tile
        c = tl.load(agg_ptr + first + ks, mask=earlier, other=0.0)
        b = tl.load(agg_ptr + num_slots + first + ks, mask=earlier, other=0.0)
        c_scan, b_scan = tl.associative_scan((c, b), 0, _compose)
        c_in, b_in = _compose(c_in, b_in, _last(c_scan, PREFIX), _last(b_scan, PREFIX))
    return x0 - c_in * x0 + b_in
