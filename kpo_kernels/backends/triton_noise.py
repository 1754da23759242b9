"""The Triton backend's noise fit (`estimate_noise` on the Triton backend): the launches of the
kernels of triton_fit_transform.py and triton_fit_search.py, mixed into `TritonBackend` as `NoiseFitLaunch`.

One micro-batch's fit: `fit_layout_kernel`, `fit_chirp_kernel`, torch's FFT, product and inverse
FFT (cuFFT on a GPU), `fit_coefficients_kernel`, `fit_bins_kernel` (the float64 sums the fit
needs, in the layout of fit_search: `totals`; it also zeroes the search's counter) and
`noise_search_kernel`: eight launches (nine, and two all-reduces, under a process group), where
the torch operations take some 330 to 440. Nothing is read back on the host but a packed batch's
longest length.
"""

import collections
import math
import threading

import torch

from .. import tables
from ..fit_search import NoiseEstimate, all_reduce
from ..fit_spectrum import bin_centres, edge_half_angles, fft_length
from .triton_launch import INTERPRETED, float64_parts, float64_parts_fit, kernels

# The noise search on the Triton backend: the binned profile at SEARCH_POINTS ratios evenly spaced
# in log q (0.0135 apart over q_range's default 12 decades: Q/R within 0.7% of the grid's best),
# SEARCH_RATIOS a program (256 programs of 4 warps: two an SM of an H100/H200, which the model
# of benchmarks/fit_model.py put ahead of 128 x 16 ratios and of 8 warps), then the best point.
SEARCH_POINTS, SEARCH_RATIOS, SEARCH_WARPS = 2048, 8, 4
if INTERPRETED:  # the same points and values in fewer, wider programs: numpy's cost is per operation
    SEARCH_RATIOS = 256
SEARCH_BINS, SEARCH_SEQUENCES, SEARCH_FINISH = 64, 32, 512  # per step of its loops
# The search's float64 reciprocals start from float32's 1 / (c + q), which a GPU's div.full.f32
# returns as 0 for divisors above 2^126 (the interpreter does not): larger ratios take the torch search.
SEARCH_HIGHEST = 1e30
TRANSFORM_BLOCK = 1024  # positions or coefficients a program step of the transform's kernels
BIN_BLOCK = 128  # bins a program of fit_bins_kernel


_SIZED = collections.OrderedDict()  # (what, bins, device) -> float64 tensor: _edge_angles and _centres
_SIZED_PINNED = set()  # keys a CUDA-graph capture read: never evicted (a graph holds no reference to its inputs)
_SIZED_MOST = 64  # unpinned entries kept
_SIZED_LOCK = threading.Lock()


def _per_size(what, bins, device, build):
    """build(), cached per (what, bins, device). Not while `device`'s stream is captured into a
    CUDA graph: what a capture builds is the graph's own (its operations rerun at each replay; its
    memory the graph's pool), so an eager call must not find it; and an entry a capture reads is
    pinned, since the graph will read it at every replay."""
    key = (what, bins, tables.canonical_device(device))
    captured = tables.capturing(key[2])
    with _SIZED_LOCK:
        found = _SIZED.get(key)
        if found is not None:
            _SIZED.move_to_end(key)
            if captured:
                _SIZED_PINNED.add(key)
            return found
    built = build()
    if not captured:
        with _SIZED_LOCK:
            _SIZED[key] = built
            unpinned = [k for k in _SIZED if k not in _SIZED_PINNED]  # oldest first
            for old in unpinned[: max(len(unpinned) - _SIZED_MOST, 0)]:
                del _SIZED[old]
    return built


def _edge_angles(bins, device):
    """fit_spectrum.edge_half_angles (at least one edge: the kernel reads one even for a single
    bin), made on `device` by torch once per size, then cached: no host copy."""
    return _per_size("edge angles", bins, device, lambda: edge_half_angles(max(bins, 2), device))


def _centres(bins, device):
    """The bins' centres in lam (fit_spectrum.bin_centres: the reference's own numbers), cached."""
    return _per_size("centres", bins, device, lambda: bin_centres(bins, device))


def _search_grid(low, high, diffuse, device):
    """(3, SEARCH_POINTS) float64 on `device`: the search's ratios q, SEARCH_POINTS evenly spaced
    in log q from log(low) to log(high) (both ends exact in log q), their phi = 2 asinh(sqrt(q) / 2)
    and the part of a sequence's log-determinant that depends on q alone (log 2 + log cosh(phi / 2)
    under P0 = 0, log(-expm1(-2 phi)) diffuse: triton_fit_search._log_determinant); made by torch
    once per q_range and prior, then cached (_per_size), so that no program of the search
    evaluates a float64 exp or log for them."""
    lower, upper = math.log(low), math.log(high)

    def build():
        u = lower + (upper - lower) * (torch.arange(SEARCH_POINTS, dtype=torch.float64, device=device) / (SEARCH_POINTS - 1))
        u[-1] = upper  # a fill: nothing copied from the host (the grid may be built while a CUDA graph is captured)
        q = torch.exp(u)
        phi = 2.0 * torch.asinh(0.5 * torch.sqrt(q))
        constant = torch.log(-torch.expm1(-2.0 * phi)) if diffuse else 0.5 * phi + torch.log1p(torch.exp(-phi))
        return torch.stack([q, phi, constant])

    return _per_size("search grid", (lower, upper, diffuse), device, build)


def _search_parts(low, high, fallback):
    """The search's float64 settings as float32 parts (triton_launch.float64_parts), or None where
    the parts cannot carry one exactly or the ratio may pass SEARCH_HIGHEST."""
    settings = (low, high, *fallback)
    if high > SEARCH_HIGHEST or not all(float64_parts_fit(value) for value in settings):
        return None
    return [part for value in settings for part in float64_parts(value)]


class NoiseFitLaunch:
    """`Backend.noise_layout` and `Backend.noise_fit` on Triton kernels."""

    def noise_layout(self, log_ratio, mask, cu_seqlens, mask_mode, x0, max_tokens):
        """fit_spectrum.sequences in one kernel (triton_fit_transform.fit_layout_kernel), the packed budget
        included (every k-th sequence); log-ratios of any float dtype but float64."""
        device = log_ratio.device
        mask = self._mask(mask)
        packed = cu_seqlens is not None
        if packed:
            sequences = cu_seqlens.shape[0] - 1
            span = (cu_seqlens[1:] - cu_seqlens[:-1]).max() if sequences else None
            width = max(int(span), 1) if sequences else 1  # the one host read of a packed batch (as sequences)
            step = -(-sequences * width // max_tokens) if max_tokens is not None and sequences * width > max_tokens else 1
            rows = -(-sequences // step)
        else:
            rows, width = log_ratio.shape
            step = 1
        z = self._empty((rows, width), torch.float32, device)
        lengths = self._empty((rows,), torch.int64, device)
        if rows == 0:
            return z, lengths
        x_strides = (0, log_ratio.stride(0)) if packed else (log_ratio.stride(0), log_ratio.stride(1))
        mask_strides = (0, 0) if mask is None else (0, mask.stride(0)) if packed else (mask.stride(0), mask.stride(1))
        kernels.fit_layout_kernel[(rows,)](
            log_ratio, *x_strides, log_ratio if mask is None else mask, *mask_strides,
            cu_seqlens if packed else lengths, step, z, lengths, width, x0,
            HAS_MASK=mask is not None, PACKED=packed, POSITION=mask_mode == "position", BLOCK=TRANSFORM_BLOCK,
            num_warps=4,
        )
        return z, lengths

    def noise_fit(self, z, lengths, *, diffuse, bins, low, high, min_tokens, fallback, group):
        """The transform (noise_moments), its sums all-reduced over `group`, then the search
        (noise_search); None (the torch transform and search) for settings the search's float32
        parts cannot carry exactly and for ratios above SEARCH_HIGHEST: alike on every rank."""
        parts = _search_parts(low, high, fallback)
        if parts is None:
            return None
        totals, finished = self.noise_moments(z, lengths, diffuse=diffuse, bins=bins)
        grid = _search_grid(low, high, diffuse, z.device)
        return self.noise_search(all_reduce(totals, group), lengths, diffuse=diffuse, parts=parts, min_tokens=min_tokens,
                                 group=group, finished=finished, grid=grid)

    def noise_moments(self, z, lengths, *, diffuse, bins):
        """The transform and its binned moments (fit_spectrum.spectral_sums, one bucket of
        every row): (totals, finished), the float64 (2 + 3 bins,) `totals` of fit_search and the
        search's int32 counter (1,), zeroed in stream order by the bins kernel."""
        rows, width = z.shape
        device = z.device
        inputs = max(width - 1, 0) if diffuse else width
        totals = self._empty((2 + 3 * bins,), torch.float64, device)
        finished = self._empty((1,), torch.int32, device)
        if rows == 0 or inputs == 0:  # no coefficient at all: the fallback statuses follow from zeros
            return totals.zero_(), finished.zero_()
        size = fft_length(2 * inputs)
        both = self._empty((2, rows, size), torch.complex64, device)
        grid = (rows, -(-size // TRANSFORM_BLOCK))
        kernels.fit_chirp_kernel[grid](
            z, z.stride(0), z.stride(1), lengths, lengths.stride(0), torch.view_as_real(both), rows, size, inputs,
            DIFFUSE=diffuse, BLOCK=TRANSFORM_BLOCK, num_warps=4,
        )
        spectra = torch.fft.fft(both)
        conv = torch.fft.ifft(spectra[0].mul_(spectra[1]), norm="forward")  # size times the circular convolution
        prefix = self._empty((3, rows, inputs + 1), torch.float64, device)
        scale = (2.0 if diffuse else 4.0) / float(size) ** 2
        kernels.fit_coefficients_kernel[(rows,)](
            torch.view_as_real(conv), lengths, lengths.stride(0), prefix, rows, size, inputs, scale,
            DIFFUSE=diffuse, BLOCK=TRANSFORM_BLOCK, num_warps=4,
        )
        kernels.fit_bins_kernel[(-(-bins // BIN_BLOCK),)](
            prefix, _edge_angles(bins, device), lengths, lengths.stride(0), totals, finished, rows, inputs, bins,
            DIFFUSE=diffuse, BLOCK=BIN_BLOCK, num_warps=4,
        )
        return totals, finished

    def noise_search(self, totals, lengths, *, diffuse, parts, min_tokens, group, finished, grid):
        """The search on a dense grid in one launch (triton_fit_search.noise_search_kernel) from
        `totals` (summed over `group`), `parts` (_search_parts), a zeroed int32 counter
        `finished` and the grid's points (_search_grid); under a process group the
        log-determinants at the grid's points first (fit_log_determinant_kernel) and one
        all-reduce of them."""
        device = totals.device
        bins = (totals.shape[0] - 2) // 3
        programs = (SEARCH_POINTS // SEARCH_RATIOS,)
        sizes = dict(POINTS=SEARCH_POINTS, RATIOS=SEARCH_RATIOS, BLOCK_S=SEARCH_SEQUENCES)
        log_det = None
        if group is not None:
            log_det = self._empty((SEARCH_POINTS,), torch.float64, device)
            kernels.fit_log_determinant_kernel[programs](
                lengths, lengths.shape[0], lengths.stride(0), log_det, grid, DIFFUSE=diffuse, **sizes,
                num_warps=SEARCH_WARPS,
            )
            all_reduce(log_det, group)
        result, codes = self._empty((6,), torch.float64, device), self._empty((2,), torch.int64, device)
        values = self._empty((2, SEARCH_POINTS), torch.float64, device)  # profile and R
        kernels.noise_search_kernel[programs](
            totals, _centres(bins, device), bins, lengths, lengths.shape[0], lengths.stride(0),
            totals if log_det is None else log_det, values, finished, result, codes, min_tokens, grid, *parts,
            DIFFUSE=diffuse, GIVEN_LOG_DET=log_det is not None, BLOCK_B=SEARCH_BINS, BLOCK_F=SEARCH_FINISH, **sizes,
            num_warps=SEARCH_WARPS,
        )
        return NoiseEstimate(
            q=result[0], r=result[1], ratio=result[2], log_likelihood=result[3], drift_evidence=result[4],
            at_boundary=codes[0], num_tokens=result[5], status=codes[1],
        )
