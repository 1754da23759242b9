"""`estimate_noise`'s search on the Triton backend (launched by triton_noise.py): the binned
profile (float64, the formula of fit_spectrum.binned_quadratic and LogDeterminant) at every
point of a dense grid in log q over q_range, then, in the last program to finish, the first
best point and the result (`noise_search_kernel`); under a process group the log-determinants at
the grid's points come from `fit_log_determinant_kernel`, all-reduced in between. It reads the
transform's `totals` (triton_fit_transform.py): [tokens, sum y^2, moments (3, bins) row-major].

The grid's best point stands in for the torch reference's staged grid and parabola
(kpo_kernels/fit_search.py): a grid step apart at most, and the profile and R reported are
exactly those at the ratio reported (the reference evaluates the profile again at its
parabola's vertex; here that would be a serial pass).

Float64 settings (q_range's ends, the fallback) arrive as three float32 parts each
(triton_launch.float64_parts): Triton passes Python floats as float32, and its interpreter
rounds them so even where a float64 parameter is declared. Python float literals inside the
kernels are float32 too: float64 constants are made with tl.full.
"""

import math

import triton
import triton.language as tl

_LOG_2PI = tl.constexpr(math.log(2.0 * math.pi))
_DBL_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _float64(part0, part1, part2):
    return tl.cast(part0, tl.float64) + tl.cast(part1, tl.float64) + tl.cast(part2, tl.float64)


@triton.jit
def _log1p(y):
    """log(1 + y) to the dtype's precision, also for tiny y (Kahan: the rounding of 1 + y
    cancels in log(w) / (w - 1)); libdevice's is not available to the interpreter."""
    w = 1.0 + y
    return tl.where(w == 1.0, y, tl.log(w) * (y / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 to the dtype's precision, also for tiny x (Kahan's (e - 1) x / log e), and -1
    where exp(x) underflows."""
    e = tl.exp(x)
    usual = (e > 0.0) & (e != 1.0)
    return tl.where(e == 1.0, x, tl.where(e == 0.0, -1.0, (e - 1.0) * (x / tl.log(tl.where(usual, e, 2.0)))))


@triton.jit
def _log_determinant(phi, constant, lengths_ptr, sequences, lengths_stride, DIFFUSE: tl.constexpr, BLOCK_S: tl.constexpr):
    """sum over sequences of log det(I + q M) (P0 = 0) or log det(q I + D) (diffuse) for each q,
    float64 (fit_spectrum.LogDeterminant), from phi (2 + q = 2 cosh(phi)) and the part that
    depends on q alone (`constant`, triton_noise._search_grid): with
    log cosh((n + 1/2) phi) - log cosh(phi / 2) = (n + 1/2) phi - log 2 + log1p(exp(-(2n + 1) phi))
    - log cosh(phi / 2), and log sinh(n phi) - log sinh(phi) = (n - 1) phi + log(-expm1(-2 n phi))
    - log(-expm1(-2 phi)): the linear part from the total length, the bounded rest per sequence,
    and constant = log 2 + log cosh(phi / 2) (P0 = 0) or log(-expm1(-2 phi)) (diffuse) per sequence."""
    corrections = tl.zeros(phi.shape, dtype=tl.float64)
    length_total = tl.zeros([BLOCK_S], dtype=tl.int64)
    for start in range(0, sequences, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        length = tl.load(lengths_ptr + s * lengths_stride, mask=s < sequences, other=0)
        if DIFFUSE:
            length = tl.where(s < sequences, tl.maximum(length, 1), 0)  # one token or none: log det 0
        length_total += length
        n = tl.where(s < sequences, length, 1).to(tl.float64)  # 1 past the end: finite, then dropped
        if DIFFUSE:
            part = tl.log(-_expm1(-2.0 * n[None, :] * phi[:, None]))
        else:
            part = _log1p(tl.exp(-(2.0 * n[None, :] + 1.0) * phi[:, None]))
        corrections += tl.sum(tl.where((s < sequences)[None, :], part, 0.0), 1)
    count = tl.cast(sequences, tl.float64)  # a cast, not .to: a count of 1 arrives as a constexpr
    total = tl.sum(length_total, 0).to(tl.float64)
    linear = total - count if DIFFUSE else total + 0.5 * count
    return linear * phi + corrections - count * constant


@triton.jit
def _reciprocal(x):
    """1 / x in float64 for 1.2e-38 < x < 2^126 (div.full.f32, what `/` compiles to on a GPU,
    returns 0 beyond; triton_noise.SEARCH_HIGHEST keeps q below): float32's reciprocal, then two
    Newton steps (error 2^-23 -> 2^-46 -> below float64's rounding), cheaper than an IEEE
    float64 division."""
    w = (1.0 / x.to(tl.float32)).to(tl.float64)
    w = w * (2.0 - x * w)
    return w * (2.0 - x * w)


@triton.jit
def _coefficients(totals_ptr, centres_ptr, bins, k):
    """For bins k (0 past the last), the binned quadratic's terms as a polynomial in w = 1 / (c + q):
    (m0 - s m1 + s (2s - 1) m2 / 2) w with s = c w is w (m0 - w (c (m1 + m2 / 2) - w c^2 m2))."""
    inside = k < bins
    m0 = tl.load(totals_ptr + 2 + k, mask=inside, other=0.0)
    m1 = tl.load(totals_ptr + 2 + bins + k, mask=inside, other=0.0)
    m2 = tl.load(totals_ptr + 2 + 2 * bins + k, mask=inside, other=0.0)
    centre = tl.load(centres_ptr + k, mask=inside, other=1.0)
    return centre, m0, centre * (m1 + 0.5 * m2), centre * centre * m2


@triton.jit
def _profile(q, log_det, totals_ptr, centres_ptr, bins, BLOCK_B: tl.constexpr):
    """(profile log-likelihood per token, R_hat) at the ratios q, float64, from the binned
    moments, the bins' centres and the log-determinants: the quadratic part is the sum over bins
    of (m0 - s m1 + s (2s - 1) m2 / 2) w, w = 1 / (c + q), s = c w (fit_spectrum.binned_quadratic),
    in _coefficients' form."""
    terms = tl.zeros([q.shape[0], BLOCK_B], dtype=tl.float64)  # summed over the bins after the loop
    for start in range(0, bins, BLOCK_B):
        centre, first, second, third = _coefficients(totals_ptr, centres_ptr, bins, start + tl.arange(0, BLOCK_B))
        w = _reciprocal(centre[None, :] + q[:, None])
        terms += w * (first[None, :] - w * (second[None, :] - w * third[None, :]))
    quadratic = tl.sum(terms, 1)
    per = tl.maximum(tl.load(totals_ptr), 1.0)
    return -0.5 * (tl.full([], _LOG_2PI, tl.float64) + tl.log(quadratic / per) + log_det / per + 1.0), quadratic / per


@triton.jit
def fit_log_determinant_kernel(lengths_ptr, sequences, lengths_stride, log_det_ptr, grid_ptr,
                               DIFFUSE: tl.constexpr, POINTS: tl.constexpr, RATIOS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (POINTS / RATIOS,): the sequences' log-determinant sums at every point of
    noise_search_kernel's grid, float64 (POINTS,): under a process group they are all-reduced
    before the search, which then reads them (GIVEN_LOG_DET)."""
    index = tl.program_id(0) * RATIOS + tl.arange(0, RATIOS)
    phi = tl.load(grid_ptr + POINTS + index)
    constant = tl.load(grid_ptr + 2 * POINTS + index)
    tl.store(log_det_ptr + index, _log_determinant(phi, constant, lengths_ptr, sequences, lengths_stride, DIFFUSE, BLOCK_S))


@triton.jit
def noise_search_kernel(
    totals_ptr, centres_ptr, bins, lengths_ptr, sequences, lengths_stride, log_det_ptr, values_ptr, finished_ptr, result_ptr,
    codes_ptr, min_tokens, grid_ptr, low0, low1, low2, high0, high1, high2,
    fallback_q0, fallback_q1, fallback_q2, fallback_r0, fallback_r1, fallback_r2,
    DIFFUSE: tl.constexpr, GIVEN_LOG_DET: tl.constexpr, POINTS: tl.constexpr, RATIOS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid (POINTS / RATIOS,). Each program evaluates the binned profile and R (float64, as the
    reference's, at the bins' centres `centres`) at RATIOS points of the grid `grid` (3, POINTS)
    (triton_noise._search_grid: the ratios, evenly spaced in log q over q_range, with their phi
    and log-determinant constant, made once per q_range: no float64 exp or log a program), into
    `values` (2, POINTS); the log-determinants are its own, or (GIVEN_LOG_DET) read from
    log_det_ptr (fit_log_determinant_kernel's, summed over a process group). The last program to
    finish (an atomic count in `finished`, zero before the launch: its release and acquire order
    the values' stores before their loads) takes the first best point (ranked as
    torch.nan_to_num(values, nan=-inf) would be) and writes the result.
    result: [q, r, ratio, log_likelihood, drift_evidence, num_tokens] float64; codes:
    [at_boundary, status] int64 (fitting.NoiseEstimate; status FITTED 0, ON_POLICY 1,
    FEW_TOKENS 2, NOT_FINITE 3). Each float64 setting comes as three float32 parts
    (triton_launch.float64_parts)."""
    index = tl.program_id(0) * RATIOS + tl.arange(0, RATIOS)
    q = tl.load(grid_ptr + index)
    if GIVEN_LOG_DET:
        log_det = tl.load(log_det_ptr + index)
    else:
        phi = tl.load(grid_ptr + POINTS + index)
        constant = tl.load(grid_ptr + 2 * POINTS + index)
        log_det = _log_determinant(phi, constant, lengths_ptr, sequences, lengths_stride, DIFFUSE, BLOCK_S)
    values, r_hat = _profile(q, log_det, totals_ptr, centres_ptr, bins, BLOCK_B)
    tl.store(values_ptr + index, values)
    tl.store(values_ptr + POINTS + index, r_hat)
    tl.debug_barrier()  # every thread's stores before the atomic's release
    if tl.atomic_add(finished_ptr, 1) == tl.num_programs(0) - 1:
        _finish(values_ptr, totals_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr,
                _float64(low0, low1, low2), _float64(high0, high1, high2),
                _float64(fallback_q0, fallback_q1, fallback_q2), _float64(fallback_r0, fallback_r1, fallback_r2),
                POINTS, BLOCK_F)


@triton.jit
def _ranked(values):
    """As torch.nan_to_num(values, nan=-inf): NaN ranks lowest, infinities as the largest
    finite numbers."""
    largest = tl.full([], _DBL_MAX, tl.float64)
    return tl.where(values != values, -float("inf"),
                    tl.where(values > largest, largest, tl.where(values < -largest, -largest, values)))


@triton.jit
def _finish(values_ptr, totals_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr, low, high, fallback_q, fallback_r,
            POINTS: tl.constexpr, BLOCK_F: tl.constexpr):
    """The last program's part of noise_search_kernel, from every grid point's profile and R."""
    best_value = _ranked(tl.load(values_ptr, volatile=True))
    best = tl.zeros([], dtype=tl.int32)
    for start in range(0, POINTS, BLOCK_F):
        block = _ranked(tl.load(values_ptr + start + tl.arange(0, BLOCK_F), volatile=True))
        top, where = tl.max(block, 0, return_indices=True, return_indices_tie_break_left=True)
        where += start
        better = top > best_value  # strictly: the first best point, as torch.argmax
        best = tl.where(better, where, best)
        best_value = tl.where(better, top, best_value)
    l_best = tl.load(values_ptr + best, volatile=True)
    r_best = tl.load(values_ptr + POINTS + best, volatile=True)
    l_lower = tl.load(values_ptr, volatile=True)
    at_lower = best == 0
    at_upper = best == POINTS - 1
    ratio = tl.where(at_lower, low, tl.where(at_upper, high, tl.load(grid_ptr + best)))

    tokens = tl.load(totals_ptr)
    quadratic_total = tl.load(totals_ptr + 1)
    finite = (l_best == l_best) & (tl.abs(l_best) < float("inf"))
    finite = finite & (quadratic_total == quadratic_total) & (tl.abs(quadratic_total) < float("inf"))
    status = tl.where(finite & (r_best > 0), 0, 3)
    status = tl.where(quadratic_total == 0, 1, status)
    status = tl.where(tokens < min_tokens, 2, status)
    fitted = status == 0
    nan = float("nan")
    drift = (l_best - l_lower) * tokens
    drift = tl.where(drift < 0, 0.0, drift)  # NaN stays NaN, as clamp(min=0)
    tl.store(result_ptr + 0, tl.where(fitted, ratio * r_best, fallback_q))
    tl.store(result_ptr + 1, tl.where(fitted, r_best, fallback_r))
    tl.store(result_ptr + 2, tl.where(fitted, ratio, fallback_q / fallback_r))
    tl.store(result_ptr + 3, tl.where(fitted, l_best, nan))
    tl.store(result_ptr + 4, tl.where(fitted, drift, nan))
    tl.store(result_ptr + 5, tokens)
    tl.store(codes_ptr + 0, tl.where(fitted, at_upper.to(tl.int64) - at_lower.to(tl.int64), 0))
    tl.store(codes_ptr + 1, status.to(tl.int64))
