"""The fused loss: forward (filter, clipped surrogate, its derivative and the statistics of
aggregation.STAT_NAMES per tile) and backward (the stored derivative scaled per sequence)."""

import triton
import triton.language as tl

from .triton_common import (
    _block_maps,
    _exp,
    _last,
    _run_sum,
    _run_max,
    _variance_ratio,
    _shift_in,
    _sign_code,
    _latest,
    _flips,
    _bit_code,
    _pack3,
    _unpack3_sum,
    _tile_state,
    _tile_state_and_latest,
    _locate,
    _seq_base,
    _load_valid,
    _load_checked_valid,
    _anchored,
    _first_block_start,
    _load_log_ratio,
    _tile_seen,
    _entering_state,
    KL_CLAMP,
    NO_SIGNS,
    NO_TOKEN,
)
from .triton_finalize import finalize

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
    log_ratio_ptr,
    ratio_last,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    grad_ptr,
    stats_ptr,
    state_x_ptr,
    state_count_ptr,
    state_sign_ptr,
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
    done_ptr,
    mask_ok_ptr,
    mask_one,
    row_scale_ptr,
    loss_ptr,
    metrics_ptr,
    dp_size,
    token_count,
    sequence_count,
    token_count_ptr,
    sequence_count_ptr,
    loss_scale_factor,
    anchor_ptr,
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
    RUN: tl.constexpr,
    HAS_STATE: tl.constexpr = False,
    DIAGNOSTICS: tl.constexpr = True,
    FLAT: tl.constexpr = False,
    AGG: tl.constexpr = 0,
    TOKEN_COUNT: tl.constexpr = 0,
    SEQUENCE_COUNT: tl.constexpr = 0,
    HAS_SCALE_FACTOR: tl.constexpr = False,
    BLOCK_S: tl.constexpr = 1024,
    SEQ_BLOCK: tl.constexpr = 512,
    TILES: tl.constexpr = 1,
    CHECK_MASK: tl.constexpr = False,
    FLOAT_MASK: tl.constexpr = False,
    ANCHOR: tl.constexpr = False,
):
    """HAS_STATE: each sequence enters with the FilterState (state_x, state_count, state_sign)
    instead of (x0, 0, NO_TOKEN) (docs/math.md section 7). DIAGNOSTICS: False (metrics="basic")
    compiles out the section-5b diagnostics: their statistics rows stay 0. FLAT: every token
    input holds sequence s's token t at flat index seq_start + t, in its token strides (packed
    batches; padded ones whose every row stride is T token strides), as the gradient does; the
    tiles and blocks are then aligned to that index (_locate, triton_layout.flat_layout).

    The last program to finish (a count at done_ptr, which it sets back to 0 for the next launch)
    runs triton_finalize.finalize on every tile's statistics: the loss, the sequence weights and
    the metrics, without a launch of their own. CHECK_MASK (masks other than bool): every mask
    value must be 0 or 1 (FLOAT_MASK: a float mask's bits, mask_one those of 1.0 in its dtype);
    a program that reads another sets done_ptr[1], and the last program writes 1 (all were) or
    0 to mask_ok_ptr and sets done_ptr[1] back to 0. AGG .. TILES and the arguments from done_ptr on
    are finalize's (its loops' layout from triton_launch._fused_finalize_launch), but anchor_ptr:
    zero bytes that ANCHOR loads a block of, for the register layout they give the blocks
    (triton_layout.needs_layout_anchor)."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN, FLAT
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
    if HAS_STATE:
        x_in, offset, entering = _entering_state(state_x_ptr, state_count_ptr, state_sign_ptr, seq, gains_last)
        seen += offset
    else:
        x_in, entering = x0, NO_TOKEN
    if DIAGNOSTICS:
        state, latest = _tile_state_and_latest(agg_ptr, num_slots, first, tile, x_in, entering, PREFIX)
        latest = _bit_code(latest)
    else:  # no sign flips: the earlier tiles' maps alone
        state = _tile_state(agg_ptr, num_slots, first, tile, x_in, PREFIX)

    # Statistics of the tile, accumulated over its blocks and reduced once at the end. The float
    # sums and maxima keep one value a thread (RUN, _run_sum): a lane each would hold RUN
    # registers a statistic. The nine token counts share three int32 registers a lane, 10 bits
    # each (_pack3): a lane sees one token per block and a tile holds at most
    # MAX_BLOCKS_PER_TILE + 1 = 1023 blocks of tokens (the launcher's bound); a thread's RUN
    # lanes summed could pass 10 bits.
    counts_a = tl.zeros([BLOCK], tl.int32)  # valid tokens, scored tokens, sign-flip pairs
    counts_b = tl.zeros([BLOCK], tl.int32)  # raw flips, filtered flips, capped
    counts_c = tl.zeros([BLOCK], tl.int32)  # clipped high, clipped low, dual-clip floor
    loss_sum = tl.zeros([BLOCK // RUN], tl.float32)
    nis_sum = tl.zeros([BLOCK // RUN], tl.float32)
    ll_sum = tl.zeros([BLOCK // RUN], tl.float32)
    neg_z_sum = tl.zeros([BLOCK // RUN], tl.float32)
    ratio_sum = tl.zeros([BLOCK // RUN], tl.float32)
    ratio_max = tl.full([BLOCK // RUN], float("-inf"), tl.float32)
    raw_sum = tl.zeros([BLOCK // RUN], tl.float32)
    raw_max = tl.full([BLOCK // RUN], float("-inf"), tl.float32)
    mask_errors = tl.zeros([BLOCK // RUN], tl.int32)

    # FLAT: the blocks start at tokens whose flat index is a multiple of 16 (a sequence's first
    # block reaches back to one, its lanes before tile_start out of bounds; _locate puts the
    # boundaries between its tiles at such indices), so that the compiler
    # knows each block's alignment as it does for aligned padded rows: without it a packed batch
    # gets a one-token-a-lane layout whose scans cost about 50% more instructions.
    lanes = tl.arange(0, BLOCK)
    for start in range(_first_block_start(seq_start, tile_start, tile_end, FLAT), tile_end, BLOCK):
        pos = start + lanes
        in_bounds = (pos >= tile_start) & (pos < tile_end) if FLAT else pos < tile_end
        if FLAT:  # every token input at ptr + (seq_start + position) * token stride
            at = tl.multiple_of(seq_start + start, 16)
            lp_block, old_block = log_prob_ptr + at * stride_lp_tok, old_log_prob_ptr + at * stride_old_tok
            mask_block, w_block = mask_ptr + at * stride_mask_tok, weights_ptr + at * stride_w_tok
            grad_block = grad_ptr + at
            if ADV_PER_TOKEN:
                adv_block = adv_ptr + at * stride_adv_tok
        else:
            lp_block, old_block = lp_row + start * stride_lp_tok, old_row + start * stride_old_tok
            mask_block, w_block = mask_row + start * stride_mask_tok, w_row + start * stride_w_tok
            grad_block = grad_row + start
            if ADV_PER_TOKEN:
                adv_block = adv_row + start * stride_adv_tok
        if CHECK_MASK:
            valid, not_binary = _load_checked_valid(mask_block, stride_mask_tok, lanes, in_bounds, mask_one, FLOAT_MASK)
            mask_errors |= _run_max(not_binary.to(tl.int32), BLOCK, RUN)
        else:
            valid = _load_valid(mask_block, stride_mask_tok, lanes, in_bounds, HAS_MASK)
        valid = _anchored(valid, anchor_ptr, lanes, ANCHOR)
        z = _load_log_ratio(lp_block, old_block, stride_lp_tok, stride_old_tok, lanes, valid, True)
        index = pos + offset if HAS_STATE else pos  # the gain index in position mode
        if DIAGNOSTICS:
            w, log_w = _variance_ratio(ratio_ptr, log_ratio_ptr, valid, index, seen, ratio_last, SKIP)
        c, b, seen = _block_maps(z, valid, in_bounds, index, gains_ptr, gains_last, seen, SKIP)
        x = state - c * state + b

        if DIAGNOSTICS:
            # Innovation e = z - xhat_before with S = R / w (docs/math.md section 5b): the state before each
            # token is the previous lane's (the carried state for lane 0).
            e = z - _shift_in(x, state, BLOCK)
            scored = valid & (w > 0.0)  # S finite: all but a diffuse prior's first observation
            nis = e * e * w * inv_r
            nis_sum += _run_sum(tl.where(scored, nis, 0.0), BLOCK, RUN)
            ll_sum += _run_sum(tl.where(scored, -0.5 * (log_2pi_r - log_w + nis), 0.0), BLOCK, RUN)
            # Sign flips against the previous valid token of the sequence: the latest valid code
            # before each lane, from this block's scan or, before the block's first, the carry.
            code = _sign_code(z, x, valid)
            codes = tl.associative_scan(code, 0, _latest)
            previous = _shift_in(codes, latest, BLOCK)
            pair, flip_raw, flip_filtered = _flips(code, tl.where(previous == NO_SIGNS, latest, previous))
            counts_a += _pack3(valid, scored, pair)
            latest = _latest(latest, tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, codes, 0), 0))
        else:
            flip_raw = lanes < 0  # all false
            flip_filtered = flip_raw
            counts_a += valid.to(tl.int32)

        state = _last(x, BLOCK)
        # -inf at other tokens: every branch decision below is then false there (adv is 0 too),
        # and rt = exp(x) is 0, so the loss and the ratio's sum and maximum need no mask.
        x = tl.where(valid, x, float("-inf"))

        # Branch decisions (cap, clip, dual clip) compare the filtered log-ratio with the log of
        # each bound: rt = exp(x) would add its own rounding to the decision.
        if HAS_CAP:
            frozen = x > log_ratio_cap
            x = tl.where(frozen, log_ratio_cap, x)
        else:
            frozen = lanes < 0  # all false
        counts_b += _pack3(flip_raw, flip_filtered, frozen & valid)
        rt = _exp(x)
        if ADV_PER_TOKEN:
            adv = tl.load(adv_block + lanes * stride_adv_tok, mask=valid, other=0.0).to(tl.float32)
        else:
            adv = tl.where(valid, adv_scalar, 0.0)

        loss = -adv * rt
        if CLIP:
            clip_high = (adv > 0) & (x > log_ratio_high)
            clip_low = (adv < 0) & (x < log_ratio_low)
            loss = tl.where(clip_high, -adv * ratio_high, tl.where(clip_low, -adv * ratio_low, loss))
            frozen = frozen | clip_high | clip_low
            counts_c += _pack3(clip_high, clip_low, lanes < 0)
        if DUAL_CLIP:
            lower = (adv < 0) & (x > log_dual_clip)
            loss = tl.where(lower, -adv * dual_clip, loss)
            frozen = frozen | lower
            counts_c += _pack3(lanes < 0, lanes < 0, lower)
        # d loss / d log_prob = -A * rt (the stop-gradient trick), 0 where a branch froze it.
        dloss = tl.where(frozen, 0.0, -adv * rt)
        if HAS_WEIGHTS:
            w = tl.load(w_block + lanes * stride_w_tok, mask=valid, other=0.0).to(tl.float32)
            loss = loss * w
            dloss = dloss * w
        if STORE_GRAD:
            tl.store(grad_block + lanes, tl.where(valid, dloss, 0.0).to(grad_ptr.dtype.element_ty), mask=in_bounds)

        raw = _exp(tl.where(valid, z, float("-inf")))  # 0 at other tokens, as rt
        loss_sum += _run_sum(loss, BLOCK, RUN)
        # ppo_kl as verl computes it: z clamped to [-KL_CLAMP, KL_CLAMP] (NaN stays NaN).
        neg_z_sum -= _run_sum(tl.clamp(z, -KL_CLAMP, KL_CLAMP, propagate_nan=tl.PropagateNan.ALL), BLOCK, RUN)
        ratio_sum += _run_sum(rt, BLOCK, RUN)
        ratio_max = tl.maximum(ratio_max, _run_max(rt, BLOCK, RUN))  # 0 where no token was valid: finalize reports 0 then
        raw_sum += _run_sum(raw, BLOCK, RUN)
        raw_max = tl.maximum(raw_max, _run_max(raw, BLOCK, RUN))

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

    if CHECK_MASK:
        if tl.max(mask_errors, 0) > 0:
            tl.store(done_ptr + 1, 1)
    tl.debug_barrier()  # every thread's stores before the count's release
    if tl.atomic_add(done_ptr, 1) == tl.num_programs(0) * tl.num_programs(1) - 1:
        finalize(
            stats_ptr, tile_offsets_ptr, cu_seqlens_ptr, row_scale_ptr, loss_ptr, metrics_ptr, num_seqs, num_slots,
            tl.num_programs(1), T, dp_size, token_count, sequence_count, token_count_ptr, sequence_count_ptr,
            loss_scale_factor, AGG, TOKEN_COUNT, SEQUENCE_COUNT, HAS_SCALE_FACTOR, IS_VARLEN, BLOCK_S, SEQ_BLOCK, TILES,
        )
        if CHECK_MASK:
            tl.store(mask_ok_ptr, 1 - tl.load(done_ptr + 1, volatile=True))
            tl.store(done_ptr + 1, 0)
        tl.atomic_xchg(done_ptr, 0)


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
