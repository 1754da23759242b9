"""`estimate_noise` on the Triton backend after the layout (launched by triton_noise.py): the
exact profile likelihood at every point of a grid in log q, from the filter itself run at all of
them at once, then the best point refined by a parabola through it and its neighbours.

In units of R (the profile concentrates R out), the filter at ratio q = Q / R predicts each
scored observation with variance F = P + q + 1 and innovation v, and the profile needs
sum v^2 / F and sum log F (the prediction-error decomposition: kpo_kernels/fitting.py).
`noise_filter_kernel` runs it over chunks of each sequence in parallel, one lane a ratio. A
chunk does not know the level m it enters with, but everything it computes is affine in it:
with u = m - (the chunk's first observation), its filtered level is A u + B and its part of
sum v^2 / F is s0 - 2 u s1 + u^2 s2, all small numbers (no cancellation of large levels). The
variance it enters with is data-independent and closed form (triton_noise._entering_variances).
`noise_profile_kernel` chains each sequence's chunks in order (a chunk's leaving level is the
next one's entering level) and adds the sequence's closed-form log-determinant sum log F
(fit_spectrum.LogDeterminant), one program a sequence; its last program sums over the sequences
in float64 and evaluates the profile and R_hat at every ratio, takes the first best one, then
the vertex of the parabola through it and its neighbours (the profile and R reported are the
parabola's, and R's own quadratic's through the same three points, at that vertex). Under a
process group it runs twice: the sums (all-reduced in between), then the profile from them.

Why not the torch path's sine transform (fit_spectrum.py): on a GPU that took three FFTs and five
kernels around them, eight launches against the fused loss's five; this is three with the
layout, its work about 16 float32 instructions a warp per (position, 32 ratios).

Float64 settings (q_range's ends, the fallback) arrive as three float32 parts each
(triton_launch.float64_parts): Triton passes Python floats as float32, and its interpreter
rounds them so even where a float64 parameter is declared. Python float literals inside the
kernels are float32 too: float64 constants are made with tl.full.
"""

import math

import triton
import triton.language as tl

from .triton_common import _NVIDIA_PTX

_LOG_2PI = tl.constexpr(math.log(2.0 * math.pi))
_DBL_MAX = tl.constexpr(1.7976931348623157e308)
# A profile that rises less than this over its lower end (nats a token: the float32 filters'
# sums carry ~1e-7 relative error) shows no drift: the fit reports the lower end.
NO_RISE = 1e-6
_NO_RISE = tl.constexpr(NO_RISE)


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
    """exp(x) - 1 to the dtype's precision: Kahan's (e - 1) x / log e for |x| < 1 (x itself
    where e rounds to 1), e - 1 elsewhere (no cancellation there; and where e is subnormal, log e
    is not x: x near -740 gave a relative error near 1e-3)."""
    e = tl.exp(x)
    near_zero = tl.abs(x) < 1.0
    kahan = (e - 1.0) * (x / tl.log(tl.where(near_zero & (e != 1.0), e, 2.0)))
    return tl.where(near_zero, tl.where(e == 1.0, x, kahan), e - 1.0)


@triton.jit
def _log_determinant(n, phi, constant, DIFFUSE: tl.constexpr):
    """log det(I + q M) (P0 = 0) or log det(q I + D) (diffuse) of one sequence of n >= 1 tokens,
    float64 (fit_spectrum.LogDeterminant), from phi (2 + q = 2 cosh(phi)) and the part that
    depends on q alone (`constant`, triton_noise._search_grid): log cosh((n + 1/2) phi) -
    log cosh(phi / 2) = (n + 1/2) phi - log 2 + log1p(exp(-(2n + 1) phi)) - log cosh(phi / 2), and
    log sinh(n phi) - log sinh(phi) = (n - 1) phi + log(-expm1(-2 n phi)) - log(-expm1(-2 phi)),
    with constant = log 2 + log cosh(phi / 2) (P0 = 0) or log(-expm1(-2 phi)) (diffuse)."""
    n = n.to(tl.float64)
    if DIFFUSE:
        return (n - 1.0) * phi + tl.log(-_expm1(-2.0 * n * phi)) - constant
    return (n + 0.5) * phi + _log1p(tl.exp(-(2.0 * n + 1.0) * phi)) - constant


@triton.jit
def _reciprocal(x):
    """1 / x of float32 x >= 1: one rcp.approx.ftz on an NVIDIA GPU (`/` is div.full there, six
    instructions more of range checks); the interpreter divides."""
    if _NVIDIA_PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return 1.0 / x


@triton.jit
def noise_filter_kernel(z_ptr, z_row_stride, z_stride, lengths_ptr, lengths_stride, grid_ptr, entering_ptr, chunks_ptr,
                        finished_ptr, sequences, chunk_count, chunk_length,
                        DIFFUSE: tl.constexpr, POINTS: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Grid (sequences * chunk_count, POINTS / BLOCK_Q): program (s chunk_count + c, j) runs the
    filters of grid ratios j BLOCK_Q .. (j + 1) BLOCK_Q - 1 over chunk c of sequence s (its scored
    positions c L .. c L + L - 1, L = chunk_length; scored: every token (P0 = 0), or every token
    but the first (diffuse)) and stores (s0, s1, s2, A, B) into chunks (5, sequences *
    chunk_count, POINTS) float32: with u the entering level less the chunk's first observation,
    its share of sum v^2 / F is s0 - 2 u s1 + u^2 s2 and A u + B is the leaving level less the
    next chunk's first observation (the filter runs on the observations less the first: levels
    stay small, whatever the data's). It starts from the variance `entering` (chunk_count or more,
    POINTS) float32 (triton_noise._entering_variances). A chunk past its sequence's end stores
    nothing, and nothing reads it. Program (0, 0) zeroes noise_profile_kernel's counter
    `finished`, which runs after it in the stream."""
    pid = tl.program_id(0)
    if (pid == 0) & (tl.program_id(1) == 0):
        tl.store(finished_ptr, tl.zeros([], dtype=tl.int32))
    seq = pid // chunk_count
    first = 1 if DIFFUSE else 0
    scored = tl.maximum(tl.load(lengths_ptr + seq * lengths_stride) - first, 0)
    chunk = pid - seq * chunk_count
    start = chunk.to(tl.int64) * chunk_length
    stop = tl.minimum(start + chunk_length, scored)
    if start < stop:
        index = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        ratio = tl.load(grid_ptr + index).to(tl.float32)
        variance = tl.load(entering_ptr + chunk * POINTS + index)
        row = z_ptr + seq.to(tl.int64) * z_row_stride + first * z_stride
        anchor = tl.load(row + start * z_stride)  # levels are kept relative to it: small, whatever the data's level
        a = tl.full([BLOCK_Q], 1.0, tl.float32)
        b = tl.zeros([BLOCK_Q], tl.float32)
        s0 = tl.zeros([BLOCK_Q], tl.float32)
        s1 = tl.zeros([BLOCK_Q], tl.float32)
        s2 = tl.zeros([BLOCK_Q], tl.float32)
        for t in range(start, stop):
            x = tl.load(row + t * z_stride) - anchor
            predicted = variance + ratio
            w = _reciprocal(predicted + 1.0)  # 1 / F
            gain = predicted * w
            e = x - b  # the innovation less its part -A u
            ew = e * w
            s0 += ew * e
            s1 += ew * a
            s2 += a * a * w
            b += gain * e
            a -= gain * a
            variance = gain  # P = P_pred R / F, R = 1
        # the leaving level relative to the next chunk's first observation (the difference of two
        # observations: small where the data's level is large), what the next chunk's u is
        following = tl.load(row + stop * z_stride, mask=stop < scored, other=0.0)
        b += anchor - following
        out = chunks_ptr + pid.to(tl.int64) * POINTS + index
        plane = tl.cast(sequences, tl.int64) * chunk_count * POINTS
        tl.store(out, s0)
        tl.store(out + plane, s1)
        tl.store(out + 2 * plane, s2)
        tl.store(out + 3 * plane, a)
        tl.store(out + 4 * plane, b)


@triton.jit
def _sequence_sums(z_ptr, z_row_stride, z_stride, chunks_ptr, sequences, chunk_count, chunk_length, seq, n, index, grid_ptr,
                   DIFFUSE: tl.constexpr, POINTS: tl.constexpr):
    """One sequence's (sum v^2 / F, log-determinant) at the grid points `index`, float64: its
    chunks (noise_filter_kernel) chained in order from its entering level (0 under P0 = 0; its
    first token, diffuse), the level carried relative to each chunk's first observation; (0, 0)
    without an observation scored."""
    first = 1 if DIFFUSE else 0
    scored = tl.maximum(n - first, 0)
    plane = tl.cast(sequences, tl.int64) * chunk_count * POINTS
    row = z_ptr + seq.to(tl.int64) * z_row_stride + first * z_stride
    # u: the level entering the chunk less its first observation; before chunk 0, 0 (P0 = 0) or
    # the first token (diffuse) less it
    u = tl.zeros(index.shape, dtype=tl.float32) - tl.load(row, mask=scored > 0, other=0.0)
    if DIFFUSE:
        u += tl.load(row - z_stride, mask=n > 0, other=0.0)
    quadratic = tl.zeros(index.shape, dtype=tl.float64)
    for c in range(0, tl.cdiv(scored, chunk_length)):
        at = chunks_ptr + (seq.to(tl.int64) * chunk_count + c) * POINTS + index
        s0 = tl.load(at)
        s1 = tl.load(at + plane)
        s2 = tl.load(at + 2 * plane)
        quadratic += (s0 + u * (u * s2 - 2.0 * s1)).to(tl.float64)
        u = tl.load(at + 3 * plane) * u + tl.load(at + 4 * plane)
    log_det = _log_determinant(n, tl.load(grid_ptr + POINTS + index), tl.load(grid_ptr + 2 * POINTS + index), DIFFUSE)
    return quadratic, tl.where(scored > 0, log_det, 0.0)


# noise_profile_kernel's stages
_LOCAL = tl.constexpr(0)  # this rank's sums, the profile and the result
_SUMS = tl.constexpr(1)  # the sums only, into `sums` (all-reduced before _GIVEN)
_GIVEN = tl.constexpr(2)  # the profile and the result from `sums`


@triton.jit
def noise_profile_kernel(
    z_ptr, z_row_stride, z_stride, lengths_ptr, lengths_stride, chunks_ptr, per_sequence_ptr, sequences, chunk_count,
    chunk_length, sums_ptr, values_ptr, finished_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr,
    low0, low1, low2, high0, high1, high2, fallback_q0, fallback_q1, fallback_q2, fallback_r0, fallback_r1, fallback_r2,
    DIFFUSE: tl.constexpr, STAGE: tl.constexpr, POINTS: tl.constexpr, RATIOS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """_LOCAL and _SUMS: grid (sequences, POINTS / RATIOS); program (s, j) chains sequence s's
    chunks at grid points j RATIOS .. (j + 1) RATIOS - 1 (_sequence_sums) into per_sequence
    (2, sequences, POINTS) float64, and the last program to finish (an atomic count in
    `finished`, zero before the launch: its release and acquire order the other programs' stores
    before its loads) sums them over the sequences into `sums` = [observations, sum v^2 / F at
    the lowest ratio, sum v^2 / F (POINTS), log-determinant (POINTS)] float64, in order. _SUMS
    stops there (the sums are all-reduced before _GIVEN); _LOCAL goes on, as _GIVEN (grid (1,))
    does from `sums`: the profile log-likelihood per observation and R_hat at every grid point
    into `values` (2, POINTS), and the result (_finish). The grid `grid` (3, POINTS) is
    triton_noise._search_grid's. result: [q, r, ratio, log_likelihood, drift_evidence,
    num_tokens] float64; codes: [at_boundary, status] int64 (fitting.NoiseEstimate; status
    FITTED 0, ON_POLICY 1, FEW_TOKENS 2, NOT_FINITE 3). Each float64 setting comes as three
    float32 parts (triton_launch.float64_parts)."""
    parts = (low0, low1, low2, high0, high1, high2, fallback_q0, fallback_q1, fallback_q2, fallback_r0, fallback_r1,
             fallback_r2)
    if STAGE == _GIVEN:
        _profile_and_finish(sums_ptr, values_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr, parts, POINTS, BLOCK_F)
    else:
        seq = tl.program_id(0)
        index = tl.program_id(1) * RATIOS + tl.arange(0, RATIOS)
        n = tl.load(lengths_ptr + seq * lengths_stride)
        quadratic, log_det = _sequence_sums(z_ptr, z_row_stride, z_stride, chunks_ptr, sequences, chunk_count,
                                            chunk_length, seq, n, index, grid_ptr, DIFFUSE, POINTS)
        out = per_sequence_ptr + seq.to(tl.int64) * POINTS + index
        tl.store(out, quadratic)
        tl.store(out + tl.cast(sequences, tl.int64) * POINTS, log_det)
        tl.debug_barrier()  # every thread's stores before the atomic's release
        if tl.atomic_add(finished_ptr, 1) == tl.num_programs(0) * tl.num_programs(1) - 1:
            _sum_sequences(lengths_ptr, lengths_stride, per_sequence_ptr, sequences, sums_ptr, DIFFUSE, POINTS, BLOCK_S)
            if STAGE == _LOCAL:
                _profile_and_finish(sums_ptr, values_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr, parts, POINTS,
                                    BLOCK_F)


@triton.jit
def _profile_and_finish(sums_ptr, values_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr, parts, POINTS: tl.constexpr,
                        BLOCK_F: tl.constexpr):
    """From `sums`: the profile log-likelihood per observation and R_hat at every grid point into
    `values`, then the result (_finish)."""
    points = tl.arange(0, POINTS)
    per = tl.maximum(tl.load(sums_ptr, volatile=True), 1.0)
    quadratic = tl.load(sums_ptr + 2 + points, volatile=True)
    log_det = tl.load(sums_ptr + 2 + POINTS + points, volatile=True)
    tl.store(values_ptr + points, -0.5 * (tl.full([], _LOG_2PI, tl.float64) + tl.log(quadratic / per) + log_det / per + 1.0))
    tl.store(values_ptr + POINTS + points, quadratic / per)
    tl.debug_barrier()  # the values' stores before _finish's loads
    _finish(values_ptr, sums_ptr, result_ptr, codes_ptr, min_tokens, grid_ptr, _float64(parts[0], parts[1], parts[2]),
            _float64(parts[3], parts[4], parts[5]), _float64(parts[6], parts[7], parts[8]),
            _float64(parts[9], parts[10], parts[11]), POINTS, BLOCK_F)


@triton.jit
def _sum_sequences(lengths_ptr, lengths_stride, per_sequence_ptr, sequences, sums_ptr, DIFFUSE: tl.constexpr,
                   POINTS: tl.constexpr, BLOCK_S: tl.constexpr):
    """noise_profile_kernel's last program: per_sequence summed over the sequences, in order of
    blocks, and the observations scored, into `sums`."""
    first = 1 if DIFFUSE else 0
    points = tl.arange(0, POINTS)
    quadratic = tl.zeros([BLOCK_S, POINTS], dtype=tl.float64)
    log_det = tl.zeros([BLOCK_S, POINTS], dtype=tl.float64)
    count = tl.zeros([BLOCK_S], dtype=tl.int64)
    for begin in range(0, sequences, BLOCK_S):
        s = begin + tl.arange(0, BLOCK_S)
        inside = s < sequences
        count += tl.maximum(tl.load(lengths_ptr + s * lengths_stride, mask=inside, other=0) - first, 0)
        at = per_sequence_ptr + (s.to(tl.int64) * POINTS)[:, None] + points[None, :]
        quadratic += tl.load(at, mask=inside[:, None], other=0.0, volatile=True)
        log_det += tl.load(at + tl.cast(sequences, tl.int64) * POINTS, mask=inside[:, None], other=0.0, volatile=True)
    quadratic_sum = tl.sum(quadratic, 0)
    tl.store(sums_ptr, tl.sum(count, 0).to(tl.float64))
    tl.store(sums_ptr + 1, tl.sum(tl.where(points == 0, quadratic_sum, 0.0), 0))
    tl.store(sums_ptr + 2 + points, quadratic_sum)
    tl.store(sums_ptr + 2 + POINTS + points, tl.sum(log_det, 0))
    tl.debug_barrier()  # the sums' stores before their loads by the same program


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
    """The last program's part of noise_profile_kernel, from every grid point's profile and R:
    the first best point (the lower end where the best rises less than NO_RISE above it); inside the grid, the vertex of the parabola in log q through it and its
    neighbours (at most half a step away, the first best point being strictly above its left
    neighbour), where the profile and R are the parabola's and R's own quadratic's."""
    best_value = _ranked(tl.load(values_ptr, volatile=True))
    best = tl.zeros([], dtype=tl.int32)
    for start in range(0, POINTS, BLOCK_F):
        block = _ranked(tl.load(values_ptr + start + tl.arange(0, BLOCK_F), volatile=True))
        top, where = tl.max(block, 0, return_indices=True, return_indices_tie_break_left=True)
        where += start
        better = top > best_value  # strictly: the first best point, as torch.argmax
        best = tl.where(better, where, best)
        best_value = tl.where(better, top, best_value)
    best = tl.where(best_value - _ranked(tl.load(values_ptr, volatile=True)) < _NO_RISE, 0, best)  # no drift
    at_lower = best == 0
    at_upper = best == POINTS - 1
    middle = tl.minimum(tl.maximum(best, 1), POINTS - 2)
    l_left = tl.load(values_ptr + middle - 1, volatile=True)
    l_best = tl.load(values_ptr + middle, volatile=True)
    l_right = tl.load(values_ptr + middle + 1, volatile=True)
    r_left = tl.load(values_ptr + POINTS + middle - 1, volatile=True)
    r_best = tl.load(values_ptr + POINTS + middle, volatile=True)
    r_right = tl.load(values_ptr + POINTS + middle + 1, volatile=True)
    curvature = l_left - 2.0 * l_best + l_right
    finite = (tl.abs(l_left) < float("inf")) & (tl.abs(l_right) < float("inf")) & (tl.abs(l_best) < float("inf"))
    refine = (~at_lower) & (~at_upper) & finite & (curvature < 0.0)  # NaN compares False
    safe = tl.where(refine, curvature, -1.0)
    x = tl.where(refine, 0.5 * (l_left - l_right) / safe, 0.0)  # the vertex, in grid steps from `best`
    l_vertex = l_best - 0.125 * (l_right - l_left) * (l_right - l_left) / safe
    r_vertex = r_best + x * (0.5 * (r_right - r_left) + 0.5 * x * (r_left - 2.0 * r_best + r_right))
    lower, upper = tl.log(low), tl.log(high)
    vertex = tl.exp(lower + (upper - lower) * ((best.to(tl.float64) + x) / (POINTS - 1)))
    l_edge = tl.load(values_ptr + best, volatile=True)
    r_edge = tl.load(values_ptr + POINTS + best, volatile=True)
    l_best = tl.where(refine, l_vertex, l_edge)
    r_best = tl.where(refine, r_vertex, r_edge)
    l_lower = tl.load(values_ptr, volatile=True)
    ratio = tl.where(at_lower, low, tl.where(at_upper, high, tl.where(refine, vertex, tl.load(grid_ptr + best))))

    tokens = tl.load(totals_ptr, volatile=True)
    quadratic_total = tl.load(totals_ptr + 1, volatile=True)
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
