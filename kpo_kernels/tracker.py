"""`NoiseTracker`: the Q and R a training loop passes to `kpo_loss`, fixed or fitted as it goes."""

import math

import torch

from .fit_options import (
    FIT_MODES, PER_STEP_MAX_TOKENS, check_fit_mode, check_fit_prior, check_fit_range, check_max_tokens, check_min_tokens,
)
from .dispatch import check_backend_argument
from .fitting import FITTED, STATUS_NAMES, estimate_noise
from .validation import check_bool, check_filter_params

# A fitted ratio Q / R is rounded to this many steps a decade (at most 3.7% off the fit, whose own
# spread from one micro-batch to the next is far wider: docs/choosing-q-and-r.md). Successive fits
# then meet the same ratios again, and the loss finds their tables cached instead of building them
# at each step (tables depend on Q / R alone).
RATIO_STEPS_PER_DECADE = 32
_ROUNDED_BITS = 26  # the grid ratio and R keep this many significant bits: their product, Q, is exact


def _significant(value, bits, rounding=round):
    mantissa, exponent = math.frexp(value)
    return math.ldexp(rounding(mantissa * (1 << bits)), exponent - bits)


def _any_rank(flag, group, device):
    """Whether `flag` is True on any rank of `group`: one all-reduce of one number, on the CPU
    where the group has gloo (no device synchronisation), else on `device` (the data's, where
    the fit's own all-reduces run)."""
    import torch.distributed as dist

    device = "cpu" if "gloo" in str(dist.get_backend(group)) else device
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def round_fitted(q, r, q_range=None):
    """(q', r'): a fit's Q and R with Q / R the point nearest the fit among the grid of
    `RATIO_STEPS_PER_DECADE` steps a decade and `q_range`'s ends (those inside the range; the ends
    to 26 bits, inward: a fit at an end stays there), and R to 26 significant bits (1.5e-8
    relative at most), so that q' / r' is that point exactly: the key under which the loss caches
    the tables of that ratio. Returns (q, r) unchanged when there is nothing to round (a ratio or
    R that is 0, negative or not finite) or the rounding would leave float64's normal range."""
    if not (math.isfinite(r) and r > 0 and math.isfinite(q) and q > 0):
        return q, r
    ratio = q / r
    if not (math.isfinite(ratio) and ratio > 0):
        return q, r
    try:
        step = round(math.log10(ratio) * RATIO_STEPS_PER_DECADE)
        points = [_significant(10.0 ** (step / RATIO_STEPS_PER_DECADE), _ROUNDED_BITS)]
        if q_range is not None:
            low, high = q_range
            points += [_significant(low, _ROUNDED_BITS, math.ceil), _significant(high, _ROUNDED_BITS, math.floor)]
            points = [point for point in points if low <= point <= high]
        if not points:  # a range narrower than 26 bits
            return q, r
        grid = min(points, key=lambda point: abs(math.log(point / ratio)))
        rounded_r = _significant(r, _ROUNDED_BITS)
        rounded_q = grid * rounded_r  # exact (26 + 26 significant bits) unless it leaves the normal range
    except OverflowError:
        return q, r
    return (rounded_q, rounded_r) if rounded_q / rounded_r == grid else (q, r)


# metric name -> meaning (NoiseTracker.metrics; verl logs them as actor/kpo_<name>, TRL as kpo/<name>)
FIT_METRICS = ("kalman_q", "kalman_r", "drift_evidence", "at_boundary", "fit_status", "refit")


class NoiseTracker:
    """Keeps the filter's Q and R across training steps: fixed (`"off"`), fitted on the first
    stale micro-batch of each rollout batch (`"per_generation"`), or fitted on every micro-batch
    before its loss (`"per_step"`), with `estimate_noise` (docs/choosing-q-and-r.md, "Fitting
    every step"; docs/api.md).

        tracker = NoiseTracker("per_step")
        for batch in micro_batches:
            noise = tracker(log_prob.detach() - old_log_prob, mask)
            loss, metrics = kpo_loss(log_prob, old_log_prob, advantages, mask, **noise)

    Args:
        mode: one of `FIT_MODES`: "off", "per_generation" or "per_step".
        q, r, p0, x0: the filter's settings as in `kpo_loss`; q, r are used until a fit succeeds
            (and whenever one falls back). A fit keeps P0 / R at p0 / r, which must be 0 or inf.
        mask_mode: "skip" or "position", as in `kpo_loss`.
        q_range: (lowest, highest) ratio Q / R searched. Default (1e-10, 1e2).
        min_tokens: a micro-batch (over the group) with fewer tokens keeps the previous Q and R.
        group: "auto" (default: the default `torch.distributed` group when one is initialised
            with more than one process, else none), None (no collective), or a process group:
            the fit's sums are all-reduced over it, so every rank gets the same Q and R. A rank
            that does not want a fit (stale=False, or per_generation's fit done) joins the
            others' with no tokens: per_step fits at every call; per_generation first agrees
            whether any rank wants one (one all-reduce of one number a call, on the CPU where
            the group has gloo).
        max_tokens: the per-step fit's budget (default `PER_STEP_MAX_TOKENS`, 32768): a micro-batch
            of more positions (rows x longest sequence) is fitted on every k-th sequence,
            `estimate_noise`'s cap (cheaper, statistically noisier: docs/choosing-q-and-r.md);
            None: every sequence. A "per_generation" fit, once per rollout batch, reads every
            sequence.
        backend: what runs the fit, as in `estimate_noise` ("auto": the Triton backend on CUDA
            for float32 and narrower log-ratios, three launches; "torch", "triton" or a
            `Backend`). Trainers pass their loss's backend.

    Raises:
        TypeError, ValueError: a bad option, named, at construction.

    Calling it (`tracker(log_ratio, mask=None, *, cu_seqlens=None, stale=True)`) returns the
    keywords {"q", "r", "p0"} for `kpo_loss`. It fits when the mode asks for it and `stale` is
    True (pass False for a micro-batch known to be on-policy), or, under a group, when another
    rank wants one (`group`); a fit reads its few numbers back to the host once (`kpo_loss`
    takes q and r as Python numbers). A fitted Q / R is rounded to
    `RATIO_STEPS_PER_DECADE` steps a decade (`round_fitted`): the loss then reuses the tables of
    earlier steps' ratios. `new_generation()` marks a new rollout batch for "per_generation".
    `metrics` holds the latest values of `FIT_METRICS`.
    """

    def __init__(self, mode="per_step", *, q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", q_range=(1e-10, 1e2),
                 min_tokens=64, group="auto", max_tokens=PER_STEP_MAX_TOKENS, backend="auto"):
        self.mode = check_fit_mode("mode", mode)
        options = check_filter_params(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
        self.p0_ratio = options.p0 / options.r
        check_fit_prior("p0", self.p0_ratio, self.mode)
        self.q_range = check_fit_range("q_range", q_range)
        self.min_tokens = check_min_tokens("min_tokens", min_tokens)
        if isinstance(group, str) and group != "auto":
            raise ValueError(f"group must be 'auto', None or a torch.distributed process group, got {group!r}")
        self.group = group
        self.max_tokens = check_max_tokens("max_tokens", max_tokens)
        check_backend_argument(backend)
        self.backend = backend
        self.q, self.r, self.p0, self.x0, self.mask_mode = options.q, options.r, options.p0, options.x0, options.mask_mode
        self._pending = self.mode == "per_generation"
        self.metrics = {"kalman_q": self.q, "kalman_r": self.r, "drift_evidence": math.nan, "at_boundary": 0.0,
                        "fit_status": -1.0, "refit": 0.0}

    def new_generation(self):
        """A new rollout batch begins: "per_generation" fits on its first stale micro-batch."""
        self._pending = self.mode == "per_generation"

    @property
    def options(self):
        """The keywords {"q", "r", "p0"} of `kpo_loss` in use now."""
        return {"q": self.q, "r": self.r, "p0": self.p0}

    def __call__(self, log_ratio, mask=None, *, cu_seqlens=None, stale=True):
        """Fit if the mode asks for it (see the class docstring); return `options`."""
        stale = check_bool("stale", stale)
        self.metrics["refit"] = 0.0
        if self.mode == "off":
            return self.options
        wanted = stale and (self.mode == "per_step" or self._pending)
        group = self._group()
        if group is not None:
            # The fit's sums are all-reduced: every rank joins a fit that any rank wants (one
            # on-policy, or with its micro-batch all masked, would otherwise skip it and pair its
            # next collective with the others' fit), adding no tokens if it does not want it.
            # per_step fits at every call on every rank; per_generation first agrees (_any_rank).
            if self.mode == "per_generation" and not _any_rank(wanted, group, log_ratio.device):
                return self.options
            if not wanted:
                mask = torch.zeros(log_ratio.shape, dtype=torch.bool, device=log_ratio.device)
        elif not wanted:
            return self.options
        fit = estimate_noise(
            log_ratio.detach(), mask, cu_seqlens=cu_seqlens, mask_mode=self.mask_mode, p0=self.p0_ratio, x0=self.x0,
            q_range=self.q_range, min_tokens=self.min_tokens, fallback=(self.q, self.r), group=group,
            max_tokens=self.max_tokens if self.mode == "per_step" else None, backend=self.backend,
        )
        values = torch.stack([fit.q, fit.r, fit.drift_evidence, fit.at_boundary.double(), fit.status.double()]).tolist()
        q, r, evidence, boundary, status = values  # the one host read of a fit
        if status == FITTED:
            self.q, self.r = round_fitted(q, r, self.q_range)
            self.p0 = self.p0_ratio * self.r if math.isfinite(self.p0_ratio) else self.p0_ratio
            self._pending = False
            self.metrics.update(drift_evidence=evidence, at_boundary=boundary, refit=1.0)
        self.metrics.update(kalman_q=self.q, kalman_r=self.r, fit_status=status)
        return self.options

    def _group(self):
        if self.group is None or not isinstance(self.group, str):
            return self.group
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def __repr__(self):
        return f"NoiseTracker(mode={self.mode!r}, q={self.q:.4g}, r={self.r:.4g}, p0={self.p0:.4g})"


__all__ = ["FIT_METRICS", "FIT_MODES", "RATIO_STEPS_PER_DECADE", "STATUS_NAMES", "NoiseTracker", "round_fitted"]
