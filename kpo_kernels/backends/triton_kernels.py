"""Triton kernels: the KPO filter as an associative scan, fused with the loss and its gradient.

One program owns one row and walks it in blocks of BLOCK tokens. Inside a block the filter is
`tl.associative_scan` over (c, b) pairs; across blocks the program carries the filtered state
and the number of observations consumed (the gain index in skip mode). Each block then computes
the filtered ratio, the per-token loss, its derivative with respect to log_prob (stored
unweighted; the aggregation weight of the row is applied in backward) and the statistics of
the row. A one-program finalize kernel turns row statistics into row weights, loss and metrics.
Math in float32 whatever the input dtype; NaN propagates through every `where` on purpose
(tl.minimum/maximum would drop it on GPUs).
"""

import triton
import triton.language as tl

from ..options import AGG_MODES

# Aggregation modes as compile-time constants, numbered in options.AGG_MODES order.
AGG_TOKEN_MEAN = tl.constexpr(0)
AGG_TOKEN_SUM = tl.constexpr(1)
AGG_SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)
AGG_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
AGG_SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)
AGG_CODES = {name: code for code, name in enumerate(AGG_MODES)}


@triton.jit
def _compose(c1, b1, c2, b2):
    """Affine map (c1, b1) followed by (c2, b2), with x -> (1 - c) x + b.

    Carrying c = 1 - a instead of a keeps the digits of tiny gains (spec section 2).
    """
    return c1 + c2 - c1 * c2, b1 - c2 * b1 + b2


@triton.jit
def _filter_block(z, valid, in_bounds, pos, gains_ptr, seen, state, SKIP: tl.constexpr, BLOCK: tl.constexpr):
    """Filter one block given the state before it.

    z: log-ratios, 0 where not valid. seen: observations consumed before the block (skip mode).
    Returns (filtered state at every token, observations consumed after the block, state after
    the block). Tokens out of bounds are identity maps.
    """
    if SKIP:
        count = seen + tl.cumsum(valid.to(tl.int32), 0)
        gain = tl.load(gains_ptr + (count - 1), mask=valid, other=0.0)
        seen = seen + tl.sum(valid.to(tl.int32), 0)
    else:
        gain = tl.load(gains_ptr + pos, mask=in_bounds, other=0.0)
    c, b = tl.associative_scan((gain, gain * z), 0, _compose)
    x = state - c * state + b
    state = tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, x, 0.0), 0)
    return x, seen, state


@triton.jit
def _load_valid(mask_row, stride, pos, in_bounds, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return (tl.load(mask_row + pos * stride, mask=in_bounds, other=0) != 0) & in_bounds
    return in_bounds


@triton.jit
def kalman_filter_kernel(
    z_ptr,
    mask_ptr,
    gains_ptr,
    out_ptr,
    T,
    stride_z_row,
    stride_z_tok,
    stride_mask_row,
    stride_mask_tok,
    x0,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z_row
    mask_row = mask_ptr + row * stride_mask_row
    out_row = out_ptr + row * T
    seen = tl.program_id(0) * 0
    state = x0
    for start in range(0, T, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_bounds = pos < T
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        z = tl.load(z_row + pos * stride_z_tok, mask=valid, other=0.0).to(tl.float32)
        x, seen, state = _filter_block(z, valid, in_bounds, pos, gains_ptr, seen, state, SKIP, BLOCK)
        tl.store(out_row + pos, tl.where(valid, x, 0.0), mask=in_bounds)


@triton.jit
def kpo_loss_fwd_kernel(
    log_prob_ptr,
    old_log_prob_ptr,
    mask_ptr,
    adv_ptr,
    weights_ptr,
    gains_ptr,
    grad_ptr,
    stats_ptr,
    num_rows,
    T,
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
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lp_row = log_prob_ptr + row * stride_lp_row
    old_row = old_log_prob_ptr + row * stride_old_row
    mask_row = mask_ptr + row * stride_mask_row
    adv_row = adv_ptr + row * stride_adv_row
    w_row = weights_ptr + row * stride_w_row
    grad_row = grad_ptr + row * T
    if not ADV_PER_TOKEN:
        adv_scalar = tl.load(adv_row).to(tl.float32)

    seen = tl.program_id(0) * 0
    state = x0
    # Row statistics, accumulated per lane and reduced once at the end (see aggregation.STAT_NAMES).
    tokens = tl.zeros([BLOCK], tl.float32)
    loss_sum = tl.zeros([BLOCK], tl.float32)
    clipped_sum = tl.zeros([BLOCK], tl.float32)
    lower_sum = tl.zeros([BLOCK], tl.float32)
    neg_z_sum = tl.zeros([BLOCK], tl.float32)
    ratio_sum = tl.zeros([BLOCK], tl.float32)
    ratio_max = tl.full([BLOCK], float("-inf"), tl.float32)
    raw_sum = tl.zeros([BLOCK], tl.float32)
    raw_max = tl.full([BLOCK], float("-inf"), tl.float32)

    for start in range(0, T, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_bounds = pos < T
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        new = tl.load(lp_row + pos * stride_lp_tok, mask=valid, other=0.0).to(tl.float32)
        old = tl.load(old_row + pos * stride_old_tok, mask=valid, other=0.0).to(tl.float32)
        z = tl.where(valid, new - old, 0.0)
        x, seen, state = _filter_block(z, valid, in_bounds, pos, gains_ptr, seen, state, SKIP, BLOCK)
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
            tl.store(grad_row + pos, tl.where(valid, dloss, 0.0), mask=in_bounds)

        raw = tl.exp(z)
        tokens += valid.to(tl.float32)
        loss_sum += loss
        neg_z_sum -= z
        ratio_sum += tl.where(valid, rt, 0.0)
        ratio_max = tl.maximum(ratio_max, tl.where(valid, rt, float("-inf")))
        raw_sum += tl.where(valid, raw, 0.0)
        raw_max = tl.maximum(raw_max, tl.where(valid, raw, float("-inf")))

    # Column-major (NUM_STATS, B) statistics, rows in aggregation.STAT_NAMES order.
    out = stats_ptr + row
    tl.store(out + 0 * num_rows, tl.sum(tokens, 0))
    tl.store(out + 1 * num_rows, tl.sum(loss_sum, 0))
    tl.store(out + 2 * num_rows, tl.sum(clipped_sum, 0))
    tl.store(out + 3 * num_rows, tl.sum(lower_sum, 0))
    tl.store(out + 4 * num_rows, tl.sum(neg_z_sum, 0))
    tl.store(out + 5 * num_rows, tl.sum(ratio_sum, 0))
    tl.store(out + 6 * num_rows, tl.max(ratio_max, 0))
    tl.store(out + 7 * num_rows, tl.sum(raw_sum, 0))
    tl.store(out + 8 * num_rows, tl.max(raw_max, 0))


@triton.jit
def _safe_inverse(x):
    return tl.where(x > 0, 1.0 / tl.where(x > 0, x, 1.0), 0.0)


@triton.jit
def kpo_loss_finalize_kernel(
    stats_ptr,
    row_scale_ptr,
    out_ptr,
    B,
    dp_size,
    token_count,
    sequence_count,
    norm,
    AGG: tl.constexpr,
    HAS_TOKEN_COUNT: tl.constexpr,
    HAS_SEQUENCE_COUNT: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Single program: row statistics -> row weights (aggregation.row_weights), loss, metrics.

    stats is (NUM_STATS, B), rows of aggregation.STAT_NAMES. out = [loss] + the metric vector in
    options.METRIC_NAMES order. Deterministic: fixed reduction order, no atomics.
    """
    tokens_acc = tl.zeros([BLOCK_B], tl.float32)
    nonempty_acc = tl.zeros([BLOCK_B], tl.float32)
    clipped_acc = tl.zeros([BLOCK_B], tl.float32)
    lower_acc = tl.zeros([BLOCK_B], tl.float32)
    neg_z_acc = tl.zeros([BLOCK_B], tl.float32)
    ratio_acc = tl.zeros([BLOCK_B], tl.float32)
    ratio_max_acc = tl.full([BLOCK_B], float("-inf"), tl.float32)
    raw_acc = tl.zeros([BLOCK_B], tl.float32)
    raw_max_acc = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        in_bounds = rows < B
        tokens = tl.load(stats_ptr + 0 * B + rows, mask=in_bounds, other=0.0)
        tokens_acc += tokens
        nonempty_acc += (tokens > 0).to(tl.float32)
        clipped_acc += tl.load(stats_ptr + 2 * B + rows, mask=in_bounds, other=0.0)
        lower_acc += tl.load(stats_ptr + 3 * B + rows, mask=in_bounds, other=0.0)
        neg_z_acc += tl.load(stats_ptr + 4 * B + rows, mask=in_bounds, other=0.0)
        ratio_acc += tl.load(stats_ptr + 5 * B + rows, mask=in_bounds, other=0.0)
        ratio_max_acc = tl.maximum(
            ratio_max_acc, tl.load(stats_ptr + 6 * B + rows, mask=in_bounds, other=float("-inf"))
        )
        raw_acc += tl.load(stats_ptr + 7 * B + rows, mask=in_bounds, other=0.0)
        raw_max_acc = tl.maximum(raw_max_acc, tl.load(stats_ptr + 8 * B + rows, mask=in_bounds, other=float("-inf")))

    num_tokens = tl.sum(tokens_acc, 0)
    if HAS_TOKEN_COUNT:
        token_weight = dp_size * _safe_inverse(token_count + 0.0 * num_tokens)
    else:
        token_weight = dp_size * _safe_inverse(num_tokens)
    if HAS_SEQUENCE_COUNT:
        sequence_weight = dp_size * _safe_inverse(sequence_count + 0.0 * num_tokens)
    else:
        sequence_weight = dp_size * _safe_inverse(tl.sum(nonempty_acc, 0))
    if AGG == AGG_SEQ_MEAN_TOKEN_SUM_NORM:
        sequence_weight = sequence_weight / norm

    loss = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        in_bounds = rows < B
        tokens = tl.load(stats_ptr + 0 * B + rows, mask=in_bounds, other=0.0)
        row_loss = tl.load(stats_ptr + 1 * B + rows, mask=in_bounds, other=0.0)
        if AGG == AGG_TOKEN_MEAN:
            weight = token_weight + 0.0 * tokens
        elif AGG == AGG_TOKEN_SUM:
            weight = dp_size + 0.0 * tokens
        elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
            weight = tl.where(tokens > 0, sequence_weight * _safe_inverse(tokens), 0.0)
        else:
            weight = tl.where(tokens > 0, sequence_weight, 0.0)
        tl.store(row_scale_ptr + rows, weight, mask=in_bounds)
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
def kpo_loss_bwd_kernel(grad_ptr, row_scale_ptr, grad_output_ptr, out_ptr, T, BLOCK: tl.constexpr):
    """d loss / d log_prob = grad_output * row weight * stored per-token derivative."""
    row = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = pos < T
    scale = tl.load(grad_output_ptr).to(tl.float32) * tl.load(row_scale_ptr + row)
    grad = tl.load(grad_ptr + row * T + pos, mask=in_bounds, other=0.0)
    tl.store(out_ptr + row * T + pos, (grad * scale).to(out_ptr.dtype.element_ty), mask=in_bounds)
