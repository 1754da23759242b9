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
y^2 binned in log lam. The search (kpo_kernels/fit_search.py) evaluates `GRID` ratios per stage
on a shrinking log-spaced grid (each stage keeps the two grid intervals around its best point;
stages until the spacing is at most `FINAL_SPACING` in log q: two over the default q_range),
then a parabola through the best point and its neighbours; the profile
and R_hat reported there are exact (every coefficient) for float64 transforms, binned (~1e-8
relative) otherwise. Over a data-parallel group the bins are all-reduced once and the
log-determinant sums at each stage (GRID numbers), so every rank searches the same profile and
gets the same Q and R.

On the Triton backend (what `backend="auto"` picks on CUDA for float32 and narrower log-ratios)
the same likelihood comes without a transform, in three kernels (kpo_kernels/backends/triton_fit_*.py):
the layout; the filter itself at 128 ratios evenly spaced in log q, over chunks of every
sequence in parallel (the prediction-error decomposition, exact, in float32); and the profile
at every ratio with its best point refined by a parabola (the profile and R reported are the
parabola's at its vertex). Under a process group the sums are all-reduced once. Three launches
where the torch operations take some 290 (at 64 x 4096's default budget).

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

import torch

from .dispatch import resolve_backend
from .fit_options import check_fit_range, check_max_tokens, check_min_tokens
from .fit_search import (  # noqa: F401 - the result and its codes are this module's API too
    FEW_TOKENS,
    FITTED,
    NOT_FINITE,
    ON_POLICY,
    STATUS_NAMES,
    NoiseEstimate,
    all_reduce,
    staged_search,
)
from .fit_spectrum import bin_count, sequences, spectral_sums
from .validation import _number, check_cu_seqlens, check_mask, check_tokens

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
    backend="auto",
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
        backend: "auto" (Triton on CUDA for float32 and narrower log-ratios, else torch),
            "torch", "triton" or a `Backend`: what runs the fit. The Triton backend lays out,
            filters at every grid ratio and searches in its own kernels, three launches
            (docs/choosing-q-and-r.md); float64 log-ratios, and settings that float32 parts
            cannot carry exactly, take the torch path there too.

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
    impl = resolve_backend(backend, log_ratio.device, log_ratio.dtype)
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        if max_tokens is not None and cu_seqlens is None and log_ratio.numel() > max_tokens:  # padded: rows first
            step = -(-log_ratio.numel() // max_tokens)
            log_ratio, mask = log_ratio[::step], None if mask is None else mask[::step]
        laid_out = None
        if log_ratio.dtype != torch.float64:
            laid_out = impl.noise_layout(log_ratio, mask, cu_seqlens, mask_mode, x0, max_tokens)
        if laid_out is not None:
            z, lengths = laid_out
        else:
            z, lengths = sequences(log_ratio, mask, cu_seqlens, mask_mode, x0)
            if max_tokens is not None and cu_seqlens is not None and z.numel() > max_tokens:  # packed: sequences as rows
                step = -(-z.numel() // max_tokens)
                z, lengths = z[::step], lengths[::step]
        diffuse = p0 == math.inf
        exact = z.dtype == torch.float64  # the exact profile at the end reads every coefficient
        bins = bin_count(z.shape[1], group)
        settings = dict(diffuse=diffuse, low=low, high=high, min_tokens=min_tokens, fallback=(fallback_q, fallback_r))
        found = None if exact else impl.noise_fit(z, lengths, bins=bins, group=group, **settings)
        if found is not None:
            return found
        y2_total, moments, y2, lam = spectral_sums(z, lengths, diffuse=diffuse, bins=bins, keep=exact)
        count = (lengths - 1).clamp(min=0) if diffuse else lengths
        totals = torch.cat([torch.stack([count.sum().to(torch.float64), y2_total]), moments.reshape(-1)])
        totals = all_reduce(totals, group)
        return staged_search(totals, lengths, y2=y2, lam=lam, group=group, **settings)


