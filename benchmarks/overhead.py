"""Host overhead of one kpo_loss forward + backward: eager, torch.compile, CUDA-graph replay.

    python -m benchmarks.overhead [--json PATH] [--repeats N] [--profile CALLS]

At training micro-batch sizes the loss's device work is microseconds, so what a call costs is
decided by the host: Python checks, op dispatch, kernel launches. For each shape (B = 8, T = 256
and B = 64, T = 4096) this prints the wall time per call of the eager step and of the compiled
step (its forward under torch.compile(fullgraph=True)), and on a GPU also the stream time of the
eager step (CUDA events around calls queued back to back: on a host slower than the GPU, the
host's time again), the wall time of a CUDA-graph replay of the same step, and the replay's
device time (events around replays queued back to back: the kernels with no host between them).
On a CPU there is no separate device: wall time is all there is, and
the figures show what compiling saves of the Python around the ops.

--profile CALLS runs that many eager steps at B = 8, T = 256 under cProfile and prints where the
host time goes (the functions with the most time of their own, and the most time under them).
"""

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

import kpo_kernels
from kpo_kernels.bench.timing import capture_cuda_graph

SHAPES = ((8, 256), (64, 4096))


def _batch(rows, length, device):
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(rows, length, generator=gen) * 3
    new = old + torch.randn(rows, length, generator=gen) * 0.05
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    advantages = torch.randn(rows, generator=gen)
    return [t.to(device) for t in (new, old, advantages, mask)]


def _forward(log_prob, old_log_prob, advantages, mask):
    loss, metrics = kpo_kernels.kpo_loss(log_prob, old_log_prob, advantages, mask)
    return loss, torch.stack([metrics[name] for name in kpo_kernels.METRIC_NAMES])


def _step(forward, log_prob, *rest):
    """Forward (eager or compiled) and backward (autograd runs the compiled backward graph)."""
    log_prob.grad = None
    loss, metrics = forward(log_prob, *rest)
    loss.backward()
    return loss, metrics


def _median_wall(fn, repeats, sync):
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _device_time(fn, repeats):
    """Device time per call: events around `repeats` calls queued back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure(repeats=50):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compiled = torch.compile(_forward, fullgraph=True)
    rows_out = []
    for rows, length in SHAPES:
        new, old, adv, mask = _batch(rows, length, device)
        log_prob = new.clone().requires_grad_()
        row = {"B": rows, "T": length, "device": str(device)}
        eager = lambda: _step(_forward, log_prob, old, adv, mask)  # noqa: E731
        row["eager_wall_s"] = _median_wall(eager, repeats, sync)
        row["compiled_wall_s"] = _median_wall(lambda: _step(compiled, log_prob, old, adv, mask), repeats, sync)
        if device.type == "cuda":
            row["eager_device_s"] = _device_time(eager, repeats)
            pinned = kpo_kernels.prepare(length, device=device)
            graph = capture_cuda_graph(eager)
            row["graph_replay_wall_s"] = _median_wall(graph.replay, repeats, sync)
            row["graph_device_s"] = _device_time(graph.replay, repeats)
            del graph
            pinned.release()  # the graph that read them is gone
            row["host_over_device"] = row["eager_wall_s"] / row["graph_device_s"]
        rows_out.append(row)
    return rows_out


def profile(calls, top=30):
    """cProfile of `calls` eager steps at the small shape: the report as text."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    new, old, adv, mask = _batch(*SHAPES[0], device)
    log_prob = new.clone().requires_grad_()
    for _ in range(5):
        _step(_forward, log_prob, old, adv, mask)
    sync()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        _step(_forward, log_prob, old, adv, mask)
    sync()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(f"cProfile of {calls} eager steps, B={SHAPES[0][0]} T={SHAPES[0][1]} on {device} (times per run of all calls)\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--profile", type=int, default=0, metavar="CALLS", help="profile this many eager steps instead")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args.profile))
        return
    rows = measure(args.repeats)
    for row in rows:
        parts = [f"B={row['B']:<3} T={row['T']:<5} {row['device']}", f"eager {row['eager_wall_s'] * 1e6:9.1f} us"]
        parts.append(f"compiled {row['compiled_wall_s'] * 1e6:9.1f} us")
        if "eager_device_s" in row:
            parts.append(f"eager stream {row['eager_device_s'] * 1e6:8.1f} us")
            parts.append(f"graph replay {row['graph_replay_wall_s'] * 1e6:8.1f} us (device {row['graph_device_s'] * 1e6:.1f})")
            parts.append(f"host/device {row['host_over_device']:.2f}")
        print(" | ".join(parts))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
