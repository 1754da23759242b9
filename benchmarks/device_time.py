"""Where one forward + backward spends its GPU time: kpo's kernels one by one, and a graph replay.

    python -m benchmarks.device_time [--cases 512x8192:fp32,...] [--steps N] [--json PATH]

CUDA only. The main command's `device ms` column gives each implementation's kernel time per step
(bench/timing.py explains why the eager events do not, on a host slower than the GPU). This adds,
per case:

- kpo's kernels by name with their device time per step (torch.profiler, the L2 flushed before
  each step and the flush left out): what a static model of the kernels is checked against;
- `graph`: CUDA events around a CUDA-graph replay of kpo's whole step (the L2 flushed before
  each): the device time with no host in it, launch gaps between kernels included;
- the same kernel sum for `vectorized-cumsum` and `grpo-eager`, and the copy of the bytes a fused
  step must move (the bandwidth ceiling). The baselines read metrics to the host (`.item()`),
  so they cannot be captured in a graph;
- `basic`: kpo's kernel sum with metrics="basic" (the diagnostics compiled out), `fit`: the
  kernel sum of the per-step noise fit (`estimate_noise` at the default budget), and `tables`:
  the fused loss's tables for a ratio Q / R new to the process (the table kernel), the figures
  `benchmarks.static_model` and `benchmarks.fit_model` predict; from them a fitted step in plain
  steps, (fit + kpo) / kpo with the ratio's tables cached and (fit + tables + kpo) / kpo without
  (issue 17's bound: 2).
"""

import argparse
import itertools
import json
import statistics
import time

import torch

import kpo_kernels
from kpo_kernels.bench.cases import DTYPES, Case, fused_bytes
from kpo_kernels.bench.data import rl_batch
from kpo_kernels.bench.implementations import DEFAULT, forward_backward
from kpo_kernels.fit_options import PER_STEP_MAX_TOKENS
from kpo_kernels.bench.timing import CudaTimer, capture_cuda_graph

BASELINES = ("vectorized-cumsum", "grpo-eager")
DEFAULT_CASES = "64x4096:fp32,512x8192:fp32,512x8192:bf16,2x131072:fp32,8x131072:bf16"


def parse_cases(text):
    """'512x8192:bf16,2x131072' -> Cases (dtype fp32 when not given)."""
    cases = []
    for item in text.split(","):
        shape, _, dtype = item.strip().partition(":")
        rows, length = (int(v) for v in shape.split("x"))
        cases.append(Case(rows, length, DTYPES[dtype or "fp32"]))
    return cases


def _events_median_us(timer, fn, repeats):
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in pairs:
        timer.flush_l2()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3


def _graph(step, case):
    """kpo's step captured in a CUDA graph (tables prepared first, warmed on a side stream)."""
    kpo_kernels.prepare(case.length, device="cuda")
    return capture_cuda_graph(step)


def measure_case(timer, case, steps):
    batch = rl_batch(case.rows, case.length, dtype=case.dtype, device="cuda")
    row = {"case": case.label, "rows": case.rows, "length": case.length, "dtype": case.dtype_name,
           "bytes": fused_bytes(case)}
    kpo = lambda: forward_backward("kpo", batch)  # noqa: E731
    for _ in range(3):
        kpo()
    kernels = timer.kernels_us(kpo, steps)
    row["kpo_kernels_us"] = {k: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])}
    row["kpo_us"] = sum(kernels.values())
    try:
        row["kpo_graph_us"] = _events_median_us(timer, _graph(kpo, case).replay, 20)
        kpo_kernels.release_tables()  # the graph that read its pinned tables is gone
    except Exception as error:  # noqa: BLE001 - reported, the other figures still stand
        row["kpo_graph_error"] = f"{type(error).__name__}: {error}"[:300]
    log_ratio = (batch["log_prob"] - batch["old_log_prob"]).float()
    new_ratios = itertools.count(1)
    extra = {
        "kpo_basic_us": lambda: _kpo_basic(batch),
        "tables_us": lambda: _new_tables(case.length, next(new_ratios)),
        "fit_us": lambda: kpo_kernels.estimate_noise(log_ratio, batch["mask"], max_tokens=PER_STEP_MAX_TOKENS),
    }
    for key, step in extra.items():
        try:
            for _ in range(2):
                step()
            row[key] = sum(timer.kernels_us(step, steps).values())
        except Exception as error:  # noqa: BLE001 - reported, the other figures still stand
            row[key.replace("_us", "_error")] = f"{type(error).__name__}: {error}"[:300]
    for name in BASELINES:
        step = lambda: forward_backward(name, batch)  # noqa: E731
        step()
        row[f"{name}_us"] = timer.device_ms(step, steps) * 1e3
    src = torch.randint(0, 256, (fused_bytes(case) // 2,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    row["copy_us"] = timer.device_ms(lambda: dst.copy_(src), steps) * 1e3  # the same clock as kpo's
    return row


def _new_tables(length, n):
    """The fused loss's float32 tables for a ratio no call made before (DEFAULT.q times 1 + 1e-9 n):
    one table kernel launch (its companions come with the gains)."""
    kpo_kernels.tables.gain_table(length, DEFAULT.q * (1.0 + 1e-9 * n), 1.0, 0.0, torch.device("cuda"), torch.float32)


def _kpo_basic(batch):
    s = DEFAULT
    log_prob = batch["log_prob"].detach().requires_grad_()
    loss, _ = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], q=s.q,
                                   clip_low=s.clip_low, clip_high=s.clip_high, agg=s.agg, log_ratio_cap=s.log_ratio_cap,
                                   metrics="basic")
    loss.backward()


def summary(row):
    """A few lines of text for one case."""
    kpo = row["kpo_us"]
    head = (f"{row['case']:<16} kpo kernels {kpo:8.1f} us ({row['bytes'] / kpo / 1e3:.0f} GB/s, "
            f"{row['copy_us'] / kpo:.0%} of copy's {row['copy_us']:.1f} us)")
    head += f" | graph replay {row['kpo_graph_us']:.1f} us" if "kpo_graph_us" in row else f" | graph: {row.get('kpo_graph_error')}"
    head += "".join(f" | {name} {row[f'{name}_us']:.1f} us = {row[f'{name}_us'] / kpo:.1f}x" for name in BASELINES)
    for key, label in (("kpo_basic", "metrics=basic"), ("fit", "per-step fit"), ("tables", "new tables")):
        head += f" | {label} {row[key + '_us']:.1f} us" if key + "_us" in row else f" | {label}: {row.get(key + '_error')}"
    if "fit_us" in row and "tables_us" in row:
        head += (f" | fitted step {(row['fit_us'] + kpo) / kpo:.2f} plain steps, "
                 f"{(row['fit_us'] + row['tables_us'] + kpo) / kpo:.2f} with new tables")
    kernels = [f"    {us:9.2f} us  {name[:100]}" for name, us in list(row["kpo_kernels_us"].items())[:10]]
    return "\n".join([head, *kernels])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated ROWSxLENGTH[:fp32|bf16|fp16]")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per measurement")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds: no new case after this")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    cases = parse_cases(args.cases)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    timer, rows, start = CudaTimer(torch.device("cuda")), [], time.perf_counter()
    for case in cases:
        if time.perf_counter() - start > args.budget:
            print(f"{case.label}: skipped, out of time", flush=True)
            continue
        try:
            rows.append(measure_case(timer, case, args.steps))
            print(summary(rows[-1]), flush=True)
        except Exception as error:  # noqa: BLE001 - one case must not hide the others
            print(f"{case.label}: {type(error).__name__}: {error}"[:400], flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
