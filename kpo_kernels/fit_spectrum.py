"""The sine transform behind `estimate_noise` (kpo_kernels/fitting.py explains the model): each
sequence's coefficients y_k and eigenvalues lam_k, the closed-form log-determinant of each
sequence's covariance, and the binned moments the search evaluates the profile from.

Precision: float64 log-ratios are transformed in complex128 (the profile then agrees with
`fit_noise` to ~1e-12); any other dtype (float32, bf16, fp16) in complex64, about 4 times
cheaper on a CPU, whose coefficients carry ~1e-6 relative error: the inputs' own precision
(float32 or less). Whatever the transform's precision, the sums the fit uses (the binned moments,
the exact profile at the chosen ratio) are accumulated in float64.
"""

import functools
import math
import threading

import torch
import torch.nn.functional as F

BIN_WIDTH = 0.02  # in log lam: a second-order expansion about the centre is good to ~1e-8 relative
BIN_TOP = math.log(4.0) + 1e-9  # lam = 4 sin^2(...) <= 4: bin i covers log lam in (TOP - (i + 1) W, TOP - i W]
MAX_BINS = 4096  # down to lam = 4 e^-82: any length; used whole under a process group (same shape on every rank)


def sequences(log_ratio, mask, cu_seqlens, mask_mode, x0):
    """(z, n): (S, T) log-ratios less x0 (float64 for float64 input, else float32), each
    sequence's tokens first, 0 after them; n (S,) int64."""
    device = log_ratio.device
    real = torch.float64 if log_ratio.dtype == torch.float64 else torch.float32
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
    z = log_ratio.to(real)
    z = torch.where(valid, z - x0 if x0 else z, 0.0)
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
    compact = torch.zeros(rows, width + 1, dtype=real, device=device)
    compact.scatter_(1, slot, z)  # masked tokens all land in the extra column, as zeros
    return compact[:, :width], lengths


@functools.lru_cache(maxsize=4096)  # host arithmetic, called per row of a batch (CPU buckets)
def fft_length(needed):
    """The smallest 3^a 5^b 2^c at least `needed` with c >= 4 (fast FFT sizes; pocketfft is
    about as fast per point on these as on powers of 2, 1.7 times slower on 5^5)."""
    best, five = max(1 << max(needed - 1, 0).bit_length(), 16), 1
    while five < best:
        odd = five
        while odd < best:
            shift = 4
            while odd << shift < needed:
                shift += 1
            best, odd = min(best, odd << shift), odd * 3
        five *= 5
    return best


BUCKET_COST = 32_000  # one more bucket (its transform, its binning) costs about this many (row, FFT position) pairs of work


def buckets(lengths, width, diffuse):
    """[(rows or None, columns)]: the transform runs once per bucket on `rows` (an index tensor;
    None: every row) and their first `columns` tokens, with an FFT length fitted to the bucket's
    longest row. On the CPU (lengths are host data: no synchronisation) rows whose FFT lengths
    differ are grouped so as to minimise rows x FFT length plus BUCKET_COST per bucket; elsewhere
    one bucket of every row (no host read of the lengths)."""
    if lengths.device.type != "cpu" or lengths.numel() < 2:
        return [(None, width)]
    order = torch.argsort(lengths)
    sorted_lengths = lengths[order].tolist()
    groups = {}  # FFT length -> (first, end) in the sorted order
    for place, n in enumerate(sorted_lengths):
        size = fft_length(2 * max(n - 1 if diffuse else n, 1))
        first = groups.get(size, (place, place))[0]
        groups[size] = (first, place + 1)
    sizes = sorted(groups)
    # best[i]: the cheapest split of the groups before i; a bucket takes groups j..i - 1 at sizes[i - 1]
    best, cut = [0.0] + [math.inf] * len(sizes), [0] * (len(sizes) + 1)
    for i in range(1, len(sizes) + 1):
        for j in range(i):
            cost = best[j] + (groups[sizes[i - 1]][1] - groups[sizes[j]][0]) * sizes[i - 1] + BUCKET_COST
            if cost < best[i]:
                best[i], cut[i] = cost, j
    plan, i = [], len(sizes)
    while i > 0:
        first, end = groups[sizes[cut[i]]][0], groups[sizes[i - 1]][1]
        plan.append((None if end - first == len(sorted_lengths) else order[first:end], max(sorted_lengths[end - 1], 1)))
        i = cut[i]
    return plan


def spectral_sums(z, lengths, *, diffuse, bins, keep):
    """The transform over all rows, bucket by bucket (`buckets`): (y2_total, moments, y2, lam):
    the sum of every y2 (float64, 0-dim), the binned moments (3, bins), and when `keep` every
    coefficient's y2 and lam (flat), else None and None."""
    total, moments, kept = 0.0, 0.0, []
    for rows, columns in buckets(lengths, z.shape[1], diffuse):
        block, block_lengths = (z, lengths) if rows is None else (z[rows, :columns], lengths[rows])
        y2, lam, count = spectrum(block, block_lengths, diffuse=diffuse)
        sums = binned_moments(y2, lam, count, block_lengths, bins, diffuse=diffuse)
        total = total + sums[0].sum()
        moments = moments + sums
        if keep:
            kept.append((y2.reshape(-1), lam.reshape(-1)))
    y2, lam = (torch.cat(items) for items in zip(*kept)) if keep else (None, None)
    return total, moments, y2, lam


def spectrum(z, lengths, *, diffuse):
    """(y2, lam, count): per coefficient y^2 lam^beta in float64 (beta = 1 for P0 = 0, 0 diffuse;
    0 past a sequence's count) and lam in z's dtype (1 past the count); count (S,) coefficients
    per sequence.
    Coefficient k's variance is R (lam_k + q) / lam_k^beta.

    P0 = 0: y_k = Im F_k sqrt(4 / N), F_k = sum_j z_j exp(i pi (2k - 1) j / N), N = 2n + 1,
    k, j = 1..n. Diffuse: the first differences x_j = z_{j+1} - z_j, j = 1..n - 1, and
    F_k = sum_j x_j exp(i pi k j / n), y_k = Im F_k sqrt(2 / n). Both by Bluestein with one chirp
    per row, g(m) = exp(i pi P(m) / D) (P = 2 m^2 - m, D = 2N; diffuse P = m^2, D = 2n): the phase
    is g(k) g(j) conj(g(k - j)), since (2k - 1) j = G(k) + G(j) - G(k - j) for G(m) = m^2 - m / 2
    (and 2 k j = k^2 + j^2 - (k - j)^2), so F is one circular convolution of length M >= 2T
    (three FFTs, the first two in one call), whatever each row's length, no host synchronisation.
    """
    rows, width = z.shape
    device, real = z.device, z.dtype
    if diffuse:
        period, count = lengths.clamp(min=1), (lengths - 1).clamp(min=0)
        x = z[:, 1:] - z[:, :-1]  # x_j at column j - 1; the difference across a row's end is masked
        x = torch.where(torch.arange(max(width - 1, 0), device=device)[None, :] < count[:, None], x, 0.0)
    else:
        count, period = lengths, 2 * lengths + 1
        x = z
    inputs = outputs = x.shape[1]  # j, k = 1..inputs (past a row's count they are masked)
    if inputs == 0 or rows == 0:  # no coefficients at all
        empty = torch.zeros(rows, 0, dtype=torch.float64, device=device)
        return empty, empty + 1.0, count
    size = fft_length(2 * inputs)
    half = 2 * period  # D
    complex_dtype = torch.complex64 if real == torch.float32 else torch.complex128
    both = _workspace((rows, size, inputs), complex_dtype, device)  # a, b
    parts = torch.view_as_real(both)
    # one chirp per row, g(m) = exp(i pi P(m) / D), at the wrapped lags m of the positions 0..size - 1;
    # the phase P(m) / D reduced modulo 2: exactly in integers for float64 data; otherwise in turns,
    # P / (2D) in float64 less its integer part (~1e-11 for any length, far below float32's
    # rounding of the angle, and 7 times cheaper than the integer remainder on a CPU)
    phase = _chirp_phase(size, diffuse, device)
    if real == torch.float64:
        angle = torch.remainder(phase[None, :], 2 * half[:, None]).to(real).mul_((-math.pi / half.to(real))[:, None])
    else:
        turns = torch.mul(phase.to(torch.float64)[None, :], (0.5 / half.to(torch.float64))[:, None]).frac_()
        angle = torch.mul(turns, -2.0 * math.pi, out=torch.empty(turns.shape, dtype=real, device=device))
    torch.cos(angle, out=parts[1, ..., 0])
    torch.sin(angle, out=parts[1, ..., 1])  # b = conj(g)
    cosine, sine = parts[1, :, 1 : inputs + 1, 0], parts[1, :, 1 : inputs + 1, 1]  # g(j) = cosine - i sine
    torch.mul(both[1, :, 1 : inputs + 1].conj(), x, out=both[0, :, :inputs])  # a = x g
    spectra = torch.fft.fft(both)
    conv = torch.fft.ifft(spectra[0].mul_(spectra[1]), norm="forward")  # size times the circular convolution
    conv = torch.view_as_real(conv)[:, :outputs]
    coefficient = (conv[..., 1] * cosine).addcmul_(conv[..., 0], sine, value=-1.0)  # Im(conv g(k))
    # lam_k = 4 sin^2(half angle): (2k - 1) pi / (2N) for P0 = 0, k pi / (2n) diffuse
    k, numerator = _coefficient_numerators(outputs, diffuse, real, device)
    lam = torch.sin(numerator[None, :] * (math.pi / 2 / period.to(real))[:, None]).square_().mul_(4.0)
    lam.clamp_(min=torch.finfo(real).tiny)  # past a row's count (y2 = 0 there) lam may round to 0: keep log lam finite
    norm = (((2.0 if diffuse else 4.0) / float(size) ** 2) / period.to(torch.float64)).to(real)
    scale = (k[None, :] <= count[:, None]).to(real).mul_(norm[:, None])  # 0 past a row's count
    if not diffuse:
        scale.mul_(lam)
    return coefficient.square_().mul_(scale).to(torch.float64), lam, count


CACHED_POSITIONS = 1 << 18  # the CPU caches below keep tables of at most this many positions (2 MiB of int64)


def _wrapped_phase(size, diffuse, device):
    position = torch.arange(size, device=device)
    m = torch.where(position <= size // 2, position, position - size)
    return m * m if diffuse else 2 * m * m - m


@functools.lru_cache(maxsize=8)
def _cpu_phase(size, diffuse):
    return _wrapped_phase(size, diffuse, torch.device("cpu"))


def _chirp_phase(size, diffuse, device):
    """P(m) at the wrapped lags m of the positions 0..size - 1 (int64): m^2 diffuse, else 2 m^2 - m.
    Cached on the CPU for sizes up to CACHED_POSITIONS (shared, never written)."""
    if device.type == "cpu" and size <= CACHED_POSITIONS:
        return _cpu_phase(size, diffuse)
    return _wrapped_phase(size, diffuse, device)


_NUMERATORS = {}  # (diffuse, dtype) -> (k, numerator) for the longest width asked for so far on the CPU


def _coefficient_numerators(outputs, diffuse, real, device):
    """(k, k or 2k - 1 in `real`), k = 1..outputs: the coefficients' indices and their half
    angles' numerators. On the CPU slices of one table per prior and dtype, grown as needed up
    to CACHED_POSITIONS (shared, never written: a thread replaces it, never changes it)."""
    cpu = device.type == "cpu" and outputs <= CACHED_POSITIONS
    table = _NUMERATORS.get((diffuse, real)) if cpu else None
    if table is None or table[0].shape[0] < outputs:
        width = min(max(outputs, 2 * table[0].shape[0] if table is not None else 0), CACHED_POSITIONS) if cpu else outputs
        k = torch.arange(1, width + 1, device=torch.device("cpu") if cpu else device)
        table = (k, (k if diffuse else 2 * k - 1).to(real))
        if cpu:
            _NUMERATORS[(diffuse, real)] = table
    return table[0][:outputs], table[1][:outputs]


_LAST = threading.local()


def _workspace(key, dtype, device):
    """a and b (2, rows, size), a zero past its inputs. On the CPU a view of one buffer per
    thread, grown as needed and reused by every bucket and call (a fresh multi-megabyte tensor
    costs page faults worth a few passes over it); elsewhere the allocator caches. The FFTs get
    no `out=`: torch's CPU FFT writes a fresh tensor and copies it into `out`."""
    rows, size, inputs = key
    if device.type != "cpu":
        return torch.zeros((2, rows, size), dtype=dtype, device=device)
    need = 2 * rows * size
    flat = getattr(_LAST, "buffers", {}).get(dtype)
    if flat is None or flat.numel() < need:
        flat = torch.empty(need, dtype=dtype, device="cpu")
        _LAST.buffers = {**getattr(_LAST, "buffers", {}), dtype: flat}
    both = flat[:need].view(2, rows, size)
    both[0, :, inputs:].zero_()
    return both


def bin_count(width, group):
    """Bins from the top down to the smallest lam of a sequence of `width` tokens (all of
    MAX_BINS under a process group, so that every rank's bins have the same shape)."""
    if group is not None:
        return MAX_BINS
    smallest = 4.0 * math.sin(math.pi / (2 * (2 * max(width, 1) + 1))) ** 2
    return min(int((BIN_TOP - math.log(smallest)) / BIN_WIDTH) + 2, MAX_BINS)


def binned_moments(y2, lam, count, lengths, bins, *, diffuse):
    """(3, bins) float64: per bin of log lam, the sums of y2, y2 v and y2 v^2, v = log lam less
    the bin's centre. A second-order expansion of each coefficient's 1 / (lam + q) about its
    bin's centre then gives the quadratic part of the profile at any q from 3 x bins numbers.

    lam_k rises with k in every row, so each bin holds a run of consecutive coefficients of a
    row: the run's ends come from inverting lam_k = 4 sin^2(nu_k pi / (2 p)) at the bin edges
    (per row and edge, not per coefficient), and its sums from prefix sums of y2 L^0..2,
    L = log lam (float64), then shifted to the bin's centre. That costs rows x bins: when the
    rows are shorter than the bins their lengths need (many short rows, or every bin under a
    process group), each coefficient goes to its bin instead (rows x width)."""
    rows, width = y2.shape
    device = y2.device
    log_lam = torch.log(lam.to(torch.float64))
    needed = min(bins, bin_count(width, None))  # no coefficient of these rows lies below these bins
    centre = BIN_TOP - (torch.arange(needed, device=device, dtype=torch.float64) + 0.5) * BIN_WIDTH
    if needed > width:
        sums = _sums_by_coefficient(y2, log_lam, needed)
    else:
        sums = _sums_by_runs(y2, log_lam, count, lengths, needed, diffuse)
    first = sums[1] - centre * sums[0]  # sum y2 (L - c)
    second = sums[2] - 2.0 * centre * sums[1] + centre.square() * sums[0]  # sum y2 (L - c)^2
    return F.pad(torch.stack([sums[0], first, second]), (0, bins - needed))


def _sums_by_runs(y2, log_lam, count, lengths, bins, diffuse):
    """(3, bins): per bin the sums of y2 L^p, p = 0, 1, 2, from each row's runs (binned_moments)."""
    rows, width = y2.shape
    device = y2.device
    powers = torch.empty(3, rows, width + 1, dtype=torch.float64, device=device)
    powers[:, :, 0] = 0.0
    powers[0, :, 1:] = y2
    torch.mul(y2, log_lam, out=powers[1, :, 1:])
    torch.mul(powers[1, :, 1:], log_lam, out=powers[2, :, 1:])
    prefix = powers.cumsum_(2)  # prefix[:, :, K] sums coefficients 1..K
    # K_i: coefficients with log lam <= edge e_i = TOP - i W, i = 0..bins (K_0 = all, K_bins = none:
    # the last bin also takes every smaller lam, as a clamp would)
    half_angle = _cpu_half_angles(bins) if device.type == "cpu" else edge_half_angles(bins, device)
    period = (lengths.clamp(min=1) if diffuse else 2 * lengths + 1).to(torch.float64)
    nu = half_angle[None, :] * (2.0 / math.pi) * period[:, None]  # nu_k <= this
    below = nu.floor_() if diffuse else nu.add_(1.0).mul_(0.5).floor_()
    below = torch.minimum(below, count[:, None].to(torch.float64)).clamp_(min=0.0).long()
    ends = torch.cat([count[:, None].clamp(min=0, max=width), below, torch.zeros_like(count)[:, None]], 1)
    at = prefix.gather(2, ends[None].expand(3, rows, bins + 1))  # (3, rows, bins + 1)
    return (at[..., :-1] - at[..., 1:]).sum(1)


def edge_half_angles(bins, device):
    """asin(exp(e_i / 2) / 2) at the bin edges e_i = TOP - i W, i = 1..bins - 1 (float64): lam <=
    e^e_i exactly where the coefficient's half angle is at most this."""
    edges = BIN_TOP - torch.arange(1, bins, device=device, dtype=torch.float64) * BIN_WIDTH
    return torch.asin(torch.exp(0.5 * edges).mul_(0.5).clamp_(max=1.0))


@functools.lru_cache(maxsize=16)
def _cpu_half_angles(bins):  # shared, never written: a few operations fewer per bucket on the CPU
    return edge_half_angles(bins, torch.device("cpu"))


def _sums_by_coefficient(y2, log_lam, bins):
    """(3, bins): the same sums with each coefficient put in its bin (y2 is 0 past a row's count).
    index_add_, not bincount: bincount sizes its result from the largest index, a host read on CUDA."""
    log_lam = log_lam.reshape(-1)
    index = torch.floor((BIN_TOP - log_lam) / BIN_WIDTH).clamp_(0, bins - 1).long()
    y2 = y2.reshape(-1)
    y2_log = y2 * log_lam
    weights = torch.stack([y2, y2_log, y2_log * log_lam])
    return torch.zeros(3, bins, dtype=torch.float64, device=y2.device).index_add_(1, index, weights)


def bin_centres(bins, device):
    return torch.exp(BIN_TOP - (torch.arange(bins, device=device, dtype=torch.float64) + 0.5) * BIN_WIDTH)


def quadratic_coefficients(moments, centre):
    """(3, bins): the binned quadratic as a polynomial in w = 1 / (c + q) per bin,
    sum over bins of w (a - w (b - w d)): with s = c w the expansion
    (m0 - s m1 + s (2s - 1) m2 / 2) w is m0 w - c (m1 + m2 / 2) w^2 + c^2 m2 w^3."""
    return torch.stack([moments[0], centre * (moments[1] + 0.5 * moments[2]), centre.square() * moments[2]])


def binned_quadratic(coefficients, centre, q):
    """sum of y2 / (lam + q) for each ratio of q (G,), from `quadratic_coefficients`: (G,)."""
    w = torch.add(centre[None, :], q[:, None]).reciprocal_()
    inner = torch.addcmul(coefficients[1], w, coefficients[2], value=-1.0)  # b - w d
    return torch.addcmul(coefficients[0], w, inner, value=-1.0).mul_(w).sum(-1)


class LogDeterminant:
    """sum over sequences of log det(I + q M) (P0 = 0; M_ij = min(i, j)) or of
    log det(q I + D) (diffuse; D the (n - 1)-dimensional (2, -1) second difference), for each
    ratio of q (G,): (G,). With 2 + q = 2 cosh(phi) the tridiagonal recurrences give
    cosh((n + 1/2) phi) / cosh(phi / 2) and sinh(n phi) / sinh(phi) per sequence; summed over
    the S sequences, P0 = 0:  phi sum(n) + sum log1p(e^-(2n + 1) phi) - S log1p(e^-phi);
    diffuse (n >= 1):        phi sum(n - 1) + sum log(-expm1(-2 n phi)) - S log(-expm1(-2 phi)).
    What depends on the lengths alone is made once."""

    def __init__(self, lengths, *, diffuse):
        n = lengths.to(torch.float64)
        if diffuse:
            n = n.clamp(min=1.0)  # one token or none: no differences, log det 0
            rate, shared_rate, self.linear = -2.0 * n, -2.0, (n - 1.0).sum()
        else:
            rate, shared_rate, self.linear = -(2.0 * n + 1.0), -1.0, n.sum()
        # the per-sequence terms (weight 1) and the shared one (weight -S) as one product
        self.rate = F.pad(rate, (0, 1), value=shared_rate)
        self.weight = F.pad(torch.ones_like(rate), (0, 1), value=-float(rate.shape[0]))
        self.diffuse = diffuse

    def __call__(self, q):
        phi = torch.asinh(torch.sqrt(q).mul_(0.5)).mul_(2.0)
        terms = torch.outer(phi, self.rate)
        terms = terms.expm1_().neg_().log_() if self.diffuse else terms.exp_().log1p_()
        return torch.addmv(phi * self.linear, terms, self.weight)
