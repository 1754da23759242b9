"""Kalman gains K_1, K_2, ... in closed form (cached per device as tables by `tables`).

With constant Q, R and prior variance P0 the gain after n observations does not depend on the
data. In normalised units (q = Q/R, p = P/R) the variance follows the Moebius map
f(p) = (p + q) / (p + q + 1) and K_n = p_n. Writing h = (q + sqrt(q^2 + 4q)) / 2, the fixed
points are p* = h / (1 + h) > 0 and p' = -(p* + q) < 0, and with E_n = kappa^n,
kappa = (1 - p*) / (1 + p* + q):

    K_n = (p0 (p* + E_n |p'|) + q (1 - E_n)) / (p0 (1 - E_n) + |p'| + E_n p*)

Every term is non-negative, so nothing cancels; E_n = exp(n log kappa) and 1 - E_n =
-expm1(n log kappa) are accurate for all n, and log kappa = -log1p(h) - log1p(p* + q) needs no
subtraction either. The evaluation order keeps every intermediate in range: quotients are taken
before products (q (1 - E_n) would underflow for q < 1e-220), a prior p0 > 1 is divided out
(p0 (1 - E_n) would overflow), and h is computed as q (1 + sqrt(1 + 4/q)) / 2 for q >= 1
(q + sqrt(q^2 + 4q) would overflow). q = 0 and p0 = inf (a diffuse prior) are limits of the
same formula.

Supported: q = Q/R equal to 0 or a normal float64 (>= 2.2e-308, so that n q never turns
subnormal), any finite value up to float64's maximum; p0 = P0/R in [0, inf].
"""

import math
import sys

import torch

# Gains beyond the saturation index equal the steady state p* to this relative precision
# (below float64's half ulp, 2^-53): a table may stop there and be read with a clamped index.
SATURATION_PRECISION = 2.0**-64
MIN_RATIO = sys.float_info.min  # smallest positive q/r and p0/r: smaller ones would be subnormal


def _normalise(q, r, p0):
    q_n, p0_n = float(q) / float(r), float(p0) / float(r)
    if not math.isfinite(q_n):
        raise ValueError(f"q / r must be finite, got q={q!r}, r={r!r}")
    return q_n, p0_n


def _fixed_point(q):
    """(p*, |p'|, log kappa) of the Moebius map for q > 0, every one without overflow."""
    if q >= 1.0:
        h = 0.5 * q * (1.0 + math.sqrt(1.0 + 4.0 / q))
    else:
        h = 0.5 * (q + math.sqrt(q) * math.sqrt(q + 4.0))
    p_star = h / (1.0 + h)
    p_neg = p_star + q  # |p'|
    return p_star, p_neg, -math.log1p(h) - math.log1p(p_neg)


def saturation_index(q, r, p0):
    """Smallest n with K_m = K_n to SATURATION_PRECISION for every m >= n (None: never, q = 0).

    From the Moebius form, |p_n - p*| <= E_n (1 + |p'|), so E_n <= precision p* / (1 + |p'|)
    suffices for any p0.
    """
    q, _ = _normalise(q, r, p0)
    if q == 0.0:
        return None
    p_star, p_neg, log_kappa = _fixed_point(q)
    needed = math.log(SATURATION_PRECISION) + math.log(p_star) - math.log1p(p_neg)
    return max(1, math.ceil(needed / log_kappa))


def closed_form(q, r, p0):
    """(q, p0, u, p*, |p'|, log kappa) of the closed form, q and p0 in units of R: u = 1 / p0 for
    a large prior (p0 > 1, 0 for p0 = inf), else 0 (the formulas then divide by p0); p*, |p'| and
    log kappa are 0 when q = 0. Shared by `gain_schedule` and the GPU's table kernel."""
    q, p0 = _normalise(q, r, p0)
    u = 1.0 / p0 if p0 > 1.0 else 0.0
    return (q, p0, u) + ((0.0, 0.0, 0.0) if q == 0.0 else _fixed_point(q))


def gain_schedule(n, q, r, p0, *, device="cpu"):
    """Float64 tensor of K_1..K_n on `device` (computed there: no host round trip)."""
    q, p0, u, p_star, p_neg, log_kappa = closed_form(q, r, p0)
    steps = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    large_prior = p0 > 1.0
    if q == 0.0:  # No process noise: p_n = p0 / (1 + n p0); 1/n (a running mean) for p0 = inf.
        return 1.0 / (steps + u) if large_prior else p0 / (1.0 + steps * p0)
    e = torch.exp(steps * log_kappa)
    one_minus_e = -torch.expm1(steps * log_kappa)
    if large_prior:
        gains = (p_star + e * p_neg + (q * u) * one_minus_e) / (one_minus_e + u * (p_neg + e * p_star))
        if u == 0.0 and n:
            gains[0] = 1.0  # a diffuse prior: K_1 = 1 exactly (the formula can give 1 - 1 ulp)
    else:
        denominator = p0 * one_minus_e + p_neg + e * p_star
        gains = (p_star + e * p_neg) / denominator * p0 + one_minus_e / denominator * q
    return gains.clamp_(max=1.0)  # K_1 = 1 for p0 = inf can round to 1 + 1 ulp
