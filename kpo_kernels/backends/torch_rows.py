"""The torch backend's loss for a padded (B, T) CPU batch: its fast path (`rows_loss`).

It computes what the general path (`TorchBackend.loss_forward`) computes, with the same float64
filter and the same branch decisions, in fewer passes over the batch. It applies when

- the batch is a (B, T) batch on the CPU (the checks below read values on the host);
- every token input is finite everywhere, under the mask too: masking is then a multiplication;
- advantages are per sequence, or per token but equal over each sequence's valid tokens (GRPO
  broadcasts one per response);
- the valid tokens of each row come first, or the mask mode is skip: rows with holes are then
  compacted (`TailCompaction`), the loss computed on the compacted rows and the gradient moved back.

Otherwise it returns None and the general path runs. What differs from the general path:

- every row uses the same gains (position t: K_{t+1}): one `shared_scan`, one (T,) row of
  variance ratios, and the diagnostics of consecutive tokens without gathers;
- the branch decisions compare the masked filtered log-ratio (float64) with per-row bounds
  (which depend only on the sign of the row's advantage) and come out as 0/1 floats: their sums
  are the counts, and 1 - their sum where valid is where the gradient flows;
- sign flips are counted from products of signs, exact in any float dtype.

Sums over a compacted row run in a different order than over the row with its holes (rounding of
the result dtype, as between layouts: docs/numerics.md).
"""

import math

import torch
import torch.nn.functional as F

from .. import tables
from ..options import KL_CLAMP
from . import aggregation
from .base import LossForward, log1p_neg
from .torch_scan import COMPUTE, LARGEST_VALUE, cached_on_cpu, gain_lookup, prefix_filter
from .torch_workspace import scratch


def _bounds(low, high, dtype):
    """Clip bounds as `dtype` scalars: beyond its range a bound cannot bind (rt > 0)."""
    biggest = torch.finfo(dtype).max
    return max(low, -biggest), (high if high <= biggest else math.inf)


def _finite(tensor):
    return math.isfinite(float(tensor.sum()))


def _as_float(flags, dtype, name):
    """0/1 as `dtype`, in the scratch buffer `name`: a bool tensor through its bytes (about 7x
    faster on CPUs than bool -> float, the same values); other masks as they are converted."""
    return scratch(name, flags.shape, dtype).copy_(flags.view(torch.uint8) if flags.dtype == torch.bool else flags)


def _count(flags):
    """Per row, the number of True flags."""
    return flags.view(torch.uint8).sum(-1, dtype=torch.int32)


def _is_prefix(valid_f, tokens):
    """Whether each row's valid tokens are its first ones: their positions then sum to n(n-1)/2,
    the smallest sum of n distinct positions (exact in float32 up to T = 4096)."""
    length = valid_f.shape[-1]
    dtype = valid_f.dtype if length <= 4096 else torch.float64
    positions = torch.arange(length, dtype=dtype)
    return torch.equal(valid_f.to(dtype) @ positions, (tokens * (tokens - 1) / 2).to(dtype))


def rows_loss(batch, options, need_grad):
    """`LossForward` of a (B, T) CPU batch, or None when the fast path does not apply."""
    if batch.cu_seqlens is not None or batch.device.type != "cpu" or 0 in batch.shape:
        return None
    filt = options.filter
    dtype = batch.result_dtype
    rows, length = batch.shape
    mask = batch.mask
    valid_f = scratch("valid_f", batch.shape, dtype).fill_(1) if mask is None else _as_float(mask, dtype, "valid_f")
    # Same-dtype arithmetic throughout: with mixed float32/float64 operands a CPU op first makes
    # a float64 copy of the float32 one. Fresh (B, T) buffers are what costs most here (their
    # pages are faulted in anew), so every one that dies inside the call is a scratch buffer kept
    # between calls (torch_workspace.py), and the float64 ones are few: `spare` holds
    # old_log_prob, then the compaction's index or z before compaction, then x; and masking is
    # a `where` on the bool mask, in place. What is returned (the gradient, the sums) is fresh.
    z = scratch("z", batch.shape, COMPUTE).copy_(batch.log_prob)
    spare = scratch("spare", batch.shape, COMPUTE).copy_(batch.old_log_prob)
    z.sub_(spare)
    others = [t for t in (batch.is_weights, batch.advantages) if t is not None]
    if not _finite(z) or not all(_finite(t) for t in others):
        return None
    tokens = valid_f.sum(-1)
    compaction = None
    if mask is not None and not _is_prefix(valid_f, tokens):
        if not filt.skip:
            return None
        compaction = TailCompaction(valid_f, index=spare.view(torch.int64))
        spare, z = z, compaction.compact(z, out=scratch("compacted z", batch.shape, COMPUTE))

    original_valid = valid_f
    if compaction is not None:  # from here on, valid_f is the compacted rows' mask: their first n tokens
        positions = torch.arange(length, dtype=dtype)
        valid_f = torch.sub(tokens[:, None], positions, out=scratch("compacted valid_f", batch.shape, dtype)).clamp_(0, 1)
    # Every value masked here is finite: masking is a product with the float64 mask (a `where`
    # on the bool mask takes about 3x as long on CPUs). Invalid tokens may hold -0.0.
    valid64 = None if mask is None else scratch("valid64", batch.shape, COMPUTE).copy_(valid_f)

    def masked(values):  # values (float64), set to 0 at invalid tokens in place
        return values if valid64 is None else values.mul_(valid64)

    masked(z)  # 0 at invalid tokens (and in the compacted tails, whatever was under the mask)

    def tokenwise(values, name):  # a per-token input, 0 at invalid tokens, in the rows' layout
        values = torch.mul(values.to(dtype), original_valid, out=scratch(name, batch.shape, dtype))
        return values if compaction is None else compaction.compact(values, out=scratch("compacted " + name, batch.shape, dtype))

    weight = None if batch.is_weights is None else tokenwise(batch.is_weights, "weight")
    advantage = batch.advantages.to(dtype)
    if batch.advantages_per_token:
        per_token = tokenwise(batch.advantages, "advantage")
        advantage = per_token[:, 0].clone()
    if batch.advantages_per_token and not torch.equal(per_token, advantage[:, None] * valid_f):
        return None
    advantage = torch.where(tokens > 0, advantage, 0.0)
    weight = valid_f if weight is None else weight

    checked = batch.log_prob.dtype != torch.float64 and abs(filt.x0) <= LARGEST_VALUE
    x = masked(prefix_filter(z, filt, checked=checked, out=spare))  # 0 at invalid tokens
    count = tokens.long()
    z_low = scratch("z_low", batch.shape, dtype).copy_(z)
    low, high = torch.aminmax(z)  # ppo_kl's clamp changes nothing within +-KL_CLAMP
    clamped = z if max(-float(low), float(high)) <= KL_CLAMP else z.clamp(-KL_CLAMP, KL_CLAMP)
    neg_log_ratio_sum = clamped.sum(-1).neg_()
    stats = _diagnostics(z, x, z_low, count, dtype, filt) if options.diagnostics else {}  # z is overwritten

    capped = None
    top = float(x.max())
    if options.log_ratio_cap is not None and top > options.log_ratio_cap:
        capped = torch.gt(x, options.log_ratio_cap)
        if mask is not None:
            capped.logical_and_(valid_f != 0)
        stats["capped"] = _count(capped)
        masked(x.clamp_(max=options.log_ratio_cap))
        top = options.log_ratio_cap
    if top >= math.log(torch.finfo(dtype).max):
        return None  # an infinite ratio: the general path keeps its gradient 0 where frozen
    rt = scratch("rt", batch.shape, dtype).copy_(x).exp_()  # filtered ratio; 1 at invalid tokens

    neg_adv = advantage.neg()[:, None]
    positive, negative = advantage > 0, advantage < 0
    # unclipped becomes the gradient, unless the compaction's gather makes a fresh one
    unclipped = torch.mul(rt, neg_adv, out=None if compaction is None else scratch("unclipped", batch.shape, dtype))
    token_loss = scratch("token_loss", batch.shape, dtype)
    if options.clip:
        torch.clamp(rt, *_bounds(1 - options.clip_low, 1 + options.clip_high, dtype), out=token_loss).mul_(neg_adv)
        torch.maximum(unclipped, token_loss, out=token_loss)
    else:
        token_loss.copy_(unclipped)
    if options.dual_clip is not None:
        floor = torch.where(negative, advantage.neg() * options.dual_clip, math.inf)
        torch.minimum(token_loss, floor.to(dtype)[:, None], out=token_loss)
    stats["loss_sum"] = token_loss.mul_(weight).sum(-1)

    # Frozen tokens (the loss does not depend on log_prob): above a per-row upper bound of the
    # filtered log-ratio (clip_high for A > 0, the dual clip for A < 0), below a lower one
    # (clip_low for A < 0), or capped. x is 0 at invalid tokens, inside every bound. Decided in
    # float64; `frozen` holds them as 0/1 in the result dtype (or None: nothing is frozen).
    if options.clip and options.dual_clip is None:
        frozen = _beyond_clip(x, positive, negative, options, stats, dtype, out=z)  # z is spent
    else:
        flags = _beyond_bounds(x, positive, negative, options, stats)
        frozen = None if flags is None else _as_float(flags, dtype, "frozen")
    if capped is not None:
        capped = _as_float(capped, dtype, "capped")
        frozen = capped if frozen is None else torch.maximum(frozen, capped, out=frozen)
    if options.clip:
        for name in ("clipped_high", "clipped_low"):
            stats.setdefault(name, torch.zeros_like(tokens))
        stats["clipped"] = stats["clipped_high"] + stats["clipped_low"]

    grad = None
    if need_grad:  # d token_loss / d log_prob = -A * rt * w where the loss is not frozen
        grad = unclipped.mul_(weight)
        if frozen is not None:  # g - g f: g, or +0 where frozen (f = 1); a bool factor is slow on CPUs
            grad.addcmul_(grad, frozen, value=-1.0)
        if compaction is not None:
            grad = compaction.expand(grad)  # invalid tokens read a tail: 0 (weight is 0 there)

    ratio = rt.mul_(valid_f)
    raw = z_low.exp_().mul_(valid_f)
    stats.update(
        tokens=tokens,
        neg_log_ratio_sum=neg_log_ratio_sum,
        ratio_sum=ratio.sum(-1),
        ratio_max=ratio.amax(-1),
        raw_ratio_sum=raw.sum(-1),
        raw_ratio_max=raw.amax(-1),
    )
    none = torch.zeros_like(tokens)
    columns = [stats.get(name, none) for name in aggregation.STAT_NAMES]
    columns = torch.stack([c if c.dtype == dtype else c.to(dtype) for c in columns], dim=-1)
    row_scale, loss, metrics = aggregation.finalize(columns, options, length)
    return LossForward(loss, metrics, grad, row_scale)


def _beyond_clip(x, positive, negative, options, stats, dtype, out):
    """Where the clip freezes the loss without a dual clip, as 0/1 in `dtype`: one bound a row,
    above log1p(clip_high) for A > 0, below log1p(-clip_low) for A < 0, none for A = 0. With
    side = sign(A), those are where (x - bound) side > 0: one pass instead of two comparisons
    (exact: the rounded x side - bound side is 0 only where x equals the bound, and has the sign
    of x - bound otherwise), its sign clamped at 0 (a float result: bool flags and their use
    cost several times more on CPUs). out: a (B, T) float64 buffer to spend. Sets clipped_high
    and clipped_low."""
    rows = x.shape[0]
    side = torch.zeros(rows, dtype=COMPUTE).masked_fill_(positive, 1.0).masked_fill_(negative, -1.0)
    bound = torch.zeros(rows, dtype=COMPUTE)  # float64: a float32 bound would move the edge
    bound.masked_fill_(positive, math.log1p(options.clip_high)).masked_fill_(negative, log1p_neg(options.clip_low))
    beyond = torch.addcmul(bound.mul_(side).neg_()[:, None], x, side[:, None], out=out)
    frozen = scratch("frozen", x.shape, dtype).copy_(torch.sign(beyond, out=beyond).clamp_(min=0.0))
    total = frozen.sum(-1)  # exact below 2^24 tokens a row
    stats["clipped_high"] = torch.where(positive, total, 0.0)
    stats["clipped_low"] = torch.where(negative, total, 0.0)
    return frozen


def _beyond_bounds(x, positive, negative, options, stats):
    """Where the loss is frozen in general (a dual clip, or no clip) as bool flags, or None;
    `_beyond_clip` otherwise."""
    rows = x.shape[0]
    upper = torch.full((rows,), math.inf, dtype=COMPUTE)
    lower = torch.full((rows,), -math.inf, dtype=COMPUTE)
    if options.clip:
        upper.masked_fill_(positive, math.log1p(options.clip_high))
        lower.masked_fill_(negative, log1p_neg(options.clip_low))
    if options.dual_clip is not None:
        upper.masked_fill_(negative, math.log(options.dual_clip))
    frozen = None
    if bool(torch.isfinite(upper).any()):
        above = torch.gt(x, upper[:, None], out=scratch("above", x.shape, torch.bool))
        total = _count(above)
        if options.clip:
            stats["clipped_high"] = torch.where(positive, total, 0)
        if options.dual_clip is not None:
            stats["clipped_lower"] = torch.where(negative, total, 0)
        frozen = above
    if bool(torch.isfinite(lower).any()):
        below = torch.lt(x, lower[:, None], out=scratch("below", x.shape, torch.bool))
        stats["clipped_low"] = _count(below)
        frozen = below if frozen is None else frozen.logical_or_(below)
    return frozen


class TailCompaction:
    """Moves each row's valid tokens to the front of its (B, T) row, in order, and back: what
    `torch_scan.Compaction` does, in fewer passes (no running count). One int64 index serves both
    ways: a valid token's place in its compacted row, and for an invalid token its row's last
    place T - 1, which is in the compacted row's tail (a row with an invalid token has fewer than
    T valid ones)."""

    def __init__(self, valid_f, index=None):
        # Observations up to each token, n(t): a float cumulative sum (exact below 2^24 tokens a
        # row in float32) is several times faster on CPUs than one of the bool mask, and the
        # index is formed in place in it (a scratch buffer): n(t) - 1 where valid, T - 1
        # elsewhere. index: an int64 (B, T) tensor to hold it, or None.
        length = valid_f.shape[-1]
        dtype = torch.float32 if length < 2**24 else torch.float64
        flags = valid_f if valid_f.dtype == dtype else scratch("compaction flags", valid_f.shape, dtype).copy_(valid_f)
        count = torch.cumsum(flags, dim=-1, out=scratch("compaction count", valid_f.shape, dtype))
        count.sub_(length).mul_(flags).add_(length - 1)
        self.index = count.long() if index is None else index.copy_(count)

    def compact(self, values, out=None):
        """(B, T) values -> (B, T) with the valid tokens first, in order; after them 0, except
        the last place of a row with invalid tokens, which holds one of their values. out: a
        (B, T) tensor of values' dtype to hold it, or None."""
        out = torch.zeros_like(values) if out is None else out.zero_()
        return out.scatter_(1, self.index, values)

    def expand(self, compacted):
        """Compacted values -> each valid token's value at its own place; at an invalid token the
        value at the row's last place (0 when the compacted tail is)."""
        return torch.gather(compacted, 1, self.index)


def _innovation_terms(length, options, device):
    """What the diagnostics need of the ratios Q / R and P0 / R alone, for rows whose valid tokens
    come first: w (T,), the variance ratio of the token at position t (its observation t + 1), and
    per count n (T + 1,) over the first n tokens: the unscored ones (S = inf: p0 = inf, first
    observation) and the sum of -log w over the scored ones (log S = log r - log w). Shared: not
    written."""
    ratios = tables.variance_ratio_table(length, options.q, options.r, options.p0, device, COMPUTE)
    w = gain_lookup(ratios, torch.arange(length, device=device))
    unscored = F.pad(torch.cumsum(w == 0, 0), (1, 0))
    neg_log_w = w.log().neg_().masked_fill_(w == 0, 0.0)
    return w, unscored, F.pad(torch.cumsum(neg_log_w, 0), (1, 0))


def _diagnostics(z, x, z_low, count, dtype, options):
    """The diagnostic columns (docs/math.md section 5b) of rows whose valid tokens come first:
    z and x (float64) are 0 at invalid tokens, z_low is z in the result dtype; count holds the
    valid tokens of each row. z is overwritten (with the innovations)."""
    rows, length = z.shape
    r = options.r
    size = 1 << max(length - 1, 0).bit_length()  # a power of two: rows of other widths share it (prefixes)
    terms = cached_on_cpu("innovation terms", size, options, z.device, lambda: _innovation_terms(size, options, z.device))
    w, unscored_before, neg_log_w_before = terms[0][:length], terms[1][: length + 1], terms[2][: length + 1]

    # Innovation e = z - (the state before the token), x0 before the first token. At a row's first
    # invalid token t = n this reads -x_{n-1}: zeroed; after it z = x = 0.
    e = z  # in place: one (B, T) float64 buffer fewer
    e[:, 1:].sub_(x[:, :-1])
    e[:, :1].sub_(options.x0)
    end = count.clamp(max=length - 1)[:, None]
    e.scatter_(1, end, e.gather(1, end).mul_((count == length)[:, None]))
    nis = (e.square_() @ w).div_(r)

    unscored = unscored_before[count]
    scored = (count - unscored).to(COMPUTE)
    log_s_sum = neg_log_w_before[count].add_(scored * math.log(r))

    def flips(values):  # pairs of neighbours with strictly opposite signs (0 at invalid tokens)
        # torch.sign in the values' own dtype (-1, 0 or 1, whatever their size), the products of
        # neighbours' signs -1 where they are opposite, counted in float32 at least (exact below
        # 2^24 tokens a row). About 3x faster on CPUs than signs made of two comparisons.
        sign = torch.sign(values, out=scratch("signs", z.shape, values.dtype))
        pairs = torch.mul(sign[:, :-1], sign[:, 1:], out=scratch("sign pairs", (rows, max(length - 1, 0)), values.dtype))
        return pairs.clamp_(max=0).sum(-1, dtype=torch.promote_types(values.dtype, torch.float32)).neg_()

    # float32 inputs: z is a multiple of 2^-149, so its float32 rounding keeps its sign.
    z_signs = z_low
    return {
        "innovation_tokens": scored,
        "nis_sum": nis,
        "log_likelihood_sum": (scored * math.log(2 * math.pi)).add_(log_s_sum).add_(nis).mul_(-0.5),
        "sign_flip_pairs": (count - 1).clamp_(min=0),
        "sign_flips_raw": flips(z_signs),
        "sign_flips_filtered": flips(x),
    }
