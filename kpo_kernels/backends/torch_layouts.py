"""The torch backend's batch layouts: a padded (B, T) batch (`_Rows`) or a packed stream
(`_Packed`), each with its filter and the per-sequence reductions the loss needs, and the
diagnostic columns of the general loss path (docs/math.md section 5b)."""

import math

import torch
import torch.nn.functional as F

from .. import tables
from ..state import NO_TOKEN, largest_count
from . import aggregation
from .torch_scan import (
    COMPUTE,
    Compaction,
    affine_scan,
    gain_lookup,
    ieee_nonfinite,
    nonfinite,
    position_gains,
    prefix_filter,
)


def filter_states(z, valid, options):
    """Filtered log-ratio (float64) of a (B, T) z (float64, 0 where invalid). At invalid tokens
    the value is the state carried over them, or (right padding) the filter run on with z = 0
    (callers mask it)."""
    bad = nonfinite(z)
    finite = z if bad is None else z.masked_fill(bad, 0.0)
    if not options.skip or _is_prefix(valid):
        # Position mode, or valid tokens forming a prefix of every row: the token at position t
        # uses K_{t+1} in every row, so all rows share one coefficient sequence.
        x = prefix_filter(finite, options)
        if bad is None:
            return x
        return ieee_nonfinite(x, z, position_gains(z.shape[-1], options, z.device), bad, _running)
    # Holes in skip mode: the filter of each row's valid tokens, moved to the front.
    compaction = Compaction(valid)
    x = prefix_filter(compaction.compact(finite), options)
    if bad is not None:
        c = position_gains(z.shape[-1], options, z.device)
        x = ieee_nonfinite(x, compaction.compact(z), c, compaction.compact(bad.to(COMPUTE)) > 0, _running)
    return compaction.carried(x, options.x0)


def _running(flags):
    return torch.cumsum(flags, dim=-1)


def _is_prefix(valid):
    """True if each row's valid tokens come before its invalid ones (right padding).

    Answered only for CPU tensors: on an accelerator the answer would cost a host sync, and the
    general path is taken instead.
    """
    if valid.device.type != "cpu" or valid.shape[-1] < 2:
        return valid.device.type == "cpu"
    return not bool((valid[:, 1:] > valid[:, :-1]).any())


def _valid(mask, shape, device):
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return mask if mask.dtype == torch.bool else mask != 0


class _Rows:
    """A padded (B, T) batch: each row is a sequence."""

    def __init__(self, shape):
        self.num_seqs, self.horizon = shape

    def filter(self, z, valid, options):
        return filter_states(z, valid, options)

    def per_token(self, per_sequence):
        return per_sequence[:, None]

    def any_valid(self, valid):
        return valid.any(-1)

    def row_stats(self, **columns):
        return aggregation.row_stats(**columns)


    def table_length(self, z):
        return self.horizon

    def per_observation(self, table, valid, skip):
        """A per-observation table (indexed like the gains) at every token: (T,) shared by the
        rows when the index is the position, else (B, T)."""
        if not skip or self.prefix(valid):
            return gain_lookup(table, torch.arange(self.horizon, device=valid.device))
        return gain_lookup(table, torch.cumsum(valid, dim=-1).sub_(1))

    def row_sum(self, values):
        return values.sum(-1)

    def count(self, flags):
        """Per row, the number of True flags (without a (B, T) int64 copy)."""
        return flags.view(torch.uint8).sum(-1, dtype=torch.int32)

    def prefix(self, valid):
        """_is_prefix(valid), asked once per batch."""
        if getattr(self, "_prefix", None) is None:
            self._prefix = _is_prefix(valid)
        return self._prefix

    def innovation(self, z, x, x0):
        """z minus the state before each token (x0 before the first), a new tensor."""
        e = torch.empty_like(z)
        torch.sub(z[:, :1], x0, out=e[:, :1])
        torch.sub(z[:, 1:], x[:, :-1], out=e[:, 1:])
        return e

    def sign_flips(self, z, x, valid, tokens):
        """Per row: (pairs of consecutive valid tokens, of those with strictly opposite signs
        of z (z_prev z < 0), of x). z must be 0 at invalid tokens; tokens: valid tokens per row.
        Holes: the products of the values at the previous valid token are float64, which cannot
        underflow for float32 inputs (|z| >= 1e-45); for float64 ones only below 1e-154."""
        if self.prefix(valid):  # consecutive valid tokens are neighbours: the pair (t - 1, t)
            pairs = (tokens - 1).clamp_min_(0)  # counts iff t is valid
            raw = self.count(_opposite(z))  # z = 0 at invalid tokens: no flip there
            return pairs, raw, self.count(_opposite(x).logical_and_(valid[:, 1:]))
        has, (pz, px) = self.previous_valid(valid, z, x)
        return self.count(has), self.count((pz * z < 0) & has), self.count((px * x < 0) & has)

    def previous_valid(self, valid, *values):
        """(has, values at the previous valid token of the row): has is True at valid tokens
        with an earlier valid token in their row."""
        if valid.shape[-1] == 0:
            return valid.clone(), [v.clone() for v in values]
        if self.prefix(valid):  # the previous valid token is the previous token
            has = F.pad(valid[:, 1:], (1, 0))
            return has, [F.pad(v[:, :-1], (1, 0)) for v in values]
        # cummax of the mask: the value says whether a valid token came yet, the index (the
        # latest of tied maxima) which one was the last.
        seen, index = torch.cummax(valid.view(torch.uint8), dim=-1)
        has = valid & F.pad(seen[:, :-1], (1, 0)).bool()
        last = F.pad(index[:, :-1], (1, 0))
        return has, [torch.gather(v, 1, last) for v in values]


class _Packed:
    """A packed (N,) stream of sequences delimited by cu_seqlens (S + 1,)."""

    def __init__(self, cu_seqlens, num_tokens, state=None):
        self.cu_seqlens = cu_seqlens.long()
        self.num_seqs = cu_seqlens.numel() - 1
        tokens = torch.arange(num_tokens, device=cu_seqlens.device)
        self.seq = torch.searchsorted(self.cu_seqlens[1:], tokens, right=True)  # sequence of each token
        self.pos = tokens - self.cu_seqlens[self.seq]  # position in its sequence
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        self.horizon = lengths.max() if self.num_seqs else 0  # the longest sequence (no host sync)
        self.longest = tables.packed_longest(cu_seqlens, num_tokens)  # the tables' length bound
        # An entering state (docs/math.md section 7): each sequence starts from state.x, its
        # gain index is offset by state.count, its first valid token pairs with state.last_sign.
        self.state = state
        self.offset = 0
        if state is not None:
            self.offset = state.count[self.seq]
            self.longest += largest_count(state)

    def _start(self, x0):
        """The state before each sequence's first token, at every token (or the number x0)."""
        return x0 if self.state is None else self.state.x.to(COMPUTE)[self.seq]

    def filter(self, z, valid, options):
        """Filtered log-ratio of a packed z: one scan over the stream, where the first token of
        each sequence forgets the state exactly (its map is x -> x0 (1 - c) + c z, a = 0)."""
        gains = tables.gain_table(self.longest, options.q, options.r, options.p0, z.device, COMPUTE)
        c = self.per_observation(gains, valid, options.skip)
        if options.skip:
            c = c.mul_(valid)
        bad = nonfinite(z)
        b = c * (z if bad is None else z.masked_fill(bad, 0.0))
        first = self.pos == 0
        start, bad_start = self._start(options.x0), None
        if self.state is not None:
            # An entering state that is inf or NaN (an earlier chunk's token was): the recursion
            # gives NaN at every token of the sequence (inf - inf), as the whole-sequence call
            # does after such a token. Scanned as 0: in the scan of the stream a NaN or inf would
            # leak into the next sequences (0 * NaN at their reset).
            bad_start = nonfinite(start)
            if bad_start is not None:
                start = start.masked_fill(bad_start, 0.0)
        b = torch.where(first, start * (1 - c) + b, b)
        x = affine_scan(torch.sub(1.0, c).masked_fill_(first, 0.0)[None], b[None], need_a=False)[1][0]
        if bad is not None:
            x = ieee_nonfinite(x, z, c, bad, self._running)
        return x if bad_start is None else x.masked_fill_(bad_start, math.nan)

    def _running(self, flags):
        """Inclusive count of `flags` within each token's sequence."""
        count = torch.cumsum(flags, 0)
        return count - F.pad(count, (1, 0))[self.cu_seqlens[:-1]][self.seq]

    def per_token(self, per_sequence):
        return per_sequence[self.seq]

    def any_valid(self, valid):
        return self._sum(valid.to(torch.int64)) > 0

    def _sum(self, values):
        # index_add_ accumulates token by token: in float64, so that float32 inputs lose nothing.
        wide = values.to(torch.float64 if values.is_floating_point() else values.dtype)
        total = torch.zeros(self.num_seqs, dtype=wide.dtype, device=values.device).index_add_(0, self.seq, wide)
        return total.to(values.dtype)

    def _max(self, values):
        empty = torch.full((self.num_seqs,), -math.inf, dtype=values.dtype, device=values.device)
        return empty.scatter_reduce_(0, self.seq, values, "amax")

    def row_stats(self, **columns):
        return aggregation.row_stats(**columns, segments=(self._sum, self._max))

    def table_length(self, z):
        return self.longest

    def per_observation(self, table, valid, skip):
        """A per-observation table (indexed like the gains) at every token."""
        if skip:
            return gain_lookup(table, self._running(valid).sub_(1).add_(self.offset))
        return gain_lookup(table, self.pos + self.offset)

    def row_sum(self, values):
        return self._sum(values)

    def count(self, flags):
        return self._sum(flags.to(torch.int64))

    def innovation(self, z, x, x0):
        """z minus the state before each token (x0 before the first of its sequence)."""
        return z - self.previous_state(x, x0)

    def sign_flips(self, z, x, valid, tokens):
        """Per sequence: (pairs of consecutive valid tokens, of those with strictly opposite
        signs of z, of x)."""
        has, (pz, px) = self.previous_valid(valid, z, x)
        pairs, raw, filtered = self.count(has), self.count((pz * z < 0) & has), self.count((px * x < 0) & has)
        if self.state is None:
            return pairs, raw, filtered
        # Each sequence's first valid token pairs with the last valid token before the chunk.
        code = self.state.last_sign.to(torch.int64)
        carried = (valid & ~has & (code != NO_TOKEN)[self.seq]).to(torch.int64)
        raw_before, filtered_before = (code // 3 - 1)[self.seq], (code % 3 - 1)[self.seq]
        pairs = pairs + self._sum(carried)
        raw = raw + self._sum(carried * (_sign(z) * raw_before < 0))
        filtered = filtered + self._sum(carried * (_sign(x) * filtered_before < 0))
        return pairs, raw, filtered

    def previous_state(self, x, x0):
        """The state before each token (x0, or the entering state, before the first of each sequence)."""
        if x.numel() == 0:
            return x.clone()
        before = F.pad(x[:-1], (1, 0))
        return torch.where(self.pos == 0, self._start(x0), before)

    def previous_valid(self, valid, *values):
        """(has, values at the previous valid token of the same sequence)."""
        if valid.shape[0] == 0:
            return valid.clone(), [v.clone() for v in values]
        index = torch.where(valid, torch.arange(valid.shape[0], device=valid.device), -1)
        last = F.pad(torch.cummax(index, dim=0).values[:-1], (1, 0), value=-1)
        has = valid & (last >= self.cu_seqlens[self.seq])
        last.clamp_(min=0)
        return has, [v[last] for v in values]



def _sign(v):
    """-1, 0 or 1 as int64 (0 for 0 and NaN, as the kernels' sign codes)."""
    return torch.sign(v).nan_to_num_(0.0).to(torch.int64)


def _opposite(v):
    """(B, T - 1): v[:, t] and v[:, t + 1] have strictly opposite signs (0 and NaN: neither),
    with byte-sized temporaries."""
    positive, negative = v > 0, v < 0
    return (positive[:, :-1] & negative[:, 1:]).logical_or_(negative[:, :-1] & positive[:, 1:])


def innovation_terms(layout, z, x, valid, options):
    """(scored, e^2 / S, log S) per token of a filtered batch (float64; docs/math.md section 5b).

    z: observations (0 where invalid); x: the filtered states (carried over invalid tokens).
    e = z - xhat_before, S = R / w with w = 1 - K of the token's observation
    (innovation.variance_ratio_schedule). scored: valid tokens with a finite S. The terms are
    0 where not scored; log S may be a (T,) row shared by every row.
    """
    table = tables.variance_ratio_table(layout.table_length(z), options.q, options.r, options.p0, z.device, COMPUTE)
    w = layout.per_observation(table, valid, options.skip)
    scored = valid & (w > 0)
    nis = layout.innovation(z, x, options.x0)
    nis.square_().mul_(w).div_(options.r).masked_fill_(~scored, 0.0)
    log_s = w.log().neg_().add_(math.log(options.r))
    return scored, nis, log_s


def diagnostic_columns(layout, z, x, valid, options):
    """Per-sequence sums of the diagnostic statistics but the clip and cap counts
    (aggregation.STAT_NAMES), from the float64 observations z (0 where invalid) and states x."""
    r = options.r
    table = tables.variance_ratio_table(layout.table_length(z), options.q, r, options.p0, z.device, COMPUTE)
    w = layout.per_observation(table, valid, options.skip)
    shared = w.dim() < z.dim()  # one (T,) row of weights for every row
    tokens = layout.count(valid)

    e = layout.innovation(z, x, options.x0).masked_fill_(~valid, 0.0).square_()  # e^2, 0 where invalid
    nis = (e @ w if shared else layout.row_sum(e.mul_(w))).div_(r)
    log_s = w.log().neg_().add_(math.log(r)).masked_fill_(w == 0, 0.0)  # log S; 0 where S = inf
    if shared and layout.prefix(valid):  # row b's tokens are observations 1..n_b: a prefix sum
        prefix_sums = F.pad(torch.cumsum(log_s, 0), (1, 0))
        log_s_sum = prefix_sums[tokens]
    elif shared:
        log_s_sum = valid.to(COMPUTE) @ log_s
    else:
        log_s_sum = layout.row_sum(log_s.masked_fill_(~valid, 0.0))
    count = tokens
    if math.isinf(options.p0):  # S = inf (w = 0) at each sequence's first observation: not scored
        count = tokens - layout.count(valid & (w == 0))
    count = count.to(COMPUTE)
    pairs, flips_raw, flips_filtered = layout.sign_flips(z, x, valid, tokens)
    return {
        "innovation_tokens": count,
        "nis_sum": nis,
        "log_likelihood_sum": (count * math.log(2 * math.pi)).add_(log_s_sum).add_(nis).mul_(-0.5),
        "sign_flip_pairs": pairs,
        "sign_flips_raw": flips_raw,
        "sign_flips_filtered": flips_filtered,
    }
