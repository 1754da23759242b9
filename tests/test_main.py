"""`python -m kpo_kernels` (the README's first command), run as a user runs it, on small CPU shapes.

Also the pieces it stands on: the float64 yardstick equals `reference/`, the error columns can
fail, and the accuracy sweep finds the vectorized-cumsum failures.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kpo_kernels
import reference

ROOT = Path(__file__).resolve().parents[1]
CPU_IMPLS = {"kpo", "kpo-torch", "sequential-reference", "vectorized-cumsum", "grpo-eager"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the `bench` extra
ACCURACY_LENGTHS = [256, 1024]


def package_env():
    """The environment of a child process that imports the kpo_kernels under test (this
    checkout's, even where an installed copy of another checkout is on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(kpo_kernels.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """One run from a directory outside the checkout: q = 1e-8 breaks vectorized-cumsum."""
    out = tmp_path_factory.mktemp("main")
    args = [
        sys.executable, "-m", "kpo_kernels", "--device", "cpu", "--rows", "8", "--length", "384",
        "--q", "1e-8", "--budget", "0.02", "--reference-max-length", "512", "--accuracy-max-length", "1024",
        "--threads", "1", "--json", str(out / "rows.json"), "--markdown", str(out / "table.md"),
    ] + (["--plot", str(out / "plot.png")] if HAS_MATPLOTLIB else [])
    proc = subprocess.run(args, cwd=out, env=package_env(), capture_output=True, text=True, timeout=300)
    return proc, out


def test_main_command_runs_and_agrees(main_run):
    proc, out = main_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agree with the float64 reference" in proc.stdout
    assert "vectorized-cumsum" in proc.stdout and "err filter" in proc.stdout
    assert "1 torch threads" in proc.stdout  # --threads 1
    # Output in the order of the work: the noise fit, then the files written, then the verdict.
    order = [proc.stdout.index(text) for text in ("Noise: fit_noise on the synthetic batch (8 x 384", "wrote ", "agree with")]
    assert order == sorted(order), order
    assert " 5/5 8x384 fp32" in proc.stderr  # progress lines
    assert "accuracy 4x1024 fp32: kpo filter" in proc.stderr
    table = (out / "table.md").read_text()
    assert "| kpo (torch) | 8x384 fp32 |" in table
    assert "## Accuracy against float64 as T grows" in table and "| 1024 |" in table
    accuracy = proc.stdout.split("Accuracy against float64 as T grows", 1)[1].split("\n\n", 1)[0]
    lines = {line.split()[0]: line.split()[1:] for line in accuracy.splitlines()[3:]}
    # kpo's filter and gradient, then vectorized-cumsum's: its filter is NaN at q = 1e-8 (its
    # gradient is not: torch.clamp's backward is 0 where the ratio is NaN)
    assert set(lines) == {"256", "1024"} and all(len(cells) == 4 and cells[2] == "NaN" for cells in lines.values())
    assert all(float(cell) <= 1e-5 for cells in lines.values() for cell in cells[:2])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install -e '.[bench]')")
def test_main_command_plot(main_run):
    proc, out = main_run
    assert proc.returncode == 0
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_main_command_json_rows(main_run):
    _, out = main_run
    everything = json.loads((out / "rows.json").read_text())
    rows = [row for row in everything if row["kind"] == "timing"]
    accuracy = [row for row in everything if row["kind"] == "accuracy"]
    assert len(rows) + len(accuracy) == len(everything)
    by_impl = {row["impl"]: row for row in rows}
    assert set(by_impl) == CPU_IMPLS and len(rows) == len(CPU_IMPLS)
    assert sorted((r["impl"], r["length"]) for r in accuracy) == sorted(
        (name, t) for name in ("kpo", "vectorized-cumsum") for t in ACCURACY_LENGTHS
    )
    for row in accuracy:
        assert (row["rows"], row["dtype"], row["q"], row["status"]) == (4, "fp32", 1e-8, "ok")
        assert "median_ms" not in row  # errors only
        if row["impl"] == "kpo":
            assert row["check"] == "pass" and row["err_filter"] <= 1e-5 and row["err_grad"] <= 1e-5
        else:  # the authors' gains are 0/0 at q = 1e-8
            assert row["check"] is None and row["err_filter"] == "NaN"
    for row in rows:
        assert row["status"] == "ok"
        assert (row["rows"], row["length"], row["dtype"], row["device"]) == (8, 384, "fp32", "cpu")
        assert row["bytes"] == 8 * 384 * (3 * 4 + 1) + 8 * 4
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["gbps"] == pytest.approx(row["bytes"] / row["median_ms"] / 1e6)
    kpo = by_impl["kpo"]
    assert kpo["backend"] == "torch" and kpo["time_vs_kpo"] == 1.0 and kpo["q"] == 1e-8
    assert kpo["peak_mb"] > 0  # the gradient alone is 12 KB
    for name in ("kpo", "kpo-torch"):
        row = by_impl[name]
        assert row["check"] == "pass"
        for key in ("err_filter", "err_loss", "err_grad", "err_metrics"):
            assert isinstance(row[key], float) and row[key] <= 1e-5, (name, key, row[key])
    # The authors' float32 sinh gains are 0/0 at q = 1e-8: the error column shows it.
    assert by_impl["vectorized-cumsum"]["err_filter"] == "NaN"
    assert by_impl["vectorized-cumsum"]["check"] is None
    grpo = by_impl["grpo-eager"]
    assert grpo["err_filter"] is None and grpo["err_grad"] is None
    assert by_impl["sequential-reference"]["err_filter"] < 1e-5


def test_main_command_fails_on_a_disagreement(tmp_path):
    """Exit status 1 and a FAILED line when this package disagrees with float64 (here: a
    backend whose filter is off by 1e-4 relative, monkeypatched into the child process)."""
    script = (
        "import sys, kpo_kernels.bench.implementations as impls\n"
        "real = impls.IMPLEMENTATIONS['kpo']\n"
        "impls.IMPLEMENTATIONS['kpo'] = real.__class__('kpo', real.run, lambda b, s: real.filter(b, s) * (1 + 1e-4),"
        " real.native_on, kpo=True)\n"
        "from kpo_kernels.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [sys.executable, "-c", script, "--device", "cpu", "--rows", "4", "--length", "64", "--impl", "kpo",
            "--budget", "0.01", "--accuracy-max-length", "256", "--no-memory", "--quiet"]
    proc = subprocess.run(args, cwd=tmp_path, env=package_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: disagreement with the float64 reference" in proc.stdout
    assert "kpo on 4x256 fp32 (accuracy sweep): filter" in proc.stdout and "kpo on 4x64 fp32: filter" in proc.stdout


def _batch(rows=8, length=256, seed=3):
    from kpo_kernels.bench.data import rl_batch

    return rl_batch(rows, length, seed=seed)


@pytest.mark.parametrize("mask_mode", ["skip", "position"])
def test_yardstick_recursion_is_reference(mask_mode):
    from kpo_kernels.bench.baselines import float64_filter

    batch = _batch()
    mask = batch["mask"].clone()
    mask[2, 10:40] = False  # a hole
    mask[3, :5] = False  # left padding
    z = (batch["log_prob"] - batch["old_log_prob"]).double()
    for kwargs in (dict(q=1e-6), dict(q=3e-3, r=2.0, p0=0.5, x0=0.1), dict(q=1e-2, p0=math.inf)):
        want = reference.kalman_filter(z, mask, mask_mode=mask_mode, **kwargs)
        assert torch.equal(float64_filter(z, mask, mask_mode=mask_mode, **kwargs), want)


def test_error_columns_can_fail():
    from kpo_kernels.bench.correctness import errors_against, yardstick
    from kpo_kernels.bench.implementations import forward_backward

    batch = _batch()
    yard = yardstick(batch)
    assert float(yard.grad.abs().max()) > 0 and yard.loss_scale > 0  # nothing vacuous
    loss, metrics, grad = forward_backward("kpo", batch)
    good = errors_against(yard, loss, grad)
    assert good["err_grad"] <= 1e-6 and good["err_loss"] <= 1e-6
    off = errors_against(yard, loss, grad * (1 + 1e-3))
    assert 5e-4 < off["err_grad"] < 2e-3
    broken = grad.clone()
    broken[0, 0] = math.nan
    assert math.isnan(errors_against(yard, loss, broken)["err_grad"])
    shifted = errors_against(yard, loss + 1e-3 * yard.loss_scale, grad)
    assert shifted["err_loss"] == pytest.approx(1e-3, rel=1e-2)


def test_the_float32_reference_differs_only_at_ratio_ties():
    """Issue 19: the sequential-reference row showed err grad 8.3e-2 at 8 x 512 fp32. The cause:
    it clips the ratio exp(x) in float32, where at one token 7.6e-8 below log(1 - clip_low) the
    two PPO terms round to the same float32 number and torch.maximum gives each half the
    gradient; this package decides on x against float64 bounds and gets the float64 branch. The
    row now counts such ratio ties (correctness.RATIO_TIE_WINDOW), this package's rows do not."""
    from kpo_kernels.bench.correctness import RATIO_TIE_WINDOW, errors_against, measure_errors, yardstick
    from kpo_kernels.bench.implementations import forward_backward

    batch = _batch(8, 512, seed=0)
    yard = yardstick(batch)
    assert int(yard.ties.sum()) == 0 and int(yard.ratio_ties.sum()) >= 1
    loss, _, grad = forward_backward("sequential-reference", batch)
    strict = errors_against(yard, loss, grad)  # the float64 ties only, as before
    assert strict["err_grad"] > 1e-2
    diff = (grad.double() - yard.grad).abs()
    worst = diff == diff.max()
    assert bool(yard.ratio_ties[worst].all())
    assert abs(float(yard.x[worst][0]) - math.log1p(-3e-4)) <= RATIO_TIE_WINDOW
    assert float(grad.double()[worst][0]) == pytest.approx(0.5 * float(yard.grad[worst][0]), rel=1e-5)  # the split
    reference_row = measure_errors("sequential-reference", batch, yard)
    assert reference_row["err_grad"] <= 1e-5 and reference_row["grad_ties"] == int(yard.ratio_ties.sum())
    kpo_row = measure_errors("kpo", batch, yard)
    assert kpo_row["err_grad"] <= 1e-6 and kpo_row["grad_ties"] == 0  # strict: no ratio ties for this package


def test_accuracy_sweep_finds_the_failures():
    from benchmarks import accuracy

    results = accuracy.sweep(torch.device("cpu"), rows=2, q_values=(1e-8, 1e-6, 1e-2), lengths=(256, 1024))
    status = {(r["impl"], r["q"], r["length"]): r["status"] for r in results}
    assert all(status[("kpo", q, t)] == "exact" for q in (1e-8, 1e-6, 1e-2) for t in (256, 1024))
    assert status[("vectorized-cumsum", 1e-8, 256)] == "NaN"  # 1 + q/2 rounds to 1 in float32
    assert status[("vectorized-cumsum", 1e-2, 1024)] == "NaN"  # sinh((k + 1) eta) overflows from k ~ 890
    assert status[("vectorized-cumsum", 1e-6, 1024)] == "broken"  # gains 2.5% off
    text = accuracy.markdown(results, accuracy.gain_onsets((1e-8, 1e-6, 1e-2), 1024))
    assert "## vectorized-cumsum" in text and "**NaN**" in text


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_timer_protocol_with_host_events(monkeypatch):
    """The CUDA timing loop (warm-up from an estimate, flushed rounds, synchronized wall time,
    profiled rounds), run with host-clock stand-ins for CUDA events so that it is exercised without a GPU."""
    import time

    from kpo_kernels.bench import timing

    class HostEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    timer = timing.CudaTimer(torch.device("cpu"), flush_bytes=1024)
    policy = timing.TimingPolicy(warmup=2, min_rounds=5, max_rounds=100, warmup_ms=10, rep_ms=20, wall_rounds=3)
    result = timer(fn, policy)
    # estimate >= 2 ms: warm-up max(2, 10 ms / estimate) <= 5 calls, max(5, 20 ms / estimate) <= 10 rounds
    assert 5 <= result["rounds"] <= 10
    profiled = min(policy.device_rounds, result["rounds"])
    assert 1 + 2 + result["rounds"] + 3 + profiled <= len(calls) <= 1 + 5 + result["rounds"] + 3 + profiled
    assert 2.0 <= result["p20_ms"] <= result["median_ms"] <= result["p80_ms"] < 50
    assert result["wall_ms"] >= 2.0
    assert result["device_ms"] == 0.0  # the profiler sees no device work on a CPU
    calls.clear()
    slow = timer(fn, timing.SLOW)
    assert slow["rounds"] == 3 and len(calls) == 1 + 1 + 3 + 1 + 1


def test_device_time_sums_device_events_without_the_flush():
    """device_ms: every GPU event (kernels, copies) per call, host events and the L2 flush left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from kpo_kernels.bench import timing

    def event(name, us, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [
        event("void at::native::distribution_elementwise_grid_stride_kernel<...>", 500.0),  # the flush
        event("_fused_forward_kernel", 30.0),
        event("Memcpy DtoD (Device -> Device)", 4.0),
        event("aten::add", 900.0, DeviceType.CPU),
        event("_fused_backward_kernel", 16.0),
    ]
    assert timing.device_busy_ms(events, calls=2) == pytest.approx((30 + 4 + 16) / 1e3 / 2)


def test_goals_and_tables_from_rows():
    from kpo_kernels.bench import report

    def row(impl, ms, rows=512, length=8192, dtype="fp32", **extra):
        tokens = rows * length
        return dict(impl=impl, rows=rows, length=length, dtype=dtype, tokens=tokens, status="ok", median_ms=ms,
                    p20_ms=ms, p80_ms=ms, gbps=tokens * 13 / ms / 1e6, device="cuda", regime="short rows", **extra)

    rows = [row("kpo", 1.0, time_vs_kpo=1.0), row("vectorized-cumsum", 12.0), row("grpo-eager", 1.5), row("copy", 0.5),
            dict(row("kpo-torch", 1.0), status="error: OutOfMemoryError: CUDA out of memory")]
    lines = report.goals(rows)
    assert any("12.0x faster than vectorized-cumsum in eager time (goal 10x): met" in line for line in lines)
    assert any("1.5x faster than grpo-eager in eager time (goal 2x): MISSED" in line for line in lines)
    assert any("50% of copy" in line and "MISSED" in line for line in lines)
    # With the kernels' device time (a host slower than the GPU): the goals are read on it.
    on_device = [dict(r, device_ms=d) for r, d in zip(rows, (0.05, 0.6, 0.08, 0.04, None))]
    device_lines = report.goals(on_device)
    assert any("12.0x faster than vectorized-cumsum in device time (goal 10x; eager step 12.0x): met" in line
               for line in device_lines)
    assert any("1.6x faster than grpo-eager in device time" in line and "MISSED" in line for line in device_lines)
    assert any("80% of copy" in line and "in device time (goal 60%): met" in line for line in device_lines)
    assert any("device 50 us" in line and "cumsum 12.0x" in line for line in report.brief(on_device))
    text = report.table(rows)
    assert "error: OutOfMemoryError" in text and "GB/s" in text
    assert "kpo" in report.brief(rows)[0] and "50% of copy" in report.brief(rows)[0]
