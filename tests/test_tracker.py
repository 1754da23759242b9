"""NoiseTracker: off is today's behaviour, per_generation fits once per rollout batch, per_step
every micro-batch; fallbacks keep the previous Q and R; bad options refused by name; under data
parallelism (real gloo processes) every rank gets the same Q and R, those of the pooled data."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import kpo_kernels
from kpo_kernels import NoiseTracker, estimate_noise, kpo_loss
from kpo_kernels.tracker import RATIO_STEPS_PER_DECADE, round_fitted
from test_noise import simulate


def tracked(fit, q_range=(1e-10, 1e2)):
    """The (q, r) a tracker passes on for an `estimate_noise` result: its ratio rounded."""
    return round_fitted(float(fit.q), float(fit.r), q_range)


def batch(seed, q=1e-4, r=0.01, rows=6):
    z, mask = simulate(rows, 100, 200, q, r, seed)
    return torch.where(mask, z, 0.0), mask


def test_off_is_the_fixed_setting_without_reading_the_data():
    tracker = NoiseTracker("off", q=1e-6, r=1.0)
    z, mask = batch(1)
    assert tracker(z, mask) == {"q": 1e-6, "r": 1.0, "p0": 0.0}
    assert tracker(torch.full_like(z, math.nan), mask) == {"q": 1e-6, "r": 1.0, "p0": 0.0}
    assert tracker.metrics["refit"] == 0.0
    # the loss with tracker("off")'s keywords is bitwise the loss with the defaults
    old = -torch.rand(z.shape, dtype=torch.float64)
    adv = torch.randn(z.shape[0], dtype=torch.float64)
    a, _ = kpo_loss(old + z, old, adv, mask, **tracker(z, mask))
    b, _ = kpo_loss(old + z, old, adv, mask)
    assert torch.equal(a, b)


def test_per_step_fits_every_micro_batch():
    tracker = NoiseTracker("per_step", q=1e-6, r=1.0)
    for seed in (2, 3):
        z, mask = batch(seed)
        options = tracker(z, mask)
        want = estimate_noise(z, mask)
        assert (options["q"], options["r"]) == tracked(want) and options["p0"] == 0.0
        assert tracker.metrics["refit"] == 1.0 and tracker.metrics["kalman_q"] == options["q"]
        assert tracker.metrics["fit_status"] == 0.0


def test_the_per_step_budget_fits_every_kth_sequence_of_a_larger_micro_batch():
    """per_step fits at most max_tokens positions (default PER_STEP_MAX_TOKENS): a larger
    micro-batch on every k-th sequence, as estimate_noise(max_tokens=...); None fits every
    sequence; per_generation always reads every sequence."""
    from kpo_kernels.fit_options import PER_STEP_MAX_TOKENS

    z, mask = batch(6, rows=12)  # 12 x 200 positions
    capped = estimate_noise(z, mask, max_tokens=z.numel() // 3)
    whole = estimate_noise(z, mask)
    assert float(capped.q) != float(whole.q)
    assert tracked(capped) != tracked(whole)
    assert NoiseTracker("per_step", max_tokens=z.numel() // 3)(z, mask)["q"] == tracked(capped)[0]
    assert NoiseTracker("per_step", max_tokens=None)(z, mask)["q"] == tracked(whole)[0]
    assert NoiseTracker("per_generation", max_tokens=z.numel() // 3)(z, mask)["q"] == tracked(whole)[0]
    assert NoiseTracker().max_tokens == PER_STEP_MAX_TOKENS == 32768
    big, big_mask = simulate(40, 1900, 2000, 1e-4, 0.01, 7, dtype=torch.float32)  # 80000 positions: every 3rd row
    assert NoiseTracker("per_step")(big, big_mask)["q"] == tracked(estimate_noise(big[::3], big_mask[::3]))[0]


def test_per_generation_fits_the_first_stale_micro_batch_of_each_generation():
    tracker = NoiseTracker("per_generation", q=1e-6, r=1.0)
    first, mask = batch(4)
    second, _ = batch(5)
    assert tracker(torch.zeros_like(first), mask) == {"q": 1e-6, "r": 1.0, "p0": 0.0}  # on-policy: still pending
    assert tracker.metrics["fit_status"] == 1.0
    fitted = tracker(first, mask)
    assert fitted["q"] == tracked(estimate_noise(first, mask))[0]
    assert tracker(second, mask) == fitted  # fixed until the next generation
    assert tracker(second, mask, stale=False) == fitted
    tracker.new_generation()
    assert tracker(second, mask, stale=False) == fitted  # declared on-policy: not fitted
    assert tracker(second, mask)["q"] == tracked(estimate_noise(second, mask))[0]


def test_a_failed_fit_keeps_the_previous_values():
    tracker = NoiseTracker("per_step", q=1e-6, r=1.0, p0=math.inf, min_tokens=50)
    z, mask = batch(6)
    fitted = tracker(z, mask)
    assert fitted["p0"] == math.inf
    for bad in (torch.zeros_like(z), torch.full_like(z, math.nan)):
        assert tracker(bad, mask) == fitted
        assert tracker.metrics["refit"] == 0.0
    assert tracker(z, mask & (torch.arange(z.shape[1]) < 5)) == fitted  # 30 tokens < 50
    assert tracker.metrics["fit_status"] == 2.0


@pytest.mark.parametrize("q_range", [None, (1e-10, 1e2), (3e-7, 5e-3)])
def test_a_fitted_ratio_is_rounded_to_the_grid_and_keeps_r(q_range):
    """round_fitted: Q / R exactly on the grid of RATIO_STEPS_PER_DECADE steps a decade, or at an
    end of q_range (26 bits, inward), within half a step of the fit; R within 26 significant bits."""
    generator = torch.Generator().manual_seed(5)
    half_step = math.log(10.0) / RATIO_STEPS_PER_DECADE / 2
    low, high = q_range or (1e-10, 1e2)
    samples = torch.rand(2000, 2, generator=generator, dtype=torch.float64).tolist() + [[0.5, 0.0], [0.5, 1.0]]
    for log_r, log_ratio in samples:
        r = math.exp(-60 + 70 * log_r)
        ratio = math.exp(math.log(low) + (math.log(high) - math.log(low)) * log_ratio)
        q2, r2 = round_fitted(ratio * r, r, q_range)
        assert abs(r2 / r - 1.0) <= 2.0**-26
        grid = q2 / r2
        assert grid * r2 == q2 and abs(math.log(grid / ratio)) <= half_step + 1e-7
        step = math.log10(grid) * RATIO_STEPS_PER_DECADE
        if q_range is not None:
            assert low <= grid <= high
            if log_ratio in (0.0, 1.0):  # a fit at an end of the range stays there
                assert abs(grid / ratio - 1.0) <= 2.0**-25
                continue
        at_end = q_range is not None and min(abs(grid / low - 1.0), abs(grid / high - 1.0)) <= 2.0**-25
        assert abs(step - round(step)) < 1e-6 or at_end  # on the grid, or at an end of q_range


def test_round_fitted_leaves_what_it_cannot_round():
    """Nothing to round (0, negative, non-finite), a q_range narrower than 26 bits, or a rounding
    that would leave float64's range: the values as given."""
    assert math.isnan(round_fitted(math.nan, 1.0)[0])
    for q, r in [(1e-6, math.inf), (1.0, 0.0), (0.0, 1.0), (-1e-6, 1.0), (1e-6, -1.0), (1e-300, 1.7e308)]:
        assert round_fitted(q, r) == (q, r)
    assert round_fitted(1.01e-6, 1.0, (1.01e-6, 1.01e-6 * (1 + 1e-12))) == (1.01e-6, 1.0)
    q, r = round_fitted(1.01e-6, 1.0, (1.005e-6, 1.02e-6))  # no grid point inside: the nearer end
    assert 1.005e-6 <= q / r <= 1.005e-6 * (1 + 2.0**-25)


def test_successive_fits_meet_their_rounded_ratios_tables_again(monkeypatch):
    """Two fits whose ratios round to one grid point, with different R: the second loss builds no
    table (kpo_kernels.tables.cache.builds) and adds no CPU scan entry; its result is the loss at
    the tracker's (q, r), whatever was cached."""
    from collections import OrderedDict

    from kpo_kernels import tables
    from kpo_kernels.backends import torch_scan

    monkeypatch.setattr(torch_scan, "_CPU_CACHE", OrderedDict())  # empty: any new entry shows
    monkeypatch.setattr(torch_scan, "_cpu_cache_bytes", 0)
    z, mask = batch(12)
    old = -torch.rand(z.shape, dtype=torch.float64)
    adv = torch.randn(z.shape[0], dtype=torch.float64)
    q, r = tracked(estimate_noise(z, mask))
    first = {"q": q, "r": r, "p0": 0.0}
    other_q, other_r = round_fitted(q / r * 0.37, 0.37)  # the same ratio, another R
    assert other_q / other_r == q / r and other_r != r
    other = dict(first, q=other_q, r=other_r)
    a, _ = kpo_loss(old + z, old, adv, mask, backend="torch", **first)
    builds, entries = tables.cache.builds, len(torch_scan._CPU_CACHE)
    b, metrics = kpo_loss(old + z, old, adv, mask, backend="torch", **other)
    assert entries and tables.cache.builds == builds and len(torch_scan._CPU_CACHE) == entries
    monkeypatch.setattr(torch_scan, "_CPU_CACHE", OrderedDict())
    tables.cache.clear()
    fresh, fresh_metrics = kpo_loss(old + z, old, adv, mask, backend="torch", **other)
    assert torch.equal(b, fresh) and all(torch.equal(metrics[k], fresh_metrics[k]) for k in metrics)


def test_p0_ratio_is_kept():
    tracker = NoiseTracker("per_step", q=1e-6, r=1.0, p0=0.0)
    z, mask = batch(7)
    assert tracker(z, mask)["p0"] == 0.0


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"mode": "sometimes"}, ValueError, "mode"),
        ({"mode": True}, TypeError, "mode"),
        ({"p0": 0.5}, ValueError, "p0"),
        ({"q": -1.0}, ValueError, "process noise"),
        ({"r": 0.0}, ValueError, "observation noise"),
        ({"q_range": (1e-3, 1e-4)}, ValueError, "q_range"),
        ({"min_tokens": 0}, ValueError, "min_tokens"),
        ({"max_tokens": 1}, ValueError, "max_tokens"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens"),
        ({"max_tokens": "all"}, TypeError, "max_tokens"),
        ({"mask_mode": "drop"}, ValueError, "mask_mode"),
        ({"group": "world"}, ValueError, "group"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        NoiseTracker(**kwargs)


def test_p0_between_0_and_inf_is_fine_when_off():
    assert NoiseTracker("off", p0=0.5).options["p0"] == 0.5


# --- data parallelism ---------------------------------------------------------------------------


def _rank(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        z, mask = batch(10 + rank, rows=3 + rank)  # different data and sizes on each rank
        tracker = NoiseTracker("per_step")  # group="auto": the default group
        options = tracker(z, mask)
        torch.save({"options": options, "metrics": dict(tracker.metrics)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_get_the_same_fit_that_of_the_pooled_data(tmp_path):
    """Two gloo processes on the CPU, each with its own micro-batch: one all-reduce of the
    estimator's sums, identical Q and R on both ranks, equal to the fit of both micro-batches
    together in one process."""
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0] == results[1]
    (z0, m0), (z1, m1) = batch(10, rows=3), batch(11, rows=4)
    width = max(z0.shape[1], z1.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    pooled = estimate_noise(torch.cat([pad(z0), pad(z1)]), torch.cat([pad(m0), pad(m1)]))
    want_q, want_r = tracked(pooled)
    assert results[0]["options"]["q"] == pytest.approx(want_q, rel=1e-9)
    assert results[0]["options"]["r"] == pytest.approx(want_r, rel=1e-12)
    assert results[0]["metrics"]["refit"] == 1.0


def _rank_disagreeing(rank, world, path, out):
    """Rank 1 never wants a fit (an on-policy micro-batch: stale=False); rank 0 does. A
    collective after each call checks that the two ranks' collectives still pair up."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        z, mask = batch(10)
        results = {}
        for mode in ("per_step", "per_generation"):
            tracker = NoiseTracker(mode)
            calls = []
            for _ in range(2):  # per_generation: the second call is within the same generation
                calls.append((dict(tracker(z, mask, stale=rank == 0)), tracker.metrics["refit"]))
                marker = torch.tensor([float(rank + 1)])
                dist.all_reduce(marker)
                calls.append(float(marker))
            results[mode] = calls
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_join_a_fit_any_rank_wants(tmp_path):
    """A rank whose micro-batch is on-policy (or all masked) joins the fit the others want, with
    no tokens of its own: skipping it would pair its next collective (a gradient all-reduce)
    with the others' fit. Both ranks get the fit of rank 0's data alone, per_step at every
    call, per_generation once a generation."""
    mp.spawn(_rank_disagreeing, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0] == results[1]
    want_q, want_r = tracked(estimate_noise(*batch(10)))
    for mode, refits in (("per_step", [1.0, 1.0]), ("per_generation", [1.0, 0.0])):
        (first, refit_1), marker_1, (second, refit_2), marker_2 = results[0][mode]
        assert (marker_1, marker_2) == (3.0, 3.0)
        assert [refit_1, refit_2] == refits
        assert first["q"] == second["q"] == pytest.approx(want_q, rel=1e-9)
        assert first["r"] == pytest.approx(want_r, rel=1e-12)


def test_backend_is_checked_and_passed_to_the_fit(monkeypatch):
    """`backend` is refused by name at construction when it names no backend, and each fit
    runs on the one given (trainers pass their loss's)."""
    with pytest.raises(ValueError, match="backend"):
        NoiseTracker("per_step", backend="cuda")
    seen = []
    real = kpo_kernels.tracker.estimate_noise

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kpo_kernels.tracker, "estimate_noise", spy)
    for backend in ("torch", kpo_kernels.TorchBackend()):
        tracker = NoiseTracker("per_step", backend=backend)
        tracker(*batch(2))
        assert seen[-1] is backend and tracker.metrics["refit"] == 1.0
