"""The search of `estimate_noise` (kpo_kernels/fitting.py explains the model), from what the
transform leaves (fit_spectrum.spectral_sums), and its result.

The inputs of a search:
- totals: float64 [tokens in the likelihood, sum of every y^2, the binned moments (3, bins)
  row-major], summed over the process group when there is one;
- lengths: (S,) int64, each sequence's length as the transform saw it;
- y2, lam: every coefficient (flat), for float64 transforms (the exact profile at the end),
  else None;
- the settings: q_range's ends (low, high), min_tokens and the fallback (q, r).

`staged_search` is the search in torch operations, the reference; a backend may run the same
search its own way (`Backend.noise_fit`: the Triton backend on a dense grid, in one launch).
"""

import math
from dataclasses import dataclass

import torch

from .fit_spectrum import LogDeterminant, bin_centres, binned_quadratic, quadratic_coefficients

GRID = 32  # ratios per stage
FINAL_SPACING = 0.06  # in log q: stages are added until the grid is this fine (two over the default 12 decades: 0.057)

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


def all_reduce(tensor, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class _Profile:
    """The profile log-likelihood per token over u = log q: binned (the search) or exact (every
    coefficient, at the end, for float64 transforms). The log-determinant is closed form per
    sequence either way; over a process group its per-ratio sums are all-reduced at each evaluation."""

    def __init__(self, totals, y2, lam, lengths, diffuse, group):
        self.tokens, self.quadratic_total, moments = totals[0], totals[1], totals[2:].reshape(3, -1)
        self.per = self.tokens.clamp(min=1.0)
        self.centre = bin_centres(moments.shape[1], moments.device)
        self.coefficients = quadratic_coefficients(moments, self.centre)
        self.log_det = LogDeterminant(lengths, diffuse=diffuse)
        self.y2, self.lam, self.group = y2, lam, group
        self.device = totals.device

    def _value(self, log_det, quadratic):
        return -0.5 * (torch.log(2 * math.pi * quadratic / self.per) + log_det / self.per + 1.0)

    def binned_score(self, u):
        """log(quadratic) + log_det / tokens at the ratios exp(u): the binned profile is
        -(score + log(2 pi / tokens) + 1) / 2, so the search minimises it."""
        q = torch.exp(u)
        log_det = all_reduce(self.log_det(q), self.group)
        return torch.log(binned_quadratic(self.coefficients, self.centre, q)).add_(log_det.div_(self.per))

    def exact(self, u):
        """(profile, R_hat) at the ratios exp(u): from every coefficient when the transform ran
        in float64; else from the bins, whose ~1e-8 relative error is below the float32 one."""
        q = torch.exp(u)
        log_det = self.log_det(q)
        if self.y2 is not None:
            quadratic = (self.y2[None, :] / (self.lam[None, :] + q[:, None])).sum(-1)
            sums = all_reduce(torch.cat([log_det, quadratic]), self.group)
            log_det, quadratic = sums[: u.shape[0]], sums[u.shape[0] :]
        else:
            log_det = all_reduce(log_det, self.group)
            quadratic = binned_quadratic(self.coefficients, self.centre, q)
        return self._value(log_det, quadratic), quadratic / self.per


def search_stages(width):
    """Stages of `GRID` ratios for a range of `width` in log q: each keeps the two grid intervals
    around its best point, until the spacing is at most FINAL_SPACING (host arithmetic)."""
    stages, spacing = 1, width / (GRID - 1)
    while spacing > FINAL_SPACING:
        stages, spacing = stages + 1, spacing * 2 / (GRID - 1)
    return stages


def staged_search(totals, lengths, *, y2, lam, diffuse, group, low, high, min_tokens, fallback):
    """The search in torch operations (any device, any process group): staged grid search of the
    binned profile over u = log q, then the exact profile at the chosen ratio and at the lower end
    of q_range (tensors only, no host read). The module docstring describes the arguments."""
    profile = _Profile(totals, y2, lam, lengths, diffuse, group)
    device = profile.device
    lower, upper = math.log(low), math.log(high)
    steps = torch.linspace(0.0, 1.0, GRID, dtype=torch.float64, device=device)
    # torch.full, not torch.tensor: a tensor made from a host number is copied to the device and
    # waits for it (a synchronisation on CUDA); a fill is one more kernel in the stream
    a = torch.full((), lower, dtype=torch.float64, device=device)
    b = torch.full((), upper, dtype=torch.float64, device=device)
    stages = search_stages(upper - lower)
    for stage in range(stages):
        u = torch.lerp(a, b, steps)  # its ends are a and b exactly: the boundary tests below rely on it
        score = torch.nan_to_num_(profile.binned_score(u), nan=math.inf)
        best = torch.argmin(score)
        spacing = (b - a) / (GRID - 1)
        if stage < stages - 1:  # the next grid spans the two intervals around the best point
            centre = u.take(best)  # take, not u[best]: indexing with a 0-dim tensor reads it on the host
            a, b = (centre - spacing).clamp_(min=lower), (centre + spacing).clamp_(max=upper)
    # a parabola through the best point and its neighbours (the last grid)
    index = best.clamp(1, GRID - 2)
    left, mid, right = score.take(index - 1), score.take(index), score.take(index + 1)
    curvature = left - 2 * mid + right
    offset = torch.where(curvature > 0, 0.5 * (left - right) / curvature, 0.0).clamp_(-1.0, 1.0)
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
