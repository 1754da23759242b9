"""fit_noise (docs/math.md section 5c): recovery of known Q and R, exactness against the sequential float64
likelihood of reference/diagnostics.py, layouts, and argument checks."""

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kpo_kernels
import reference
from conftest import DEVICE, triton_backend
from helpers import assert_close, examples


def simulate(rows, shortest, longest, q, r, seed, dtype=torch.float64):
    """Ragged right-padded random walks plus white noise, from x_0 = 0 with P_0 = 0 (the model
    fit_noise assumes with p0=0, x0=0); NaN garbage under the mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (rows,), generator=gen)
    width = int(lengths.max())
    walk = torch.cumsum(torch.randn(rows, width, generator=gen, dtype=torch.float64) * math.sqrt(q), dim=1)
    z = walk + torch.randn(rows, width, generator=gen, dtype=torch.float64) * math.sqrt(r)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return torch.where(mask, z, math.nan).to(dtype), mask


# (Q, R): the paper's Q/R = 1e-6 and larger ratios, at two noise scales, and no drift at all.
RECOVERY = [(1e-8, 1e-2), (1e-7, 1e-2), (1e-6, 1e-2), (1e-4, 1.0), (1e-3, 1e-1), (0.0, 1e-2), (0.0, 1.0)]


@pytest.mark.parametrize("q, r", RECOVERY)
@pytest.mark.parametrize("seed", [101, 202])
def test_recovers_known_noise(q, r, seed):
    """Held-out simulations (seeds not used to design the search): Q/R within 35%, R within 3%;
    without drift the ratio ends at the lower end of q_range, or at a ratio the data cannot
    tell from it (drift_evidence < 1.4 nats) whose drift over a whole sequence is negligible."""
    z, mask = simulate(64, 2048, 4096, q, r, seed, dtype=torch.float32)
    fit = kpo_kernels.fit_noise(z, mask)
    assert abs(fit.r / r - 1) < 0.03, fit
    if q > 0:
        assert abs(fit.ratio / (q / r) - 1) < 0.35, fit
        assert fit.at_boundary is None
        assert math.isclose(fit.q, fit.ratio * fit.r)
    else:
        assert fit.at_boundary == "lower" or fit.drift_evidence < 1.4, fit
        assert fit.ratio * 4096 < 1e-3, fit
    assert fit.num_tokens == int(mask.sum())


def test_lower_end_is_reported_as_such():
    """Constant-mean data and a lower end above the fitted optimum: the profile rises to the
    end, the fit stays there and says so."""
    z, mask = simulate(8, 500, 800, 0.0, 1.0, 7)
    fit = kpo_kernels.fit_noise(z, mask, q_range=(1e-4, 1.0))
    assert fit.at_boundary == "lower" and fit.ratio == 1e-4 and fit.drift_evidence == 0.0
    steep, steep_mask = simulate(8, 500, 800, 1.0, 1.0, 8)
    high = kpo_kernels.fit_noise(steep, steep_mask, q_range=(1e-6, 1e-2))
    assert high.at_boundary == "upper" and high.ratio == 1e-2


@pytest.mark.parametrize(
    "case",
    ["right", "holes", "left", "position", "diffuse", "prior", "packed", "packed-position", "float32"],
)
def test_likelihood_is_the_sequential_float64_one(case):
    """The fitted log-likelihood per token and R agree with the sequential float64 recursion to
    1e-9 relative, and R_hat maximises it over R."""
    gen = torch.Generator().manual_seed(3)
    z, mask = simulate(5, 60, 90, 1e-3, 0.04, 3)
    options = {}
    if case in ("holes", "position", "diffuse", "prior", "packed", "packed-position"):
        mask = mask & (torch.rand(mask.shape, generator=gen) > 0.3)
    if case == "left":
        mask, z = mask.flip(1), z.flip(1)
    if case in ("position", "packed-position"):
        options["mask_mode"] = "position"
    if case == "diffuse":
        options["p0"] = math.inf
    if case == "prior":
        options.update(p0=0.5, x0=0.02)
    if case.startswith("packed"):  # each row cut to a random length, then packed
        lengths = [int(n) for n in torch.randint(1, z.shape[1] + 1, (5,), generator=gen)]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        flat = torch.cat([z[i, :n] for i, n in enumerate(lengths)])
        flat_mask = torch.cat([mask[i, :n] for i, n in enumerate(lengths)])
        ratio_fit = kpo_kernels.fit_noise(flat, flat_mask, cu_seqlens=cu, **options)
        mask = mask & (torch.arange(z.shape[1])[None] < torch.tensor(lengths)[:, None])
    else:
        ratio_fit = kpo_kernels.fit_noise(z.float() if case == "float32" else z, mask, **options)
    z64 = z.float().double() if case == "float32" else z
    ref_options = {k: v for k, v in options.items() if k != "p0"}
    p0_ratio = options.get("p0", 0.0)
    r_hat, per_token = reference.profile(z64, mask, ratio=ratio_fit.ratio, p0_ratio=p0_ratio, **ref_options)
    assert math.isclose(ratio_fit.r, r_hat, rel_tol=1e-9)
    assert math.isclose(ratio_fit.log_likelihood, per_token, rel_tol=1e-9)
    total, count = reference.innovation_log_likelihood(
        z64, mask, q=ratio_fit.q, r=ratio_fit.r, p0=ratio_fit.p0, **ref_options
    )
    assert count == ratio_fit.num_tokens
    assert math.isclose(ratio_fit.log_likelihood, total / count, rel_tol=1e-9)
    for factor in (0.999, 1.001):  # R_hat is the maximum over R at the fitted ratio
        other, _ = reference.innovation_log_likelihood(
            z64, mask, q=ratio_fit.q * factor, r=ratio_fit.r * factor, p0=ratio_fit.p0 * factor, **ref_options
        )
        assert other < total
    if case == "diffuse":
        assert count == int(mask.sum()) - int(mask.any(1).sum())  # each sequence's first is left out


def test_profile_is_sorted_and_peaks_at_the_fit():
    z, mask = simulate(16, 300, 600, 1e-3, 1.0, 5)
    fit = kpo_kernels.fit_noise(z, mask)
    assert list(fit.profile_ratio) == sorted(fit.profile_ratio)
    assert len(fit.profile_ratio) == fit.evaluations == len(fit.profile_log_likelihood)
    assert fit.profile_ratio[0] == pytest.approx(1e-10) and fit.profile_ratio[-1] == pytest.approx(1e2)
    assert max(fit.profile_log_likelihood) == fit.log_likelihood
    # golden-section search converged: the neighbours of the optimum are within 0.1% in ratio
    i = fit.profile_ratio.index(fit.ratio)
    assert fit.profile_ratio[i + 1] / fit.profile_ratio[i - 1] < 1.002


def test_matches_the_kpo_loss_metric_at_the_fit():
    """NoiseFit.log_likelihood is kpo_loss's log_likelihood metric at (q, r); nis_mean is 1 there
    (R_hat makes the mean of e^2 / S exactly 1)."""
    z, mask = simulate(6, 100, 200, 1e-3, 0.01, 9)
    fit = kpo_kernels.fit_noise(z, mask)
    zero = torch.zeros_like(z)
    _, metrics = kpo_kernels.kpo_loss(z, zero, torch.ones(6, dtype=torch.float64), mask, q=fit.q, r=fit.r, backend="torch")
    assert math.isclose(float(metrics["log_likelihood"]), fit.log_likelihood, rel_tol=1e-12)
    assert math.isclose(float(metrics["nis_mean"]), 1.0, rel_tol=1e-12)


def test_packed_equals_padded_and_garbage_is_not_read():
    z, mask = simulate(6, 50, 120, 1e-3, 0.02, 11)
    garbage = torch.where(mask, z, torch.tensor([math.inf, -math.inf, math.nan, 1e30]).repeat(z.numel() // 4 + 1)[: z.numel()].view(z.shape))
    padded = kpo_kernels.fit_noise(garbage, mask)
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    packed = kpo_kernels.fit_noise(z[mask], cu_seqlens=cu)
    assert padded.ratio == pytest.approx(packed.ratio, rel=1e-9) and padded.r == pytest.approx(packed.r, rel=1e-9)


def test_triton_backend_agrees():
    """backend="triton" evaluates the profile with the fused loss kernel's float32 metrics."""
    z, mask = simulate(3, 80, 100, 1e-2, 0.05, 12, dtype=torch.float32)
    # Two decades around the truth (1e-2): each profile point is an interpreted kernel launch here.
    want = kpo_kernels.fit_noise(z, mask, q_range=(1e-3, 1e-1))
    got = kpo_kernels.fit_noise(z.to(DEVICE), mask.to(DEVICE), q_range=(1e-3, 1e-1), backend=triton_backend(block_size=16, tile_size=32))
    # float32 sums: the profile to ~1e-6, hence the optimum of a flat maximum to ~1e-3
    assert got.ratio == pytest.approx(want.ratio, rel=0.02) and got.r == pytest.approx(want.r, rel=2e-3)
    assert got.log_likelihood == pytest.approx(want.log_likelihood, rel=1e-5)
    assert got.num_tokens == want.num_tokens


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"q_range": (0.0, 1.0)}, ValueError, "q_range"),
        ({"q_range": (1.0, 1e-3)}, ValueError, "q_range"),
        ({"q_range": 1e-3}, TypeError, "q_range"),
        ({"q_range": (1e-3, math.inf)}, ValueError, "q_range"),
        ({"p0": -1.0}, ValueError, "p0"),
        ({"x0": math.nan}, ValueError, "x0"),
        ({"mask_mode": "drop"}, ValueError, "mask_mode"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError, "mask"),
        ({"cu_seqlens": torch.tensor([0, 40])}, ValueError, "log_ratio"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    z, mask = simulate(4, 10, 10, 1e-3, 1.0, 1)
    args = {"mask": mask, **kwargs}
    with pytest.raises(exc, match=words):
        kpo_kernels.fit_noise(z, **args)


def test_bad_data():
    z, mask = simulate(4, 10, 10, 1e-3, 1.0, 1)
    with pytest.raises(TypeError, match="log_ratio"):
        kpo_kernels.fit_noise(z.tolist())
    with pytest.raises(ValueError, match="no valid token"):
        kpo_kernels.fit_noise(z, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="no valid token"):  # one token a sequence, diffuse prior
        kpo_kernels.fit_noise(z[:, :1], p0=math.inf)
    with pytest.raises(ValueError, match="x0"):
        kpo_kernels.fit_noise(torch.full((3, 8), 0.25), x0=0.25)
    bad = z.clone()
    bad[1, 3] = math.inf
    with pytest.raises(ValueError, match="finite"):
        kpo_kernels.fit_noise(bad, mask)


def test_noise_section_of_the_main_command():
    """The section prints the fits against the generator and the diagnostics at both noises;
    at the fitted (Q, R) nis_mean is 1 by construction of R_hat."""
    import io

    from kpo_kernels.noise_report import Generator, noise_section

    z, mask = simulate(8, 300, 500, 1e-4, 0.01, 13)
    z = torch.where(mask, z, 0.0)
    batch = {"log_prob": z, "old_log_prob": torch.zeros_like(z), "advantages": torch.randn(8, dtype=torch.float64), "mask": mask}
    text = io.StringIO()
    result = noise_section(batch, Generator("random walk Q = 1e-4, R = 0.01", q=1e-4, r=0.01), out=text)
    printed = text.getvalue()
    assert "Q = 0.0001, R = 0.01" in printed and "diffuse prior" in printed
    for name in ("nis_mean", "log_likelihood", "sign_flip_raw", "sign_flip_filtered", "clipfrac_high", "capfrac"):
        assert name in printed
    assert result["fitted"]["nis_mean"] == pytest.approx(1.0, rel=1e-5)
    assert abs(result["fit_p0_0"].ratio / 1e-2 - 1) < 0.35


def test_choosing_q_and_r_snippets_run():
    """Every Python snippet of docs/choosing-q-and-r.md runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "choosing-q-and-r.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert snippets
    for code in snippets:
        exec(compile(code, "docs/choosing-q-and-r.md", "exec"), {})


def _assert_usable(fit, x0=0.0):
    """A fit kpo_loss accepts as it is: q, r (and a finite p0) normal float64 numbers."""
    from kpo_kernels.validation import check_filter_params

    for name in ("q", "r", "log_likelihood", "drift_evidence"):
        assert math.isfinite(getattr(fit, name)), (name, fit)
    assert fit.q >= sys.float_info.min and fit.r >= sys.float_info.min, fit
    check_filter_params(q=fit.q, r=fit.r, p0=fit.p0, x0=x0)


def test_the_fit_scales_with_the_square_of_the_data():
    """The filter is equivariant in (z - x0, Q, R): data times 2^k give the same ratio, R times
    4^k, and the log-likelihood per token less k log 2, at magnitudes where R would overflow or
    underflow if the data were not scaled first (the fit works on (z - x0) / its magnitude)."""
    z, mask = simulate(3, 40, 60, 1e-3, 1.0, 5)
    want = kpo_kernels.fit_noise(z, mask, x0=0.25)
    for k in (-500, -300, 300, 511):  # 511: |z| ~ 2^513, whose square overflows
        got = kpo_kernels.fit_noise(z * 2.0**k, mask, x0=0.25 * 2.0**k)
        _assert_usable(got, x0=0.25 * 2.0**k)
        assert got.ratio == pytest.approx(want.ratio, rel=1e-9)
        assert got.r == pytest.approx(math.ldexp(want.r, 2 * k), rel=1e-9)
        assert got.log_likelihood == pytest.approx(want.log_likelihood - k * math.log(2.0), rel=1e-9)
        assert got.drift_evidence == pytest.approx(want.drift_evidence, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("value, where", [(1e200, "one"), (1e-160, "all"), (1e-300, "all"), (1.7e308, "one")])
def test_extreme_data_give_a_usable_fit_or_name_the_range(value, where):
    """Issue 19: one log-ratio of 1e200 gave q = r = inf; data of 1e-160 gave q = 0 with a
    subnormal r. Now: a fit kpo_loss accepts, or a ValueError naming log_ratio and the range."""
    z, mask = simulate(2, 30, 30, 1e-3, 1.0, 2)
    if where == "one":
        z[0, 3] = value
    else:
        z = z * value
    try:
        fit = kpo_kernels.fit_noise(z, mask)
    except ValueError as error:
        assert "log_ratio" in str(error) and "range" in str(error), error
    else:
        _assert_usable(fit)


@settings(max_examples=examples(25), deadline=None)
@given(
    exponent=st.floats(-300.0, 300.0),
    rows=st.integers(1, 3),
    length=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    x0_share=st.sampled_from([0.0, 0.5]),
)
def test_property_every_finite_magnitude_gives_a_usable_fit_or_a_range_error(exponent, rows, length, seed, x0_share):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, length, dtype=torch.float64, generator=generator) * 10.0**exponent
    x0 = x0_share * float(z[0, 0])
    try:
        fit = kpo_kernels.fit_noise(z, x0=x0, q_range=(1e-6, 1e2))
    except ValueError as error:
        message = str(error)
        assert "log_ratio" in message and "range" in message, message
        assert not 1e-140 < abs(10.0**exponent) < 1e140, message  # only at the extremes
    else:
        _assert_usable(fit, x0=x0)


def test_triton_fit_takes_an_x0_beyond_float32():
    """The backend sees the data centred on x0, so the Triton kernels' float32 x0 is no limit."""
    z, mask = simulate(2, 10, 12, 1e-2, 1.0, 3)
    x0, data = 1e39, z * 1e38 + 1e39
    want = kpo_kernels.fit_noise(data, mask, x0=x0, q_range=(1e-2, 1.0))
    got = kpo_kernels.fit_noise(data.to(DEVICE), mask.to(DEVICE), x0=x0, q_range=(1e-2, 1.0),
                                backend=triton_backend(block_size=16))
    assert got.ratio == pytest.approx(want.ratio, rel=0.05) and got.r == pytest.approx(want.r, rel=0.05)
