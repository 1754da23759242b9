"""Kalman gains K_1, K_2, ... in closed form, and a per-device cache of gain tables.

With constant Q, R and prior variance P0 the gain after n observations does not depend on the
data. In normalised units (q = Q/R, p = P/R) the variance follows the Moebius map
f(p) = (p + q) / (p + q + 1) and K_n = p_n. Writing h = (q + sqrt(q^2 + 4q)) / 2, the fixed
points are p* = h / (1 + h) > 0 and p' = -(p* + q) < 0, and with E_n = kappa^n,
kappa = (1 - p*) / (1 + p* + q):

    K_n = (p0 (p* + E_n |p'|) + q (1 - E_n)) / (p0 (1 - E_n) + |p'| + E_n p*)

Every term is non-negative, so nothing cancels; E_n = exp(n log kappa) and 1 - E_n =
-expm1(n log kappa) are accurate for all n, and log kappa = -log1p(h) - log1p(p* + q) needs no
subtraction either. This holds from q = 1e-300 to q = 1e300; q = 0 and p0 = inf (a diffuse
prior) are the limits of the same formula.
"""

import math
from collections import OrderedDict

import torch


def _normalise(q, r, p0):
    q_n, p0_n = float(q) / float(r), float(p0) / float(r)
    if not math.isfinite(q_n):
        raise ValueError(f"q / r must be finite, got q={q!r}, r={r!r}")
    return q_n, p0_n


def gain_schedule(n, q, r, p0, *, device="cpu"):
    """Float64 tensor of K_1..K_n on `device` (computed there: no host round trip)."""
    q, p0 = _normalise(q, r, p0)
    steps = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    diffuse = math.isinf(p0)
    if q == 0.0:  # No process noise: p_n = p0 / (1 + n p0), i.e. 1/n (a running mean) for p0 = inf.
        return 1.0 / steps if diffuse else p0 / (1.0 + steps * p0)
    h = 0.5 * (q + math.sqrt(q) * math.sqrt(q + 4.0))
    p_star = h / (1.0 + h)
    p_neg = p_star + q  # |p'|
    log_kappa = -math.log1p(h) - math.log1p(p_neg)
    e = torch.exp(steps * log_kappa)
    one_minus_e = -torch.expm1(steps * log_kappa)
    if diffuse:
        gains = (p_star + e * p_neg) / one_minus_e
    else:
        gains = (p0 * (p_star + e * p_neg) + q * one_minus_e) / (p0 * one_minus_e + p_neg + e * p_star)
    return gains.clamp_(max=1.0)  # K_1 = 1 for p0 = inf can round to 1 + 1 ulp


def kalman_gains(n, *, q=1e-6, r=1.0, p0=0.0):
    """K_1..K_n as a float64 CPU tensor (the gain used at the n-th observation of a sequence).

    Accurate to a few float64 ulps for any q in [0, 1e300], p0 in [0, inf] and any n; never NaN.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    from .validation import check_filter_params

    check_filter_params(q=q, r=r, p0=p0, x0=0.0)
    return gain_schedule(n, q, r, p0)


class GainTables:
    """Float32/float64 gain tables on each device, grown in powers of two and reused.

    Kernels index the table with the observation count (skip mode) or the position (position
    mode), so a table of length >= the longest sequence serves every call with the same q, r, p0.
    """

    def __init__(self, max_entries=16):
        self._tables = OrderedDict()
        self._max_entries = max_entries

    def get(self, length, q, r, p0, device, dtype):
        key = (float(q) / float(r), float(p0) / float(r), torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None or table.numel() < length:
            size = max(1024, 1 << max(0, length - 1).bit_length())
            table = gain_schedule(size, q, r, p0, device=device).to(dtype)
            self._tables[key] = table
        self._tables.move_to_end(key)
        while len(self._tables) > self._max_entries:
            self._tables.popitem(last=False)
        return table


gain_tables = GainTables()
