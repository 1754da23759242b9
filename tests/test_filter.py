"""kalman_filter on both backends against the sequential float64 reference."""

import math

import pytest
import torch

import kpo_kernels
import reference
from conftest import DEVICE, SMALL_BLOCK, triton_backend
from helpers import LAYOUTS, assert_close, make_mask

EDGE_LENGTHS = [1, 2, SMALL_BLOCK - 1, SMALL_BLOCK, SMALL_BLOCK + 1, 37, 3 * SMALL_BLOCK]


def log_ratios(batch, length, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, length, generator=gen, dtype=torch.float64) * scale
    z += (torch.rand(batch, length, generator=gen) < 0.03) * torch.randn(batch, length, generator=gen) * 2
    return z


def expected(z, mask, **options):
    return reference.kalman_filter(z.double().cpu(), None if mask is None else mask.cpu(), **options)


@pytest.mark.parametrize("length", EDGE_LENGTHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_mode", ["skip", "position"])
def test_matches_reference(backend, length, layout, mask_mode):
    gen = torch.Generator().manual_seed(length)
    z = log_ratios(4, length, seed=length)
    mask = make_mask(4, length, layout, gen)
    z_in = z.float().to(DEVICE)
    if mask is not None:
        z_in = z_in.masked_fill(~mask.to(DEVICE), math.nan)  # never read
    got = kpo_kernels.kalman_filter(z_in, None if mask is None else mask.to(DEVICE), q=1e-2, mask_mode=mask_mode, backend=backend)
    want = expected(z, mask, q=1e-2, mask_mode=mask_mode)
    assert got.dtype == torch.float32 and got.shape == z.shape
    assert_close("filter", got, want, rtol=2e-6)
    if mask is not None:
        assert (got.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("q", [0.0, 1e-10, 1e-6, 1e-2, 1.0, 1e3, 1e8])
@pytest.mark.parametrize("p0, x0", [(0.0, 0.0), (1.0, 0.2), (math.inf, -0.1), (1e-3, 0.5)])
def test_hyperparameters(backend, q, p0, x0):
    gen = torch.Generator().manual_seed(1)
    z = log_ratios(3, 41, seed=2)
    mask = make_mask(3, 41, "holes", gen)
    got = kpo_kernels.kalman_filter(z.float().to(DEVICE), mask.to(DEVICE), q=q, r=0.5, p0=p0, x0=x0, backend=backend)
    want = expected(z, mask, q=q, r=0.5, p0=p0, x0=x0)
    assert_close("filter", got, want, rtol=2e-6)


def test_float64_input_stays_float64_on_torch_backend():
    z = log_ratios(2, 50)
    got = kpo_kernels.kalman_filter(z, q=1e-3, backend="torch")
    assert got.dtype == torch.float64
    assert_close("filter", got, expected(z, None, q=1e-3), rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_input_dtypes(backend, dtype, mask_dtype):
    gen = torch.Generator().manual_seed(3)
    z = log_ratios(3, 29).to(dtype)
    mask = make_mask(3, 29, "holes", gen)
    got = kpo_kernels.kalman_filter(z.to(DEVICE), mask.to(mask_dtype).to(DEVICE), q=1e-3, backend=backend)
    want = expected(z.double(), mask, q=1e-3)  # the rounded inputs are the data
    assert_close("filter", got, want, rtol=2e-6)


def test_strided_inputs(backend):
    gen = torch.Generator().manual_seed(4)
    z = log_ratios(40, 6).t()  # (6, 40), token stride 6
    mask = make_mask(40, 6, "holes", gen).t()
    got = kpo_kernels.kalman_filter(z.float().to(DEVICE), mask.to(DEVICE), q=1e-2, backend=backend)
    assert_close("filter", got, expected(z, mask, q=1e-2), rtol=2e-6)


def test_layout_invariance_in_skip_mode(backend):
    """Right, left and interior padding leave the filtered values of the valid tokens unchanged."""
    gen = torch.Generator().manual_seed(5)
    length, rows = 45, 5
    streams = [log_ratios(1, n, seed=n)[0] for n in (45, 30, 17, 1, 0)]

    def place(positions_of):
        z = torch.full((rows, length), math.nan, dtype=torch.float64)
        mask = torch.zeros(rows, length, dtype=torch.bool)
        for row, stream in enumerate(streams):
            pos = positions_of(len(stream))
            z[row, pos] = stream
            mask[row, pos] = True
        return z, mask

    def right(n):
        return torch.arange(n)

    def left(n):
        return torch.arange(length - n, length)

    def scattered(n):
        return torch.sort(torch.randperm(length, generator=gen)[:n]).values

    results = []
    for layout in (right, left, scattered):
        z, mask = place(layout)
        out = kpo_kernels.kalman_filter(z.float().to(DEVICE), mask.to(DEVICE), q=1e-3, backend=backend).cpu()
        results.append([out[row][mask[row]] for row in range(rows)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b) if isinstance(backend, kpo_kernels.TorchBackend) else torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_position_equals_skip_on_right_padding(backend):
    gen = torch.Generator().manual_seed(6)
    z = log_ratios(5, 40).float().to(DEVICE)
    mask = make_mask(5, 40, "right", gen).to(DEVICE)
    skip = kpo_kernels.kalman_filter(z, mask, q=1e-2, mask_mode="skip", backend=backend)
    position = kpo_kernels.kalman_filter(z, mask, q=1e-2, mask_mode="position", backend=backend)
    torch.testing.assert_close(skip, position, rtol=0, atol=0)


def test_huge_q_is_no_filter(backend):
    z = log_ratios(3, 33).float().to(DEVICE)
    out = kpo_kernels.kalman_filter(z, q=1e8, backend=backend)
    torch.testing.assert_close(out, z, rtol=1e-6, atol=1e-7)


def test_nan_at_a_valid_token_propagates(backend):
    z = log_ratios(2, 40).float()
    z[0, 10] = math.nan
    out = kpo_kernels.kalman_filter(z.to(DEVICE), q=1e-2, backend=backend).cpu()
    assert torch.isnan(out[0, 10:]).all() and not torch.isnan(out[0, :10]).any()
    assert not torch.isnan(out[1]).any()


def test_input_not_modified(backend):
    z = log_ratios(3, 20).float().to(DEVICE)
    mask = (torch.rand(3, 20) > 0.3).to(DEVICE)
    z[~mask] = math.nan
    z_before, mask_before = z.clone(), mask.clone()
    kpo_kernels.kalman_filter(z, mask, backend=backend)
    assert torch.equal(z.isnan(), z_before.isnan()) and torch.equal(z.nan_to_num(), z_before.nan_to_num())
    assert torch.equal(mask, mask_before)


def test_empty_shapes(backend):
    for shape in [(0, 5), (3, 0)]:
        out = kpo_kernels.kalman_filter(torch.zeros(shape, device=DEVICE), backend=backend)
        assert out.shape == shape


@pytest.mark.slow
@pytest.mark.parametrize("q", [1e-9, 1e-7, 1e-5, 1e-3, 1e-1, 1.0, 30.0])
def test_float32_precision_on_long_rows_torch(q):
    """fp32 filter within 1e-5 relative for q in [1e-9, 30] up to T = 16384 (docs/math.md section 2)."""
    z = log_ratios(2, 16384, seed=7, scale=0.1)
    got = kpo_kernels.kalman_filter(z.float(), q=q, backend="torch")
    assert_close("filter", got, expected(z.float(), None, q=q), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("q", [1e-9, 1e-5, 30.0])
def test_float32_precision_on_long_rows_triton(q):
    z = log_ratios(1, 16384, seed=7, scale=0.1)
    got = kpo_kernels.kalman_filter(z.float().to(DEVICE), q=q, backend=triton_backend(block_size=1024))
    assert_close("filter", got, expected(z.float(), None, q=q), rtol=1e-5)
