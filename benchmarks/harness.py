"""Measure every implementation on synthetic RL batches: correctness first, then time and memory.

Shared by `python -m kpo_kernels`, `benchmarks/test_cpu.py` (pytest-benchmark) and
`benchmarks/gpu_check.sh`. For each case (rows B, length T, dtype):

1. The batch: `data.rl_batch` (documented there), on the device.
2. The yardstick, in float64: the filter by a float64 sequential recursion on the CPU
   (`baselines.float64_filter`, numpy, vectorized over rows, bitwise equal to
   `reference.kalman_filter` in float64), and loss, metrics and gradient from
   `reference.kpo_loss` on float64 inputs (on the batch's device) with that recursion as its
   filter: the same definition as `reference/`, minus its per-token Python loop, so that
   T = 131072 is affordable. Nothing in it comes from kpo_kernels. The main command also checks,
   on its first case, that `reference.kalman_filter` itself gives the recursion's values.
3. Errors of each implementation against it (computed before any timing):
   - err_filter: max |x - x64| / max |x64| over valid tokens (x: the filtered log-ratio);
   - err_loss: |loss - loss64| / max(|loss64|, aggregated |advantage|) (a GRPO loss is near 0,
     its advantages summing to 0 per group, so it is measured on the scale of its terms);
   - err_grad: max |g - g64| / max |g64| over tokens, where the float64 filtered log-ratio is
     not within FILTER_TOL * max |x64| of a branch bound (clip bounds, cap): at those "ties"
     float32 cannot decide the branch and either gradient is right; their count is grad_ties;
   - err_metrics (kpo and reference only): the worst metric error, fractions in absolute terms
     (less ties / tokens), ppo_kl relative to mean |z|, the others relative.
   NaN anywhere gives a NaN error. `grpo-eager` computes a different loss: its errors are None.
4. Peak memory: bytes allocated during one step above what was allocated before it (the inputs),
   outputs included. CUDA: the caching allocator's peak. CPU: the allocation events recorded by
   torch.profiler(profile_memory=True), summed in time order (not for `sequential-reference`,
   whose Python loop makes profiling slow).
5. Time of forward + backward (loss, metrics, d loss / d log_prob). CPU: time.perf_counter after
   a warm-up of at least 0.2 s, rounds for at least `budget_s`. CUDA: CUDA events around each
   call, the L2 cache flushed before each (as triton.testing.do_bench does), plus the host time
   of a synchronized call (wall_ms). Medians, 20th and 80th percentiles.
6. Bytes: what a fused implementation must move, the same for every implementation of a case:
   read log_prob, old_log_prob (B T each, input dtype), mask (B T bool), advantages (B), write
   the gradient (B T, input dtype). `copy` (CUDA only) copies that many bytes (half read, half
   written). GB/s = bytes / median time.
"""

import contextlib
import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch

import kpo_kernels
import reference
import reference.loss as reference_loss

from . import baselines
from .data import rl_batch
from .implementations import DEFAULT, IMPLEMENTATIONS, auto_backend, available, filtered, forward_backward

FILTER_TOL = 1e-5
LOSS_TOL = 1e-5
METRIC_TOL = 1e-5
LONG_ROWS = 16384  # T above this: the "few long rows" regime
REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
YARDSTICK = "float64 recursion (filter) + reference/ loss in float64"


def grad_tol(dtype):
    """Gradients come back in the input dtype: float32 to 1e-5, 16-bit to one unit of rounding."""
    return max(1e-5, torch.finfo(dtype).eps)


@dataclass(frozen=True)
class Case:
    rows: int
    length: int
    dtype: torch.dtype = torch.float32

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self):
        return f"{self.rows}x{self.length} {self.dtype_name}"

    @property
    def tokens(self):
        return self.rows * self.length

    @property
    def regime(self):
        return "long rows" if self.length > LONG_ROWS else "short rows"


def fused_bytes(case):
    """Bytes a fused forward+backward must move (see the module docstring, item 6)."""
    size = torch.empty((), dtype=case.dtype).element_size()
    return case.tokens * (3 * size + 1) + case.rows * size


def default_cases(device):
    """The default run: under a minute on a 2-core CPU; on a GPU it adds the issue's goal shape."""
    if device.type == "cuda":
        return [
            Case(64, 4096),
            Case(512, 8192),
            Case(512, 8192, torch.bfloat16),
            Case(2, 131072),
        ]
    return [Case(16, 1024), Case(64, 4096), Case(2, 131072)]


def sweep_cases(device):
    """`--full`: many short rows and few long rows, float32 and bfloat16."""
    if device.type == "cuda":
        short = [(b, t) for b in (256, 512, 1024) for t in (1024, 2048, 4096, 8192)]
        long = [(b, t) for b in (1, 2, 4, 8) for t in (32768, 65536, 131072)]
    else:  # sized for a few minutes on a small CPU
        short = [(b, t) for b in (16, 64, 256) for t in (1024, 4096, 8192)]
        long = [(b, t) for b in (1, 2) for t in (32768, 131072)]
    return [Case(b, t, dtype) for dtype in (torch.float32, torch.bfloat16) for b, t in short + long]


# ----------------------------------------------------------------------------- the yardstick


@dataclass
class Yardstick:
    valid: torch.Tensor  # (B, T) bool, CPU
    x: torch.Tensor  # filtered log-ratio, float64
    loss: float
    loss_scale: float
    grad: torch.Tensor  # d loss / d log_prob, float64
    metrics: dict
    ties: torch.Tensor  # (B, T) bool: x within the filter tolerance of a branch bound
    mean_abs_z: float


def yardstick(batch, settings=DEFAULT):
    """float64 filter, loss, gradient and metrics of a batch (module docstring, item 2).

    The filter runs on the CPU (numpy); reference/'s loss runs in float64 on the batch's device
    (elementwise and cheap there); everything is returned on the CPU.
    """
    valid_device = batch["mask"].detach().bool()
    new, old, adv = (batch[k].detach().double() for k in ("log_prob", "old_log_prob", "advantages"))
    filtered_states = []

    def recursion_filter(z, mask=None, *, q, r=1.0, p0=0.0, x0=0.0, mask_mode="skip"):
        """`reference.kalman_filter`'s signature, computed by the float64 recursion."""
        x = baselines.float64_filter(z, mask, q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
        filtered_states.append(x)
        return x.to(z.device, z.dtype)

    log_prob = new.clone().requires_grad_()
    with mock.patch.object(reference_loss, "kalman_filter", recursion_filter):
        loss, metrics = reference.kpo_loss(
            log_prob, old, adv, valid_device, q=settings.q, clip_low=settings.clip_low,
            clip_high=settings.clip_high, agg=settings.agg, log_ratio_cap=settings.log_ratio_cap,
        )
    loss.backward()
    (x,) = filtered_states
    abs_adv = adv.abs()[:, None].expand(valid_device.shape) if adv.dim() == 1 else adv.abs()
    scale = reference.aggregate(abs_adv, valid_device, settings.agg)
    valid = valid_device.cpu()
    z = torch.where(valid, new.cpu() - old.cpu(), 0.0)
    scale_x = float(x[valid].abs().max()) if bool(valid.any()) else 0.0
    window = FILTER_TOL * scale_x
    bounds = [math.log1p(-settings.clip_low), math.log1p(settings.clip_high), settings.log_ratio_cap]
    ties = torch.zeros_like(valid)
    for bound in bounds:
        ties |= (x - bound).abs() <= window
    ties &= valid
    return Yardstick(
        valid=valid,
        x=x,
        loss=float(loss.detach()),
        loss_scale=float(scale),
        grad=log_prob.grad.detach().cpu(),
        metrics={k: float(v) for k, v in metrics.items()},
        ties=ties,
        mean_abs_z=float(z[valid].abs().mean()) if bool(valid.any()) else 0.0,
    )


def reference_agrees(batch, yard, settings=DEFAULT, max_length=4096):
    """max |reference.kalman_filter (float64, its Python loop) - float64 recursion| on a prefix."""
    length = min(batch["mask"].shape[-1], max_length)
    cpu = {k: v.detach().to("cpu") for k, v in batch.items()}
    z = (cpu["log_prob"].double() - cpu["old_log_prob"].double())[:, :length]
    x = reference.kalman_filter(z, cpu["mask"][:, :length], q=settings.q)
    return float((x - yard.x[:, :length]).abs().max()), length


# ----------------------------------------------------------------------------- errors


def _rel(diff, scale):
    diff = float(diff)
    return diff / scale if scale > 0 else diff


def _metric_error(name, got, want, yard, tokens):
    if name in ("clipfrac", "clipfrac_lower"):  # fractions: absolute, less the tie tokens
        return max(0.0, abs(got - want) - int(yard.ties.sum()) / max(tokens, 1)) if math.isfinite(got) else math.nan
    if name == "ppo_kl":
        return _rel(abs(got - want), yard.mean_abs_z)
    return _rel(abs(got - want), abs(want))


def measure_errors(name, batch, yard, settings=DEFAULT):
    """err_filter, err_loss, err_grad, err_metrics, grad_ties of `name` against the yardstick."""
    impl = IMPLEMENTATIONS[name]
    if impl.run is None or impl.filter is None:  # copy, grpo-eager: not this loss
        return dict(err_filter=None, err_loss=None, err_grad=None, err_metrics=None, worst_metric=None, grad_ties=None)
    loss, metrics, grad = forward_backward(name, batch, settings)
    x = filtered(name, batch, settings)
    with_metrics = name == "sequential-reference" or impl.kpo
    return errors_against(yard, loss, grad, x, metrics if with_metrics else None)


def errors_against(yard, loss, grad, x=None, metrics=None):
    """The error columns (module docstring, item 3) of one result against the yardstick."""
    valid = yard.valid
    out = dict(err_filter=None, err_metrics=None, worst_metric=None, grad_ties=int(yard.ties.sum()))
    out["err_loss"] = _rel(abs(float(loss.detach()) - yard.loss), max(abs(yard.loss), yard.loss_scale))

    grad = grad.detach().to("cpu", torch.float64)
    diff = (grad - yard.grad).abs()
    diff = torch.where(yard.ties & torch.isfinite(diff), 0.0, diff)
    out["err_grad"] = _rel(diff.max(), float(yard.grad.abs().max())) if diff.numel() else 0.0

    if x is not None:
        x = x.detach().to("cpu", torch.float64)
        scale = float(yard.x[valid].abs().max()) if bool(valid.any()) else 0.0
        out["err_filter"] = _rel((x - yard.x)[valid].abs().max(), scale) if bool(valid.any()) else 0.0
    if metrics is not None:
        tokens = int(valid.sum())
        errors = {
            k: _metric_error(k, float(metrics[k]), yard.metrics[k], yard, tokens)
            for k in kpo_kernels.METRIC_NAMES
            if k in metrics
        }
        worst = max(errors, key=lambda k: math.inf if math.isnan(errors[k]) else errors[k])
        out["err_metrics"], out["worst_metric"] = errors[worst], worst
    return out


def _limits(row):
    return {
        "err_filter": FILTER_TOL,
        "err_loss": LOSS_TOL,
        "err_grad": grad_tol(DTYPES[row["dtype"]]),
        "err_metrics": METRIC_TOL,
    }


def check(row):
    """'pass' / 'fail' for this package's implementations, None for the others."""
    if not IMPLEMENTATIONS[row["impl"]].kpo:
        return None
    return "fail" if failures(row) else "pass"


def failures(row):
    """Why a row of this package fails its check: ['metrics 6.1e-05 > 1e-05', ...] (NaN fails)."""
    if row["status"] != "ok":
        return [row["status"]]
    out = []
    for key, tol in _limits(row).items():
        value = row.get(key)
        if value is None or not value <= tol:
            name = key[4:] + (f" ({row['worst_metric']})" if key == "err_metrics" and row.get("worst_metric") else "")
            out.append(f"{name} {value if value is None else format(value, '.1e')} > {tol:g}")
    return out


# ----------------------------------------------------------------------------- time and memory


def _percentile(sorted_values, fraction):
    if not sorted_values:
        return math.nan
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(seconds):
    values = sorted(seconds)
    return {
        "median_ms": _percentile(values, 0.5) * 1e3,
        "p20_ms": _percentile(values, 0.2) * 1e3,
        "p80_ms": _percentile(values, 0.8) * 1e3,
        "min_ms": values[0] * 1e3,
        "rounds": len(values),
    }


@dataclass
class TimingPolicy:
    warmup: int = 2  # CPU: calls; CUDA: at least this many calls and warmup_ms
    min_rounds: int = 5
    max_rounds: int = 200
    budget_s: float = 0.4  # CPU: keep timing until this long has passed (and min_rounds)
    warmup_s: float = 0.2  # CPU: warm up for at least this long (the allocator's mmap threshold
    #                        adapts over the first calls: until then large tensors page-fault)
    warmup_ms: float = 25.0  # CUDA
    rep_ms: float = 100.0  # CUDA
    wall_rounds: int = 10  # CUDA: synchronized host-timed calls


SLOW = TimingPolicy(warmup=1, min_rounds=3, max_rounds=3, budget_s=0.0, warmup_s=0.0, warmup_ms=0.0, rep_ms=0.0, wall_rounds=1)


def time_cpu(fn, policy):
    start, calls = time.perf_counter(), 0
    while calls < policy.warmup or time.perf_counter() - start < policy.warmup_s:
        fn()
        calls += 1
    gc.collect()
    times = []
    start = time.perf_counter()
    while len(times) < policy.max_rounds and (len(times) < policy.min_rounds or time.perf_counter() - start < policy.budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times)


class CudaTimer:
    """CUDA-event timing with an L2 flush before each call (the method of triton.testing.do_bench)."""

    def __init__(self, device, flush_bytes=256 * 1024 * 1024):
        self.device = device
        self.flush = torch.empty(flush_bytes, dtype=torch.int8, device=device)  # > L2 (50 MB on an H100)

    def __call__(self, fn, policy):
        sync = torch.cuda.synchronize
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        estimate_ms = max(start.elapsed_time(end), 1e-3)
        warmup = max(policy.warmup, int(policy.warmup_ms / estimate_ms))
        rounds = min(policy.max_rounds, max(policy.min_rounds, int(policy.rep_ms / estimate_ms)))
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        for i in range(rounds):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        sync()
        result = summarize([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])
        wall = []
        for _ in range(policy.wall_rounds):
            self.flush.zero_()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            wall.append(time.perf_counter() - t0)
        result["wall_ms"] = summarize(wall)["median_ms"]
        return result


def peak_memory_cuda(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


@contextlib.contextmanager
def _quiet_fd2():
    """The profiler's C++ side prints start/stop lines on file descriptor 2: hide them."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_cpu(fn):
    """Peak bytes allocated during fn() above the allocation at its start, from the allocation
    events of torch.profiler (sizes summed in time order); None if the profiler cannot tell."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    gc.collect()
    try:
        with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception:  # noqa: BLE001 - a private profiler API: no number rather than a wrong one
        return None
    del out
    if not events:
        return None
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


# ----------------------------------------------------------------------------- the run


def git_commit():
    """Short commit of the checkout, '-dirty' if tracked files differ; KPO_COMMIT overrides."""
    if os.environ.get("KPO_COMMIT"):
        return os.environ["KPO_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "device": device.type,
        "device_name": name,
        "load_avg_1m": load,  # at the start: other processes make CPU timings slower and noisier
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "kpo_kernels": kpo_kernels.__version__,
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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
        row = {
            "impl": name,
            "backend": auto_backend(device, case.dtype) if name == "kpo" else None,
            "dtype": case.dtype_name,
            "rows": case.rows,
            "length": case.length,
            "tokens": case.tokens,
            "valid_tokens": int(yard.valid.sum()),
            "regime": case.regime,
            "q": options.settings.q,
            "bytes": byte_count,
            "yardstick": YARDSTICK,
            "status": "ok",
            "note": None,
        }
        try:  # correctness before timing
            row.update(measure_errors(name, batch, yard, options.settings) if name != "copy" else measure_errors("copy", None, None))
        except Exception as error:  # noqa: BLE001 - a failing implementation is a row, not a crash
            row.update(status=f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            _release(device)
        row["check"] = check(row)
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
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
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
    """Every case in turn: (rows, skipped) with the environment in each row."""
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


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device
