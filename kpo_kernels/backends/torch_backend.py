"""Vectorized, exact PyTorch backend (any device; the default on CPUs).

The filter is the inclusive scan of the affine maps x -> a_t x + b_t (a_t = 1 - c_t, with c_t the
gain at a valid token and 0 elsewhere). It runs as the recursion itself, in float64, blocked for
vectorization: the tokens are cut into chunks of CHUNK, one loop step per position inside a chunk
runs on every chunk of every row at once, and the same scan runs recursively on the chunk totals
to carry the state across chunks. There is no closed form and no floor: products of a_t
underflow to 0 as they should, and a packed sequence start (a = 0) is an exact reset. O(T) work,
O(CHUNK log T) tensor operations, in-place arithmetic (CPU allocations of large tensors are
slow). The loss and its gradient are computed in float64 too, and returned in float32 (float64
for float64 inputs).
"""

import math

import torch
import torch.nn.functional as F

from .. import tables
from ..options import KL_CLAMP
from .base import Backend, LossForward, expand_rows, log1p_neg
from . import aggregation

COMPUTE = torch.float64
CHUNK = 16


def affine_scan(a, b, need_a=True):
    """(A, B) with x_t = A_t x_0 + B_t for x_t = a_t x_{t-1} + b_t along dim -1.

    a and b are float64 temporaries (both are overwritten). a may be one (T,) sequence shared by
    every row of b: the work on a is then done once. A is None unless need_a, and has a's shape.
    """
    length = b.shape[-1]
    chunks = -(-length // CHUNK)
    pad = chunks * CHUNK - length  # (1, 0) is the identity map
    if pad:
        a, b = F.pad(a, (0, pad), value=1.0), F.pad(b, (0, pad))
    a, b = a.unflatten(-1, (chunks, CHUNK)), b.unflatten(-1, (chunks, CHUNK))
    for t in range(1, CHUNK):  # within each chunk: B_t = a_t B_{t-1} + b_t, A_t = a_t A_{t-1}
        b[..., t].addcmul_(b[..., t - 1], a[..., t])
        if need_a or chunks > 1:
            a[..., t].mul_(a[..., t - 1])

    if chunks > 1:
        # State entering chunk k: the scan of the chunk totals, shifted by one chunk.
        a_through, b_through = affine_scan(a[..., -1].clone(), b[..., -1].clone(), need_a)
        b.addcmul_(F.pad(b_through[..., :-1], (1, 0))[..., None], a)
        if need_a:
            a.mul_(F.pad(a_through[..., :-1], (1, 0), value=1.0)[..., None])
    b = b.flatten(-2)[..., :length]
    return (a.flatten(-2)[..., :length] if need_a else None), b


def _bounds(low, high, dtype):
    """Clip bounds as `dtype` scalars: beyond its range a bound cannot bind (rt > 0)."""
    biggest = torch.finfo(dtype).max
    return max(low, -biggest), (high if high <= biggest else math.inf)


def _gain_lookup(gains, index):
    """Gains at 0-based gain indices (clamped: beyond the table every gain is saturated)."""
    return torch.take(gains, index.clamp(0, gains.numel() - 1))


def filter_states(z, valid, options):
    """Filtered log-ratio (float64) of a (B, T) z (float64, 0 where invalid). At invalid tokens
    the value is the state carried over them (callers mask it)."""
    batch, length = z.shape
    gains = tables.gain_table(length, options.q, options.r, options.p0, z.device, COMPUTE)
    if not options.skip or _is_prefix(valid):
        # Position mode, or valid tokens forming a prefix of every row: the token at position t
        # uses K_{t+1} in every row, so all rows share one coefficient sequence.
        c = _gain_lookup(gains, torch.arange(length, device=z.device))
    else:
        observations = torch.cumsum(valid, dim=-1)  # gain index n(t) of docs/math.md section 2
        c = _gain_lookup(gains, observations.sub_(1)).mul_(valid)
    bad = _nonfinite(z)
    b = c * (z if bad is None else z.masked_fill(bad, 0.0))
    a_total, b_total = affine_scan(torch.sub(1.0, c), b, need_a=options.x0 != 0)
    x = b_total if options.x0 == 0 else b_total.add_(a_total * options.x0)
    return x if bad is None else _ieee_nonfinite(x, z, c, bad, lambda v: torch.cumsum(v, dim=-1))


def _nonfinite(z):
    """Where z (0 at invalid tokens) is inf or NaN, or None when nowhere (known without a host
    sync only for CPU tensors; on an accelerator the mask is always built)."""
    bad = ~torch.isfinite(z)
    if z.device.type == "cpu" and not bool(bad.any()):
        return None
    return bad


def _ieee_nonfinite(x, z, c, bad, running_count):
    """What the recursion x + K (z - x) gives once an observation is inf or NaN: K z (inf, or NaN)
    at that token and NaN (inf - inf) at every later one of its sequence. The scan itself ran on
    finite values: its closed form would carry an inf along where the recursion has NaN, and in
    a packed stream could carry it into the next sequence."""
    earlier = running_count(bad) > bad
    return torch.where(earlier, math.nan, torch.where(bad, c * z, x))


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
            return _gain_lookup(table, torch.arange(self.horizon, device=valid.device))
        return _gain_lookup(table, torch.cumsum(valid, dim=-1).sub_(1))

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

    def __init__(self, cu_seqlens, num_tokens):
        self.cu_seqlens = cu_seqlens.long()
        self.num_seqs = cu_seqlens.numel() - 1
        tokens = torch.arange(num_tokens, device=cu_seqlens.device)
        self.seq = torch.searchsorted(self.cu_seqlens[1:], tokens, right=True)  # sequence of each token
        self.pos = tokens - self.cu_seqlens[self.seq]  # position in its sequence
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        self.horizon = lengths.max() if self.num_seqs else 0  # the longest sequence (no host sync)
        self.longest = tables.packed_longest(cu_seqlens, num_tokens)  # the tables' length bound

    def filter(self, z, valid, options):
        """Filtered log-ratio of a packed z: one scan over the stream, where the first token of
        each sequence forgets the state exactly (its map is x -> x0 (1 - c) + c z, a = 0)."""
        gains = tables.gain_table(self.longest, options.q, options.r, options.p0, z.device, COMPUTE)
        if options.skip:
            count = self._running(valid)  # gain index n(t) within the sequence
            c = _gain_lookup(gains, count.sub_(1)).mul_(valid)
        else:
            c = _gain_lookup(gains, self.pos)
        bad = _nonfinite(z)
        b = c * (z if bad is None else z.masked_fill(bad, 0.0))
        first = self.pos == 0
        b = torch.where(first, options.x0 * (1 - c) + b, b)
        x = affine_scan(torch.sub(1.0, c).masked_fill_(first, 0.0)[None], b[None], need_a=False)[1][0]
        return x if bad is None else _ieee_nonfinite(x, z, c, bad, self._running)

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
            return _gain_lookup(table, self._running(valid).sub_(1))
        return _gain_lookup(table, self.pos)

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
        return self.count(has), self.count((pz * z < 0) & has), self.count((px * x < 0) & has)

    def previous_state(self, x, x0):
        """The state before each token (x0 before the first of each sequence)."""
        if x.numel() == 0:
            return x.clone()
        before = F.pad(x[:-1], (1, 0))
        return before.masked_fill_(self.pos == 0, x0)

    def previous_valid(self, valid, *values):
        """(has, values at the previous valid token of the same sequence)."""
        if valid.shape[0] == 0:
            return valid.clone(), [v.clone() for v in values]
        index = torch.where(valid, torch.arange(valid.shape[0], device=valid.device), -1)
        last = F.pad(torch.cummax(index, dim=0).values[:-1], (1, 0), value=-1)
        has = valid & (last >= self.cu_seqlens[self.seq])
        last.clamp_(min=0)
        return has, [v[last] for v in values]


class TorchBackend(Backend):
    """The vectorized PyTorch backend: exact to float64 rounding, on any device torch runs on.

    `backend="torch"` (or "auto" on a CPU, and for float64 inputs) uses it. It computes in
    float64 internally (the gains and the scan), so float64 inputs give float64 results; it is
    the backend of the CPU and the reference the Triton kernels are compared with in the tests.
    No arguments. docs/api.md lists where each backend runs.
    """

    name = "torch"

    def filter(self, log_ratio, mask, options, cu_seqlens=None):
        valid = _valid(mask, log_ratio.shape, log_ratio.device)
        z = torch.where(valid, log_ratio.to(COMPUTE), 0.0)
        layout = _Rows(log_ratio.shape) if cu_seqlens is None else _Packed(cu_seqlens, log_ratio.shape[0])
        out_dtype = torch.float64 if log_ratio.dtype == torch.float64 else torch.float32
        return torch.where(valid, layout.filter(z, valid, options), 0.0).to(out_dtype)

    def loss_forward(self, batch, options, need_grad):
        # The scan and every branch decision (cap, clip, dual clip) use the float64 filtered
        # log-ratio, so decisions agree with a float64 definition token for token; values are
        # computed in the result dtype. Garbage under the mask is replaced once; after that
        # every masked quantity is finite and multiplying by the mask zeroes it (cheaper than
        # `where` on CPUs). Arithmetic is in place where it can be: fresh multi-megabyte CPU
        # allocations cost page faults.
        dtype = batch.result_dtype
        layout = _Rows(batch.shape) if batch.cu_seqlens is None else _Packed(batch.cu_seqlens, batch.shape[0])
        valid = _valid(batch.mask, batch.shape, batch.device)
        invalid = ~valid
        valid_f = valid.to(dtype)
        z = batch.log_prob.to(COMPUTE, copy=True).sub_(batch.old_log_prob).masked_fill_(invalid, 0.0)
        x = layout.filter(z, valid, options.filter)
        diagnostics = _diagnostic_columns(layout, z, x, valid, options.filter)

        capped = None
        if options.log_ratio_cap is not None:
            capped = x > options.log_ratio_cap
            diagnostics["capped"] = layout.count(capped & valid)
            x.clamp_(max=options.log_ratio_cap)
        rt = x.to(dtype, copy=True).mul_(valid_f).exp_()  # filtered ratio; 1 at invalid tokens

        neg_adv = batch.advantages.to(dtype)
        if not batch.advantages_per_token:  # one advantage per sequence
            neg_adv = layout.per_token(torch.where(layout.any_valid(valid), neg_adv, 0.0))
        else:
            neg_adv = neg_adv.masked_fill(invalid, 0.0)
        neg_adv = neg_adv.neg_()
        token_loss = rt * neg_adv
        frozen = capped  # tokens whose loss does not depend on log_prob
        clipped = lower = None
        if options.clip:
            clipped_loss = torch.clamp(rt, *_bounds(1 - options.clip_low, 1 + options.clip_high, dtype)).mul_(neg_adv)
            torch.maximum(token_loss, clipped_loss, out=token_loss)
            clipped_high = (x > math.log1p(options.clip_high)) & (neg_adv < 0)
            clipped_low = (x < log1p_neg(options.clip_low)) & (neg_adv > 0)
            diagnostics["clipped_high"] = layout.count(clipped_high & valid)
            diagnostics["clipped_low"] = layout.count(clipped_low & valid)
            clipped = clipped_high | clipped_low
            frozen = clipped if frozen is None else frozen | clipped
        if options.dual_clip is not None:
            negative = neg_adv > 0
            torch.minimum(token_loss, torch.where(negative, neg_adv * options.dual_clip, math.inf), out=token_loss)
            lower = (x > math.log(options.dual_clip)) & negative
            frozen = lower if frozen is None else frozen | lower
        weight = valid_f
        if batch.is_weights is not None:
            weight = batch.is_weights.to(dtype).masked_fill(invalid, 0.0)
        token_loss.mul_(weight)

        stats = layout.row_stats(
            valid=valid_f,
            token_loss=token_loss,
            clipped=clipped,
            clipped_lower=lower,
            log_ratio=z.clamp(-KL_CLAMP, KL_CLAMP),  # ppo_kl as verl computes it
            ratio=rt,
            raw_ratio=z.to(dtype, copy=True).exp_(),
            diagnostics=diagnostics,
        )
        row_scale, loss, metrics = aggregation.finalize(stats, options, layout.horizon)
        grad = None
        if need_grad:  # d token_loss / d log_prob = -A * rt * w where the loss is not frozen
            grad = rt.mul_(neg_adv).mul_(weight)
            # Exactly 0 at masked tokens, even where rt is NaN (after an infinite log-ratio).
            grad.masked_fill_(invalid if frozen is None else frozen | invalid, 0.0)
        return LossForward(loss, metrics, grad, row_scale)

    def loss_backward(self, grad, row_scale, grad_output, cu_seqlens, dtype):
        scale = expand_rows(grad_output.to(row_scale.dtype) * row_scale, grad.shape, cu_seqlens)
        return (grad * scale).to(dtype)

    def prepare(self, length, q, r, p0, device):
        tables.gain_table(length, q, r, p0, device, COMPUTE)
        tables.variance_ratio_table(length, q, r, p0, device, COMPUTE)

    def output_dtypes(self, dtype):
        return dict.fromkeys(("filter", "loss", "grad", "row_scale"), torch.float64 if dtype == torch.float64 else torch.float32)

    def key(self):
        return "torch" if type(self) is TorchBackend else super().key()


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


def _diagnostic_columns(layout, z, x, valid, options):
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
