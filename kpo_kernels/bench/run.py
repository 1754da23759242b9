"""Measure every implementation on synthetic RL batches: correctness first, then memory and time.

Shared by `python -m kpo_kernels`, `benchmarks/test_cpu.py` (pytest-benchmark) and
`benchmarks/gpu_check.sh`. For each timed case (rows B, length T, dtype):

1. The batch: `data.rl_batch` (documented there), on the device.
2. The float64 yardstick and the errors of each implementation against it, before any timing
   (`correctness`).
3. Peak memory of one step (`memory`): CUDA's allocator peak; on the CPU the profiler's
   allocation events (not for `sequential-reference`, whose Python loop makes profiling slow).
4. Time of forward + backward (loss, metrics, d loss / d log_prob) (`timing`).
5. Bytes a fused implementation must move, the same for every implementation of a case
   (`cases.fused_bytes`); `copy` (CUDA only) copies that many bytes (half read, half written).
   GB/s = bytes / median time.

Timed rows have `kind` "timing". The accuracy sweep (`run_accuracy`) measures the errors only
(step 2), of `kpo` and `vectorized-cumsum`, on a few rows at lengths from 256 to 131072
(`cases.accuracy_cases`); its rows have `kind` "accuracy".
"""

import gc
import sys
import time
from dataclasses import dataclass, field

import torch

from .cases import Case, fused_bytes
from .correctness import YARDSTICK, check, measure_errors, yardstick
from .data import rl_batch
from .environment import environment
from .implementations import DEFAULT, IMPLEMENTATIONS, auto_backend, available, forward_backward
from .memory import peak_memory_cpu, peak_memory_cuda
from .timing import SLOW, CudaTimer, TimingPolicy, time_cpu

ACCURACY_IMPLS = ("kpo", "vectorized-cumsum")


class Progress:
    """Progress lines on stderr, with the elapsed time."""

    def __init__(self, total, enabled=True, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def say(self, text):
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", file=self.stream, flush=True)

    def step(self, text):
        self.done += 1
        self.say(f"{self.done:>3}/{self.total} {text}")


@dataclass
class RunOptions:
    settings: object = DEFAULT
    names: tuple = tuple(IMPLEMENTATIONS)
    reference_max_length: int = 4096
    seed: int = 0
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    measure_memory: bool = True


def skip_reason(name, case, device, options):
    reason = available(name, device)
    if reason is None and name == "sequential-reference" and case.length > options.reference_max_length:
        reason = f"a Python loop over tokens: timed only up to T = {options.reference_max_length}"
    return reason


def _base_row(name, case, device, yard, options, kind):
    return {
        "impl": name,
        "kind": kind,
        "backend": auto_backend(device, case.dtype) if name == "kpo" else None,
        "dtype": case.dtype_name,
        "rows": case.rows,
        "length": case.length,
        "tokens": case.tokens,
        "valid_tokens": int(yard.valid.sum()),
        "regime": case.regime,
        "q": options.settings.q,
        "yardstick": YARDSTICK,
        "status": "ok",
        "note": None,
    }


def _checked_row(name, case, device, batch, yard, options, kind):
    row = _base_row(name, case, device, yard, options, kind)
    try:
        row.update(measure_errors(name, batch, yard, options.settings))
    except Exception as error:  # noqa: BLE001 - a failing implementation is a row, not a crash
        row.update(status=_error_text(error))
        _release(device)
    row["check"] = check(row)
    return row


def _error_text(error):
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def run_case(case, device, options, progress=None, on_checked=None, timer=None):
    """Rows (dicts) of every implementation on one case, and the skipped ones (name, reason)."""
    progress = progress or Progress(0, enabled=False)
    batch = rl_batch(case.rows, case.length, dtype=case.dtype, device=device, seed=options.seed)
    progress.say(f"{case.label}: float64 yardstick")
    yard = yardstick(batch, options.settings)
    byte_count = fused_bytes(case)
    rows, skipped = [], []
    for name in options.names:
        reason = skip_reason(name, case, device, options)
        if reason is not None:
            skipped.append((name, reason))
            continue
        row = _checked_row(name, case, device, batch, yard, options, "timing")  # correctness before timing
        row["bytes"] = byte_count
        rows.append(row)
    if on_checked is not None:
        on_checked(case, rows, batch, yard)

    for row in rows:
        if row["status"] != "ok":
            progress.step(f"{case.label:18s} {row['impl']:21s} {row['status']}")
            continue
        fn, keep = _step(row["impl"], batch, byte_count, device, options.settings)
        policy = SLOW if row["impl"] == "sequential-reference" else options.policy
        try:
            peak = None
            if options.measure_memory:
                if device.type == "cuda":
                    peak = peak_memory_cuda(fn)
                elif row["impl"] != "sequential-reference":
                    peak = peak_memory_cpu(fn)
            timing = timer(fn, policy) if device.type == "cuda" else time_cpu(fn, policy)
            row.update(timing)
            row["peak_mb"] = None if peak is None else peak / 2**20
            row["gbps"] = byte_count / (timing["median_ms"] * 1e-3) / 1e9
            if row["impl"] == "sequential-reference":
                row["note"] = f"{timing['rounds']} rounds"
        except Exception as error:  # noqa: BLE001
            row["status"] = _error_text(error)
            row["check"] = check(row)
            _release(device)
        del keep
        progress.step(f"{case.label:18s} {row['impl']:21s} {_progress_text(row)}")

    kpo = next((r for r in rows if r["impl"] == "kpo" and r.get("median_ms")), None)
    for row in rows:
        if row.get("median_ms") is not None and kpo is not None:
            row["time_vs_kpo"] = row["median_ms"] / kpo["median_ms"]
    return rows, skipped


def _progress_text(row):
    if row["status"] != "ok":
        return row["status"]
    text = f"{row['median_ms']:10.3f} ms"
    if row.get("err_filter") is not None:
        text += f"   err filter {row['err_filter']:.1e}"
    return text


def _step(name, batch, byte_count, device, settings):
    if name == "copy":
        n = byte_count // 2
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)  # not zeros
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), (src, dst)
    return (lambda: forward_backward(name, batch, settings)), None


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run(cases, device, options, progress=None, on_checked=None, on_case=None):
    """Every timed case in turn: (rows, skipped) with the environment in each row."""
    env = environment(device)
    timer = CudaTimer(device) if device.type == "cuda" else None
    all_rows, all_skipped = [], []
    for case in cases:
        rows, skipped = run_case(case, device, options, progress, on_checked, timer)
        for row in rows:
            row.update(env)
        all_rows.extend(rows)
        all_skipped.extend((case, name, reason) for name, reason in skipped)
        if on_case is not None:
            on_case(all_rows)
        on_checked = None  # the correctness report is for the first case
    return all_rows, all_skipped


def run_accuracy(cases, device, options, progress=None, names=ACCURACY_IMPLS):
    """Errors only (no timing) of `names` on each case: rows with `kind` "accuracy"."""
    progress = progress or Progress(0, enabled=False)
    env = environment(device)
    rows = []
    for case in cases:
        batch = rl_batch(case.rows, case.length, dtype=case.dtype, device=device, seed=options.seed)
        yard = yardstick(batch, options.settings)
        for name in names:
            if available(name, device) is None:
                rows.append({**_checked_row(name, case, device, batch, yard, options, "accuracy"), **env})
        progress.say(f"accuracy {case.label}: " + ", ".join(
            f"{r['impl']} filter {_short(r.get('err_filter'))} grad {_short(r.get('err_grad'))}"
            for r in rows if r["length"] == case.length and r["rows"] == case.rows
        ))
        del batch, yard
        _release(device)
    return rows


def _short(value):
    return "n/a" if value is None else "NaN" if value != value else f"{value:.1e}"


__all__ = ["ACCURACY_IMPLS", "Case", "Progress", "RunOptions", "run", "run_accuracy", "run_case", "skip_reason"]
