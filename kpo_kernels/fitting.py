"""`estimate_noise`: the maximum-likelihood Q and R of `fit_noise`, cheap enough for every step.

Same model and likelihood as `fit_noise` (docs/math.md section 5c), computed another way. With
the prior variance P0 = 0, a sequence's n log-ratios (less x0) are Gaussian with covariance
R I + Q M, M_ij = min(i, j), because the latent walk starts at x0 exactly. M's eigenvectors are
the sine vectors u_k(j) = sin((2k - 1) j theta), theta = pi / (2n + 1), with eigenvalues
1 / lam_k, lam_k = 4 sin^2((2k - 1) theta / 2). In that basis the covariance is diagonal:

    y_k = <u_k, z> / |u_k|,   Var(y_k) = R (1 + q / lam_k),   q = Q / R,

so the log-likelihood of the whole sequence (the filter's innovation log-likelihood, exactly:
the prediction-error decomposition) is a sum over the n coefficients, and for fixed q the best R
is closed form, R_hat(q) = mean(y^2 lam / (lam + q)). With a diffuse prior (P0 = inf) the
likelihood is that of the n - 1 first differences (each sequence's first token left out, as in
`fit_noise`), whose covariance Q I + R D (D the (2, -1) second-difference matrix) is diagonal in
the basis sin(k j pi / n), with eigenvalues R (q + lam_k), lam_k = 4 sin^2(k pi / (2n)).

One batched transform per micro-batch (kpo_kernels/fit_spectrum.py: a chirp-z / Bluestein
transform, three FFTs of a common length per bucket of rows (one bucket off the CPU), float32 unless the
log-ratios are float64, no host synchronisation) gives every (lam, y^2). The log-determinant
sum(log(1 + q / lam)) is closed form per sequence; the quadratic part comes from moments of
y^2 binned in log lam. The search evaluates `GRID` ratios per stage for `STAGES` stages on a
shrinking log-spaced grid (each stage keeps the two grid intervals around its best point), then
a parabola through the best point and its neighbours; the profile and R_hat reported there are
exact (every coefficient) for float64 transforms, binned (~1e-8 relative) otherwise. Over a
data-parallel group the bins are all-reduced once and the log-determinant sums at each stage
(GRID numbers), so every rank searches the same profile and gets the same Q and R.

Which tokens: each sequence's valid tokens in order (`mask_mode="skip"`), or in `position` mode
its positions up to its last valid token with masked ones as the observation 0 (what that filter
sees; the likelihood then also scores those zeros, where `fit_noise` scores only valid tokens:
the two agree when masks have no holes). Prior ratios P0 / R other than 0 and inf have no such
basis and are refused (use `fit_noise`).

Everything stays a tensor on the data's device: the result's q and r are 0-dim float64 tensors
(`NoiseEstimate`). `kpo_loss` takes q and r as Python numbers (its gain tables are built on the
host for each value), so using a fit costs one host read of these few numbers: `NoiseTracker`
does it once per fit, together with the fit's metrics.
"""

import math
from dataclasses import dataclass

import torch

from .fit_options import check_fit_range, check_max_tokens, check_min_tokens
from .fit_spectrum import bin_centres, bin_count, binned_quadratic, log_determinant, sequences, spectral_sums
from .validation import _number, check_cu_seqlens, check_mask, check_tokens

GRID = 16  # ratios per stage
STAGES = 4  # grid spacing after the last stage: (log range) / 15 * (2 / 15)^3, 4e-3 in log q over 12 decades

# status codes of a NoiseEstimate
FITTED, ON_POLICY, FEW_TOKENS, NOT_FINITE = 0, 1, 2, 3
STATUS_NAMES = ("fitted", "on_policy", "few_tokens", "not_finite")


@dataclass(frozen=True)
class NoiseEstimate:
    """The result of `estimate_noise`: 0-dim float64 tensors on the data's device (no host read).
    docs/choosing-q-and-r.md explains each field.

    q, r: the fitted Q and R (when `status` is not FITTED: the `fallback` values given).
    ratio: Q / R searched (fallback: q / r). log_likelihood: profile log-likelihood per token at
    the fit (NaN unless fitted). drift_evidence: nats gained over the lower end of q_range.
    at_boundary: -1 the lower end of q_range, +1 the upper end, 0 inside. num_tokens: tokens
    in the likelihood (over the whole group). status: FITTED (0), ON_POLICY (1: every valid
    log-ratio equals x0, so R would be 0), FEW_TOKENS (2: fewer than min_tokens), NOT_FINITE (3).
    """

    q: torch.Tensor
    r: torch.Tensor
    ratio: torch.Tensor
    log_likelihood: torch.Tensor
    drift_evidence: torch.Tensor
    at_boundary: torch.Tensor
    num_tokens: torch.Tensor
    status: torch.Tensor


def estimate_noise(
    log_ratio,
    mask=None,
    *,
    cu_seqlens=None,
    mask_mode="skip",
    p0=0.0,
    x0=0.0,
    q_range=(1e-10, 1e2),
    min_tokens=64,
    fallback=(1e-6, 1.0),
    group=None,
    max_tokens=None,
):
    """Maximum-likelihood Q and R of the filter, the `fit_noise` model, in one batched transform
    (docs/choosing-q-and-r.md, "Fitting every step").

    Args:
        log_ratio: (B, T) detached per-token log pi_theta - log pi_old, or packed (N,) with
            `cu_seqlens`; any float dtype (computed in float64). Values under the mask are not read.
        mask: None or the shape of `log_ratio` (bool or 0/1).
        cu_seqlens: (S + 1,) offsets of packed sequences (on CUDA its longest sequence is read
            on the host: one synchronisation; padded batches need none).
        mask_mode: "skip" or "position", as in `kpo_loss` (module docstring: which tokens).
        p0: the prior variance in units of R: 0 (default) or inf.
        x0: prior log-ratio, finite.
        q_range: (lowest, highest) ratio Q / R searched.
        min_tokens: fewer tokens in the likelihood (over the group) give status FEW_TOKENS.
        fallback: (q, r) returned when nothing is fitted (on-policy data, too few tokens,
            non-finite log-ratios).
        group: None, or a `torch.distributed` process group over which the fit's sums are
            all-reduced (every rank gets the same result); None uses no collective.
        max_tokens: None (default: every sequence), or a cap on the positions transformed: when
            the sequences (rows x longest, a shape: no host read) hold more, every k-th sequence
            is fitted, k = ceil(positions / max_tokens). Cheaper, at a statistical cost:
            docs/choosing-q-and-r.md, "Fitting every step".

    Returns:
        A `NoiseEstimate` of 0-dim float64 tensors on `log_ratio`'s device.

    Raises:
        TypeError, ValueError: a bad argument, named (a p0 other than 0 or inf included).
    """
    check_tokens("log_ratio", log_ratio, cu_seqlens)
    cu_seqlens = check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    mask = check_mask(mask, log_ratio.shape, log_ratio.device)
    if mask_mode not in ("skip", "position"):
        raise ValueError(f"mask_mode must be 'skip' or 'position', got {mask_mode!r}")
    p0 = _number("p0", p0, allow_inf=True)
    if p0 not in (0.0, math.inf):
        raise ValueError(f"p0 (prior variance / R) must be 0 or inf for estimate_noise, got {p0} (fit_noise takes any)")
    x0 = _number("x0", x0)
    low, high = check_fit_range("q_range", q_range)
    min_tokens = check_min_tokens("min_tokens", min_tokens)
    fallback_q, fallback_r = (_number("fallback", value) for value in fallback)
    max_tokens = check_max_tokens("max_tokens", max_tokens)
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        if max_tokens is not None and cu_seqlens is None and log_ratio.numel() > max_tokens:  # padded: rows first
            step = -(-log_ratio.numel() // max_tokens)
            log_ratio, mask = log_ratio[::step], None if mask is None else mask[::step]
        z, lengths = sequences(log_ratio, mask, cu_seqlens, mask_mode, x0)
        if max_tokens is not None and cu_seqlens is not None and z.numel() > max_tokens:  # packed: sequences as rows
            step = -(-z.numel() // max_tokens)
            z, lengths = z[::step], lengths[::step]
        diffuse = p0 == math.inf
        count = (lengths - 1).clamp(min=0) if diffuse else lengths
        exact = z.dtype == torch.float64  # the exact profile at the end reads every coefficient
        y2_total, moments, y2, lam = spectral_sums(z, lengths, diffuse=diffuse, bins=bin_count(z.shape[1], group), keep=exact)
        totals = torch.cat([torch.stack([count.sum().to(torch.float64), y2_total]), moments.reshape(-1)])
        totals = _all_reduce(totals, group)
        profile = _Profile(totals, y2, lam, lengths, diffuse, group)
        return _search(profile, low, high, min_tokens, (fallback_q, fallback_r))


def _all_reduce(tensor, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class _Profile:
    """The profile log-likelihood per token over u = log q: binned (the search) or exact (every
    coefficient, at the end, for float64 transforms). The log-determinant is closed form per sequence either way; over a
    process group its per-ratio sums are all-reduced at each evaluation."""

    def __init__(self, totals, y2, lam, lengths, diffuse, group):
        self.tokens, self.quadratic_total, moments = totals[0], totals[1], totals[2:].reshape(3, -1)
        self.per = self.tokens.clamp(min=1.0)
        self.moments, self.centre = moments, bin_centres(moments.shape[1], moments.device)
        self.y2, self.lam, self.lengths, self.diffuse, self.group = y2, lam, lengths, diffuse, group
        self.device = totals.device

    def _value(self, log_det, quadratic):
        return -0.5 * (torch.log(2 * math.pi * quadratic / self.per) + log_det / self.per + 1.0)

    def binned(self, u):
        q = torch.exp(u)
        log_det = _all_reduce(log_determinant(self.lengths, q, diffuse=self.diffuse), self.group)
        return self._value(log_det, binned_quadratic(self.moments, self.centre, q))

    def exact(self, u):
        """(profile, R_hat) at the ratios exp(u): from every coefficient when the transform ran
        in float64; else from the bins, whose ~1e-8 relative error is below the float32 one."""
        q = torch.exp(u)
        log_det = log_determinant(self.lengths, q, diffuse=self.diffuse)
        if self.y2 is not None:
            quadratic = (self.y2[None, :] / (self.lam[None, :] + q[:, None])).sum(-1)
            sums = _all_reduce(torch.cat([log_det, quadratic]), self.group)
            log_det, quadratic = sums[: u.shape[0]], sums[u.shape[0] :]
        else:
            log_det = _all_reduce(log_det, self.group)
            quadratic = binned_quadratic(self.moments, self.centre, q)
        return self._value(log_det, quadratic), quadratic / self.per


def _search(profile, low, high, min_tokens, fallback):
    """Staged grid search of the binned profile over u = log q, then the exact profile at the
    chosen ratio and at the lower end of q_range (tensors only, no host read)."""
    device = profile.device
    lower, upper = math.log(low), math.log(high)
    steps = torch.linspace(0.0, 1.0, GRID, dtype=torch.float64, device=device)
    # torch.full, not torch.tensor: a tensor made from a host number is copied to the device and
    # waits for it (a synchronisation on CUDA); a fill is one more kernel in the stream
    a = torch.full((), lower, dtype=torch.float64, device=device)
    b = torch.full((), upper, dtype=torch.float64, device=device)
    for _ in range(STAGES):
        u = a + (b - a) * steps
        values = torch.nan_to_num(profile.binned(u), nan=-math.inf)
        best = torch.argmax(values)
        spacing = (b - a) / (GRID - 1)
        centre = u.take(best)  # take, not u[best]: indexing with a 0-dim tensor reads it on the host
        a, b = (centre - spacing).clamp(min=lower), (centre + spacing).clamp(max=upper)
    # a parabola through the best point and its neighbours (the last grid)
    index = best.clamp(1, GRID - 2)
    left, mid, right = values.take(index - 1), values.take(index), values.take(index + 1)
    curvature = left - 2 * mid + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0).clamp(-1.0, 1.0)
    candidate = u.take(index) + offset * spacing
    inside = (best > 0) & (best < GRID - 1)
    u_best = torch.where(inside, candidate, u.take(best))
    at_lower, at_upper = u_best <= lower, u_best >= upper
    exact, r_hat = profile.exact(torch.stack([u_best, torch.full_like(u_best, lower)]))
    l_best, r_best = exact[0], r_hat[0]
    ratio = torch.where(at_lower, low, torch.where(at_upper, high, torch.exp(u_best)))

    tokens, quadratic_total = profile.tokens, profile.quadratic_total
    finite = torch.isfinite(l_best) & torch.isfinite(quadratic_total)
    status = torch.full((), FITTED, dtype=torch.long, device=device)
    status = torch.where(finite & (r_best > 0), status, NOT_FINITE)
    status = torch.where(quadratic_total == 0, ON_POLICY, status)
    status = torch.where(tokens < min_tokens, FEW_TOKENS, status)
    fitted = status == FITTED
    fallback_q, fallback_r = (torch.full((), value, dtype=torch.float64, device=device) for value in fallback)
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    return NoiseEstimate(
        q=torch.where(fitted, ratio * r_best, fallback_q),
        r=torch.where(fitted, r_best, fallback_r),
        ratio=torch.where(fitted, ratio, fallback_q / fallback_r),
        log_likelihood=torch.where(fitted, l_best, nan),
        drift_evidence=torch.where(fitted, ((l_best - exact[1]) * tokens).clamp(min=0.0), nan),
        at_boundary=torch.where(fitted, at_upper.long() - at_lower.long(), 0),
        num_tokens=tokens,
        status=status,
    )
