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

    Carrying c = 1 - a instead of a keeps the digits of tiny gains (spec section 2). Both parts
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
    ends where the gains have saturated (gains.GainTables).
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
):
    """Pass 2: the composed affine map of each tile, stored as agg[0, slot] = C, agg[1, slot] = B
    (but for the last tile of a sequence: no tile after it reads it)."""
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
    for start in range(tile_start, tile_end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_bounds = pos < tile_end
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        z = _load_log_ratio(new_row, old_row, stride_new_tok, stride_old_tok, pos, valid, HAS_OLD)
        c, b, seen = _block_maps(z, valid, in_bounds, pos, gains_ptr, gains_last, seen, SKIP)
        c_tile, b_tile = _compose(c_tile, b_tile, _last(c, BLOCK), _last(b, BLOCK))
    tl.store(agg_ptr + slot, c_tile)
    tl.store(agg_ptr + num_slots + slot, b_tile)


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
    state = _tile_state(agg_ptr, num_slots, first, tile, x0, PREFIX)

    # Statistics of the tile, accumulated per lane and reduced once at the end.
    tokens = tl.zeros([BLOCK], tl.float32)
    loss_sum = tl.zeros([BLOCK], tl.float32)
    clipped_sum = tl.zeros([BLOCK], tl.float32)
    lower_sum = tl.zeros([BLOCK], tl.float32)
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
        c, b, seen = _block_maps(z, valid, in_bounds, pos, gains_ptr, gains_last, seen, SKIP)
        x = state - c * state + b
        state = _last(x, BLOCK)
        x = tl.where(valid, x, 0.0)

        # Branch decisions (cap, clip, dual clip) compare the filtered log-ratio with the log of
        # each bound: rt = exp(x) would add its own rounding to the decision.
        if HAS_CAP:
            frozen = x > log_ratio_cap
            x = tl.where(frozen, log_ratio_cap, x)
        else:
            frozen = pos < 0  # all false
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
            clipped_sum += (clip_high | clip_low).to(tl.float32)
        if DUAL_CLIP:
            lower = (adv < 0) & (x > log_dual_clip)
            loss = tl.where(lower, -adv * dual_clip, loss)
            frozen = frozen | lower
            lower_sum += lower.to(tl.float32)
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
        tokens += valid.to(tl.float32)
        loss_sum += loss
        # ppo_kl as verl computes it: z clamped to [-KL_CLAMP, KL_CLAMP] (NaN stays NaN).
        neg_z_sum -= tl.where(z < -KL_CLAMP, -KL_CLAMP, tl.where(z > KL_CLAMP, KL_CLAMP, z))
        ratio_sum += tl.where(valid, rt, 0.0)
        ratio_max = tl.maximum(ratio_max, tl.where(valid, rt, float("-inf")))
        raw_sum += tl.where(valid, raw, 0.0)
        raw_max = tl.maximum(raw_max, tl.where(valid, raw, float("-inf")))

    # Column-major (NUM_STATS, slots) statistics, rows in aggregation.STAT_NAMES order.
    out = stats_ptr + slot
    tl.store(out + 0 * num_slots, tl.sum(tokens, 0))
    tl.store(out + 1 * num_slots, tl.sum(loss_sum, 0))
    tl.store(out + 2 * num_slots, tl.sum(clipped_sum, 0))
    tl.store(out + 3 * num_slots, tl.sum(lower_sum, 0))
    tl.store(out + 4 * num_slots, tl.sum(neg_z_sum, 0))
    tl.store(out + 5 * num_slots, tl.sum(ratio_sum, 0))
    tl.store(out + 6 * num_slots, tl.max(ratio_max, 0))
    tl.store(out + 7 * num_slots, tl.sum(raw_sum, 0))
    tl.store(out + 8 * num_slots, tl.max(raw_max, 0))


@triton.jit
def _safe_inverse(x):
    return tl.where(x > 0, 1.0 / tl.where(x > 0, x, 1.0), 0.0)


@triton.jit
def _sequence_sums(stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN: tl.constexpr):
    """(valid tokens, loss sum) of a block of sequences, summed over each sequence's tiles."""
    if IS_VARLEN:
        first = tl.load(tile_offsets_ptr + seqs, mask=in_bounds, other=0)
        count = tl.load(tile_offsets_ptr + seqs + 1, mask=in_bounds, other=0) - first
    else:
        first = seqs * tiles_per_seq
        count = tl.where(in_bounds, tiles_per_seq, 0)
    tokens = tl.zeros_like(seqs).to(tl.float32)
    loss = tl.zeros_like(seqs).to(tl.float32)
    for k in range(0, tl.max(count, 0)):
        has = k < count
        tokens += tl.load(stats_ptr + first + k, mask=has, other=0.0)
        loss += tl.load(stats_ptr + num_slots + first + k, mask=has, other=0.0)
    return tokens, loss


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
):
    """Single program: tile statistics -> sequence weights (aggregation.row_weights), loss, metrics.

    out = [loss] + the metric vector in options.METRIC_NAMES order. Deterministic: fixed
    reduction order, no atomics. The horizon of seq-mean-token-sum-norm is T for padded batches
    and the longest sequence for packed ones, unless loss_scale_factor is given. TOKEN_COUNT and
    SEQUENCE_COUNT: 0 = count this batch, 1 = the scalar argument, 2 = read it from the pointer.
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
    num_tokens = tl.sum(tokens_acc, 0)

    # Sequences with a valid token, and the longest sequence (the packed horizon).
    nonempty_acc = tl.zeros([BLOCK_S], tl.float32)
    longest = tl.zeros([BLOCK_S], tl.int32)
    for start in range(0, num_seqs, BLOCK_S):
        seqs = start + tl.arange(0, BLOCK_S)
        in_bounds = seqs < num_seqs
        tokens, _ = _sequence_sums(stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN)
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

    loss = tl.zeros([BLOCK_S], tl.float32)
    for start in range(0, num_seqs, BLOCK_S):
        seqs = start + tl.arange(0, BLOCK_S)
        in_bounds = seqs < num_seqs
        tokens, row_loss = _sequence_sums(stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN)
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
