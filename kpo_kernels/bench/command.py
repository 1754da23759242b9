"""The body of `python -m kpo_kernels` (the arguments are parsed and checked, all of them before
any work, in kpo_kernels/__main__.py: `run_command` takes them as checked)."""

import os
import sys
import time
from collections import OrderedDict

import torch

import kpo_kernels
from kpo_kernels.noise_report import noise_section

from . import figure, report
from .cases import DTYPES, Case, accuracy_cases, default_cases, sweep_cases
from .correctness import FILTER_TOL, failures, grad_tol, reference_agrees
from .data import noise_generator, rl_batch
from .environment import environment, resolve_device
from .implementations import IMPLEMENTATIONS, Settings, auto_backend
from .run import ACCURACY_IMPLS, Progress, RunOptions, run, run_accuracy, skip_reason
from .timing import TimingPolicy


NOISE_SHAPE = (64, 4096)  # the noise section's batch when no --rows/--length is given


def _cases(args, device):
    if args.rows is not None:
        dtypes = [DTYPES[d] for d in (args.dtype or "fp32").split(",")]
        return [Case(args.rows, args.length, dtype) for dtype in dtypes]
    cases = sweep_cases(device) if args.full else default_cases(device)
    if args.dtype:
        wanted = {DTYPES[d] for d in args.dtype.split(",")}
        cases = [c for c in cases if c.dtype in wanted]
    return cases


def _names(args):
    if not args.impl:
        return tuple(IMPLEMENTATIONS)
    names = tuple(n.strip() for n in args.impl.split(",") if n.strip())
    if "kpo" not in names:
        names = ("kpo",) + names  # the reference point of t/kpo
    return names


def _print_header(device, cases, settings, env):
    print(f"kpo_kernels {kpo_kernels.__version__}: the KPO loss, checked against float64 and timed against today's baselines")
    print(report.environment_line(env))
    print(
        "batch: synthetic off-policy GRPO micro-batch (kpo_kernels/bench/data.py): groups of 8 responses, lengths T/8..T\n"
        "       right-padded, log-ratio = drift + noise + 1% spikes; "
        f"q={settings.q:g} r=1 clip [1-{settings.clip_low:g}, 1+{settings.clip_high:g}] {settings.agg}"
    )
    backends = sorted({auto_backend(device, c.dtype) for c in cases})
    print(f'kpo = kpo_kernels.kpo_loss(backend="auto"): the {"/".join(backends)} backend here')
    print("cases: " + ", ".join(c.label for c in cases))
    print()


def _print_check(case, rows, batch, yard, settings):
    difference, tokens = reference_agrees(batch, yard, settings)
    print(f"Correctness before timing ({case.label}), against a float64 recursion and reference/ in float64:")
    print(f"  reference/ filter in float64 (its Python loop) vs the recursion: max |diff| {difference:.1e}"
          f" (first {tokens} tokens)")
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['impl']:21s} {row['status']}")
            continue
        if row.get("err_filter") is None:
            continue
        verdict = {"pass": "pass", "fail": "FAIL"}.get(row["check"], "")
        ties = f" ({row['grad_ties']} tied with a clip bound)" if row.get("grad_ties") else ""
        print(
            f"  {row['impl']:21s} filter {report._err(row['err_filter'])}  loss {report._err(row['err_loss'])}"
            f"  grad {report._err(row['err_grad'])}{ties}  metrics {report._err(row['err_metrics'])}  {verdict}"
        )
    print(f"  (pass: filter, loss, metrics within {FILTER_TOL:g}; gradient within {grad_tol(case.dtype):g})")
    print(flush=True)


def _print_skipped(skipped):
    grouped = OrderedDict()
    for case, name, reason in skipped:
        grouped.setdefault((name, reason), []).append(case.label)
    for (name, reason), labels in grouped.items():
        where = f" ({len(labels)} cases)" if len(labels) > 3 else f" ({', '.join(labels)})"
        print(f"not run: {name}{where}: {reason}")


def _print_accuracy(rows, q):
    if not rows:
        return
    print(f"Accuracy against float64 as T grows ({rows[0]['rows']} rows per length, fp32, q={q:g}; errors only, not timed):")
    print("\n".join("  " + line for line in report.accuracy_table(rows).splitlines()))
    print(flush=True)


def _busy_note(env):
    """CPU timings on a loaded machine: say so, and how to get steadier numbers."""
    busy = env.get("load_avg_1m")
    if busy is None or busy <= 0.5:
        return None
    threads = env.get("torch_threads")
    return (f"note: load average {busy} over the last minute on {os.cpu_count()} cores, torch uses {threads} threads:\n"
            "      other processes make CPU timings slower and noisier than on an idle machine. On a busy machine\n"
            "      fewer threads give steadier numbers: --threads 1 (torch.set_num_threads), or OMP_NUM_THREADS=1.")


def run_command(args):
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = Settings(q=args.q)
    cases = _cases(args, device)
    if args.reference_max_length is None:  # a Python loop over tokens: short on CPUs
        args.reference_max_length = 4096 if device.type == "cuda" else 1024
    options = RunOptions(
        settings=settings,
        names=_names(args),
        reference_max_length=args.reference_max_length,
        seed=args.seed,
        measure_memory=not args.no_memory,
        policy=TimingPolicy(budget_s=args.budget, warmup_s=min(0.2, args.budget / 2)),
    )
    env = environment(device)
    _print_header(device, cases, settings, env)
    note = _busy_note(env) if device.type == "cpu" else None
    if note:
        print(note + "\n")

    total = sum(1 for c in cases for n in options.names if skip_reason(n, c, device, options) is None)
    progress = Progress(total, enabled=not args.quiet)
    accuracy_names = tuple(n for n in ACCURACY_IMPLS if n in options.names)
    accuracy = []
    if args.accuracy_max_length > 0:
        progress.say(f"accuracy sweep: {', '.join(accuracy_names)} against float64, T up to {args.accuracy_max_length}")
        accuracy = run_accuracy(accuracy_cases(args.accuracy_max_length), device, options, progress, accuracy_names)
        _print_accuracy(accuracy, settings.q)

    def on_case(rows):  # partial results survive an interrupted run
        if args.json:
            report.write_json(accuracy + rows, args.json)

    rows, skipped = run(
        cases, device, options, progress,
        on_checked=lambda case, rs, batch, yard: _print_check(case, rs, batch, yard, settings),
        on_case=on_case,
    )

    print(report.table(rows))
    print()
    print(report.LEGEND)
    if note:
        print(note)
    _print_skipped(skipped)
    if device.type == "cuda":
        print("GPU goals (issue 4), measured:")
        print("\n".join("  " + line for line in report.goals(rows)))
    if any(r["impl"] == "sequential-reference" and r["status"] == "ok" for r in rows):
        print("sequential-reference: timed on 3 rounds after 1 warm-up (a Python loop over tokens), "
              f"only up to T = {args.reference_max_length} (--reference-max-length).")
    print()

    _noise(args, device)

    everything = accuracy + rows
    if args.json:
        report.write_json(everything, args.json)
        print(f"wrote {args.json} ({len(everything)} rows: {len(accuracy)} accuracy, {len(rows)} timing)")
    if args.markdown:
        report.write_markdown(everything, args.markdown, skipped)
        print(f"wrote {args.markdown}")
    if args.plot:
        figure.plot(everything, args.plot)
        print(f"wrote {args.plot}")

    failed = [r for r in everything if r.get("check") == "fail"]
    if failed:
        print("FAILED: disagreement with the float64 reference:")
        for r in failed:
            print(f"  {r['impl']} on {report.shape(r)}{' (accuracy sweep)' if r['kind'] == 'accuracy' else ''}: "
                  f"{', '.join(failures(r))}")
    else:
        checked = sum(1 for r in everything if r.get("check") == "pass")
        print(f"all {checked} kpo results agree with the float64 reference within tolerance")
    if not args.full and args.rows is None:
        print("more: python -m kpo_kernels --full (the sweep); from a source checkout: python -m benchmarks.accuracy "
              "(q and T), pytest benchmarks/ -n 0")
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


def _noise(args, device):
    """The noise section, on a batch of the shape asked for (--rows, --length), else NOISE_SHAPE."""
    rows, length = (args.rows, args.length) if args.rows is not None else NOISE_SHAPE
    try:
        noise_section(rl_batch(rows, length, device=device, seed=args.seed), noise_generator())
    except ValueError as error:  # e.g. T = 1: no token for the diffuse prior's likelihood
        print(f"Noise: not fitted on {rows} x {length}: {error}\n")


if __name__ == "__main__":
    sys.exit("run `python -m kpo_kernels`")
