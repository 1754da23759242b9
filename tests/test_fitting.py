"""estimate_noise (kpo_kernels/fitting.py): the profile is fit_noise's, exactly for float64 (to
float32 precision for float32 log-ratios, transformed in float32); its maximiser is
fit_noise's on the simulated data of test_noise.py; on-policy, tiny and non-finite micro-batches
fall back; bad arguments are refused by name."""

import math

import pytest
import torch

import kpo_kernels
from kpo_kernels.dispatch import resolve_backend
from kpo_kernels.fitting import FEW_TOKENS, FITTED, NOT_FINITE, ON_POLICY, estimate_noise
from kpo_kernels.noise import _Profile
from test_noise import RECOVERY, simulate


def fit_noise_profile(z, mask, ratio, p0=0.0, cu_seqlens=None, mask_mode="skip"):
    """fit_noise's own profile (log-likelihood per token, R_hat, tokens) at one ratio."""
    impl = resolve_backend("torch", z.device, z.dtype)
    profile = _Profile(z, mask, cu_seqlens, mask_mode, p0, 0.0, impl)
    value, r_hat, tokens = profile(ratio)
    return value - profile.exponent * math.log(2.0), math.ldexp(r_hat, 2 * profile.exponent), tokens


@pytest.mark.parametrize("dtype, rel, nats", [(torch.float64, 1e-12, 0.0), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("p0", [0.0, math.inf])
@pytest.mark.parametrize("layout", ["right", "holes", "packed", "position-right"])
def test_the_profile_is_fit_noises(p0, layout, dtype, rel, nats):
    """At the ratio it chose, the log-likelihood per token, R and the token count are fit_noise's
    (the sine basis diagonalises the model's covariance: the same likelihood, another way); to
    1e-12 relative for float64 log-ratios; for float32 ones (a float32 transform, binned sums)
    the log-likelihood to 1e-6 nats per token, R to 1e-5 relative."""
    gen = torch.Generator().manual_seed(4)
    z, mask = simulate(6, 40, 90, 1e-3, 0.04, 3, dtype=dtype)
    cu, mask_mode = None, "skip"
    if layout == "holes":
        mask = mask & (torch.rand(mask.shape, generator=gen) > 0.3)
    if layout == "packed":
        lengths = mask.sum(1)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        z, mask = z[mask], None
    if layout == "position-right":
        mask_mode = "position"
    got = estimate_noise(z, mask, cu_seqlens=cu, p0=p0, mask_mode=mask_mode)
    assert int(got.status) == FITTED
    want_l, want_r, tokens = fit_noise_profile(z, mask, float(got.ratio), p0, cu, mask_mode)
    assert float(got.log_likelihood) == pytest.approx(want_l, rel=rel, abs=nats)
    assert float(got.r) == pytest.approx(want_r, rel=rel)
    assert float(got.q) == pytest.approx(float(got.ratio) * want_r, rel=rel)
    assert int(got.num_tokens) == tokens


# fit_noise at 64 x 4096 costs seconds a case: two cases in the fast tier, the rest slow.
FAST = {(1e-6, 1e-2), (0.0, 1.0)}


@pytest.mark.parametrize(
    "q, r", [pytest.param(q, r, marks=() if (q, r) in FAST else pytest.mark.slow) for q, r in RECOVERY]
)
def test_the_maximiser_is_fit_noises(q, r):
    """On test_noise.py's simulations (64 sequences of 2048-4096 tokens, float32): the ratio
    within 0.1% of fit_noise's (the goal was 10%), R within 1e-5 (goal 2%), the log-likelihood
    per token within 1e-6 nats (goal 1e-3; float32 log-ratios are transformed in float32, whose
    ~1e-7 relative error is what separates it from fit_noise's float64 maximum); without drift
    both stop at the lower end of q_range."""
    z, mask = simulate(64, 2048, 4096, q, r, 101, dtype=torch.float32)
    want = kpo_kernels.fit_noise(z, mask)
    got = estimate_noise(z, mask)
    assert int(got.status) == FITTED
    assert float(got.ratio) == pytest.approx(want.ratio, rel=1e-3)
    assert float(got.r) == pytest.approx(want.r, rel=1e-5)
    assert float(got.log_likelihood) >= want.log_likelihood - 1e-6
    assert float(got.drift_evidence) == pytest.approx(want.drift_evidence, rel=1e-3, abs=1e-6)
    assert int(got.at_boundary) == {None: 0, "lower": -1, "upper": 1}[want.at_boundary]


def test_boundaries_are_reported():
    z, mask = simulate(8, 500, 800, 0.0, 1.0, 7)
    low = estimate_noise(z, mask, q_range=(1e-4, 1.0))
    assert int(low.at_boundary) == -1 and float(low.ratio) == 1e-4 and float(low.drift_evidence) == 0.0
    steep, steep_mask = simulate(8, 500, 800, 1.0, 1.0, 8)
    high = estimate_noise(steep, steep_mask, q_range=(1e-6, 1e-2))
    assert int(high.at_boundary) == 1 and float(high.ratio) == 1e-2 and float(high.drift_evidence) > 0


@pytest.mark.parametrize("p0", [0.0, math.inf])
def test_wide_ranges_search_as_finely(p0):
    """A wider q_range takes more stages (fit_search.search_stages), so that the last grid is as
    fine as over the default range: the same fit over 80 and 300 decades as over 12, the profile
    per token to 1e-9 nats and the ratio to 1e-3 (measured: 1e-11 and 5e-5)."""
    for seed in (0, 3):
        z, mask = simulate(8, 500, 800, 1e-3, 0.1, seed)
        want = estimate_noise(z, mask, p0=p0)
        for q_range in [(1e-60, 1e20), (1e-150, 1e150)]:
            got = estimate_noise(z, mask, p0=p0, q_range=q_range)
            assert int(got.status) == FITTED and int(got.at_boundary) == 0
            assert float(got.log_likelihood) == pytest.approx(float(want.log_likelihood), abs=1e-9)
            assert float(got.ratio) == pytest.approx(float(want.ratio), rel=1e-3)


@pytest.mark.parametrize("p0", [0.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_upper_end_is_reported_whatever_the_range(dtype, p0):
    """A walk with no noise on it stops at the upper end of any q_range: at_boundary +1 and the
    ratio the end itself, on ranges whose grid's last point a + 31 (b - a) / 31 would round one
    ulp below log(high) (each stage's grid ends exactly at its ends)."""
    z = torch.randn(4, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64).cumsum(1) * 10
    for low, high in [(1e-14, 1.0), (1e-9, 1.0), (1e-8, 1.0), (1e-7, 1.0), (1e-4, 1.0), (1e-2, 1.0), (0.1, 1.0), (1e-10, 1e2)]:
        fit = estimate_noise(z.to(dtype), p0=p0, q_range=(low, high))
        assert int(fit.status) == FITTED
        assert int(fit.at_boundary) == 1 and float(fit.ratio) == high, (low, high)


@pytest.mark.parametrize(
    "case, status",
    [("on-policy", ON_POLICY), ("few", FEW_TOKENS), ("empty", FEW_TOKENS), ("nan", NOT_FINITE), ("inf", NOT_FINITE)],
)
def test_nothing_to_fit_falls_back(case, status):
    """z == x0 everywhere (an on-policy micro-batch), fewer than min_tokens, or a non-finite
    valid log-ratio: the fallback (q, r) come back with the status, no exception, no host read."""
    z, mask = simulate(4, 30, 40, 1e-3, 1.0, 1)
    if case == "on-policy":
        z = torch.zeros_like(z)
    if case == "few":
        mask = mask & (torch.arange(z.shape[1]) < 3)
    if case == "empty":
        mask = torch.zeros_like(mask)
    if case in ("nan", "inf"):
        z[1, 2] = math.nan if case == "nan" else math.inf
    got = estimate_noise(z, mask, fallback=(2e-6, 0.5), min_tokens=16)
    assert int(got.status) == status
    assert (float(got.q), float(got.r)) == (2e-6, 0.5)
    assert math.isnan(float(got.log_likelihood)) and int(got.at_boundary) == 0


def test_reused_buffers_give_fresh_results():
    """The CPU transform reuses its last buffers: a second micro-batch of the same shape, then
    the first again, give what each gives alone."""
    a, mask = simulate(5, 60, 90, 1e-3, 0.04, 6, torch.float32)
    b = 3.0 * a  # the same shape, other data
    first = float(estimate_noise(a, mask).q)
    assert float(estimate_noise(b, mask).q) != first
    assert float(estimate_noise(a, mask).q) == first


def test_x0_and_float_dtypes():
    z, mask = simulate(5, 60, 90, 1e-3, 0.04, 6)
    want = estimate_noise(z, mask)
    shifted = estimate_noise(z + 0.3, mask, x0=0.3)
    assert float(shifted.ratio) == pytest.approx(float(want.ratio), rel=1e-6)
    half = estimate_noise(z.to(torch.bfloat16), mask)
    assert int(half.status) == FITTED


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"p0": 0.5}, ValueError, "p0"),
        ({"p0": -1.0}, ValueError, "p0"),
        ({"q_range": (0.0, 1.0)}, ValueError, "q_range"),
        ({"q_range": 1e-3}, TypeError, "q_range"),
        ({"min_tokens": 1}, ValueError, "min_tokens"),
        ({"min_tokens": 2.5}, TypeError, "min_tokens"),
        ({"mask_mode": "drop"}, ValueError, "mask_mode"),
        ({"x0": math.nan}, ValueError, "x0"),
        ({"fallback": (1e-6, "a")}, TypeError, "fallback"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError, "mask"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    z, mask = simulate(4, 10, 10, 1e-3, 1.0, 1)
    with pytest.raises(exc, match=words):
        estimate_noise(z, **{"mask": mask, **kwargs})


@pytest.mark.parametrize("p0", [0.0, math.inf])
def test_rows_of_very_different_lengths_are_transformed_in_buckets(p0):
    """On the CPU rows are grouped by FFT length (fit_spectrum.buckets): every row in exactly one
    bucket, several buckets here, and the profile at the chosen ratio still fit_noise's exactly."""
    from kpo_kernels.fit_spectrum import buckets

    z, mask = simulate(32, 3, 2500, 1e-3, 0.04, 5)
    lengths = mask.sum(1)
    plan = buckets(lengths, z.shape[1], p0 == math.inf)
    assert len(plan) > 1
    rows = torch.cat([torch.arange(len(lengths)) if index is None else index for index, _ in plan])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert all(int(lengths[index].max()) <= columns for index, columns in plan if index is not None)
    got = estimate_noise(z, mask, p0=p0)
    want_l, want_r, tokens = fit_noise_profile(z, mask, float(got.ratio), p0)
    assert float(got.log_likelihood) == pytest.approx(want_l, rel=1e-12)
    assert float(got.r) == pytest.approx(want_r, rel=1e-12)
    assert int(got.num_tokens) == tokens


def test_max_tokens_fits_every_kth_sequence():
    z, mask = simulate(10, 50, 90, 1e-3, 0.04, 9)
    got = estimate_noise(z, mask, max_tokens=z.numel() // 3)  # k = 4 (ceil of 3.x)
    want = estimate_noise(z[::4], mask[::4])
    assert float(got.ratio) == float(want.ratio) and float(got.r) == float(want.r)
    assert int(got.num_tokens) == int(mask[::4].sum())
    assert float(estimate_noise(z, mask, max_tokens=z.numel()).ratio) == float(estimate_noise(z, mask).ratio)
    with pytest.raises(ValueError, match="max_tokens"):
        estimate_noise(z, mask, max_tokens=1)


@pytest.mark.parametrize(
    "q, r", [pytest.param(q, r, marks=() if (q, r) in FAST else pytest.mark.slow) for q, r in RECOVERY]
)
def test_half_the_sequences_meet_the_likelihood_goal(q, r):
    """max_tokens at half of test_noise.py's simulations (every other sequence): R within 1% of
    fit_noise's and the whole batch's log-likelihood per token at the fitted ratio within 1e-4
    nats of fit_noise's maximum (goal 1e-3; at most 9e-6 measured); the ratio itself moves by
    the estimate's own statistical error (up to 10% on these seven, docs/choosing-q-and-r.md)."""
    z, mask = simulate(64, 2048, 4096, q, r, 101, dtype=torch.float32)
    want = kpo_kernels.fit_noise(z, mask)
    got = estimate_noise(z, mask, max_tokens=z.numel() // 2)
    assert int(got.status) == FITTED and int(got.num_tokens) == int(mask[::2].sum())
    assert float(got.r) == pytest.approx(want.r, rel=1e-2)
    whole, _, _ = fit_noise_profile(z, mask, float(got.ratio))
    assert whole >= want.log_likelihood - 1e-4


@pytest.mark.parametrize("p0", [0.0, math.inf])
def test_log_determinant_is_the_covariances(p0):
    """The closed form summed over sequences (fit_spectrum.LogDeterminant) against slogdet of
    each sequence's covariance factor: I + q M (P0 = 0, M_ij = min(i, j)) or q I + D (diffuse,
    D the (n - 1)-dimensional (2, -1) second difference), from q = 1e-10 to 1e2, with sequences
    of 0, 1 and 2 tokens among them."""
    from kpo_kernels.fit_spectrum import LogDeterminant

    lengths = torch.tensor([0, 1, 2, 3, 7, 50, 333])
    q = torch.logspace(-10, 2, 25, dtype=torch.float64)
    want = torch.zeros_like(q)
    for n in lengths.tolist():
        index = torch.arange(1, n + 1, dtype=torch.float64)
        if p0 == math.inf:
            size = max(n - 1, 0)
            ones = torch.ones(max(size - 1, 0), dtype=torch.float64)
            second = 2 * torch.eye(size, dtype=torch.float64) - torch.diag(ones, 1) - torch.diag(ones, -1)
            factors = q[:, None, None] * torch.eye(size, dtype=torch.float64) + second
        else:
            factors = torch.eye(n, dtype=torch.float64) + q[:, None, None] * torch.minimum(index[:, None], index[None, :])
        want += torch.linalg.slogdet(factors)[1] if factors.shape[-1] else 0.0
    got = LogDeterminant(lengths, diffuse=p0 == math.inf)(q)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("width", [700, 40])  # 40: fewer coefficients than bins, each put in its bin
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p0", [0.0, math.inf])
def test_binned_quadratic_is_every_coefficients(p0, dtype, width):
    """The bins (runs of consecutive coefficients found from each row's bin edges, summed by
    prefix sums, or when the rows are shorter than the bins, each coefficient in its bin) give
    sum y2 / (lam + q) over every coefficient at every ratio of q_range to the second-order
    expansion's remainder, at most (W / 2)^3 / 6 = 1.7e-7 relative a coefficient (1e-8 over
    the 6000 coefficients of 700-token rows, whose remainders average out), with rows of 0, 1, 2 and up to 700 tokens in one bucket (lam past a row's count
    clamped, its y2 zero); and the moments are the same as assigning each coefficient to its bin."""
    from kpo_kernels.fit_spectrum import (
        bin_centres, bin_count, binned_moments, binned_quadratic, quadratic_coefficients, spectrum,
    )

    diffuse = p0 == math.inf
    z, mask = simulate(9, 1, width, 1e-4, 0.05, 11, dtype=dtype)
    mask[0] = False
    mask[1, 1:] = False
    mask[2, 2:] = False
    lengths = mask.sum(1)
    z = torch.where(mask, z, 0.0)
    y2, lam, count = spectrum(z, lengths, diffuse=diffuse)
    bins = bin_count(z.shape[1], None)
    moments = binned_moments(y2, lam, count, lengths, bins, diffuse=diffuse)
    q = torch.logspace(-10, 2, 49, dtype=torch.float64)
    exact = (y2.reshape(-1)[None, :] / (lam.reshape(-1).double()[None, :] + q[:, None])).sum(-1)
    centre = bin_centres(bins, "cpu")
    got = binned_quadratic(quadratic_coefficients(moments, centre), centre, q)
    assert torch.allclose(got, exact, rtol=1e-8 if width == 700 else 2e-7, atol=0.0)
    inside = torch.arange(1, y2.shape[1] + 1)[None, :] <= count[:, None]
    position = (math.log(4.0) + 1e-9 - torch.log(lam.double())) / 0.02
    index = position.floor().clamp(0, bins - 1).long()[inside]
    v = (index + 0.5 - position[inside]) * 0.02  # log lam less the bin centre
    weights = y2[inside]
    want = torch.stack([torch.bincount(index, w, minlength=bins) for w in (weights, weights * v, weights * v * v)])
    assert torch.allclose(moments, want, rtol=1e-9, atol=1e-12 * float(weights.sum()))


@pytest.mark.parametrize("p0", [0.0, math.inf])
@pytest.mark.parametrize("mask_mode", ["skip", "position"])
def test_off_the_cpu_nothing_is_read_on_the_host(p0, mask_mode, monkeypatch):
    """Off the CPU (one bucket, no host-side shortcuts) a padded batch's fit reads no value back:
    on the meta device, where every read (item, indexing with a 0-dim tensor, bool of a tensor)
    raises, it runs to a NoiseEstimate, budget included; and it makes no tensor from host data
    on the device (on CUDA that copy waits for the stream)."""
    made = []
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def spy(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            made.append(out.device.type)
            return out

        monkeypatch.setattr(torch, name, spy)
    z, mask = simulate(6, 40, 90, 1e-3, 0.04, 3, dtype=torch.float32)
    z, mask = z.to("meta"), mask.to("meta")
    made.clear()
    got = estimate_noise(z, mask, p0=p0, mask_mode=mask_mode, max_tokens=z.numel() // 2)
    assert "meta" not in made
    assert got.q.device.type == "meta" and got.q.shape == () and got.status.dtype == torch.long


@pytest.mark.parametrize("p0", [0.0, math.inf])
def test_empty_batches_have_too_few_tokens(p0):
    """No rows, rows of no tokens, an empty packed stream: FEW_TOKENS with the fallback."""
    empty_packed = (torch.zeros(0), None, torch.zeros(1, dtype=torch.int32))
    for z, mask, cu in ((torch.zeros(0, 10), None, None), (torch.zeros(3, 0), None, None), empty_packed):
        got = estimate_noise(z, mask, cu_seqlens=cu, p0=p0, fallback=(2e-6, 0.5))
        assert int(got.status) == FEW_TOKENS and (float(got.q), float(got.r)) == (2e-6, 0.5)


def test_many_short_rows_are_binned_per_coefficient(monkeypatch):
    """Rows shorter than their bins (many short rows; under a process group every one of
    MAX_BINS): each coefficient goes to its bin, never the (rows, bins) runs of long rows."""
    from kpo_kernels import fit_spectrum

    def refuse(*args, **kwargs):
        raise AssertionError("rows x bins work for rows shorter than their bins")

    monkeypatch.setattr(fit_spectrum, "_sums_by_runs", refuse)
    z, mask = simulate(512, 8, 16, 1e-3, 0.04, 4, dtype=torch.float32)
    got = estimate_noise(z, mask)
    assert int(got.status) == FITTED


def test_the_cpu_caches_hold_cpu_tensors_whatever_the_default_device():
    """The transform's CPU tables (chirp phases, coefficient indices, the per-thread workspace)
    name their device: a fit first run under another default device (here `meta`) leaves
    nothing there that a later CPU fit of the same sizes would pick up."""
    from kpo_kernels import fit_spectrum

    z, mask = simulate(3, 70, 77, 1e-3, 0.1, 4)  # sizes no other test uses
    fit_spectrum._cpu_phase.cache_clear()
    fit_spectrum._NUMERATORS.clear()
    with torch.device("meta"):
        try:
            estimate_noise(z, mask)
        except (RuntimeError, NotImplementedError):
            pass  # what else fails under a meta default device is not this test's concern
    assert all(tensor.device.type == "cpu" for pair in fit_spectrum._NUMERATORS.values() for tensor in pair)
    got = estimate_noise(z, mask)
    fit_spectrum._cpu_phase.cache_clear()
    fit_spectrum._NUMERATORS.clear()
    want = estimate_noise(z, mask)
    assert float(got.ratio) == float(want.ratio) and float(got.log_likelihood) == float(want.log_likelihood)
