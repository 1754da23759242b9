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
        tokens += tl.load(stats_ptr + slots, mask=has, other=0.0, volatile=True)
        loss += tl.load(stats_ptr + num_slots + slots, mask=has, other=0.0, volatile=True)
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
    program runs it. The horizon of seq-mean-token-sum-norm is T for padded batches
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
        tokens_acc += tl.load(stats_ptr + 0 * num_slots + slots, mask=in_bounds, other=0.0, volatile=True)
        clipped_acc += tl.load(stats_ptr + 2 * num_slots + slots, mask=in_bounds, other=0.0, volatile=True)
        lower_acc += tl.load(stats_ptr + 3 * num_slots + slots, mask=in_bounds, other=0.0, volatile=True)
        neg_z_acc += tl.load(stats_ptr + 4 * num_slots + slots, mask=in_bounds, other=0.0, volatile=True)
        ratio_acc += tl.load(stats_ptr + 5 * num_slots + slots, mask=in_bounds, other=0.0, volatile=True)
        ratio_max_acc = tl.maximum(
            ratio_max_acc, tl.load(stats_ptr + 6 * num_slots + slots, mask=in_bounds, other=float("-inf"), volatile=True)
        )
        raw_acc += tl.load(stats_ptr + 7 * num_slots + slots, mask=in_bounds, other=0.0, volatile=True)
        raw_max_acc = tl.maximum(
            raw_max_acc, tl.load(stats_ptr + 8 * num_slots + slots, mask=in_bounds, other=float("-inf"), volatile=True)
        )
    # The diagnostic rows 9..17 (aggregation.STAT_NAMES), 16 rows x BLOCK_S / 16 slots at a time.
    diag_rows = 9 + tl.arange(0, 16)
    diag_acc = tl.zeros([16, BLOCK_S // 16], tl.float32)
    for start in range(0, num_slots, BLOCK_S // 16):
        slots = start + tl.arange(0, BLOCK_S // 16)
        diag_acc += tl.load(
            stats_ptr + diag_rows[:, None] * num_slots + slots[None, :],
            mask=(diag_rows[:, None] < 18) & (slots[None, :] < num_slots),
            other=0.0,
            volatile=True,
        )
    num_tokens = tl.sum(tokens_acc, 0)

    # One pass over the sequences. A sequence's weight (aggregation.row_weights) is a factor of
    # its own (1, or 1 / its tokens; 0 without tokens) times a scale that needs the whole pass
    # (the sequences with a valid token, the longest sequence): the pass keeps the factors in
    # row_scale and sums the factor-weighted losses, then a pass over row_scale alone scales them.
    nonempty_acc = tl.zeros([SEQ_BLOCK], tl.float32)
    longest = tl.zeros([SEQ_BLOCK], tl.int32)
    loss = tl.zeros([SEQ_BLOCK], tl.float32)
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
        loss += tl.where(in_bounds, factor * row_loss, 0.0)

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
    tl.debug_barrier()  # the factors' stores before their loads (by other threads)
    for start in range(0, num_seqs, SEQ_BLOCK):
        seqs = start + tl.arange(0, SEQ_BLOCK)
        in_bounds = seqs < num_seqs
        factor = tl.load(row_scale_ptr + seqs, mask=in_bounds, other=0.0, volatile=True)
        tl.store(row_scale_ptr + seqs, scale * factor, mask=in_bounds)

    per_token = _safe_inverse(num_tokens)
    has_tokens = num_tokens > 0
    ratio_sum = tl.sum(ratio_acc, 0)
    raw_sum = tl.sum(raw_acc, 0)
    # A NaN at a valid token shows in the sums; maxima must not hide it (GPU max ignores NaN).
    ratio_max = tl.where(ratio_sum != ratio_sum, ratio_sum, tl.where(has_tokens, tl.max(ratio_max_acc, 0), 0.0))
    raw_max = tl.where(raw_sum != raw_sum, raw_sum, tl.where(has_tokens, tl.max(raw_max_acc, 0), 0.0))
    tl.store(loss_ptr, scale * tl.sum(loss, 0))
    tl.store(metrics_ptr + 0, tl.sum(clipped_acc, 0) * per_token)
    tl.store(metrics_ptr + 1, tl.sum(lower_acc, 0) * per_token)
    tl.store(metrics_ptr + 2, tl.sum(neg_z_acc, 0) * per_token)
    tl.store(metrics_ptr + 3, ratio_sum * per_token)
    tl.store(metrics_ptr + 4, ratio_max)
    tl.store(metrics_ptr + 5, raw_sum * per_token)
    tl.store(metrics_ptr + 6, raw_max)
    tl.store(metrics_ptr + 7, num_tokens)
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
    tl.store(metrics_ptr + index, value, mask=diag_rows < 18)
