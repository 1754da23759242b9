"""The Triton backend's noise fit (`estimate_noise` on the Triton backend): the launches of the
kernels of triton_fit_layout.py and triton_fit_search.py, mixed into `TritonBackend` as `NoiseFitLaunch`.

One micro-batch's fit: `fit_layout_kernel`, `noise_filter_kernel` (the filters of every grid
ratio over chunks of every sequence; it also zeroes the profile's counter) and
`noise_profile_kernel` (the profile at every grid ratio, then the result): three launches
(four, and one all-reduce, under a process group). Nothing is read back on the host but a
packed batch's longest length.
"""

import collections
import math
import threading

import torch

from .. import tables
from ..fit_search import NoiseEstimate, all_reduce
from .triton_launch import INTERPRETED, float64_parts, float64_parts_fit, kernels

# The profile on the Triton backend: at SEARCH_POINTS ratios evenly spaced in log q (0.22 apart over
# q_range's default 12 decades), then a parabola through the best point and its neighbours.
SEARCH_POINTS = 128
# noise_filter_kernel: FILTER_RATIOS grid ratios a program (one a lane) over a chunk of
# FILTER_CHUNK scored positions (more for sequences of over FILTER_MOST_CHUNKS chunks).
# benchmarks/fit_model.py put one-warp programs over 128 positions ahead of 2 and 4 warps and of
# 64, 256 and 512 positions at 64 x 4096's default budget (the filters' work spread over more
# SMs; shorter chunks cost the profile kernel more steps).
FILTER_RATIOS, FILTER_WARPS = 32, 1
FILTER_CHUNK, FILTER_MOST_CHUNKS = 128, 64
# noise_profile_kernel: a program a sequence at every ratio, then its last program's sums over
# PROFILE_SEQUENCES sequences a step and the finish over PROFILE_FINISH points a step.
PROFILE_RATIOS, PROFILE_WARPS = SEARCH_POINTS, 4
PROFILE_SEQUENCES, PROFILE_FINISH = 8, 128
if INTERPRETED:  # the same values in fewer, wider programs: numpy's cost is per operation
    FILTER_RATIOS = SEARCH_POINTS
# The filters run in float32: a GPU's rcp.approx.ftz of 1 + P + q returns 0 above 2^126, so larger
# ratios take the torch search. So do q_ranges wider than SEARCH_POINTS steps of SEARCH_WIDEST_STEP
# in log q (13.8 decades; the default is 12): the parabola through points further apart leaves
# the profile reported more than ~5e-5 nats a token off its maximum.
SEARCH_HIGHEST = 1e30
SEARCH_WIDEST_STEP = 0.25
LAYOUT_BLOCK = 1024  # positions a program step of the layout kernel


_SIZED = collections.OrderedDict()  # (what, key, device) -> tensor: _search_grid and _entering_variances
_SIZED_PINNED = set()  # keys a CUDA-graph capture read: never evicted (a graph holds no reference to its inputs)
_SIZED_MOST = 64  # unpinned entries kept
_SIZED_LOCK = threading.Lock()


def _per_size(what, size, device, build):
    """build(), cached per (what, size, device). Not while `device`'s stream is captured into a
    CUDA graph: what a capture builds is the graph's own (its operations rerun at each replay; its
    memory the graph's pool), so an eager call must not find it; and an entry a capture reads is
    pinned, since the graph will read it at every replay."""
    key = (what, size, tables.canonical_device(device))
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


def _entering_variances(low, high, diffuse, chunk_length, device):
    """(FILTER_MOST_CHUNKS, SEARCH_POINTS) float32 on `device`: the filter's variance P / R at the
    start of chunk c (c chunk_length updates done, from P = 0 under P0 = 0 or from P = 1 after a
    diffuse first token) at each grid ratio, in float64 from its closed form, then cached
    (_per_size). The Riccati map P' = (P + q) / (P + q + 1) is a Moebius map with fixed points
    p+ > 0 > p-, and g = (P - p+) / (P - p-) shrinks by e^(-2 phi) a step (2 cosh phi = 2 + q):
    P = (p+ - p- g) / (1 - g), g = g0 e^(-2 k phi), written without cancellation for tiny q."""
    grid = _search_grid(low, high, diffuse, device)

    def build():
        q, phi = grid[0], grid[1]
        root = torch.sqrt(q * (q + 4.0))
        upper, lower = 2.0 * q / (q + root), -0.5 * (q + root)  # p+ without the cancellation of (root - q) / 2
        steps = torch.arange(FILTER_MOST_CHUNKS, dtype=torch.float64, device=device)[:, None] * chunk_length
        decay = -torch.expm1(-2.0 * steps * phi)  # 1 - e^(-2 k phi)
        if diffuse:  # g0 = (1 - p+) / (1 - p-) in (0, 1): P = 1 - (1 - p+) (1 - E) / (1 - g0 E), E = e^(-2 k phi)
            log_start = torch.log1p(-upper) - torch.log1p(-lower)
            return (1.0 - (1.0 - upper) * decay / -torch.expm1(log_start - 2.0 * steps * phi)).to(torch.float32)
        # g0 = p+ / p- < 0, so that p- g0 = p+: P = p+ (1 - E) / (1 - g0 E), no cancellation
        return (upper * decay / (1.0 - (upper / lower) * torch.exp(-2.0 * steps * phi))).to(torch.float32)

    return _per_size("entering variances", (math.log(low), math.log(high), diffuse, chunk_length), device, build)


def _search_parts(low, high, fallback):
    """The search's float64 settings as float32 parts (triton_launch.float64_parts), or None where
    the parts cannot carry one exactly, the ratio may pass SEARCH_HIGHEST or the grid's points
    would lie more than SEARCH_WIDEST_STEP apart."""
    settings = (low, high, *fallback)
    if high > SEARCH_HIGHEST or not all(float64_parts_fit(value) for value in settings):
        return None
    if (math.log(high) - math.log(low)) / (SEARCH_POINTS - 1) > SEARCH_WIDEST_STEP:
        return None
    return [part for value in settings for part in float64_parts(value)]


class NoiseFitLaunch:
    """`Backend.noise_layout` and `Backend.noise_fit` on Triton kernels."""

    def noise_layout(self, log_ratio, mask, cu_seqlens, mask_mode, x0, max_tokens):
        """fit_spectrum.sequences in one kernel (triton_fit_layout.fit_layout_kernel), the packed budget
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
            HAS_MASK=mask is not None, PACKED=packed, POSITION=mask_mode == "position", BLOCK=LAYOUT_BLOCK,
            num_warps=4,
        )
        return z, lengths

    def noise_fit(self, z, lengths, *, diffuse, bins, low, high, min_tokens, fallback, group):
        """The filters at every grid ratio (noise_filter_kernel), then the profile and the result
        (noise_profile_kernel; under a process group its sums first, all-reduced, then the
        profile from them); None (the torch transform and search) where _search_parts declines
        the settings: alike on every rank.
        `bins` is the torch search's and unused here."""
        parts = _search_parts(low, high, fallback)
        if parts is None:
            return None
        device = z.device
        grid = _search_grid(low, high, diffuse, device)
        sequences, width = z.shape
        scored = max(width - 1, 0) if diffuse else width
        chunk_length = max(FILTER_CHUNK, -(-scored // FILTER_MOST_CHUNKS))
        chunk_count = -(-scored // chunk_length)
        chunks = self._empty((5, sequences * chunk_count, SEARCH_POINTS), torch.float32, device)
        finished = self._empty((1,), torch.int32, device)
        if sequences * chunk_count > 0:
            kernels.noise_filter_kernel[(sequences * chunk_count, SEARCH_POINTS // FILTER_RATIOS)](
                z, z.stride(0), z.stride(1), lengths, lengths.stride(0), grid,
                _entering_variances(low, high, diffuse, chunk_length, device), chunks, finished, sequences, chunk_count,
                chunk_length, DIFFUSE=diffuse, POINTS=SEARCH_POINTS, BLOCK_Q=FILTER_RATIOS, num_warps=FILTER_WARPS,
            )
        else:  # no chunk to filter: the profile kernel's counter is zeroed here
            finished.zero_()
        per_sequence = self._empty((2, sequences, SEARCH_POINTS), torch.float64, device)
        sums = self._empty((2 + 2 * SEARCH_POINTS,), torch.float64, device)
        result, codes = self._empty((6,), torch.float64, device), self._empty((2,), torch.int64, device)
        values = self._empty((2, SEARCH_POINTS), torch.float64, device)  # profile and R

        def profile(stage, programs):
            kernels.noise_profile_kernel[programs](
                z, z.stride(0), z.stride(1), lengths, lengths.stride(0), chunks, per_sequence, sequences, chunk_count,
                chunk_length, sums, values, finished, result, codes, min_tokens, grid, *parts, DIFFUSE=diffuse,
                STAGE=stage, POINTS=SEARCH_POINTS, RATIOS=PROFILE_RATIOS, BLOCK_S=PROFILE_SEQUENCES,
                BLOCK_F=PROFILE_FINISH, num_warps=PROFILE_WARPS,
            )

        per_program = (sequences, SEARCH_POINTS // PROFILE_RATIOS)
        if group is None and sequences:
            profile(0, per_program)
        else:  # the sums (zeros without a sequence), all-reduced over the group, then the profile
            if sequences:
                profile(1, per_program)
            else:
                sums.zero_()
            all_reduce(sums, group)
            profile(2, (1,))
        return NoiseEstimate(
            q=result[0], r=result[1], ratio=result[2], log_likelihood=result[3], drift_evidence=result[4],
            at_boundary=codes[0], num_tokens=result[5], status=codes[1],
        )
