"""The three float32 tables of `kpo_kernels.tables` built on a GPU in one launch.

The torch operations of `gains.gain_schedule` and `innovation.variance_ratio_schedule` launch
19 kernels for a gain table and 24-25 for the variance ratios or their logs: 66 launches of a few
microseconds each whenever Q / R is new, which a per-step noise fit makes it at every step (the
fused loss itself is 1-3 launches). `table_kernel` evaluates the same closed form per entry in
float64 (docs: kpo_kernels/gains.py) and rounds it once to float32, for all three tables:

    K_n                        (GAINS)
    w_n = 1 / (1 + q + K_{n-1}), K_0 = p0      (VARIANCE_RATIOS)
    log w_n, -inf where w_n = 0                 (LOG_VARIANCE_RATIOS)

The constants come from the host as three float32 parts each (`triton_launch.float64_parts`:
Triton passes Python floats as float32); settings whose constants the parts cannot carry return
None and take the torch operations: q / r below about 1e-30 or above float32's range, p0 / r
above about 1e30, or q / r times r / p0 below about 1e-30. A table missing during CUDA-graph
capture is not built here (tables.py records torch operations instead: loading a kernel is not
allowed while a stream captures). exp(x) - 1 is Kahan's (libdevice's is not available to the
interpreter) and a GPU may contract the float64 arithmetic into FMAs: the float64 entries are
within a few ulps of the torch operations', so the float32 tables match them to one ulp (bit for
bit in every case tested on the CPU).
"""

import triton
import triton.language as tl

from ..gains import closed_form
from .triton_fit_search import _expm1, _float64
from .triton_launch import float64_parts, float64_parts_fit

BLOCK = 128  # one entry a thread of four warps: 32 programs for 4096 entries


@triton.jit
def _gain(n, q, p0, u, qu, p_star, p_neg, log_kappa, LARGE_PRIOR: tl.constexpr, NO_DRIFT: tl.constexpr):
    """K_n (float64) for n >= 1 (a float64 tensor), in gain_schedule's order of operations."""
    if NO_DRIFT:
        if LARGE_PRIOR:
            gain = 1.0 / (n + u)
        else:
            gain = p0 / (1.0 + n * p0)
    else:
        x = n * log_kappa
        e = tl.exp(x)
        one_minus_e = -_expm1(x)
        if LARGE_PRIOR:
            gain = (p_star + e * p_neg + qu * one_minus_e) / (one_minus_e + u * (p_neg + e * p_star))
        else:
            denominator = p0 * one_minus_e + p_neg + e * p_star
            gain = (p_star + e * p_neg) / denominator * p0 + one_minus_e / denominator * q
        gain = tl.minimum(gain, 1.0)
    return gain


@triton.jit
def table_kernel(
    gains_ptr, ratios_ptr, log_ratios_ptr, length, q0, q1, q2, p0_0, p0_1, p0_2, u0, u1, u2, qu0, qu1, qu2,
    star0, star1, star2, neg0, neg1, neg2, kappa0, kappa1, kappa2, one_q0, one_q1, one_q2,
    LARGE_PRIOR: tl.constexpr, NO_DRIFT: tl.constexpr, DIFFUSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Entries pid * BLOCK.. of the three tables (module docstring); DIFFUSE: p0 = inf (K_1 = 1,
    w_1 = 0)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    q = _float64(q0, q1, q2)
    p0 = _float64(p0_0, p0_1, p0_2)
    u = _float64(u0, u1, u2)
    qu = _float64(qu0, qu1, qu2)
    p_star = _float64(star0, star1, star2)
    p_neg = _float64(neg0, neg1, neg2)
    log_kappa = _float64(kappa0, kappa1, kappa2)
    one_plus_q = _float64(one_q0, one_q1, one_q2)
    n = (offsets + 1).to(tl.float64)
    gain = _gain(n, q, p0, u, qu, p_star, p_neg, log_kappa, LARGE_PRIOR, NO_DRIFT)
    before = _gain(n - 1.0, q, p0, u, qu, p_star, p_neg, log_kappa, LARGE_PRIOR, NO_DRIFT)  # K_{n-1}
    if DIFFUSE:
        gain = tl.where(offsets == 0, 1.0, gain)  # gain_schedule's K_1 = 1 exactly
        before = tl.where(offsets == 1, 1.0, before)
        ratio = tl.where(offsets == 0, 0.0, 1.0 / (before + one_plus_q))
    else:
        before = tl.where(offsets == 0, p0, before)
        ratio = 1.0 / (before + one_plus_q)
    inside = offsets < length
    tl.store(gains_ptr + offsets, gain.to(tl.float32), mask=inside)
    tl.store(ratios_ptr + offsets, ratio.to(tl.float32), mask=inside)
    tl.store(log_ratios_ptr + offsets, tl.log(ratio).to(tl.float32), mask=inside)


def table_launch(q, r, p0):
    """(constants as float32 parts, constexprs) of `table_kernel`, or None where the parts cannot
    carry a constant exactly."""
    q, p0, u, p_star, p_neg, log_kappa = closed_form(q, r, p0)
    large_prior = p0 > 1.0
    no_drift, diffuse = q == 0.0, large_prior and u == 0.0
    constants = (q, 0.0 if diffuse else p0, u, q * u, p_star, p_neg, log_kappa, 1.0 + q)  # p0 = inf: DIFFUSE
    if not all(value == 0.0 or float64_parts_fit(value) for value in constants):
        return None
    flags = dict(LARGE_PRIOR=large_prior, NO_DRIFT=no_drift, DIFFUSE=diffuse, BLOCK=BLOCK)
    return [part for value in constants for part in float64_parts(value)], flags


def build_tables(length, q, r, p0, gains, ratios, log_ratios):
    """Fill the three float32 tables of `length` entries (on the device the kernel runs on) in
    one launch; False (nothing launched) where `table_launch` declines."""
    launch = table_launch(q, r, p0)
    if launch is None:
        return False
    parts, flags = launch
    table_kernel[(triton.cdiv(length, BLOCK),)](gains, ratios, log_ratios, length, *parts, **flags)
    return True
