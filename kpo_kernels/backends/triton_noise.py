"""The Triton backend's noise fit (`estimate_noise` on the Triton backend): the launches of the
kernels of triton_fit_transform.py and triton_fit_search.py, mixed into `TritonBackend` as `NoiseFitLaunch`.

One micro-batch's fit: `fit_layout_kernel`, `fit_chirp_kernel`, torch's FFT, product and inverse
FFT (cuFFT on a GPU), `fit_coefficients_kernel`, `fit_bins_kernel` (the float64 sums the fit
needs, in the layout of fit_search: `totals`), the zeroed counter and `noise_search_kernel`:
nine launches (ten, and one all-reduce more, under a process group), where the torch operations
take some 330 to 440. Nothing is read back on the host but a packed batch's longest length.
"""

import functools
import math

import torch

from ..fit_search import NoiseEstimate, all_reduce
from ..fit_spectrum import BIN_TOP, BIN_WIDTH, fft_length
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


@functools.lru_cache(maxsize=32)
def _edge_angles(bins, device):
    """asin(exp(e_i / 2) / 2) of the bin edges e_i = TOP - i W, i = 1..bins - 1 (float64, on
    `device`; made there by torch once per size, then cached: no host copy)."""
    edges = BIN_TOP - torch.arange(1, max(bins, 2), device=device, dtype=torch.float64) * BIN_WIDTH
    return torch.asin(torch.exp(0.5 * edges).mul_(0.5).clamp_(max=1.0))


class NoiseFitLaunch:
    """`Backend.noise_moments` and `Backend.noise_search` on Triton kernels."""

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

    def noise_moments(self, z, lengths, *, diffuse, bins):
        """The transform and its binned moments (fit_spectrum.spectral_sums, one bucket of
        every row) as `totals` (fit_search), float64 (2 + 3 bins,)."""
        rows, width = z.shape
        device = z.device
        inputs = max(width - 1, 0) if diffuse else width
        totals = self._empty((2 + 3 * bins,), torch.float64, device)
        if rows == 0 or inputs == 0:  # no coefficient at all: the fallback statuses follow from zeros
            return totals.zero_()
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
            prefix, _edge_angles(bins, device), lengths, lengths.stride(0), totals, rows, inputs, bins,
            DIFFUSE=diffuse, BLOCK=BIN_BLOCK, num_warps=4,
        )
        return totals

    def noise_search(self, totals, lengths, *, diffuse, low, high, min_tokens, fallback, group):
        """The search on a dense grid in one launch (triton_fit_search.noise_search_kernel); under a
        process group the log-determinants at the grid's points first (fit_log_determinant_kernel)
        and one all-reduce of them. None (the torch search) for settings its float32 parts cannot
        carry exactly, and for ratios above SEARCH_HIGHEST."""
        settings = (math.log(low), math.log(high), low, high, *fallback)
        if high > SEARCH_HIGHEST or not all(float64_parts_fit(value) for value in settings):
            return None
        device = totals.device
        parts = [part for value in settings for part in float64_parts(value)]
        grid = (SEARCH_POINTS // SEARCH_RATIOS,)
        sizes = dict(POINTS=SEARCH_POINTS, RATIOS=SEARCH_RATIOS, BLOCK_S=SEARCH_SEQUENCES)
        log_det = None
        if group is not None:
            log_det = self._empty((SEARCH_POINTS,), torch.float64, device)
            kernels.fit_log_determinant_kernel[grid](
                lengths, lengths.shape[0], lengths.stride(0), log_det, *parts[:6], DIFFUSE=diffuse, **sizes,
                num_warps=SEARCH_WARPS,
            )
            all_reduce(log_det, group)
        result, codes = self._empty((6,), torch.float64, device), self._empty((2,), torch.int64, device)
        values = self._empty((2, SEARCH_POINTS), torch.float64, device)  # profile and R
        finished = torch.zeros(1, dtype=torch.int32, device=device)
        kernels.noise_search_kernel[grid](
            totals, (totals.shape[0] - 2) // 3, lengths, lengths.shape[0], lengths.stride(0),
            totals if log_det is None else log_det, values, finished, result, codes, min_tokens, *parts,
            DIFFUSE=diffuse, GIVEN_LOG_DET=log_det is not None, BLOCK_B=SEARCH_BINS, BLOCK_F=SEARCH_FINISH, **sizes,
            num_warps=SEARCH_WARPS,
        )
        return NoiseEstimate(
            q=result[0], r=result[1], ratio=result[2], log_likelihood=result[3], drift_evidence=result[4],
            at_boundary=codes[0], num_tokens=result[5], status=codes[1],
        )
