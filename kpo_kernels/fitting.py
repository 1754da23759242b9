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

One batched transform per micro-batch (a chirp-z / Bluestein transform: three FFTs of a common
length, whatever the sequence lengths, no host synchronisation) gives every (lam, y^2); after that
the profile log-likelihood at any q costs a few operations per token, and the search evaluates
`GRID` ratios per stage for `STAGES` stages on a shrinking log-spaced grid (each stage keeps the
two grid intervals around its best point), then a parabola through the best point and its
neighbours. Over a data-parallel group the per-ratio sums are all-reduced at each stage, so every
rank searches the same profile and gets the same Q and R.

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
from typing import Optional

import torch

from .fit_options import check_fit_range, check_min_tokens
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
    with torch.no_grad():
        z, lengths = _sequences(log_ratio.detach(), mask, cu_seqlens, mask_mode, x0)
        lam, y2, weight, constant = _spectrum(z, lengths, diffuse=p0 == math.inf)
        return _search(lam, y2, weight, constant, low, high, min_tokens, (fallback_q, fallback_r), group)


def _sequences(log_ratio, mask, cu_seqlens, mask_mode, x0):
    """(z, n): (S, T) float64 log-ratios less x0, each sequence's tokens first, 0 after them; n (S,)."""
    device = log_ratio.device
    if cu_seqlens is not None:
        starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        width = max(int(lengths.max()), 1) if lengths.numel() else 1  # the one host read of a packed batch
        columns = torch.arange(width, device=device)
        inside = columns[None, :] < lengths[:, None]
        index = (starts[:, None] + columns[None, :]).clamp(max=max(log_ratio.shape[0] - 1, 0))
        values = log_ratio[index] if log_ratio.numel() else torch.zeros(inside.shape, dtype=log_ratio.dtype, device=device)
        valid = inside if mask is None else inside & (mask[index] != 0 if mask.numel() else inside)
        log_ratio, mask = values, valid
    valid = torch.ones(log_ratio.shape, dtype=torch.bool, device=device) if mask is None else mask != 0
    z = torch.where(valid, log_ratio.to(torch.float64) - x0, 0.0)
    rows, width = z.shape
    if mask_mode == "position":  # masked tokens up to the last valid one are observations 0
        columns = torch.arange(1, width + 1, device=device)
        lengths = torch.where(valid, columns, 0).amax(-1) if width else torch.zeros(rows, dtype=torch.long, device=device)
        inside = columns[None, :] <= lengths[:, None]
        return torch.where(valid, z, torch.where(inside, -x0, 0.0)), lengths
    lengths = valid.sum(-1)
    prefix = torch.arange(width, device=device)[None, :] < lengths[:, None]
    if device.type == "cpu" and bool(torch.equal(prefix, valid)):  # right-padded: already compact
        return z, lengths
    slot = torch.where(valid, valid.cumsum(-1) - 1, width)  # each valid token's place among its row's valid tokens
    compact = torch.zeros(rows, width + 1, dtype=torch.float64, device=device)
    compact.scatter_(1, slot, z)  # masked tokens all land in the extra column, as zeros
    return compact[:, :width], lengths


def _fft_length(needed):
    """The smallest 2^k or 3 * 2^k at least `needed` (fast FFT sizes)."""
    power = 1 << max(needed - 1, 0).bit_length()
    three = 3 * (1 << max((needed - 1) // 3, 0).bit_length())
    return min(power, three) if three >= needed else power


def _spectrum(z, lengths, *, diffuse):
    """Per coefficient: lam, y^2 * lam^beta (beta = 1 for P0 = 0, 0 diffuse), a 0/1 weight, and
    the constant sum(beta log lam). Variance of coefficient k: R (lam_k + q) / lam_k^beta."""
    rows, width = z.shape
    device = z.device
    j = torch.arange(1, width + 1, device=device)
    if diffuse:  # first differences d_j = z_{j+1} - z_j, j = 1..n-1, basis sin(k j pi / n)
        x = torch.zeros_like(z)
        x[:, : max(width - 1, 0)] = z[:, 1:] - z[:, :-1]
        x = torch.where(j[None, :] < lengths[:, None], x, 0.0)
        period = lengths.clamp(min=1)  # sin(k j pi / n): exp(i pi k j / n) = exp(2 pi i k j / (2n))
        count = (lengths - 1).clamp(min=0)
        cycle, shift = 2 * period, None
    else:  # z_j, j = 1..n, basis sin((2k - 1) j pi / (2n + 1)) = Im exp(-i j pi / (2n + 1)) exp(2 pi i k j / (2n + 1))
        period = 2 * lengths + 1
        count = lengths
        cycle, shift = period, period
        x = z
    # F_k = sum_j x_j exp(2 pi i k j / cycle), k = 1..width, by Bluestein: k j = (k^2 + j^2 - (k - j)^2) / 2.
    size = _fft_length(2 * width)
    d = torch.arange(size, device=device)
    d = torch.where(d <= width, d, d - size)  # lags -(width - 1)..width - 1, wrapped
    a = _chirp(j, cycle)
    if shift is not None:  # exp(-i pi j / (2n + 1)) = exp(2 pi i (-j) / (2 cycle)) folded into the chirp
        a = a * _chirp_linear(j, cycle)
    a = x * a
    b = _chirp(d, cycle).conj()
    conv = torch.fft.ifft(torch.fft.fft(a, n=size) * torch.fft.fft(b, n=size))
    k = j  # frequencies 1..width
    coefficient = (conv[:, k - 1] * _chirp(k, cycle)).imag
    weight = (k[None, :] <= count[:, None]).to(torch.float64)
    # lam_k = 4 sin^2(half angle): (2k - 1) pi / (2 (2n + 1)) for P0 = 0, k pi / (2n) diffuse
    numerator = (2 * k - 1).to(torch.float64) if not diffuse else k.to(torch.float64)
    half_angle = (math.pi / 2) * numerator[None, :] / (period if not diffuse else period).to(torch.float64)[:, None]
    lam = torch.where(weight > 0, 4.0 * torch.sin(half_angle) ** 2, 1.0)
    norm = (2.0 / period.to(torch.float64)) if diffuse else (4.0 / period.to(torch.float64))
    y2 = coefficient**2 * norm[:, None] * weight
    if diffuse:
        return lam, y2, weight, torch.zeros((), dtype=torch.float64, device=device)
    return lam, y2 * lam, weight, (weight * torch.log(lam)).sum()


def _chirp(index, cycle):
    """exp(i pi index^2 / cycle) per row (cycle (S,)), index^2 reduced modulo 2 cycle first:
    exact phases for any length."""
    cycle = cycle.to(torch.int64)[:, None]
    reduced = torch.remainder(index.to(torch.int64)[None, :] ** 2, 2 * cycle)
    angle = reduced.to(torch.float64) * math.pi / cycle.to(torch.float64)
    return torch.complex(torch.cos(angle), torch.sin(angle))


def _chirp_linear(index, cycle):
    """exp(-i pi index / cycle) per row."""
    cycle = cycle.to(torch.int64)[:, None]
    reduced = torch.remainder(index.to(torch.int64)[None, :], 2 * cycle)
    angle = -reduced.to(torch.float64) * math.pi / cycle.to(torch.float64)
    return torch.complex(torch.cos(angle), torch.sin(angle))


def _all_reduce(tensor, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _bins(lam, y2, weight):
    """Moments of the coefficients in fixed bins of log lam (width BIN_WIDTH): per bin, for the
    weights w and for y^2, the sums of 1, v and v^2 with v = log lam - (the bin's centre). A
    second-order Taylor expansion of each token's terms about its bin's centre then gives the
    profile to about 1e-8 relative at any q, from (6, BINS) numbers."""
    log_lam = torch.log(lam)
    index = ((log_lam - BIN_BASE) / BIN_WIDTH).floor().clamp(0, BINS - 1).long()
    v = log_lam - (BIN_BASE + (index.to(torch.float64) + 0.5) * BIN_WIDTH)
    index = index.reshape(-1)
    y2v = y2 * v
    stats = (weight, weight * v, weight * v * v, y2, y2v, y2v * v)
    return torch.stack([torch.bincount(index, weights=stat.reshape(-1), minlength=BINS) for stat in stats])


BINS = 4096
BIN_WIDTH = 0.02  # in log lam; lam = 4 sin^2(...) lies in [~(pi / 2n)^2, 4]
BIN_BASE = math.log(4.0) + 1e-9 - BINS * BIN_WIDTH  # bins cover lam from 4 down to 4 e^-82


def _binned_profile(bins, u):
    """(sum of log(lam + q), sum of y^2 / (lam + q)) for the ratios exp(u), from the bins."""
    centre = torch.exp(BIN_BASE + (torch.arange(BINS, device=bins.device, dtype=torch.float64) + 0.5) * BIN_WIDTH)
    q = torch.exp(u)[:, None]
    shifted = centre[None, :] + q
    s = centre[None, :] / shifted  # d log(lam + q) / d log lam
    g = 1.0 / shifted
    log_terms = torch.log(shifted) * bins[0] + s * bins[1] + 0.5 * s * (1 - s) * bins[2]
    quad_terms = g * (bins[3] - s * bins[4] + 0.5 * s * (2 * s - 1) * bins[5])
    return log_terms.sum(-1), quad_terms.sum(-1)


def _search(lam, y2, weight, constant, low, high, min_tokens, fallback, group):
    """Staged grid search of the binned profile log-likelihood over u = log q, then the exact
    profile at the chosen ratio (tensors only; one all-reduce of the bins, one of the exact sums)."""
    device = lam.device
    lam, y2, weight = lam.reshape(-1), y2.reshape(-1), weight.reshape(-1)
    if device.type == "cpu":  # drop the padding (selecting on the host costs nothing here)
        keep = weight > 0
        lam, y2, weight = lam[keep], y2[keep], weight[keep]
    bins = _bins(lam, y2, weight)
    totals = torch.cat([torch.stack([weight.sum(), constant, y2.sum()]), bins.reshape(-1)])
    totals = _all_reduce(totals, group)
    tokens, bins = totals[0], totals[3:].reshape(6, BINS)
    per = tokens.clamp(min=1.0)
    lower, upper = math.log(low), math.log(high)

    def profile(log_sum, quad_sum):
        return -0.5 * (torch.log(2 * math.pi * quad_sum / per) + (log_sum - totals[1]) / per + 1.0)

    steps = torch.linspace(0.0, 1.0, GRID, dtype=torch.float64, device=device)
    a = torch.tensor(lower, dtype=torch.float64, device=device)
    b = torch.tensor(upper, dtype=torch.float64, device=device)
    first = None
    for _ in range(STAGES):
        u = a + (b - a) * steps
        values = torch.nan_to_num(profile(*_binned_profile(bins, u)), nan=-math.inf)
        if first is None:
            first = u[:1]
        best = torch.argmax(values)
        spacing = (b - a) / (GRID - 1)
        centre = u[best]
        a, b = (centre - spacing).clamp(min=lower), (centre + spacing).clamp(max=upper)
    # a parabola through the best point and its neighbours (the last grid)
    index = best.clamp(1, GRID - 2)
    left, mid, right = values[index - 1], values[index], values[index + 1]
    curvature = left - 2 * mid + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0).clamp(-1.0, 1.0)
    candidate = u[index] + offset * spacing
    inside = (best > 0) & (best < GRID - 1)
    u_best = torch.where(inside, candidate, u[best])
    at_lower, at_upper = u_best <= lower, u_best >= upper
    # The exact profile (every token) at the chosen ratio and at the lower end of q_range.
    both = torch.stack([u_best, first[0]])
    q = torch.exp(both)[:, None]
    shifted = lam[None, :] + q
    sums = torch.cat([(weight[None, :] * torch.log(shifted)).sum(-1), (y2[None, :] / shifted).sum(-1)])
    sums = _all_reduce(sums, group)
    exact = profile(sums[:2], sums[2:])
    l_best, r_best = exact[0], sums[2] / per
    ratio = torch.where(at_lower, low, torch.where(at_upper, high, torch.exp(u_best)))

    finite = torch.isfinite(l_best) & torch.isfinite(totals[2])
    status = torch.full((), FITTED, dtype=torch.long, device=device)
    status = torch.where(finite & (r_best > 0), status, NOT_FINITE)
    status = torch.where(totals[2] == 0, ON_POLICY, status)
    status = torch.where(tokens < min_tokens, FEW_TOKENS, status)
    fitted = status == FITTED
    fallback_q, fallback_r = (torch.tensor(value, dtype=torch.float64, device=device) for value in fallback)
    nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
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
