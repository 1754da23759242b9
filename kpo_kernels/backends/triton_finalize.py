"""The loss's finalize: tile statistics -> sequence weights, the loss and the metrics."""

import triton
import triton.language as tl

from .triton_common import (
    AGG_TOKEN_MEAN,
    AGG_TOKEN_SUM,
    AGG_SEQ_MEAN_TOKEN_MEAN,
    AGG_SEQ_MEAN_TOKEN_SUM_NORM,
)

@triton.jit
def _safe_inverse(x):
    return tl.where(x > 0, 1.0 / tl.where(x > 0, x, 1.0), 0.0)


@triton.jit
def _stat(stats_ptr, row: tl.constexpr, num_slots, slots, in_bounds, other: tl.constexpr):
    """One statistics row at `slots` (written by other programs of the fused forward: read from
    L2, `.cg`, never a stale L1 line)."""
    return tl.load(stats_ptr + row * num_slots + slots, mask=in_bounds, other=other, cache_modifier=".cg")


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
        tokens += tl.load(stats_ptr + slots, mask=has, other=0.0, cache_modifier=".cg")
        loss += tl.load(stats_ptr + num_slots + slots, mask=has, other=0.0, cache_modifier=".cg")
    return tl.sum(tokens, 1), tl.sum(loss, 1)


@triton.jit
def kpo_loss_finalize_kernel(
    stats_ptr,
    tile_offsets_ptr,
    cu_seqlens_ptr,
    row_scale_ptr,
    loss_ptr,
    metrics_ptr,
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
    """Single program: `finalize` on its own, for a loss whose forward launched no program (a
    batch without tiles); otherwise the forward's last program runs `finalize` itself."""
    finalize(
        stats_ptr, tile_offsets_ptr, cu_seqlens_ptr, row_scale_ptr, loss_ptr, metrics_ptr, num_seqs, num_slots,
        tiles_per_seq, T, dp_size, token_count, sequence_count, token_count_ptr, sequence_count_ptr,
        loss_scale_factor, AGG, TOKEN_COUNT, SEQUENCE_COUNT, HAS_SCALE_FACTOR, IS_VARLEN, BLOCK_S, SEQ_BLOCK, TILES,
    )


# Not inlined: a function of its own keeps its registers out of the fused forward's allocation
# (inlined, ptxas spilled in some forward variants and took registers from others).
@triton.jit(noinline=True)
def finalize(
    stats_ptr,
    tile_offsets_ptr,
    cu_seqlens_ptr,
    row_scale_ptr,
    loss_ptr,
    metrics_ptr,
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
    """One program: tile statistics -> sequence weights (aggregation.row_weights), loss, metrics.

    Writes the loss and the metric vector (options.METRIC_NAMES order) to separate buffers, so
    that the op returns them without copies. Deterministic: fixed reduction order, whichever
    program runs it (a program of the fused forward reads the other programs' statistics after
    its acquire: from L2, `.cg`, never a stale L1 line). The horizon of seq-mean-token-sum-norm is T for padded batches
    and the longest sequence for packed ones, unless loss_scale_factor is given. TOKEN_COUNT and
    SEQUENCE_COUNT: 0 = count this batch, 1 = the scalar argument, 2 = read it from the pointer.
    BLOCK_S tile slots per step for the metrics; SEQ_BLOCK sequences x TILES of their tiles per
    step for the per-sequence sums.
    """
    # Sums and maxima over every tile slot (slots past the last tile hold zeros), every
    # statistics row but the loss's (per sequence, below) in one pass: rows in aggregation.STAT_NAMES
    # order, the diagnostics' 9..17 as the diag_<row> accumulators.
    tokens_acc = tl.zeros([BLOCK_S], tl.float32)
    clipped_acc = tl.zeros([BLOCK_S], tl.float32)
    lower_acc = tl.zeros([BLOCK_S], tl.float32)
    neg_z_acc = tl.zeros([BLOCK_S], tl.float32)
    ratio_acc = tl.zeros([BLOCK_S], tl.float32)
    ratio_max_acc = tl.full([BLOCK_S], float("-inf"), tl.float32)
    raw_acc = tl.zeros([BLOCK_S], tl.float32)
    raw_max_acc = tl.full([BLOCK_S], float("-inf"), tl.float32)
    diag_9 = tl.zeros([BLOCK_S], tl.float32)
    diag_10 = tl.zeros([BLOCK_S], tl.float32)
    diag_11 = tl.zeros([BLOCK_S], tl.float32)
    diag_12 = tl.zeros([BLOCK_S], tl.float32)
    diag_13 = tl.zeros([BLOCK_S], tl.float32)
    diag_14 = tl.zeros([BLOCK_S], tl.float32)
    diag_15 = tl.zeros([BLOCK_S], tl.float32)
    diag_16 = tl.zeros([BLOCK_S], tl.float32)
    diag_17 = tl.zeros([BLOCK_S], tl.float32)
    for start in range(0, num_slots, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        in_bounds = slots < num_slots
        tokens_acc += _stat(stats_ptr, 0, num_slots, slots, in_bounds, 0.0)
        clipped_acc += _stat(stats_ptr, 2, num_slots, slots, in_bounds, 0.0)
        lower_acc += _stat(stats_ptr, 3, num_slots, slots, in_bounds, 0.0)
        neg_z_acc += _stat(stats_ptr, 4, num_slots, slots, in_bounds, 0.0)
        ratio_acc += _stat(stats_ptr, 5, num_slots, slots, in_bounds, 0.0)
        ratio_max_acc = tl.maximum(ratio_max_acc, _stat(stats_ptr, 6, num_slots, slots, in_bounds, float("-inf")))
        raw_acc += _stat(stats_ptr, 7, num_slots, slots, in_bounds, 0.0)
        raw_max_acc = tl.maximum(raw_max_acc, _stat(stats_ptr, 8, num_slots, slots, in_bounds, float("-inf")))
        diag_9 += _stat(stats_ptr, 9, num_slots, slots, in_bounds, 0.0)
        diag_10 += _stat(stats_ptr, 10, num_slots, slots, in_bounds, 0.0)
        diag_11 += _stat(stats_ptr, 11, num_slots, slots, in_bounds, 0.0)
        diag_12 += _stat(stats_ptr, 12, num_slots, slots, in_bounds, 0.0)
        diag_13 += _stat(stats_ptr, 13, num_slots, slots, in_bounds, 0.0)
        diag_14 += _stat(stats_ptr, 14, num_slots, slots, in_bounds, 0.0)
        diag_15 += _stat(stats_ptr, 15, num_slots, slots, in_bounds, 0.0)
        diag_16 += _stat(stats_ptr, 16, num_slots, slots, in_bounds, 0.0)
        diag_17 += _stat(stats_ptr, 17, num_slots, slots, in_bounds, 0.0)
    num_tokens = tl.sum(tokens_acc, 0)

    # One pass over the sequences. A sequence's weight (aggregation.row_weights) is a factor of
    # its own (1, or 1 / its tokens; 0 without tokens) times a scale that needs the whole pass
    # (the sequences with a valid token, the longest sequence): the pass keeps the factors in
    # row_scale and sums the factor-weighted losses, then a pass over row_scale alone scales them.
    nonempty_acc = tl.zeros([SEQ_BLOCK], tl.float32)
    longest = tl.zeros([SEQ_BLOCK], tl.int32)
    loss = tl.zeros([SEQ_BLOCK], tl.float64)  # the unscaled sum may pass float32's range where the loss does not
    for start in range(0, num_seqs, SEQ_BLOCK):
        seqs = start + tl.arange(0, SEQ_BLOCK)
        in_bounds = seqs < num_seqs
        tokens, row_loss = _sequence_sums(
            stats_ptr, tile_offsets_ptr, seqs, in_bounds, num_slots, tiles_per_seq, IS_VARLEN, TILES
        )
        nonempty_acc += (tokens > 0).to(tl.float32)
        if IS_VARLEN:
            lengths = tl.load(cu_seqlens_ptr + seqs + 1, mask=in_bounds, other=0) - tl.load(
                cu_seqlens_ptr + seqs, mask=in_bounds, other=0
            )
            longest = tl.maximum(longest, lengths.to(tl.int32))
        if AGG == AGG_TOKEN_MEAN or AGG == AGG_TOKEN_SUM:
            factor = 1.0 + 0.0 * tokens
        elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
            factor = tl.where(tokens > 0, _safe_inverse(tokens), 0.0)
        else:
            factor = tl.where(tokens > 0, 1.0, 0.0)
        tl.store(row_scale_ptr + seqs, factor, mask=in_bounds)
        loss += tl.where(in_bounds, factor.to(tl.float64) * row_loss.to(tl.float64), 0.0)

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
    if AGG == AGG_TOKEN_MEAN:
        scale = token_weight
    elif AGG == AGG_TOKEN_SUM:
        scale = dp_size + 0.0 * num_tokens
    else:
        scale = sequence_weight
    tl.debug_barrier()  # the factors' stores before their loads (by other threads of this program)
    for start in range(0, num_seqs, SEQ_BLOCK):
        seqs = start + tl.arange(0, SEQ_BLOCK)
        in_bounds = seqs < num_seqs
        factor = tl.load(row_scale_ptr + seqs, mask=in_bounds, other=0.0, cache_modifier=".cg")
        tl.store(row_scale_ptr + seqs, scale * factor, mask=in_bounds)

    per_token = _safe_inverse(num_tokens)
    has_tokens = num_tokens > 0
    ratio_sum = tl.sum(ratio_acc, 0)
    raw_sum = tl.sum(raw_acc, 0)
    # A NaN at a valid token shows in the sums; maxima must not hide it (GPU max ignores NaN).
    ratio_max = tl.where(ratio_sum != ratio_sum, ratio_sum, tl.where(has_tokens, tl.max(ratio_max_acc, 0), 0.0))
    raw_max = tl.where(raw_sum != raw_sum, raw_sum, tl.where(has_tokens, tl.max(raw_max_acc, 0), 0.0))
    tl.store(loss_ptr, (scale.to(tl.float64) * tl.sum(loss, 0)).to(tl.float32))
    tl.store(metrics_ptr + 0, tl.sum(clipped_acc, 0) * per_token)
    tl.store(metrics_ptr + 1, tl.sum(lower_acc, 0) * per_token)
    tl.store(metrics_ptr + 2, tl.sum(neg_z_acc, 0) * per_token)
    tl.store(metrics_ptr + 3, ratio_sum * per_token)
    tl.store(metrics_ptr + 4, ratio_max)
    tl.store(metrics_ptr + 5, raw_sum * per_token)
    tl.store(metrics_ptr + 6, raw_max)
    tl.store(metrics_ptr + 7, num_tokens)
    # Diagnostics (aggregation.diagnostic_metrics): metrics 8..16 from statistics rows 9..17:
    # nis and log-likelihood sums per scored token, flips per pair, clip and cap counts per
    # valid token, then the two denominators themselves.
    scored, pairs = tl.sum(diag_9, 0), tl.sum(diag_12, 0)
    tl.store(metrics_ptr + 8, tl.sum(diag_10, 0) * _safe_inverse(scored))
    tl.store(metrics_ptr + 9, tl.sum(diag_11, 0) * _safe_inverse(scored))
    tl.store(metrics_ptr + 10, tl.sum(diag_13, 0) * _safe_inverse(pairs))
    tl.store(metrics_ptr + 11, tl.sum(diag_14, 0) * _safe_inverse(pairs))
    tl.store(metrics_ptr + 12, tl.sum(diag_15, 0) * per_token)
    tl.store(metrics_ptr + 13, tl.sum(diag_16, 0) * per_token)
    tl.store(metrics_ptr + 14, tl.sum(diag_17, 0) * per_token)
    tl.store(metrics_ptr + 15, scored)
    tl.store(metrics_ptr + 16, pairs)
