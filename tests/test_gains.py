"""The closed-form gain schedule against the predict/update recursion."""

import math

import pytest
import torch

import kpo_kernels
import reference


def recursion(n, q, r, p0):
    """K_1..K_n by iterating the variance recursion in Python floats (float64)."""
    return reference.kalman_gains(n, q=q, r=r, p0=p0)


@pytest.mark.parametrize("q", [0.0, 1e-10, 1e-9, 1e-7, 1e-6, 1e-4, 1e-2, 0.5, 1.0, 30.0, 1e4, 1e8])
@pytest.mark.parametrize("p0", [0.0, 1e-3, 1.0, 50.0, math.inf])
def test_closed_form_matches_recursion(q, p0):
    n = 4096
    got = kpo_kernels.kalman_gains(n, q=q, r=1.0, p0=p0)
    want = recursion(n, q, 1.0, p0)
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert torch.isfinite(got).all()
    if p0 == 0.0 and q == 0.0:
        assert torch.equal(got, torch.zeros(n, dtype=torch.float64))
        return
    rel = ((got - want).abs() / want.abs()).max()
    assert rel < 1e-11, f"relative error {rel:.2e}"


@pytest.mark.parametrize("q", [1e-10, 1e-6, 1e-3, 1.0, 1e8])
def test_long_schedules_stay_accurate_and_finite(q):
    """Requirement: 1e-6 relative for q in [1e-10, 1e8] and n up to 2^20, never NaN.

    The recursion accumulates its own rounding over 2^20 steps (about 1e-10 relative), so the
    comparison checks the closed form to 1e-8."""
    n = 1 << 20
    got = kpo_kernels.kalman_gains(n, q=q)
    want = recursion(n, q, 1.0, 0.0)
    assert torch.isfinite(got).all()
    assert ((got - want).abs() / want).max() < 1e-8


def test_r_only_scales_q_and_p0():
    a = kpo_kernels.kalman_gains(100, q=2e-6, r=2.0, p0=4.0)
    b = kpo_kernels.kalman_gains(100, q=1e-6, r=1.0, p0=2.0)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_limits():
    n = 64
    steps = torch.arange(1, n + 1, dtype=torch.float64)
    # A diffuse prior without process noise is the running mean: K_n = 1/n.
    torch.testing.assert_close(kpo_kernels.kalman_gains(n, q=0.0, p0=math.inf), 1 / steps, rtol=1e-15, atol=0)
    # Huge q: no filtering, K = 1 to 1e-8.
    assert (1 - kpo_kernels.kalman_gains(n, q=1e8)).abs().max() < 2e-8
    # Steady state: K_n -> p* = (-q + sqrt(q^2 + 4q)) / 2.
    q = 1e-2
    p_star = (-q + math.sqrt(q * q + 4 * q)) / 2
    assert abs(float(kpo_kernels.kalman_gains(20000, q=q)[-1]) - p_star) < 1e-15


def test_empty_schedule():
    assert kpo_kernels.kalman_gains(0).shape == (0,)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"n": -1}, ValueError),
        ({"n": 2.5}, TypeError),
        ({"n": 3, "q": -1e-6}, ValueError),
        ({"n": 3, "r": 0.0}, ValueError),
        ({"n": 3, "p0": -1.0}, ValueError),
        ({"n": 3, "q": math.nan}, ValueError),
        ({"n": 3, "q": "1e-6"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, exc):
    n = kwargs.pop("n")
    with pytest.raises(exc):
        kpo_kernels.kalman_gains(n, **kwargs)
