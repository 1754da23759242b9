"""Median time of one step: CPU perf_counter after a warm-up; CUDA events with the L2 flushed.

CPU: time.perf_counter around each call, after a warm-up of at least `warmup_s`, rounds for at
least `budget_s`. CUDA: CUDA events around each call, the L2 cache flushed before each (as
triton.testing.do_bench does), plus the host time of a synchronized call (`wall_ms`). Both
report the median, the 20th and 80th percentiles, the minimum and the number of rounds.

CUDA also reports `device_ms`: the summed duration of the kernels and memory operations one call
runs on the GPU (torch.profiler's device events, the flush left out). Events around an eager call
measure the stream from the call's first launch to its last, and when the host is slower than the
GPU, which it is for every implementation here at training shapes (first seen on an H200: 1.5-2.3
ms per eager call of every loss, against tens of microseconds of kernels), that span is the host's
Python and launch time, not the kernels'. `device_ms` is the kernels' cost; `median_ms` what an
eager loop waits.
"""

import gc
import math
import time
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType


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
    device_rounds: int = 5  # CUDA: profiled calls for device_ms


SLOW = TimingPolicy(
    warmup=1, min_rounds=3, max_rounds=3, budget_s=0.0, warmup_s=0.0, warmup_ms=0.0, rep_ms=0.0, wall_rounds=1, device_rounds=1
)


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


# The L2 flush draws random bytes: its kernel's name (a "distribution" kernel) is one no loss
# launches, so device_ms can leave it out by name.
FLUSH_KERNEL = "distribution"


def device_times_us(events, calls, exclude=FLUSH_KERNEL):
    """Mean device time per call (us) of each name among profiler events: every event on the GPU
    (kernels, copies, memsets) whose name does not contain `exclude`, over `calls` calls."""
    per_name = {}
    for event in events:
        # GPU-side user annotations (record_function ranges) span kernels already counted.
        if event.device_type == DeviceType.CUDA and exclude not in event.name and not getattr(event, "is_user_annotation", False):
            per_name[event.name] = per_name.get(event.name, 0.0) + event.time_range.elapsed_us() / calls
    return per_name


def device_busy_ms(events, calls, exclude=FLUSH_KERNEL):
    """Mean device time per call (ms): the sum of `device_times_us`."""
    return sum(device_times_us(events, calls, exclude).values()) / 1e3


def capture_cuda_graph(step):
    """`step` captured in a CUDA graph, after one warm-up call on a side stream (as torch's
    CUDA-graph recipe asks: the warm-up's allocations are not recorded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class CudaTimer:
    """CUDA-event timing with an L2 flush before each call (the method of triton.testing.do_bench)."""

    def __init__(self, device, flush_bytes=256 * 1024 * 1024):
        self.device = device
        self.flush = torch.zeros(flush_bytes, dtype=torch.int8, device=device)  # > L2 (50 MB on an H100, 60 on an H200)

    def flush_l2(self):
        self.flush.random_(0, 128)

    def kernels_us(self, fn, calls):
        """Device time per call of each kernel (and copy) `fn` runs, from the profiler (us)."""
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                self.flush_l2()
                fn()
            torch.cuda.synchronize()
        return device_times_us(prof.events(), calls)

    def device_ms(self, fn, calls):
        """Kernel time per call (see the module docstring)."""
        return sum(self.kernels_us(fn, calls).values()) / 1e3

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
            self.flush_l2()
            starts[i].record()
            fn()
            ends[i].record()
        sync()
        result = summarize([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])
        wall = []
        for _ in range(policy.wall_rounds):
            self.flush_l2()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            wall.append(time.perf_counter() - t0)
        result["wall_ms"] = summarize(wall)["median_ms"]
        result["device_ms"] = self.device_ms(fn, max(1, min(policy.device_rounds, rounds)))
        return result
