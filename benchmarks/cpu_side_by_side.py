"""Issue 18 item 4 on a shared CPU: kpo-torch, grpo-eager and vectorized-cumsum side by side.

`python -m benchmarks.cpu_side_by_side [--rounds 30] [--rows 64] [--length 4096] [--threads 1]`

Forward + backward (`forward_backward`) of the `rl_batch` data, right-padded, and the same batch
with 10% of its valid tokens masked ("holes", the skip mode's compaction). On a VM whose cores
are shared the wall time says little, so this measures CPU time (`time.process_time`) with one
thread, the implementations in alternation within one process (order reversed every round), and
reports medians, p20-p80 and the ratios of medians. kpo-torch is first checked against the
float64 yardstick (as `python -m kpo_kernels` checks it). Read the ratios, not the milliseconds.
`--threads 2` runs torch on two threads and measures wall time (`time.perf_counter`), as the main
command does, still alternated.
"kpo-torch basic" is kpo-torch with metrics="basic": without the innovation and sign-flip
diagnostics, which neither baseline computes.
"""

import argparse
import os
import statistics
import time

import torch

import kpo_kernels
from kpo_kernels.bench.correctness import failures, measure_errors, yardstick
from kpo_kernels.bench.data import rl_batch
from kpo_kernels.bench.implementations import DEFAULT, forward_backward

NAMES = ("kpo-torch", "kpo-torch basic", "grpo-eager", "vectorized-cumsum")
BASIC = "kpo-torch basic"
HOLE_FRACTION = 0.1


def with_holes(batch, fraction=HOLE_FRACTION, seed=1):
    """The batch with `fraction` of its valid tokens masked, at random places."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch["mask"].shape, generator=gen) >= fraction
    return {**batch, "mask": batch["mask"] & keep}


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _step(name, batch):
    if name != BASIC:
        return forward_backward(name, batch)
    log_prob = batch["log_prob"].detach().requires_grad_()
    s = DEFAULT
    loss, _ = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], q=s.q,
                                   clip_low=s.clip_low, clip_high=s.clip_high, agg=s.agg, log_ratio_cap=s.log_ratio_cap,
                                   backend="torch", metrics="basic")
    loss.backward()


def side_by_side(batch, rounds, warmup=3, clock=time.process_time):
    """{name: [ms per call]} with the implementations alternated, order reversed each round."""
    times = {name: [] for name in NAMES}
    for i in range(warmup + rounds):
        for name in NAMES if i % 2 == 0 else reversed(NAMES):
            start = clock()
            _step(name, batch)
            elapsed = clock() - start
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 check")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1); above 1 the wall time is measured, not the CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    padded = rl_batch(args.rows, args.length)
    layouts = {"padded": padded, "holes": with_holes(padded)}
    measured = "1 thread, CPU time" if args.threads == 1 else f"{args.threads} threads, wall time"
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, {measured}")
    for layout, batch in layouts.items():
        if not args.no_check:
            errors = measure_errors("kpo-torch", batch, yardstick(batch))
            wrong = failures({"impl": "kpo-torch", "status": "ok", "dtype": "fp32", **errors})
            assert not wrong, f"kpo-torch disagrees with float64 on {layout}: {wrong}"
        times = side_by_side(batch, args.rounds, clock=clock)
        med = {name: statistics.median(values) for name, values in times.items()}
        cells = [f"{n} {med[n]:.1f} ({_quantile(times[n], 0.2):.1f}-{_quantile(times[n], 0.8):.1f})" for n in NAMES]
        print(f"{layout}: " + ", ".join(cells) + " ms")
        for name in ("kpo-torch", BASIC):
            print(
                f"{layout}: {name} / grpo-eager {med[name] / med['grpo-eager']:.2f}x, "
                f"{name} / cumsum {med[name] / med['vectorized-cumsum']:.2f}x"
            )
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at the end")


if __name__ == "__main__":
    main()
