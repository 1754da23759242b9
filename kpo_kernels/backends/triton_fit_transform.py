"""`estimate_noise`'s layout and sine transform on the Triton backend (launched by
triton_noise.py), the torch reference's operations (kpo_kernels/fit_spectrum.py) fused around
torch's FFTs:

- `fit_layout_kernel`: each sequence's log-ratios in order (fit_spectrum.sequences);
- `fit_chirp_kernel` writes the two inputs of the circular convolution (a = x g and b = conj g,
  complex64 as float32 pairs); torch convolves them (FFT, product, inverse FFT);
- `fit_coefficients_kernel` turns each row's convolution into its coefficients y2 and log lam
  and their prefix sums;
- `fit_bins_kernel` sums those into the binned moments (fit_spectrum.binned_moments), in the
  layout the search reads (triton_fit_search.py): `totals` = [tokens, sum y^2, moments (3, bins)
  row-major], float64.
"""

import math

import triton
import triton.language as tl

from ..fit_spectrum import BIN_TOP, BIN_WIDTH

_BIN_TOP = tl.constexpr(BIN_TOP)
_BIN_WIDTH = tl.constexpr(BIN_WIDTH)


@triton.jit
def _layout_valid(x_row, x_stride, mask_row, mask_stride, n, p, HAS_MASK: tl.constexpr):
    """Which of positions p hold a token (inside the sequence, not masked)."""
    inside = p < n
    if HAS_MASK:
        return ((tl.load(mask_row + p * mask_stride, mask=inside, other=0) << 1) != 0) & inside
    return inside


@triton.jit
def fit_layout_kernel(x_ptr, x_row_stride, x_stride, mask_ptr, mask_row_stride, mask_stride, cu_ptr, cu_step, z_ptr,
                      lengths_ptr, width, x0, HAS_MASK: tl.constexpr, PACKED: tl.constexpr, POSITION: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Grid (sequences,): fit_spectrum.sequences, bitwise (a zero's sign aside). Sequence i is row i of a (B, T) batch,
    or the packed sequence cu_step * i of cu_ptr's offsets (every cu_step-th: a token budget).
    z: (S, width) float32, row i its log-ratios less x0 in order, then 0: in skip mode its valid
    tokens, in position mode its positions up to its last valid one with masked ones as the
    observation 0 (-x0). lengths: (S,) int64. Garbage under the mask is never read; masks as in
    triton_common._load_valid. Two passes over the row: skip mode writes the valid tokens, then
    the zeros after them; position mode finds the last valid token, then writes every position."""
    row = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_ptr + row * cu_step).to(tl.int64)
        n = tl.load(cu_ptr + row * cu_step + 1).to(tl.int64) - start
        x_row = x_ptr + start * x_stride
        mask_row = mask_ptr + start * mask_stride
    else:
        n = width
        x_row = x_ptr + row * x_row_stride
        mask_row = mask_ptr + row * mask_row_stride
    out = z_ptr + row * width
    length = tl.zeros([], dtype=tl.int64)
    for begin in range(0, width, BLOCK):
        p = begin + tl.arange(0, BLOCK).to(tl.int64)
        valid = _layout_valid(x_row, x_stride, mask_row, mask_stride, n, p, HAS_MASK)
        if POSITION:
            length = tl.maximum(length, tl.max(tl.where(valid, p + 1, 0), 0))
        else:
            x = tl.load(x_row + p * x_stride, mask=valid, other=0.0).to(tl.float32) - x0
            tl.store(out + length + tl.cumsum(valid.to(tl.int64), 0) - 1, x, mask=valid)
            length += tl.sum(valid.to(tl.int64), 0)
    for begin in range(0, width, BLOCK):
        p = begin + tl.arange(0, BLOCK).to(tl.int64)
        if POSITION:
            valid = _layout_valid(x_row, x_stride, mask_row, mask_stride, n, p, HAS_MASK)
            x = tl.load(x_row + p * x_stride, mask=valid, other=0.0).to(tl.float32) - x0
            tl.store(out + p, tl.where(valid, x, tl.where(p < length, -x0, 0.0)), mask=p < width)
        else:  # past the valid tokens: positions the first pass never wrote
            tl.store(out + p, tl.zeros([BLOCK], dtype=tl.float32), mask=(p >= length) & (p < width))
    tl.store(lengths_ptr + row, length)


@triton.jit
def _chirp_angle(m, period, DIFFUSE: tl.constexpr):
    """The chirp's angle -pi P(m) / D at lags m (int64): P(m) = 2 m^2 - m, D = 2 (2n + 1) (P0 = 0)
    or P(m) = m^2, D = 2n (diffuse), with P reduced modulo 2D exactly in integers."""
    half = 2 * period  # D
    if DIFFUSE:
        phase = m * m
    else:
        phase = 2 * m * m - m
    reduced = phase % (2 * half)  # phase >= 0
    # the angle in float64, then rounded once to float32 (as the torch transform does)
    return (reduced.to(tl.float64) * (tl.full([], -math.pi, tl.float64) / half.to(tl.float64))).to(tl.float32)


@triton.jit
def _row_shape(lengths_ptr, lengths_stride, row, DIFFUSE: tl.constexpr):
    """(count, period) of a row: its coefficients and the period of its sine basis."""
    n = tl.load(lengths_ptr + row * lengths_stride)
    if DIFFUSE:
        return tl.maximum(n - 1, 0), tl.maximum(n, 1)
    return n, 2 * n + 1


@triton.jit
def fit_chirp_kernel(z_ptr, z_row_stride, z_column_stride, lengths_ptr, lengths_stride, both_ptr, rows, size, inputs,
                     DIFFUSE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, positions / BLOCK). both: (2, rows, size) complex64 as float32 pairs, every
    element written: b = conj(g(m)) at the wrapped lag m of each position, a = x_j g(j + 1) for
    j < inputs (x = z, or its first differences under a diffuse prior, 0 past the row's count)
    and 0 after."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = p < size
    count, period = _row_shape(lengths_ptr, lengths_stride, row, DIFFUSE)
    m = tl.where(p <= size // 2, p, p - size)
    angle = _chirp_angle(m, period, DIFFUSE)
    b_ptr = both_ptr + 2 * ((rows + row) * size + p)
    tl.store(b_ptr, tl.cos(angle), mask=inside)
    tl.store(b_ptr + 1, tl.sin(angle), mask=inside)
    taken = inside & (p < inputs) & (p < count)
    x = tl.load(z_ptr + row * z_row_stride + p * z_column_stride, mask=taken, other=0.0)
    if DIFFUSE:
        x = tl.load(z_ptr + row * z_row_stride + (p + 1) * z_column_stride, mask=taken, other=0.0) - x
    following = _chirp_angle(p + 1, period, DIFFUSE)  # g(j) at j = p + 1 <= inputs <= size / 2: no wrap
    a_ptr = both_ptr + 2 * (row * size + p)
    tl.store(a_ptr, x * tl.cos(following), mask=inside)
    tl.store(a_ptr + 1, -(x * tl.sin(following)), mask=inside)


@triton.jit
def fit_coefficients_kernel(conv_ptr, lengths_ptr, lengths_stride, prefix_ptr, rows, size, outputs, scale,
                            DIFFUSE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows,). conv: (rows, size) complex64 as float32 pairs, `size` times the circular
    convolution. Per coefficient k = 1..outputs: y = Im(conv_k g(k)), lam_k = 4 sin^2(nu_k pi /
    (2 period)) (nu = 2k - 1; diffuse k), y2 = y^2 scale / period (times lam for P0 = 0; 0 past the
    row's count), L = log lam. prefix: (3, rows, outputs + 1) float64, the prefix sums of y2,
    y2 L and y2 L^2 over k (prefix[:, row, 0] = 0)."""
    row = tl.program_id(0).to(tl.int64)
    count, period = _row_shape(lengths_ptr, lengths_stride, row, DIFFUSE)
    norm = scale / period.to(tl.float32)
    step = 1.5707963267948966 / period.to(tl.float32)
    carry0 = tl.zeros([], dtype=tl.float64)
    carry1 = tl.zeros([], dtype=tl.float64)
    carry2 = tl.zeros([], dtype=tl.float64)
    plane = tl.cast(rows, tl.int64) * (outputs + 1)  # int64: rows x (outputs + 1) may pass 2^30
    out = prefix_ptr + row * (outputs + 1)
    tl.store(out, 0.0)
    tl.store(out + plane, 0.0)
    tl.store(out + 2 * plane, 0.0)
    for start in range(0, outputs, BLOCK):
        k = start + 1 + tl.arange(0, BLOCK).to(tl.int64)
        inside = k <= outputs
        real = tl.load(conv_ptr + 2 * (row * size + k - 1), mask=inside, other=0.0)
        imaginary = tl.load(conv_ptr + 2 * (row * size + k - 1) + 1, mask=inside, other=0.0)
        angle = _chirp_angle(k, period, DIFFUSE)
        coefficient = imaginary * tl.cos(angle) - real * tl.sin(angle)
        if DIFFUSE:
            nu = k.to(tl.float32)
        else:
            nu = (2 * k - 1).to(tl.float32)
        sine = tl.sin(nu * step)
        lam = tl.maximum(sine * sine * 4.0, 1.1754943508222875e-38)  # finite log lam past the count
        y2 = coefficient * coefficient * norm
        if not DIFFUSE:
            y2 = y2 * lam
        y2 = tl.where(inside & (k <= count), y2, 0.0).to(tl.float64)
        log_lam = tl.log(lam.to(tl.float64))
        first = y2 * log_lam
        second = first * log_lam
        sums0 = tl.cumsum(y2, 0) + carry0
        sums1 = tl.cumsum(first, 0) + carry1
        sums2 = tl.cumsum(second, 0) + carry2
        tl.store(out + k, sums0, mask=inside)
        tl.store(out + plane + k, sums1, mask=inside)
        tl.store(out + 2 * plane + k, sums2, mask=inside)
        carry0 = carry0 + tl.sum(y2, 0)
        carry1 = carry1 + tl.sum(first, 0)
        carry2 = carry2 + tl.sum(second, 0)


@triton.jit
def fit_bins_kernel(prefix_ptr, edges_ptr, lengths_ptr, lengths_stride, totals_ptr, finished_ptr, rows, outputs, bins,
                    DIFFUSE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (bins / BLOCK,). Bin b covers log lam in (TOP - (b + 1) W, TOP - b W] and holds a
    run of each row's coefficients (lam rises with k): k in (K_{b+1}, K_b], K_0 the count,
    K_bins = 0 (the last bin takes every smaller lam), K_i the number of nu_k <= 2 period
    edges[i - 1] / pi (edges: the half angles asin(exp(e_i / 2) / 2) of the bin edges
    e_i = TOP - i W, i = 1..bins - 1). Its sums of y2 L^p are prefix differences, summed over the
    rows in order, then moved to the bin's centre c: totals[2 + p * bins + b] = sum y2 (L - c)^p.
    Program 0 also writes totals[0] (the coefficients: tokens in the likelihood) and totals[1]
    (the sum of every y2), and zeroes the search's counter `finished` (int32; the search runs
    after this kernel in the stream: its memset saved)."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = b < bins
    upper = tl.load(edges_ptr + b - 1, mask=inside & (b >= 1), other=0.0)
    lower = tl.load(edges_ptr + b, mask=inside & (b + 1 < bins), other=0.0)
    sums0 = tl.zeros([BLOCK], dtype=tl.float64)
    sums1 = tl.zeros([BLOCK], dtype=tl.float64)
    sums2 = tl.zeros([BLOCK], dtype=tl.float64)
    plane = tl.cast(rows, tl.int64) * (outputs + 1)  # int64: rows x (outputs + 1) may pass 2^30
    two_over_pi = tl.full([], 2.0 / math.pi, tl.float64)
    for row in range(0, rows):
        count, period = _row_shape(lengths_ptr, lengths_stride, row, DIFFUSE)
        count = tl.minimum(count, outputs)
        span = period.to(tl.float64)
        if DIFFUSE:  # nu_k = k <= 2 period edge / pi, rounded as fit_spectrum._sums_by_runs
            end_upper = tl.floor(upper * two_over_pi * span)
            end_lower = tl.floor(lower * two_over_pi * span)
        else:  # nu_k = 2k - 1
            end_upper = tl.floor((upper * two_over_pi * span + 1.0) * 0.5)
            end_lower = tl.floor((lower * two_over_pi * span + 1.0) * 0.5)
        end_upper = tl.where(b == 0, count, tl.maximum(tl.minimum(end_upper, count.to(tl.float64)), 0.0).to(tl.int64))
        end_lower = tl.where(b + 1 >= bins, 0, tl.maximum(tl.minimum(end_lower, count.to(tl.float64)), 0.0).to(tl.int64))
        base = prefix_ptr + tl.cast(row, tl.int64) * (outputs + 1)
        sums0 += tl.load(base + end_upper, mask=inside, other=0.0) - tl.load(base + end_lower, mask=inside, other=0.0)
        sums1 += tl.load(base + plane + end_upper, mask=inside, other=0.0) - tl.load(base + plane + end_lower, mask=inside, other=0.0)
        sums2 += (tl.load(base + 2 * plane + end_upper, mask=inside, other=0.0)
                  - tl.load(base + 2 * plane + end_lower, mask=inside, other=0.0))
    top, width = tl.full([], _BIN_TOP, tl.float64), tl.full([], _BIN_WIDTH, tl.float64)
    centre = top - (b.to(tl.float64) + 0.5) * width
    tl.store(totals_ptr + 2 + b, sums0, mask=inside)
    tl.store(totals_ptr + 2 + bins + b, sums1 - centre * sums0, mask=inside)
    tl.store(totals_ptr + 2 + 2 * bins + b, sums2 - 2.0 * centre * sums1 + centre * centre * sums0, mask=inside)
    if tl.program_id(0) == 0:
        tokens = tl.zeros([], dtype=tl.int64)
        total = tl.zeros([], dtype=tl.float64)
        for row in range(0, rows):
            count, period = _row_shape(lengths_ptr, lengths_stride, row, DIFFUSE)
            tokens += count
            total += tl.load(prefix_ptr + tl.cast(row, tl.int64) * (outputs + 1) + tl.minimum(count, outputs))
        tl.store(totals_ptr, tokens.to(tl.float64))
        tl.store(totals_ptr + 1, total)
        tl.store(finished_ptr, 0)
