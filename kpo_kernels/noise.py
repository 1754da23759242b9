"""`fit_noise`: the maximum-likelihood process and observation noise of the filter (docs/math.md section 5c).

Model: each sequence's latent log-ratio is a random walk, x_t = x_{t-1} + w_t with
w_t ~ N(0, Q), observed through white noise, z_t = x_t + v_t with v_t ~ N(0, R), from
x_0 = x0 with prior variance P0. The filter's innovations e (z minus the prediction) are then
independent Gaussians of variance S = P_before + Q + R, and their log-likelihood is maximised.

For a fixed ratio q = Q / R, the gains, states and innovations do not depend on R (when P0 / R
is held fixed: 0, the paper's, or inf, a diffuse prior, or the given ratio), so the
likelihood is maximised in R by R_hat(q) = mean(e^2 w) with w = 1 - K = R / S computed with
unit R (innovation.py), and the profile log-likelihood per token is

    l(q) = -0.5 (log(2 pi R_hat(q)) + mean(-log w) + 1).

Search, on u = log q over `q_range`: l at a grid of 2 points per decade (both ends included),
then golden-section search on the two grid intervals around the best grid point, until the
interval is below 1e-3 in u (0.1% in q). The answer is the best point evaluated. A profile that
still rises at an end of `q_range` ends at that end, and `NoiseFit.at_boundary` says which: a
sequence without drift (Q = 0) typically ends at the lower end, which means "Q/R at most this"
rather than a measurement. The grid makes the search robust to a profile that is flat over
decades; a profile with two separate maxima narrower than half a decade could be missed.
Each evaluation is one vectorized filter pass (no Python loop over tokens).

Scale: the filter is affine in (x0, z) with weights that depend on Q / R and P0 / R only and sum
to 1, so the fit of (z - x0) / c with x0 = 0 has the same ratio, R / c^2 and a log-likelihood
per token higher by log c. The fit runs on the valid log-ratios centred on x0 and divided by
c = 2^k, their magnitude (exact in float64), and un-scales R, Q and the log-likelihoods exactly:
data of any finite magnitude fit without overflow or underflow inside. A fit whose Q, R or P0
are not normal float64 numbers once un-scaled (log-ratios beyond about 1e+-150 of x0) is refused
with a ValueError naming log_ratio and the range.
"""

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .dispatch import check_backend_argument, resolve_backend
from .gains import MIN_RATIO
from .options import MASK_MODES, FilterOptions, TokenBatch
from .validation import _number, check_cu_seqlens, check_filter_params, check_cu_seqlens_values, check_mask, check_mask_values, check_tokens

GRID_PER_DECADE = 2
TOLERANCE = 1e-3  # width in log q at which golden-section search stops
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class NoiseFit:
    """The result of `fit_noise`. Pass q, r (and p0) to `kpo_loss(q=fit.q, r=fit.r, p0=fit.p0)`.
    docs/choosing-q-and-r.md explains each field.

    q: process noise variance Q (kpo_loss's q). r: observation noise variance R (kpo_loss's r).
    p0: the prior variance P0 = (the p0 ratio given) * r. ratio: Q / R.
    log_likelihood: innovation log-likelihood per token at (q, r), i.e. kpo_loss's
    `log_likelihood` metric there. num_tokens: the tokens in the likelihood (valid tokens; with
    p0 = inf not the first of each sequence). at_boundary: None, or "lower" / "upper" when the
    best ratio is an end of q_range. drift_evidence: the total log-likelihood (nats, over the
    num_tokens) gained by the best ratio over the lower end of q_range; the maximum-likelihood
    ratio of data without drift lands on the lower end only about half of the time, elsewhere at
    a negligible ratio with drift_evidence below ~1.4 (the 5% point of the likelihood-ratio
    test of a variance at 0: chi-square(1) / 2 = 2.71 / 2). profile_ratio / profile_log_likelihood: every ratio
    evaluated (sorted) and the profile log-likelihood per token there, for plotting.
    """

    q: float
    r: float
    p0: float
    ratio: float
    log_likelihood: float
    num_tokens: int
    at_boundary: Optional[str]
    profile_ratio: tuple
    profile_log_likelihood: tuple
    evaluations: int
    drift_evidence: float


def fit_noise(
    log_ratio,
    mask=None,
    *,
    cu_seqlens=None,
    mask_mode="skip",
    p0=0.0,
    x0=0.0,
    q_range=(1e-10, 1e2),
    backend="auto",
):
    """Maximum-likelihood Q and R of the filter for observed log-ratios (docs/math.md section 5c).

    How to use it in training (refit per generation or step) and how to read the result:
    docs/choosing-q-and-r.md.

    Args:
        log_ratio: (B, T) per-token log pi_theta - log pi_old (detached), or packed (N,) with
            `cu_seqlens`; float16, bfloat16, float32 or float64.
        mask: None or the shape of `log_ratio`, as for `kpo_loss` (values under the mask are
            never read).
        cu_seqlens: int32 or int64 (S + 1,) offsets of packed sequences.
        mask_mode: "skip" (default) or "position", as for `kpo_loss`.
        p0: the prior variance in units of R (P0 / R), held fixed by the fit: 0 (the paper's,
            default), a positive ratio, or inf (a diffuse prior; the first observation of each
            sequence is then left out of the likelihood).
        x0: prior log-ratio, finite. Default 0.0.
        q_range: (lowest, highest) ratio Q / R searched. Default (1e-10, 1e2).
        backend: "auto" and "torch" evaluate the likelihood in float64 with the torch backend
            (on the tensors' device); "triton" uses the fused loss kernel's float32 metrics.

    Returns:
        A `NoiseFit`: pass `q=fit.q, r=fit.r, p0=fit.p0` to `kpo_loss`.

    Raises:
        TypeError, ValueError: a bad argument, named. ValueError also if no token enters the
            likelihood, if a valid log-ratio is not finite, if every valid log-ratio equals x0
            (R would be 0), or if the fitted Q, R or P0 are not normal float64 numbers
            (log-ratios beyond about 1e+-140 of x0; the message names log_ratio and the range).
    """
    check_tokens("log_ratio", log_ratio, cu_seqlens)
    cu_seqlens = check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    check_cu_seqlens_values(cu_seqlens, log_ratio.shape[0])
    mask = check_mask(mask, log_ratio.shape, log_ratio.device)
    check_mask_values(mask)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    p0 = _number("p0", p0, allow_inf=True)
    if p0 < 0:
        raise ValueError(f"p0 (prior variance / R) must be >= 0, got {p0}")
    x0 = _number("x0", x0)
    low, high = _check_range(q_range)
    check_backend_argument(backend)
    if backend == "auto":
        backend = "torch"
    impl = resolve_backend(backend, log_ratio.device, log_ratio.dtype)
    # The backend sees the data centred on x0 (x0 = 0 there), so a Triton x0 beyond float32 is fine.
    impl.check_options(FilterOptions(q=low, r=1.0, p0=p0, x0=0.0, mask_mode=mask_mode))

    with torch.no_grad():
        evaluate = _Profile(log_ratio.detach(), mask, cu_seqlens, mask_mode, p0, x0, impl)
        shift = evaluate.exponent * math.log(2.0)  # log-likelihood per token: data / 2^k gains k log 2
        points = {}

        def profile_at(u):
            if u not in points:
                points[u] = evaluate(math.exp(u))
            return points[u][0]

        ends = (math.log(low), math.log(high))
        steps = max(2, math.ceil((ends[1] - ends[0]) / math.log(10.0) * GRID_PER_DECADE))
        grid = [ends[0] + (ends[1] - ends[0]) * i / steps for i in range(steps)] + [ends[1]]
        values = [profile_at(u) for u in grid]
        best = max(range(len(grid)), key=lambda i: (values[i], -i))
        a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        _golden_section(profile_at, a, b)

        u_best = max(points, key=lambda u: points[u][0])
        l_best, r_hat, tokens = points[u_best]
        ratio = low if u_best == ends[0] else high if u_best == ends[1] else math.exp(u_best)
        at_boundary = "lower" if u_best == ends[0] else "upper" if u_best == ends[1] else None
        order = sorted(points)
    q, r, p0_variance = _unscaled_variances(ratio, r_hat, p0, evaluate, x0)
    return NoiseFit(
        q=q,
        r=r,
        p0=p0_variance,
        ratio=ratio,
        log_likelihood=l_best - shift,
        num_tokens=tokens,
        at_boundary=at_boundary,
        profile_ratio=tuple(math.exp(u) for u in order),
        profile_log_likelihood=tuple(points[u][0] - shift for u in order),
        evaluations=len(points),
        drift_evidence=(l_best - points[ends[0]][0]) * tokens,
    )


def _check_range(q_range):
    if isinstance(q_range, (str, bytes)) or not hasattr(q_range, "__len__") or len(q_range) != 2:
        raise TypeError(f"q_range must be a pair (lowest, highest) of ratios Q / R, got {q_range!r}")
    low, high = (_number("q_range", value) for value in q_range)
    if not MIN_RATIO <= low < high:
        raise ValueError(f"q_range must satisfy {MIN_RATIO:.4g} <= lowest < highest, got {q_range!r}")
    return low, high


def _unscaled_variances(ratio, r_scaled, p0_ratio, profile, x0):
    """(q, r, p0) of the data from R fitted on the scaled data; ValueError naming log_ratio and
    the range when one of them is not a normal float64 number (a fit kpo_loss could not use, or
    one that lost its digits to underflow)."""
    tiny, huge = sys.float_info.min, sys.float_info.max
    try:
        r = math.ldexp(r_scaled, 2 * profile.exponent)
        q = ratio * r
        p0 = p0_ratio * r if math.isfinite(p0_ratio) else p0_ratio
    except OverflowError:
        q = r = p0 = math.inf
    usable = all(tiny <= value <= huge for value in (q, r)) and (p0 == 0 or not math.isfinite(p0_ratio) or tiny <= p0 <= huge)
    if not usable:
        log10_r = math.log10(r_scaled) + 2 * profile.exponent * math.log10(2.0)
        raise ValueError(
            f"log_ratio: the fitted noise variances are outside float64's normal range [{tiny:.4g}, {huge:.4g}] "
            f"(R = 10^{log10_r:.1f}, Q = {ratio:.3g} R, P0 = {p0_ratio:.3g} R), as the largest valid "
            f"|log_ratio - x0| is about 10^{profile.exponent * math.log10(2.0):.1f}: the variances "
            "scale with its square, so log-ratios within about 1e-140 to 1e140 of x0 fit (with the default q_range)"
        )
    check_filter_params(q=q, r=r, p0=p0, x0=x0)  # what kpo_loss will check: holds for normal q, r, p0
    return q, r, p0


def _times_power_of_two(values, exponent):
    """values * 2^exponent in two exact steps (a single factor 2^exponent may be subnormal or overflow)."""
    half = exponent // 2
    return values * math.ldexp(1.0, half) * math.ldexp(1.0, exponent - half)


def _centred_and_scaled(z, valid, x0):
    """((z - x0) / 2^k at valid tokens, 0 elsewhere; k) with the largest magnitude in [0.5, 1)
    (k = 0 when every valid z equals x0). z - x0 is formed after a first exact scaling by the
    magnitude of z and x0, so that it cannot overflow."""
    largest = max(float(z.abs().max()) if z.numel() else 0.0, abs(x0))
    if largest == 0.0:
        return z, 0
    first = math.frexp(largest)[1]
    centred = torch.where(valid, _times_power_of_two(z, -first) - math.ldexp(x0, -first), 0.0)
    spread = float(centred.abs().max())
    if spread == 0.0:
        return centred, 0
    second = math.frexp(spread)[1]
    return _times_power_of_two(centred, -second), first + second


def _golden_section(f, a, b):
    """Maximise f on [a, b] by golden-section search, down to an interval of TOLERANCE."""
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > TOLERANCE:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)


class _Profile:
    """l(q), R_hat(q) and the token count for one batch: one filter pass per call, on the data
    centred on x0 and divided by 2^exponent (module docstring, "Scale"): l and R_hat are those of
    the scaled data."""

    def __init__(self, log_ratio, mask, cu_seqlens, mask_mode, p0, x0, impl):
        from .backends.torch_backend import TorchBackend, _Packed, _Rows, _valid

        self.mask_mode, self.p0, self.x0, self.impl = mask_mode, p0, 0.0, impl
        valid = _valid(mask, log_ratio.shape, log_ratio.device)
        z = torch.where(valid, log_ratio.to(torch.float64), 0.0)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("log_ratio must be finite at every valid token")
        z, self.exponent = _centred_and_scaled(z, valid, x0)
        self.given_x0 = x0
        log_ratio = z.to(log_ratio.dtype)
        self.torch = isinstance(impl, TorchBackend)
        if self.torch:
            self.layout = _Rows(z.shape) if cu_seqlens is None else _Packed(cu_seqlens, z.shape[0])
            self.z, self.valid = z, valid
        else:
            sequences = z.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            self.batch = TokenBatch(
                log_prob=log_ratio,
                old_log_prob=torch.zeros_like(log_ratio),
                advantages=torch.zeros(sequences, dtype=torch.float32, device=log_ratio.device),
                mask=mask,
                is_weights=None,
                cu_seqlens=cu_seqlens,
            )

    def __call__(self, ratio):
        filt = FilterOptions(q=ratio, r=1.0, p0=self.p0, x0=self.x0, mask_mode=self.mask_mode)
        if self.torch:
            r_hat, mean_log_s, tokens = self._torch_pass(filt)
        else:
            r_hat, mean_log_s, tokens = self._metric_pass(filt)
        if tokens == 0:
            raise ValueError(
                "no valid token enters the likelihood (an empty mask, or with p0=inf only one-token sequences)"
            )
        if not r_hat > 0:
            raise ValueError(f"every valid log_ratio equals x0={self.given_x0}: the observation noise R cannot be estimated")
        return -0.5 * (math.log(2.0 * math.pi * r_hat) + mean_log_s + 1.0), r_hat, tokens

    def _torch_pass(self, filt):
        from .backends.torch_backend import innovation_terms

        x = self.layout.filter(self.z, self.valid, filt)
        scored, nis, log_s = innovation_terms(self.layout, self.z, x, self.valid, filt)
        tokens = int(scored.sum())
        log_s_sum = torch.where(scored, log_s, 0.0).sum()
        totals = torch.stack([nis.sum(), log_s_sum]).tolist()
        return totals[0] / max(tokens, 1), totals[1] / max(tokens, 1), tokens

    def _metric_pass(self, filt):
        from .options import METRIC_NAMES

        result = self.impl.loss_forward(self.batch, metric_pass_options(filt), need_grad=False)
        metrics = dict(zip(METRIC_NAMES, result.metrics.tolist()))
        r_hat, tokens = metrics["nis_mean"], int(round(metrics["innovation_tokens"]))
        # log_likelihood = -0.5 (log(2 pi) + mean(log S) + mean(e^2 / S)) with R = 1
        mean_log_s = -2.0 * metrics["log_likelihood"] - math.log(2.0 * math.pi) - r_hat
        return r_hat, mean_log_s, tokens


def metric_pass_options(filt):
    """The loss options of a profile evaluation through a backend's loss kernel: unit R, no
    clip, no cap, no gradient needed (the metrics are all that is read)."""
    from .validation import check_loss_options

    return check_loss_options(
        q=filt.q, r=1.0, p0=filt.p0, x0=filt.x0, mask_mode=filt.mask_mode, clip=False, clip_low=0.0,
        clip_high=0.0, dual_clip=None, log_ratio_cap=None, agg="token-sum", dp_size=1, batch_num_tokens=None,
        global_batch_size=None, loss_scale_factor=None,
    )
