"""Peak memory of one step: bytes allocated during it above what was allocated before it (the
inputs), outputs included. CUDA: the caching allocator's peak. CPU: the allocation events that
torch.profiler(profile_memory=True) records, summed in time order."""

import contextlib
import gc
import os
import sys

import torch


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
