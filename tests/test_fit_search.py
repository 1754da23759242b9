"""estimate_noise on the Triton backend (kpo_kernels/backends/triton_fit_layout.py and
triton_fit_search.py: the layout, the filters of every grid ratio over chunks of every sequence,
and the profile and its best point) against the torch transform and search (fit_spectrum,
fit_search.staged_search: the reference).

- The filters' profile is the exact one: chunks chained at any chunk length give the profile
  of one chunk a sequence, and the fit's profile is the reference's to the float32 filters'
  precision (~1e-7 nats a token).
- The whole fit: the same status, tokens and profile, and where the profile has a clear
  maximum the same ratio and R to the parabola's precision, on the inputs that hurt: flat
  profiles (no drift), either end of q_range, on-policy, too few and non-finite tokens, packed
  sequences subsampled (strided lengths), a diffuse prior, ragged rows of 1 to 150 tokens with
  holes.
Runs on CUDA, or interpreted on the CPU."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from helpers import examples
from kpo_kernels import TritonBackend, estimate_noise
from kpo_kernels.backends import triton_noise
from kpo_kernels.backends.triton_noise import SEARCH_HIGHEST
from kpo_kernels.fit_spectrum import sequences
from kpo_kernels.fitting import FEW_TOKENS, FITTED, NOT_FINITE, ON_POLICY
from test_noise import simulate

SETTINGS = dict(low=1e-10, high=1e2, min_tokens=64, fallback=(1e-6, 1.0))  # estimate_noise's defaults
FIELDS = ("q", "r", "ratio", "log_likelihood", "drift_evidence", "at_boundary", "num_tokens", "status")
POISONED = TritonBackend(poison=True)  # NaN / -2^30 in every output before the kernel writes it


def assert_same_fit(got, want, ratio_rel=0.02, nats=5e-5):
    """Same status and token count; a profile per token within `nats` of the reference's
    maximum (the parabola through grid points 0.22 apart in log q is good to ~2e-5 nats a token
    on small batches, the float32 filters' sums to ~1e-7 relative); where the reference's maximum is clear (drift evidence over 1e-4 nats a token, or
    its upper end), the same boundary, and the ratio and R within ratio_rel (the two parabolas
    through different grids); where it is not, the profile is flat to within that noise, so
    that the Triton fit may stop anywhere on it: its drift evidence is held small, and R only
    where both stop at the lower end. q = ratio r."""
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        assert a.shape == () and a.dtype == b.dtype and a.device == b.device, field
    assert int(got.status) == int(want.status)
    assert float(got.num_tokens) == float(want.num_tokens)
    if int(want.status) != FITTED:
        assert int(got.at_boundary) == int(want.at_boundary) == 0
        for field in ("q", "r", "ratio"):
            assert float(getattr(got, field)) == float(getattr(want, field)), field
        assert math.isnan(float(got.log_likelihood)) and math.isnan(float(got.drift_evidence))
        return
    tokens = float(want.num_tokens)
    assert float(got.log_likelihood) == pytest.approx(float(want.log_likelihood), abs=nats)
    assert float(got.q) == pytest.approx(float(got.ratio) * float(got.r), rel=1e-12)
    clear = float(want.drift_evidence) > 1e-4 * tokens or int(want.at_boundary) == 1
    if clear:
        assert int(got.at_boundary) == int(want.at_boundary)
        assert float(got.ratio) == pytest.approx(float(want.ratio), rel=ratio_rel)
        assert float(got.r) == pytest.approx(float(want.r), rel=ratio_rel)
        assert float(got.drift_evidence) == pytest.approx(float(want.drift_evidence), rel=1e-3, abs=2 * nats * tokens)
    else:  # where on the flat part each stops is noise (or not identified at all: one token a
        # sequence under P0 = 0 identifies only R (1 + q)), so that R may differ; at the lower end
        # both, it may not
        assert 0.0 <= float(got.drift_evidence) <= 2 * nats * tokens + 1e-4 * tokens
        if int(got.at_boundary) == int(want.at_boundary) == -1:
            assert float(got.r) == pytest.approx(float(want.r), rel=1e-3)


@pytest.mark.parametrize("p0", [0.0, math.inf])
@pytest.mark.parametrize("q, r", [(1e-4, 1.0), (1e-6, 1e-2), (3.0, 1e-2)])
def test_chunks_chain_exactly(q, r, p0, monkeypatch):
    """Sequences cut into chunks of 1, 7 or 64 positions (each entering with the closed-form
    variance and a level it learns only when chained) give the fit of one chunk a sequence:
    the same best point and profile to float32 rounding."""
    z, mask = simulate(4, 30, 200, q, r, seed=13, dtype=torch.float32)
    z, mask = z.to(DEVICE), mask.to(DEVICE)
    monkeypatch.setattr(triton_noise, "FILTER_CHUNK", 4096)
    whole = estimate_noise(z, mask, p0=p0, backend=POISONED)
    for length in (1, 7, 64):
        monkeypatch.setattr(triton_noise, "FILTER_CHUNK", length)
        cut = estimate_noise(z, mask, p0=p0, backend=POISONED)
        assert int(cut.status) == int(whole.status) == FITTED and int(cut.at_boundary) == int(whole.at_boundary)
        assert float(cut.log_likelihood) == pytest.approx(float(whole.log_likelihood), abs=2e-7), length
        assert float(cut.ratio) == pytest.approx(float(whole.ratio), rel=2e-3), length
        assert float(cut.r) == pytest.approx(float(whole.r), rel=1e-5), length


@pytest.mark.parametrize("mask_mode", ["skip", "position"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layout_kernel_matches_the_torch_layout(dtype, mask_mode):
    """Each sequence's log-ratios less x0 (fit_spectrum.sequences), bitwise, and its length: a
    fully masked row, bool and 0/1 float masks, NaN under the mask, strided and transposed views,
    packed sequences of 0 to 17 tokens (int32 or int64 offsets) and under a token budget; the
    zeros after a sequence's tokens included (the outputs NaN-poisoned first), so that the torch
    transform may read the layout too. (Bitwise but for a zero's sign in position mode at
    x0 = 0, which Triton versions give differently; nothing downstream tells them apart.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=gen).to(dtype)
    mask = torch.rand(5, 37, generator=gen) > 0.3
    mask[2] = False
    x = torch.where(mask, x, torch.tensor(math.nan, dtype=dtype))
    lengths = torch.tensor([0, 5, 1, 17, 9])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.randn(int(cu[-1]), generator=gen).to(dtype)
    flat_mask = torch.rand(int(cu[-1]), generator=gen) > 0.2
    cases = [
        (x, mask, None, None), (x, None, None, None), (x, mask.float(), None, None),
        (x.t().contiguous().t(), mask, None, None), (x[:, ::2], mask[:, ::2], None, None),
        (flat, flat_mask, cu, None), (flat, None, cu.to(torch.int32), None), (flat, flat_mask, cu, 30),
    ]
    for x0 in (0.0, 0.3):
        for values, valid, offsets, budget in cases:
            values, valid = values.to(DEVICE), None if valid is None else valid.to(DEVICE)
            offsets = None if offsets is None else offsets.to(DEVICE)
            got_z, got_n = POISONED.noise_layout(values, valid, offsets, mask_mode, x0, budget)
            want_z, want_n = sequences(values, valid, offsets, mask_mode, x0)
            if budget is not None and want_z.numel() > budget:
                step = -(-want_z.numel() // budget)
                want_z, want_n = want_z[::step], want_n[::step]
            assert torch.equal(got_n, want_n) and got_z.shape == want_z.shape and got_z.dtype == want_z.dtype
            # equal, a zero's sign aside: -x0 at x0 = 0 is -0.0 or +0.0 by Triton version
            torch.testing.assert_close(got_z, want_z, rtol=0, atol=0, equal_nan=True)


def both(z, mask=None, **options):
    """(Triton, torch) fits of the same data; the inputs untouched."""
    before = (z.clone(), None if mask is None else mask.clone())
    got = estimate_noise(z, mask, backend=POISONED, **options)
    want = estimate_noise(z, mask, backend="torch", **options)
    assert torch.equal(z.nan_to_num(), before[0].nan_to_num()) and (mask is None or torch.equal(mask, before[1]))
    return got, want


@pytest.mark.parametrize("p0", [0.0, math.inf])
@pytest.mark.parametrize("q, r", [(1e-4, 1.0), (0.0, 1e-2), (1e-3, 1e-1)])
def test_matches_the_torch_fit(q, r, p0):
    """The whole fit: the float32 transforms differ by ~1e-7, the fits by as much."""
    z, mask = simulate(6, 40, 300, q, r, seed=11, dtype=torch.float32)
    got, want = both(z.to(DEVICE), mask.to(DEVICE), p0=p0)
    assert int(want.status) == FITTED
    assert_same_fit(got, want)


def test_the_ends_of_q_range():
    """A range whose lower end binds (no drift) and one whose upper end binds (strong drift)."""
    z, mask = simulate(4, 100, 200, 0.0, 1e-2, seed=3, dtype=torch.float32)
    got, want = both(z.to(DEVICE), mask.to(DEVICE), q_range=(1e-3, 1e2))
    assert int(want.at_boundary) == -1 and float(got.ratio) == 1e-3
    assert_same_fit(got, want)
    z, mask = simulate(4, 100, 200, 1e-1, 1e-3, seed=3, dtype=torch.float32)
    got, want = both(z.to(DEVICE), mask.to(DEVICE), q_range=(1e-8, 1e-4))
    assert int(want.at_boundary) == 1 and float(got.ratio) == 1e-4
    assert_same_fit(got, want)


@pytest.mark.parametrize("p0", [0.0, math.inf])
@pytest.mark.parametrize("level", [10.0, -300.0])
def test_a_large_level_costs_no_precision(level, p0):
    """White noise of sd 1e-3 about a level far from 0 (and x0 at it under P0 = 0, so that the
    model holds): the filters carry each chunk's levels relative to its first observation, so
    the level's float32 rounding (1e-6 at 10, 3e-5 at 300) never enters the profile, which
    stays flat, and the fit reports the lower end as the torch search does."""
    gen = torch.Generator().manual_seed(5)
    z = level + 1e-3 * torch.randn(4, 300, generator=gen)
    x0 = level if p0 == 0.0 else 0.0
    got, want = both(z.to(DEVICE), None, p0=p0, x0=x0)
    assert int(want.at_boundary) == -1
    assert int(got.at_boundary) == -1 and float(got.ratio) == SETTINGS["low"]
    assert_same_fit(got, want, nats=1e-6)


def test_tiny_ratios_with_a_diffuse_prior():
    """A q_range of ratios near 1e-30 and below, diffuse prior: the chunks' entering variances
    (1 at the start, falling as 1 / (k + 1)) are closed form without cancellation, so the
    filters are right and white noise is fitted at the lower end, as the torch search."""
    z, mask = simulate(4, 200, 300, 0.0, 1.0, seed=6, dtype=torch.float32)
    for q_range in ((2.0**-110, 2.0**-70), (1e-30, 1e-20)):
        got, want = both(z.to(DEVICE), mask.to(DEVICE), p0=math.inf, q_range=q_range, min_tokens=4)
        assert int(want.status) == int(got.status) == FITTED
        assert int(got.at_boundary) == int(want.at_boundary) == -1 and float(got.ratio) == q_range[0]
        assert_same_fit(got, want, nats=1e-6)


@pytest.mark.parametrize("p0", [0.0, math.inf])
def test_no_drift_reports_the_lower_end(p0):
    """White noise alone: the profile is flat to the float32 filters' precision below about 1e-8
    ratios, so that their rounding alone would pick a point on it; a rise of less than NO_RISE
    over the lower end counts as none, and the fit reports the lower end, as the torch search."""
    from kpo_kernels.backends.triton_fit_search import NO_RISE

    z, mask = simulate(6, 200, 400, 0.0, 1.0, seed=1, dtype=torch.float32)
    got, want = both(z.to(DEVICE), mask.to(DEVICE), p0=p0)
    assert int(want.at_boundary) == -1 and float(want.ratio) == SETTINGS["low"]
    assert int(got.at_boundary) == -1 and float(got.ratio) == SETTINGS["low"]
    assert 0.0 <= float(got.drift_evidence) < NO_RISE * float(got.num_tokens)
    assert_same_fit(got, want)


def test_fallbacks():
    """On-policy (every log-ratio 0), too few tokens and a NaN at a valid token: the fallback Q
    and R, the status saying why."""
    z, mask = simulate(3, 50, 80, 1e-4, 1e-2, seed=5, dtype=torch.float32)
    z, mask = z.to(DEVICE), mask.to(DEVICE)
    cases = {
        ON_POLICY: (torch.zeros_like(z), mask, {}),
        FEW_TOKENS: (z, mask, {"min_tokens": 10_000}),
        NOT_FINITE: (torch.where(mask, z, 0.0).index_put_((torch.tensor(0), torch.tensor(7)), torch.tensor(math.nan)), mask, {}),
    }
    for status, (data, valid, options) in cases.items():
        got, want = both(data, valid, fallback=(2e-6, 0.5), **options)
        assert int(want.status) == status
        assert_same_fit(got, want)
        assert float(got.q) == 2e-6 and float(got.r) == 0.5


def test_packed_and_subsampled():
    """Packed sequences under a token budget: every k-th sequence, a strided view of the lengths."""
    z, mask = simulate(9, 20, 120, 1e-4, 1e-2, seed=8, dtype=torch.float32)
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    packed = z[mask].to(DEVICE)
    got, want = both(packed, cu_seqlens=cu, max_tokens=packed.numel() // 3)
    assert_same_fit(got, want)


def test_settings_float32_cannot_carry_run_the_torch_search():
    """The kernel takes each float64 setting as three float32 parts: q_range ends or fallbacks
    beyond float32's range, or below its normal numbers (whose parts lose bits), run the torch
    search instead, so that the ends and fallbacks come back exactly; so do ratios above
    SEARCH_HIGHEST, whose float32 reciprocals a GPU returns as 0 (the interpreter cannot show it:
    the kernel declines them, checked directly), and ranges whose grid would be coarser than
    SEARCH_WIDEST_STEP."""
    totals = torch.zeros(2 + 3 * 8, dtype=torch.float64, device=DEVICE)
    lengths = torch.ones(1, dtype=torch.int64, device=DEVICE)
    for low, high in ((1e-10, 1e35), (1e-300, 1e-200), (1e-10, 1e2), (1e-11, 1e2), (1e-12, 1e2), (1e-30, 1e30)):
        declined = POISONED.noise_fit(totals[None, :4].float(), lengths, diffuse=False, bins=8, low=low, high=high,
                                      min_tokens=1, fallback=(1e-6, 1.0), group=None) is None
        wide = (math.log(high) - math.log(low)) / (triton_noise.SEARCH_POINTS - 1) > triton_noise.SEARCH_WIDEST_STEP
        assert wide == ((low, high) in ((1e-10, 1e35), (1e-300, 1e-200), (1e-12, 1e2), (1e-30, 1e30)))
        assert declined == (high > SEARCH_HIGHEST or low < 1e-100 or wide)
    z, mask = simulate(3, 60, 80, 0.0, 1e-2, seed=4, dtype=torch.float32)
    z, mask = z.to(DEVICE), mask.to(DEVICE)
    for options in (
        {"q_range": (1e-300, 1e-200)}, {"q_range": (1e-44, 1e2)}, {"q_range": (1e-10, 1e60)}, {"q_range": (1e-10, 1e35)},
        {"fallback": (1e-50, 1.0), "min_tokens": 10_000}, {"fallback": (1e-35, 1e-40), "min_tokens": 10_000},
    ):
        got, want = both(z, mask, **options)
        assert int(got.status) == int(want.status) and int(got.at_boundary) == int(want.at_boundary), options
        if int(want.status) != FITTED:
            assert (float(got.q), float(got.r)) == options["fallback"] == (float(want.q), float(want.r))
        else:  # the same search on sums from the two float32 transforms
            assert int(want.at_boundary) != 0 and float(got.ratio) == float(want.ratio)
            assert float(got.q) == pytest.approx(float(want.q), rel=1e-5)


def test_float64_runs_the_exact_search():
    """float64 log-ratios keep every coefficient and the exact profile: the torch search runs
    on any backend, so the results are identical."""
    z, mask = simulate(4, 40, 90, 1e-4, 1e-2, seed=2)
    got, want = both(z.to(DEVICE), mask.to(DEVICE))
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend"):
        estimate_noise(torch.zeros(2, 8), backend="cuda")


@settings(max_examples=examples(24), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 5),
    longest=st.integers(1, 150),
    log_q=st.floats(-12, 1),
    p0=st.sampled_from([0.0, math.inf]),
    holes=st.booleans(),
)
def test_random_batches(seed, rows, longest, log_q, p0, holes):
    """Any small batch, ragged, with holes or not, drift from none to strong: as the reference."""
    z, mask = simulate(rows, 1, longest, 10.0**log_q, 1e-2, seed, dtype=torch.float32)
    if holes:
        mask = mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) > 0.25)
    got, want = both(z.to(DEVICE), mask.to(DEVICE), p0=p0, min_tokens=4)
    assert_same_fit(got, want, ratio_rel=0.05)


def _rank(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        z, mask = simulate(3 + rank, 50, 200, 1e-4, 1e-2, seed=20 + rank, dtype=torch.float32)  # different sizes
        fit = estimate_noise(z, mask, backend=POISONED, group=dist.group.WORLD)
        torch.save({field: getattr(fit, field) for field in FIELDS}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="gloo ranks with CPU tensors: the Triton kernels run on them interpreted")
def test_data_parallel_ranks_get_the_fit_of_the_pooled_data(tmp_path):
    """Two gloo processes on the CPU, each with its own micro-batch, on the Triton backend: one
    all-reduce of the bins and one of the log-determinants at the search grid's points; the
    same result on both ranks (bitwise), that of both micro-batches fitted together in one
    process."""
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for field in FIELDS:
        assert torch.equal(results[0][field], results[1][field]), field
    (z0, m0), (z1, m1) = (simulate(3 + rank, 50, 200, 1e-4, 1e-2, seed=20 + rank, dtype=torch.float32) for rank in range(2))
    width = max(z0.shape[1], z1.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    pooled = estimate_noise(torch.cat([pad(z0), pad(z1)]), torch.cat([pad(m0), pad(m1)]), backend=POISONED)
    assert int(results[0]["status"]) == int(pooled.status) == FITTED
    assert float(results[0]["num_tokens"]) == float(pooled.num_tokens)
    # the same sums, each rank's chunks chained on its own: float64 summation order apart
    for field in ("q", "r", "ratio"):
        assert float(results[0][field]) == pytest.approx(float(getattr(pooled, field)), rel=1e-5), field
    assert float(results[0]["log_likelihood"]) == pytest.approx(float(pooled.log_likelihood), abs=1e-7)
    assert float(results[0]["drift_evidence"]) == pytest.approx(float(pooled.drift_evidence), abs=1e-7 * float(pooled.num_tokens))


def test_per_size_tensors_are_not_cached_from_a_capture(monkeypatch):
    """The search grid is cached per q_range, prior and device, except while the device's stream
    is captured into a CUDA graph: what a capture builds belongs to the graph (rebuilt at each
    replay, in its memory pool), and a later eager fit must not read it."""
    from kpo_kernels import tables

    device = torch.device(DEVICE)
    build = lambda: triton_noise._search_grid(1.25e-9, 37.0, False, device)  # noqa: E731 - a range no other test uses
    monkeypatch.setattr(tables, "capturing", lambda device: True)
    during = build()
    assert build() is not during
    monkeypatch.setattr(tables, "capturing", lambda device: False)
    after = build()
    assert build() is after and torch.equal(after, during)


def test_per_size_tensors_a_capture_read_are_never_evicted(monkeypatch):
    """A captured graph reads the cached tensor at every replay without holding it: once a capture
    has read an entry, no number of other sizes evicts it; entries no capture read are evicted."""
    from kpo_kernels import tables

    device = torch.device(DEVICE)
    grid = lambda high: triton_noise._search_grid(1e-10, high, True, device)  # noqa: E731
    read, unread = grid(13.0), grid(14.0)
    monkeypatch.setattr(tables, "capturing", lambda device: True)
    assert grid(13.0) is read  # found, and pinned
    monkeypatch.setattr(tables, "capturing", lambda device: False)
    for high in range(2000, 2000 + triton_noise._SIZED_MOST + 2):
        grid(float(high))
    assert grid(13.0) is read
    assert grid(14.0) is not unread
