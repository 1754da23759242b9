"""Per-row partial sums -> aggregation weights, loss and metrics (docs/math.md sections 4 and 5).

Backends reduce each row to the statistics below; `finalize` turns them into the weight of
every row (so the gradient needs no second pass over the tokens), the scalar loss and the
metric vector. The Triton backend does the same in its finalize (triton_finalize.finalize, run
by the fused forward's last program), with the same column order; this is the torch version,
and the definition of the aggregation weights.
"""

import torch

from ..options import METRIC_NAMES

# Columns of the (B, NUM_STATS) row statistics.
STAT_NAMES = (
    "tokens",  # valid tokens in the row
    "loss_sum",  # sum of the per-token loss (is_weights included)
    "clipped",  # tokens where the clipped branch won
    "clipped_lower",  # tokens where the dual-clip floor won
    "neg_log_ratio_sum",  # sum of -z (for ppo_kl)
    "ratio_sum",  # sum of the filtered ratio
    "ratio_max",
    "raw_ratio_sum",  # sum of exp(z)
    "raw_ratio_max",
    # Diagnostics (docs/math.md section 5b)
    "innovation_tokens",  # valid tokens with a finite predicted variance S
    "nis_sum",  # sum of e^2 / S over them
    "log_likelihood_sum",  # sum of -0.5 (log(2 pi S) + e^2 / S) over them
    "sign_flip_pairs",  # valid tokens with an earlier valid token in the sequence
    "sign_flips_raw",  # of those pairs, with strictly opposite signs of z
    "sign_flips_filtered",  # ... of the filtered log-ratio
    "clipped_high",  # clipped branch won above 1 + clip_high (A > 0)
    "clipped_low",  # clipped branch won below 1 - clip_low (A < 0)
    "capped",  # filtered log-ratio above log_ratio_cap
)
NUM_STATS = len(STAT_NAMES)
STAT = {name: i for i, name in enumerate(STAT_NAMES)}
assert STAT["raw_ratio_max"] == STAT["ratio_max"] + 2  # finalize reads both maxima as one strided slice


def row_stats(*, valid, token_loss, clipped, clipped_lower, log_ratio, ratio, raw_ratio, diagnostics=None, segments=None):
    """(S, NUM_STATS) statistics per sequence of per-token quantities, in token_loss's dtype.

    Tokens are (B, T) rows, or a packed (N,) stream with segments = (sum, max), functions
    reducing a per-token tensor to its sequences. valid: the mask as 0/1 floats. token_loss must
    be 0 at invalid tokens; the other quantities must be finite there (flags bool or None,
    ratios positive): they are masked by the mask. diagnostics: the diagnostic columns, already
    reduced per sequence (name -> (S,) tensor); a column not given is 0.
    """
    dtype = token_loss.dtype
    if segments is None:

        def total(values):  # torch.sum's pairwise summation: BLAS dot products lose ~1e-4 on 128k tokens
            return (values.to(dtype) * valid).sum(-1)

        def largest(values):
            return (values * valid).amax(-1) if values.shape[-1] else none

        def plain_sum(values):
            return values.sum(-1)

    else:
        segment_sum, segment_max = segments

        def total(values):
            return segment_sum(values.to(dtype) * valid)

        def largest(values):
            return segment_max(values * valid)

        plain_sum = segment_sum

    none = torch.zeros_like(plain_sum(token_loss))
    columns = {
        "tokens": plain_sum(valid),
        "loss_sum": plain_sum(token_loss),
        "clipped": none if clipped is None else total(clipped),
        "clipped_lower": none if clipped_lower is None else total(clipped_lower),
        "neg_log_ratio_sum": -plain_sum(log_ratio).to(dtype),
        "ratio_sum": total(ratio),
        "ratio_max": largest(ratio),
        "raw_ratio_sum": total(raw_ratio),
        "raw_ratio_max": largest(raw_ratio),
    }
    for name in STAT_NAMES[STAT_NAMES.index("innovation_tokens"):]:
        term = None if diagnostics is None else diagnostics.get(name)
        columns[name] = none if term is None else term.to(dtype)
    return torch.stack([columns[name] for name in STAT_NAMES], dim=-1)


def row_weights(tokens, options, horizon):
    """Weight of each row's loss sum in the aggregated loss (verl's `agg_loss`, docs/math.md section 4).

    An empty denominator (no valid token, no non-empty row) gives weight 0, hence loss 0,
    instead of 0/0. Computed in float64, returned in the dtype of `tokens`.
    """
    dtype = tokens.dtype
    return _row_weights(tokens.double(), options, horizon).to(dtype)


def _row_weights(tokens, options, horizon):
    dp = float(options.dp_size)
    if options.agg == "token-sum":
        return torch.full_like(tokens, dp)
    if options.agg == "token-mean":
        count = tokens.sum() if options.batch_num_tokens is None else _scalar(options.batch_num_tokens, tokens)
        return (_safe_inverse(count) * dp).expand_as(tokens)
    nonempty = tokens > 0
    sequences = nonempty.sum().to(tokens) if options.global_batch_size is None else _scalar(options.global_batch_size, tokens)
    weight = _safe_inverse(sequences) * dp
    if options.agg == "seq-mean-token-mean":
        return torch.where(nonempty, weight * _safe_inverse(tokens), 0.0)
    if options.agg == "seq-mean-token-sum-norm":
        # The horizon: T for padded batches, the longest sequence for packed ones.
        weight = weight * _safe_inverse(torch.as_tensor(horizon if options.loss_scale_factor is None else options.loss_scale_factor, dtype=tokens.dtype, device=tokens.device))
    return torch.where(nonempty, weight, 0.0)


def _scalar(value, like):
    if isinstance(value, torch.Tensor):
        return value.to(like)
    return torch.full((), float(value), dtype=like.dtype, device=like.device)


def _safe_inverse(x):
    return torch.where(x > 0, x.reciprocal(), 0.0)  # no gradient flows here: 1 / 0 is never used


def finalize(stats, options, horizon):
    """(row_scale (S,), loss (), metrics (len(METRIC_NAMES),)) from per-sequence statistics.

    horizon: the constant of seq-mean-token-sum-norm (T, or the longest packed sequence)."""
    tokens = stats[:, STAT["tokens"]]
    row_scale = row_weights(tokens, options, horizon)
    loss = (row_scale * stats[:, STAT["loss_sum"]]).sum()

    total = stats.sum(0)
    column = dict(zip(STAT_NAMES, total.unbind()))  # views: one operation for every column
    # Maxima over the batch (ratio_max, raw_ratio_max); a batch without valid tokens reports 0.
    maxima = stats[:, STAT["ratio_max"] : STAT["raw_ratio_max"] + 1 : 2]
    maxima = maxima.amax(0) if stats.shape[0] else maxima.new_zeros(2)
    maxima = torch.where(column["tokens"] > 0, maxima, 0.0)
    # the three denominators' inverses at once: valid tokens, innovation tokens, sign-flip pairs
    inverses = _safe_inverse(torch.stack([column["tokens"], column["innovation_tokens"], column["sign_flip_pairs"]]))
    per_token, scored, pairs = inverses.unbind()
    metrics = {
        "clipfrac": column["clipped"] * per_token,
        "clipfrac_lower": column["clipped_lower"] * per_token,
        "ppo_kl": column["neg_log_ratio_sum"] * per_token,
        "ratio_mean": column["ratio_sum"] * per_token,
        "ratio_max": maxima[0],
        "raw_ratio_mean": column["raw_ratio_sum"] * per_token,
        "raw_ratio_max": maxima[1],
        "num_tokens": column["tokens"],
        **diagnostic_metrics(column, per_token, scored, pairs),
    }
    return row_scale, loss, torch.stack([metrics[name] for name in METRIC_NAMES])


def diagnostic_metrics(column, per_token, scored, pairs):
    """The metrics of docs/math.md section 5b from the column sums of the row statistics (name ->
    0-dim tensor) and the inverses of their denominators (0 where a denominator is empty).

    nis_mean and log_likelihood are means over the innovation tokens (valid tokens with a
    finite predicted variance: all of them unless p0 = inf, whose first observation of each
    sequence has S = inf); the sign-flip rates are fractions of the pairs of consecutive valid
    tokens of one sequence; the clip and cap fractions are fractions of the valid tokens. An
    empty denominator gives 0.
    """
    return {
        "nis_mean": column["nis_sum"] * scored,
        "log_likelihood": column["log_likelihood_sum"] * scored,
        "sign_flip_raw": column["sign_flips_raw"] * pairs,
        "sign_flip_filtered": column["sign_flips_filtered"] * pairs,
        "clipfrac_high": column["clipped_high"] * per_token,
        "clipfrac_low": column["clipped_low"] * per_token,
        "capfrac": column["capped"] * per_token,
        "innovation_tokens": column["innovation_tokens"],
        "sign_flip_pairs": column["sign_flip_pairs"],
    }
