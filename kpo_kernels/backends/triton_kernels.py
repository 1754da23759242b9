"""Triton kernels: the KPO filter as an associative scan, fused with the loss and its gradient.

Work is split into *tiles*: contiguous token ranges inside one sequence (a row of a padded
batch, or a `cu_seqlens` segment of a packed one). A program walks its tile in blocks of BLOCK
tokens; inside a block the filter is `tl.associative_scan` over affine maps (c, b), and across
blocks the program carries the filtered state and the number of observations consumed (the
gain index in skip mode).

A sequence that fits in one tile needs one pass. Long sequences are cut into several tiles that
run in parallel (so that a few long rows still fill the GPU), in three passes:
  1. `tile_count_kernel`: valid tokens per tile (skip mode with a mask only: the gain index of
     a tile's first token is the number of valid tokens before it);
  2. `tile_aggregate_kernel`: each tile's composed affine map (its effect on the state);
  3. the main kernel: each tile folds the maps of the tiles before it into its starting state
     (a tree reduction), then filters its tokens and computes everything else.

The main loss kernel stores per tile the statistics of aggregation.STAT_NAMES and d loss /
d log_prob without the aggregation weight; `kpo_loss_finalize_kernel` (one program) turns the
statistics into per-sequence weights, the loss and the metrics; backward multiplies the stored
derivative by grad_output and the sequence's weight.

Math in float32 whatever the input dtype. NaN propagates through every `where` on purpose
(tl.minimum/maximum would drop it on GPUs).
"""

import triton
import triton.language as tl

from ..options import AGG_MODES
from ..options import KL_CLAMP as _KL_CLAMP

# Aggregation modes as compile-time constants, numbered in options.AGG_MODES order.
AGG_TOKEN_MEAN = tl.constexpr(0)
AGG_TOKEN_SUM = tl.constexpr(1)
AGG_SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)  # the default branch of the weights
AGG_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
AGG_SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)
AGG_CODES = {name: code for code, name in enumerate(AGG_MODES)}
KL_CLAMP = tl.constexpr(_KL_CLAMP)


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


# ----------------------------------------------------------------------------- diagnostics (docs/math.md section 5b)

NO_TOKEN = tl.constexpr(9)  # sign code of "no valid token yet"; see _sign_code


@triton.jit
def _variance_ratio(ratio_ptr, valid, pos, seen, last, SKIP: tl.constexpr):
    """w = R / S = 1 - K of each valid token's observation (innovation.py), indexed like its
    gain (seen: observations before the block; indices clamped to the table's last entry
    `last`, as _block_maps clamps the gains); 1 at other tokens (never used)."""
    if SKIP:
        count = seen + tl.cumsum(valid.to(tl.int32), 0)
        return tl.load(ratio_ptr + tl.minimum(count - 1, last), mask=valid, other=1.0)
    return tl.load(ratio_ptr + tl.minimum(pos, last), mask=valid, other=1.0)


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
    """3 (sign(z) + 1) + sign(x) + 1 in 0..8 at valid tokens, NO_TOKEN elsewhere."""
    return tl.where(valid, 3 * (_sign(z) + 1) + _sign(x) + 1, NO_TOKEN)


@triton.jit
def _latest(a, b):
    """The later valid sign code (a scan of it gives the latest valid token so far)."""
    return tl.where(b != NO_TOKEN, b, a)


@triton.jit
def _flips(code, previous):
    """(pair, raw flip, filtered flip) of each token against the previous valid token's code."""
    pair = (code != NO_TOKEN) & (previous != NO_TOKEN)
    raw = pair & ((code // 3 - 1) * (previous // 3 - 1) < 0)
    filtered = pair & ((code % 3 - 1) * (previous % 3 - 1) < 0)
    return pair, raw, filtered


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
def _tile_state_and_latest(agg_ptr, num_slots, first, tile, x0, PREFIX: tl.constexpr):
    """(state entering the tile, sign code of the sequence's last valid token before the tile):
    _tile_state, folding the (M, L, k) summaries of the earlier tiles (rows 0-4 of agg) in order
    with a scan (the composition is not commutative: never tl.reduce)."""
    c_in = x0 * 0.0
    b_in = x0 * 0.0
    cl_in = x0 * 0.0
    bl_in = x0 * 0.0
    k_in = x0 * 0.0 + 3.0
    for k in range(0, tile, PREFIX):
        ks = k + tl.arange(0, PREFIX)
        earlier = ks < tile
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
    x_latest = x0 - cl_in * x0 + bl_in
    code = tl.where(k_in != 3.0, 3 * k_in.to(tl.int32) + _sign(x_latest) + 1, NO_TOKEN)
    return x0 - c_in * x0 + b_in, code


# ----------------------------------------------------------------------------- layout


@triton.jit
def _locate(cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN: tl.constexpr):
    """Where this program works.

    Returns (sequence, tile index in the sequence, slot of the sequence's first tile, this
    tile's slot, token offset of the sequence in the packed stream, tile start, tile end,
    sequence length); start/end are positions inside the sequence. Padded batches use a 2-D grid (row, tile).
    Packed batches use a 1-D grid over tile slots, an upper bound of the tile count;
    tile_offsets[s] is the first slot of sequence s, found by binary search. Programs past the
    last tile get an empty range.
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
    return seq, tile, first, slot, seq_start, tile_start, tile_end, length


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
    c_in = x0 * 0.0
    b_in = x0 * 0.0
    for k in range(0, tile, PREFIX):
        ks = k + tl.arange(0, PREFIX)
        earlier = ks < tile
        c = tl.load(agg_ptr + first + ks, mask=earlier, other=0.0)
        b = tl.load(agg_ptr + num_slots + first + ks, mask=earlier, other=0.0)
        c_scan, b_scan = tl.associative_scan((c, b), 0, _compose)
        c_in, b_in = _compose(c_in, b_in, _last(c_scan, PREFIX), _last(b_scan, PREFIX))
    return x0 - c_in * x0 + b_in


# ----------------------------------------------------------------------------- passes 1 and 2


@triton.jit
def tile_count_kernel(
    mask_ptr,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    num_seqs,
    T,
    tile_size,
    search_steps,
    stride_mask_row,
    stride_mask_tok,
    IS_VARLEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1: valid tokens in each tile (but the last of a sequence: no tile after it reads it)."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN
    )
    tile_end = tl.where(tile_end == length, tile_start, tile_end)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(tile_start, tile_end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        total += _load_valid(mask_row, stride_mask_tok, pos, pos < tile_end, True).to(tl.int32)
    tl.store(counts_ptr + slot, tl.sum(total, 0))


@triton.jit
def tile_aggregate_kernel(
    new_ptr,
    old_ptr,
    mask_ptr,
    gains_ptr,
    gains_last,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    num_seqs,
    num_slots,
    T,
    tile_size,
    search_steps,
    stride_new_row,
    stride_new_tok,
    stride_old_row,
    stride_old_tok,
    stride_mask_row,
    stride_mask_tok,
    HAS_OLD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
    STORE_LATEST: tl.constexpr = False,
):
    """Pass 2: the composed affine map of each tile, stored as agg[0, slot] = C, agg[1, slot] = B
    (but for the last tile of a sequence: no tile after it reads it). STORE_LATEST (the loss's
    sign flips) also stores the map from the tile's entry to the state after its last valid
    token (agg[2], agg[3]) and that token's sign(z) + 1 (agg[4]; 3 when the tile has none)."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN
    )
    tile_end = tl.where(tile_end == length, tile_start, tile_end)
    new_row = _seq_base(new_ptr, seq, seq_start, stride_new_row, stride_new_tok, IS_VARLEN)
    old_row = _seq_base(old_ptr, seq, seq_start, stride_old_row, stride_old_tok, IS_VARLEN)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    seen = _tile_seen(counts_ptr, first, tile, tile_start, SKIP and HAS_MASK, PREFIX)
    c_tile = tile_start.to(tl.float32) * 0.0
    b_tile = tile_start.to(tl.float32) * 0.0
    cl_tile = c_tile
    bl_tile = b_tile
    k_tile = c_tile + 3.0
    for start in range(tile_start, tile_end, BLOCK):
        lanes = tl.arange(0, BLOCK)
        pos = start + lanes
        in_bounds = pos < tile_end
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        z = _load_log_ratio(new_row, old_row, stride_new_tok, stride_old_tok, pos, valid, HAS_OLD)
        c, b, seen = _block_maps(z, valid, in_bounds, pos, gains_ptr, gains_last, seen, SKIP)
        if STORE_LATEST:
            latest = tl.max(tl.where(valid, lanes, -1), 0)  # a max: any lane order gives the same
            pick = lanes == latest
            cl, bl = _compose(c_tile, b_tile, tl.sum(tl.where(pick, c, 0.0), 0), tl.sum(tl.where(pick, b, 0.0), 0))
            k = tl.sum(tl.where(pick, _sign(z) + 1, 0), 0).to(tl.float32)
            cl_tile = tl.where(latest >= 0, cl, cl_tile)
            bl_tile = tl.where(latest >= 0, bl, bl_tile)
            k_tile = tl.where(latest >= 0, k, k_tile)
        c_tile, b_tile = _compose(c_tile, b_tile, _last(c, BLOCK), _last(b, BLOCK))
    tl.store(agg_ptr + slot, c_tile)
    tl.store(agg_ptr + num_slots + slot, b_tile)
    if STORE_LATEST:
        tl.store(agg_ptr + 2 * num_slots + slot, cl_tile)
        tl.store(agg_ptr + 3 * num_slots + slot, bl_tile)
        tl.store(agg_ptr + 4 * num_slots + slot, k_tile)


# ----------------------------------------------------------------------------- the filter


@triton.jit
def kalman_filter_kernel(
    z_ptr,
    mask_ptr,
    gains_ptr,
    gains_last,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    out_ptr,
    num_seqs,
    num_slots,
    T,
    tile_size,
    search_steps,
    stride_z_row,
    stride_z_tok,
    stride_mask_row,
    stride_mask_tok,
    x0,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Filtered log-ratio of every token (0 where masked), written contiguously."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN
    )
    z_row = _seq_base(z_ptr, seq, seq_start, stride_z_row, stride_z_tok, IS_VARLEN)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    out_row = out_ptr + seq_start
    seen = _tile_seen(counts_ptr, first, tile, tile_start, SKIP and HAS_MASK, PREFIX)
    state = _tile_state(agg_ptr, num_slots, first, tile, x0, PREFIX)
    for start in range(tile_start, tile_end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_bounds = pos < tile_end
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        z = _load_log_ratio(z_row, z_row, stride_z_tok, stride_z_tok, pos, valid, False)
        c, b, seen = _block_maps(z, valid, in_bounds, pos, gains_ptr, gains_last, seen, SKIP)
        x = state - c * state + b
        state = _last(x, BLOCK)
        tl.store(out_row + pos, tl.where(valid, x, 0.0), mask=in_bounds)


# ----------------------------------------------------------------------------- the fused loss


@triton.jit
def kpo_loss_fwd_kernel(
    log_prob_ptr,
    old_log_prob_ptr,
    mask_ptr,
    adv_ptr,
    weights_ptr,
    gains_ptr,
    gains_last,
    ratio_ptr,
    ratio_last,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    grad_ptr,
    stats_ptr,
    num_seqs,
    num_slots,
    T,
    tile_size,
    search_steps,
    stride_lp_row,
    stride_lp_tok,
    stride_old_row,
    stride_old_tok,
    stride_mask_row,
    stride_mask_tok,
    stride_adv_row,
    stride_adv_tok,
    stride_w_row,
    stride_w_tok,
    x0,
    log_ratio_cap,
    ratio_low,
    ratio_high,
    log_ratio_low,
    log_ratio_high,
    dual_clip,
    log_dual_clip,
    log_2pi_r,
    inv_r,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    CLIP: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN
    )
    lp_row = _seq_base(log_prob_ptr, seq, seq_start, stride_lp_row, stride_lp_tok, IS_VARLEN)
    old_row = _seq_base(old_log_prob_ptr, seq, seq_start, stride_old_row, stride_old_tok, IS_VARLEN)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    w_row = _seq_base(weights_ptr, seq, seq_start, stride_w_row, stride_w_tok, IS_VARLEN)
    grad_row = grad_ptr + seq_start
    if ADV_PER_TOKEN:
        adv_row = _seq_base(adv_ptr, seq, seq_start, stride_adv_row, stride_adv_tok, IS_VARLEN)
    else:
        adv_scalar = tl.load(adv_ptr + seq.to(tl.int64) * stride_adv_row).to(tl.float32)
    seen = _tile_seen(counts_ptr, first, tile, tile_start, SKIP and HAS_MASK, PREFIX)
    # The state entering the tile and the sign code of the last valid token before it.
    state, latest = _tile_state_and_latest(agg_ptr, num_slots, first, tile, x0, PREFIX)

    # Statistics of the tile, accumulated per lane and reduced once at the end. The nine token
    # counts share three int32 registers a lane, 10 bits each (_pack3): a lane sees one token
    # per block and a tile has at most MAX_BLOCKS_PER_TILE = 1023 blocks (the launcher's bound).
    counts_a = tl.zeros([BLOCK], tl.int32)  # valid tokens, scored tokens, sign-flip pairs
    counts_b = tl.zeros([BLOCK], tl.int32)  # raw flips, filtered flips, capped
    counts_c = tl.zeros([BLOCK], tl.int32)  # clipped high, clipped low, dual-clip floor
    loss_sum = tl.zeros([BLOCK], tl.float32)
    nis_sum = tl.zeros([BLOCK], tl.float32)
    ll_sum = tl.zeros([BLOCK], tl.float32)
    neg_z_sum = tl.zeros([BLOCK], tl.float32)
    ratio_sum = tl.zeros([BLOCK], tl.float32)
    ratio_max = tl.full([BLOCK], float("-inf"), tl.float32)
    raw_sum = tl.zeros([BLOCK], tl.float32)
    raw_max = tl.full([BLOCK], float("-inf"), tl.float32)

    for start in range(tile_start, tile_end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_bounds = pos < tile_end
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        z = _load_log_ratio(lp_row, old_row, stride_lp_tok, stride_old_tok, pos, valid, True)
        w = _variance_ratio(ratio_ptr, valid, pos, seen, ratio_last, SKIP)
        c, b, seen = _block_maps(z, valid, in_bounds, pos, gains_ptr, gains_last, seen, SKIP)
        x = state - c * state + b

        # Innovation e = z - xhat_before with S = R / w (docs/math.md section 5b): the state before each token
        # is the previous lane's (the carried state for lane 0).
        e = z - _shift_in(x, state, BLOCK)
        scored = valid & (w > 0.0)  # S finite: all but a diffuse prior's first observation
        nis = e * e * w * inv_r
        nis_sum += tl.where(scored, nis, 0.0)
        ll_sum += tl.where(scored, -0.5 * (log_2pi_r - tl.log(tl.where(scored, w, 1.0)) + nis), 0.0)
        # Sign flips against the previous valid token of the sequence: the latest valid code
        # before each lane, from this block's scan or, before the block's first, the carry.
        code = _sign_code(z, x, valid)
        codes = tl.associative_scan(code, 0, _latest)
        previous = _shift_in(codes, latest, BLOCK)
        pair, flip_raw, flip_filtered = _flips(code, tl.where(previous == NO_TOKEN, latest, previous))
        counts_a += _pack3(valid, scored, pair)
        latest = _latest(latest, tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, codes, 0), 0))

        state = _last(x, BLOCK)
        x = tl.where(valid, x, 0.0)

        # Branch decisions (cap, clip, dual clip) compare the filtered log-ratio with the log of
        # each bound: rt = exp(x) would add its own rounding to the decision.
        if HAS_CAP:
            frozen = x > log_ratio_cap
            x = tl.where(frozen, log_ratio_cap, x)
        else:
            frozen = pos < 0  # all false
        counts_b += _pack3(flip_raw, flip_filtered, frozen & valid)
        rt = tl.exp(x)
        if ADV_PER_TOKEN:
            adv = tl.load(adv_row + pos * stride_adv_tok, mask=valid, other=0.0).to(tl.float32)
        else:
            adv = tl.where(valid, adv_scalar, 0.0)

        loss = -adv * rt
        if CLIP:
            clip_high = (adv > 0) & (x > log_ratio_high)
            clip_low = (adv < 0) & (x < log_ratio_low)
            loss = tl.where(clip_high, -adv * ratio_high, tl.where(clip_low, -adv * ratio_low, loss))
            frozen = frozen | clip_high | clip_low
            counts_c += _pack3(clip_high, clip_low, pos < 0)
        if DUAL_CLIP:
            lower = (adv < 0) & (x > log_dual_clip)
            loss = tl.where(lower, -adv * dual_clip, loss)
            frozen = frozen | lower
            counts_c += _pack3(pos < 0, pos < 0, lower)
        # d loss / d log_prob = -A * rt (the stop-gradient trick), 0 where a branch froze it.
        dloss = tl.where(frozen, 0.0, -adv * rt)
        if HAS_WEIGHTS:
            w = tl.load(w_row + pos * stride_w_tok, mask=valid, other=0.0).to(tl.float32)
            loss = loss * w
            dloss = dloss * w
        loss = tl.where(valid, loss, 0.0)
        if STORE_GRAD:
            tl.store(grad_row + pos, tl.where(valid, dloss, 0.0).to(grad_ptr.dtype.element_ty), mask=in_bounds)

        raw = tl.exp(z)
        loss_sum += loss
        # ppo_kl as verl computes it: z clamped to [-KL_CLAMP, KL_CLAMP] (NaN stays NaN).
        neg_z_sum -= tl.where(z < -KL_CLAMP, -KL_CLAMP, tl.where(z > KL_CLAMP, KL_CLAMP, z))
        ratio_sum += tl.where(valid, rt, 0.0)
        ratio_max = tl.maximum(ratio_max, tl.where(valid, rt, float("-inf")))
        raw_sum += tl.where(valid, raw, 0.0)
        raw_max = tl.maximum(raw_max, tl.where(valid, raw, float("-inf")))

    # Column-major (NUM_STATS, slots) statistics, rows in aggregation.STAT_NAMES order.
    out = stats_ptr + slot
    high = _unpack3_sum(counts_c, 0)
    low = _unpack3_sum(counts_c, 1)
    tl.store(out + 0 * num_slots, _unpack3_sum(counts_a, 0))
    tl.store(out + 1 * num_slots, tl.sum(loss_sum, 0))
    tl.store(out + 2 * num_slots, high + low)
    tl.store(out + 3 * num_slots, _unpack3_sum(counts_c, 2))
    tl.store(out + 4 * num_slots, tl.sum(neg_z_sum, 0))
    tl.store(out + 5 * num_slots, tl.sum(ratio_sum, 0))
    tl.store(out + 6 * num_slots, tl.max(ratio_max, 0))
    tl.store(out + 7 * num_slots, tl.sum(raw_sum, 0))
    tl.store(out + 8 * num_slots, tl.max(raw_max, 0))
    tl.store(out + 9 * num_slots, _unpack3_sum(counts_a, 1))
    tl.store(out + 10 * num_slots, tl.sum(nis_sum, 0))
    tl.store(out + 11 * num_slots, tl.sum(ll_sum, 0))
    tl.store(out + 12 * num_slots, _unpack3_sum(counts_a, 2))
    tl.store(out + 13 * num_slots, _unpack3_sum(counts_b, 0))
    tl.store(out + 14 * num_slots, _unpack3_sum(counts_b, 1))
    tl.store(out + 15 * num_slots, high)
    tl.store(out + 16 * num_slots, low)
    tl.store(out + 17 * num_slots, _unpack3_sum(counts_b, 2))


@triton.jit
def _safe_inverse(x):
    return tl.where(x > 0, 1.0 / tl.where(x > 0, x, 1.0), 0.0)


@triton.jit
def _sequence_sums(
    stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN: tl.constexpr, TILES: tl.constexpr
):
    """(valid tokens, loss sum) of a block of sequences, summed over each sequence's tiles,
    TILES tiles of every sequence per step (a few long sequences have hundreds of tiles: one
    dependent load per tile would make this loop the longest part of a short step)."""
    if IS_VARLEN:
        first = tl.load(tile_offsets_ptr + seqs, mask=in_bounds, other=0)
        count = tl.load(tile_offsets_ptr + seqs + 1, mask=in_bounds, other=0) - first
    else:
        first = seqs * tiles_per_seq
        count = tl.where(in_bounds, tiles_per_seq, 0)
    chunk = tl.arange(0, TILES)
    # Sums kept per (sequence, lane) and reduced once after the loop: Triton 3.6's
    # thread-locality pass asserts on a reduction inside the loop whose result has two uses
    # (seq-mean-token-mean with tiles_per_seq divisible by 16 failed to compile on the H200).
    tokens = tl.zeros([seqs.shape[0], TILES], tl.float32)
    loss = tl.zeros([seqs.shape[0], TILES], tl.float32)
    for k in range(0, tl.max(count, 0), TILES):
        slots = first[:, None] + k + chunk[None, :]
        has = k + chunk[None, :] < count[:, None]
        tokens += tl.load(stats_ptr + slots, mask=has, other=0.0)
        loss += tl.load(stats_ptr + num_slots + slots, mask=has, other=0.0)
    return tl.sum(tokens, 1), tl.sum(loss, 1)


@triton.jit
def kpo_loss_finalize_kernel(
    stats_ptr,
    tile_offsets_ptr,
    cu_seqlens_ptr,
    row_scale_ptr,
    out_ptr,
    num_seqs,
    num_slots,
    tiles_per_seq,
    T,
    dp_size,
    token_count,
    sequence_count,
    token_count_ptr,
    sequence_count_ptr,
    loss_scale_factor,
    AGG: tl.constexpr,
    TOKEN_COUNT: tl.constexpr,
    SEQUENCE_COUNT: tl.constexpr,
    HAS_SCALE_FACTOR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    """Single program: tile statistics -> sequence weights (aggregation.row_weights), loss, metrics.

    out = [loss] + the metric vector in options.METRIC_NAMES order. Deterministic: fixed
    reduction order, no atomics. The horizon of seq-mean-token-sum-norm is T for padded batches
    and the longest sequence for packed ones, unless loss_scale_factor is given. TOKEN_COUNT and
    SEQUENCE_COUNT: 0 = count this batch, 1 = the scalar argument, 2 = read it from the pointer.
    BLOCK_S tile slots per step for the metrics; SEQ_BLOCK sequences x TILES of their tiles per
    step for the per-sequence sums.
    """
    # Metrics: sums and maxima over every tile slot (slots past the last tile hold zeros).
    tokens_acc = tl.zeros([BLOCK_S], tl.float32)
    clipped_acc = tl.zeros([BLOCK_S], tl.float32)
    lower_acc = tl.zeros([BLOCK_S], tl.float32)
    neg_z_acc = tl.zeros([BLOCK_S], tl.float32)
    ratio_acc = tl.zeros([BLOCK_S], tl.float32)
    ratio_max_acc = tl.full([BLOCK_S], float("-inf"), tl.float32)
    raw_acc = tl.zeros([BLOCK_S], tl.float32)
    raw_max_acc = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for start in range(0, num_slots, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        in_bounds = slots < num_slots
        tokens_acc += tl.load(stats_ptr + 0 * num_slots + slots, mask=in_bounds, other=0.0)
        clipped_acc += tl.load(stats_ptr + 2 * num_slots + slots, mask=in_bounds, other=0.0)
        lower_acc += tl.load(stats_ptr + 3 * num_slots + slots, mask=in_bounds, other=0.0)
        neg_z_acc += tl.load(stats_ptr + 4 * num_slots + slots, mask=in_bounds, other=0.0)
        ratio_acc += tl.load(stats_ptr + 5 * num_slots + slots, mask=in_bounds, other=0.0)
        ratio_max_acc = tl.maximum(
            ratio_max_acc, tl.load(stats_ptr + 6 * num_slots + slots, mask=in_bounds, other=float("-inf"))
        )
        raw_acc += tl.load(stats_ptr + 7 * num_slots + slots, mask=in_bounds, other=0.0)
        raw_max_acc = tl.maximum(
            raw_max_acc, tl.load(stats_ptr + 8 * num_slots + slots, mask=in_bounds, other=float("-inf"))
        )
    # The diagnostic rows 9..17 (aggregation.STAT_NAMES), 16 rows x 64 slots at a time.
    diag_rows = 9 + tl.arange(0, 16)
    diag_acc = tl.zeros([16, 64], tl.float32)
    for start in range(0, num_slots, 64):
        slots = start + tl.arange(0, 64)
        diag_acc += tl.load(
            stats_ptr + diag_rows[:, None] * num_slots + slots[None, :],
            mask=(diag_rows[:, None] < 18) & (slots[None, :] < num_slots),
            other=0.0,
        )
    num_tokens = tl.sum(tokens_acc, 0)

    # Sequences with a valid token, and the longest sequence (the packed horizon).
    nonempty_acc = tl.zeros([SEQ_BLOCK], tl.float32)
    longest = tl.zeros([SEQ_BLOCK], tl.int32)
    for start in range(0, num_seqs, SEQ_BLOCK):
        seqs = start + tl.arange(0, SEQ_BLOCK)
        in_bounds = seqs < num_seqs
        tokens, _ = _sequence_sums(
            stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN, TILES
        )
        nonempty_acc += (tokens > 0).to(tl.float32)
        if IS_VARLEN:
            lengths = tl.load(cu_seqlens_ptr + seqs + 1, mask=in_bounds, other=0) - tl.load(
                cu_seqlens_ptr + seqs, mask=in_bounds, other=0
            )
            longest = tl.maximum(longest, lengths.to(tl.int32))

    if TOKEN_COUNT == 2:
        token_count = tl.load(token_count_ptr).to(tl.float32)
    if TOKEN_COUNT == 0:
        token_weight = dp_size * _safe_inverse(num_tokens)
    else:
        token_weight = dp_size * _safe_inverse(token_count + 0.0 * num_tokens)
    if SEQUENCE_COUNT == 2:
        sequence_count = tl.load(sequence_count_ptr).to(tl.float32)
    if SEQUENCE_COUNT == 0:
        sequence_weight = dp_size * _safe_inverse(tl.sum(nonempty_acc, 0))
    else:
        sequence_weight = dp_size * _safe_inverse(sequence_count + 0.0 * num_tokens)
    if AGG == AGG_SEQ_MEAN_TOKEN_SUM_NORM:
        if HAS_SCALE_FACTOR:
            horizon = loss_scale_factor + 0.0 * num_tokens
        elif IS_VARLEN:
            horizon = tl.max(longest, 0).to(tl.float32)
        else:
            horizon = T + 0.0 * num_tokens
        sequence_weight = sequence_weight * _safe_inverse(horizon)

    loss = tl.zeros([SEQ_BLOCK], tl.float32)
    for start in range(0, num_seqs, SEQ_BLOCK):
        seqs = start + tl.arange(0, SEQ_BLOCK)
        in_bounds = seqs < num_seqs
        tokens, row_loss = _sequence_sums(
            stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN, TILES
        )
        if AGG == AGG_TOKEN_MEAN:
            weight = token_weight + 0.0 * tokens
        elif AGG == AGG_TOKEN_SUM:
            weight = dp_size + 0.0 * tokens
        elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
            weight = tl.where(tokens > 0, sequence_weight * _safe_inverse(tokens), 0.0)
        else:
            weight = tl.where(tokens > 0, sequence_weight, 0.0)
        tl.store(row_scale_ptr + seqs, weight, mask=in_bounds)
        loss += tl.where(in_bounds, weight * row_loss, 0.0)

    per_token = _safe_inverse(num_tokens)
    has_tokens = num_tokens > 0
    ratio_sum = tl.sum(ratio_acc, 0)
    raw_sum = tl.sum(raw_acc, 0)
    # A NaN at a valid token shows in the sums; maxima must not hide it (GPU max ignores NaN).
    ratio_max = tl.where(ratio_sum != ratio_sum, ratio_sum, tl.where(has_tokens, tl.max(ratio_max_acc, 0), 0.0))
    raw_max = tl.where(raw_sum != raw_sum, raw_sum, tl.where(has_tokens, tl.max(raw_max_acc, 0), 0.0))
    tl.store(out_ptr + 0, tl.sum(loss, 0))
    tl.store(out_ptr + 1, tl.sum(clipped_acc, 0) * per_token)
    tl.store(out_ptr + 2, tl.sum(lower_acc, 0) * per_token)
    tl.store(out_ptr + 3, tl.sum(neg_z_acc, 0) * per_token)
    tl.store(out_ptr + 4, ratio_sum * per_token)
    tl.store(out_ptr + 5, ratio_max)
    tl.store(out_ptr + 6, raw_sum * per_token)
    tl.store(out_ptr + 7, raw_max)
    tl.store(out_ptr + 8, num_tokens)
    # Diagnostics (aggregation.diagnostic_metrics): metrics 8..16 from statistics rows 9..17.
    diag = tl.sum(diag_acc, 1)
    scored = tl.sum(tl.where(diag_rows == 9, diag, 0.0), 0)
    pairs = tl.sum(tl.where(diag_rows == 12, diag, 0.0), 0)
    # Row 9 + i -> output: nis and log-likelihood sums per scored token, flips per pair,
    # clip and cap counts per valid token, then the two denominators themselves.
    scale = tl.where(
        (diag_rows == 10) | (diag_rows == 11),
        _safe_inverse(scored),
        tl.where((diag_rows == 13) | (diag_rows == 14), _safe_inverse(pairs), per_token),
    )
    value = diag * scale
    index = tl.where(diag_rows == 9, 15, tl.where(diag_rows == 12, 16, tl.where(diag_rows < 12, diag_rows - 2, diag_rows - 3)))
    value = tl.where((diag_rows == 9) | (diag_rows == 12), diag, value)
    tl.store(out_ptr + 1 + index, value, mask=diag_rows < 18)


@triton.jit
def kpo_loss_bwd_kernel(
    grad_ptr,
    row_scale_ptr,
    grad_output_ptr,
    out_ptr,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    num_seqs,
    T,
    tile_size,
    search_steps,
    IS_VARLEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """d loss / d log_prob = grad_output * sequence weight * stored per-token derivative."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN
    )
    scale = tl.load(grad_output_ptr).to(tl.float32) * tl.load(row_scale_ptr + seq)
    for start in range(tile_start, tile_end, BLOCK):
        pos = seq_start + start + tl.arange(0, BLOCK)
        in_bounds = start + tl.arange(0, BLOCK) < tile_end
        grad = tl.load(grad_ptr + pos, mask=in_bounds, other=0.0).to(tl.float32)
        tl.store(out_ptr + pos, (grad * scale).to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def tile_offsets_kernel(cu_seqlens_ptr, tile_offsets_ptr, num_seqs, tile_size, BLOCK_S: tl.constexpr):
    """tile_offsets[s] = number of tiles of the sequences before s (num_seqs + 1 entries)."""
    carry = tl.program_id(0) * 0
    tl.store(tile_offsets_ptr, carry)
    for start in range(0, num_seqs, BLOCK_S):
        seqs = start + tl.arange(0, BLOCK_S)
        in_bounds = seqs < num_seqs
        lengths = tl.load(cu_seqlens_ptr + seqs + 1, mask=in_bounds, other=0) - tl.load(
            cu_seqlens_ptr + seqs, mask=in_bounds, other=0
        )
        tiles = ((lengths + tile_size - 1) // tile_size).to(tl.int32)
        ends = carry + tl.cumsum(tiles, 0)
        tl.store(tile_offsets_ptr + seqs + 1, ends, mask=in_bounds)
        carry += tl.sum(tiles, 0)
