"""`python -m benchmarks.training`: GRPO against KPO in TRL's real GRPOTrainer, off-policy.

    python -m benchmarks.training --quick --json runs.json --plot runs.png   # 2 seeds, 150 steps
    python -m benchmarks.training --json runs.json --plot runs.png           # 5 seeds, 600 steps
    python -m benchmarks.training --seeds 5 --first-seed 5 --json held-out.json  # seeds 5..9

Each (method, seed) trains the same small policy from the same random initialisation on the
task of `task.py`, with the same data order and the same off-policy schedule (trainers.py names
the methods). Prints a summary table (Markdown) at the end; --json writes every run's per-step
curves, the summary and the settings; --plot the figure of plot.py; --from-json summarises and plots
an earlier --json without training.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from trl import GRPOConfig

from . import report
from .run import Schedule, checkout_commit, schedule_dict, train_job
from .trainers import METHODS, PAPER

QUICK = {"seeds": 2, "steps": 150}
FULL = {"seeds": 5, "steps": 600}
DEFAULT_THRESHOLD = 0.5


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['seeds']} seeds, {QUICK['steps']} steps")
    parser.add_argument("--seeds", type=int, help=f"seeds per method (default {FULL['seeds']})")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the first seed: runs seeds first-seed .. first-seed + seeds - 1 (default 0)"
    )
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {FULL['steps']})")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--lr", type=float, default=Schedule.learning_rate, help="learning rate (Adam)")
    parser.add_argument("--length", type=int, default=Schedule.length, help="completion length in tokens")
    parser.add_argument(
        "--steps-per-generation",
        type=int,
        default=Schedule.steps_per_generation,
        help="micro-batches generated at once (more: more stale ratios)",
    )
    parser.add_argument(
        "--num-iterations", type=int, default=Schedule.num_iterations, help="times each micro-batch is used (more: more stale)"
    )
    parser.add_argument("--strides", default="1", help="comma-separated steps k of the task (1: count up; 1,2,3: harder)")
    parser.add_argument(
        "--kpo-clip", metavar="LOW,HIGH", help="clip range (epsilon, epsilon_high) of the KPO methods (default: the paper's 3e-4,4e-4)"
    )
    parser.add_argument(
        "--delta", type=float, help="TRL's two-sided clip bound for every method (KPO: its dual clip; >= 1 + epsilon_high)"
    )
    parser.add_argument("--threshold", type=float, help="reward for 'steps to threshold' (default 0.5, or that of --from-json)")
    parser.add_argument("--workers", type=int, help="runs in parallel, one torch thread each (default: 2 on a CPU, 1 on CUDA)")
    parser.add_argument(
        "--threads", type=int, help="torch threads per run (0: torch's default; default: 1 when runs are parallel, else 0)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the runs, their curves and the summary as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the figure (PNG)")
    parser.add_argument(
        "--from-json", metavar="PATH[,PATH]", help="no training: summarise and plot the runs of earlier --json files"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        given = [option for option, value in _training_options(args).items() if value != parser.get_default(option)]
        if given:
            parser.error(f"--from-json does not train: drop {', '.join('--' + o.replace('_', '-') for o in given)}")
        return args
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    args.methods = methods
    mode = QUICK if args.quick else FULL
    args.seeds = args.seeds if args.seeds is not None else mode["seeds"]
    args.steps = args.steps if args.steps is not None else mode["steps"]
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    if args.first_seed < 0:
        parser.error("--first-seed must be >= 0")
    try:
        args.strides = tuple(int(k) for k in args.strides.split(","))
    except ValueError:
        parser.error(f"--strides: comma-separated integers, got {args.strides!r}")
    if args.kpo_clip is not None:
        try:
            low, high = (float(value) for value in args.kpo_clip.split(","))
        except ValueError:
            parser.error(f"--kpo-clip: two comma-separated numbers, got {args.kpo_clip!r}")
        args.kpo_clip = (low, high)
    if args.delta is not None:
        highs = [_epsilon_high(METHODS[name], args.kpo_clip) for name in methods if METHODS[name].config is not GRPOConfig]
        if highs and not args.delta >= 1 + max(highs):
            parser.error(f"--delta must be >= 1 + the KPO methods' epsilon_high ({1 + max(highs)}): it is their dual clip")
    cuda = torch.cuda.is_available()
    args.workers = args.workers or (1 if cuda else min(2, os.cpu_count() or 1))
    if args.threads is None:
        args.threads = 1 if args.workers > 1 else 0
    elif args.threads < 0:
        parser.error("--threads must be >= 0")
    try:
        args.schedule = Schedule(
            steps=args.steps,
            learning_rate=args.lr,
            length=args.length,
            steps_per_generation=args.steps_per_generation,
            num_iterations=args.num_iterations,
            strides=args.strides,
            kpo_clip=args.kpo_clip,
            delta=args.delta,
            threads=args.threads,
        )
    except ValueError as error:
        parser.error(str(error))
    return args


def _training_options(args):
    names = ("quick", "seeds", "first_seed", "steps", "methods", "lr", "length", "steps_per_generation", "num_iterations")
    names += ("strides", "kpo_clip", "delta", "workers", "threads")
    return {name: getattr(args, name) for name in names}


def _epsilon_high(method, kpo_clip):
    """The upper clip range a KPO method trains with under --kpo-clip."""
    if kpo_clip is not None and not method.own_clip:
        return kpo_clip[1]
    return method.options.get("epsilon_high", PAPER["epsilon_high"])


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        record = _load_records(args.from_json.split(","))
        runs, settings = record["runs"], record["schedule"]
        threshold = args.threshold if args.threshold is not None else record["threshold"]
    else:
        settings = schedule_dict(args.schedule)
        started = time.perf_counter()
        commit = checkout_commit()
        runs = _train_all(args, args.schedule)
        record = {
            "schedule": settings,
            "methods": args.methods,
            "seeds": _seeds(args),
            "machine": _machine(),
            "versions": _versions(),
            "commit": commit,
            "date": time.strftime("%Y-%m-%d"),
            "wall_seconds": time.perf_counter() - started,
            "runs": runs,
        }
        threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLD
    record["threshold"] = threshold
    record["summary"] = report.summarize(runs, threshold)
    print()
    print(report.table(record["summary"], threshold))
    print()
    print(report.seed_table(record["summary"]))
    if not args.from_json:
        print(f"\nwall time {record['wall_seconds']:.0f} s on {record['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if args.plot:
        from .plot import plot

        plot(runs, args.plot, title=_title(settings), threshold=threshold)
    nonfinite = sum(report.nonfinite_steps(run["steps"]) for run in runs)
    if nonfinite:
        print(f"{nonfinite} steps had a non-finite loss or gradient norm", file=sys.stderr)
    return 0


def _load_records(paths):
    """The runs of one or more --json files of the same schedule, as one record (the first's
    settings; `sources` names each file's machine, date and commit)."""
    records = []
    for path in paths:
        with open(path) as f:
            records.append(json.load(f))
        record = records[-1]
        print(f"{len(record['runs'])} runs from {path} ({record['machine']}, {record['date']}, commit {record['commit']})")
        differ = sorted(key for key in {**record["schedule"], **records[0]["schedule"]}
                        if record["schedule"].get(key) != records[0]["schedule"].get(key))
        if differ:
            raise SystemExit(f"--from-json: {path} has another schedule than {paths[0]} ({', '.join(differ)})")
        if record.get("threshold") != records[0].get("threshold"):
            raise SystemExit(f"--from-json: {path} has another threshold than {paths[0]}")
    runs = [run for record in records for run in record["runs"]]
    keys = [(run["method"], run["seed"]) for run in runs]
    if len(set(keys)) < len(keys):
        raise SystemExit("--from-json: the files repeat a (method, seed)")
    merged = dict(records[0], runs=runs)
    merged["methods"] = list(dict.fromkeys(run["method"] for run in runs))
    merged["seeds"] = sorted({run["seed"] for run in runs})
    merged["sources"] = [{key: record.get(key) for key in ("machine", "date", "commit", "wall_seconds")} for record in records]
    return merged


def _seeds(args):
    """The seeds of the runs: --seeds of them from --first-seed on."""
    return list(range(args.first_seed, args.first_seed + args.seeds))


def _train_all(args, schedule):
    seeds = _seeds(args)
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(method, seed, schedule, os.path.join(scratch, f"{method}-{seed}")) for seed in seeds for method in args.methods]
        print(
            f"{len(jobs)} runs ({', '.join(args.methods)} x {args.seeds} seeds: {seeds[0]}..{seeds[-1]}), {schedule.steps} steps each, "
            f"{args.workers} at a time",
            flush=True,
        )
        runs = []
        if args.workers == 1:
            for job in jobs:
                runs.append(train_job(job))
                _progress(runs[-1])
        else:
            with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
                for run in pool.map(train_job, jobs):
                    runs.append(run)
                    _progress(run)
    return runs


def _title(settings):
    title = (
        f"stride task {tuple(settings['strides'])}, {settings['length']}-token answers, lr {settings['learning_rate']:g}, "
        f"{settings['steps_per_generation']} micro-batches per generation x {settings['num_iterations']} iterations"
    )
    title += f", KPO clip {tuple(settings['kpo_clip'])}" if settings.get("kpo_clip") else ""
    return title + (f", delta {settings['delta']:g}" if settings.get("delta") else "")


def _progress(run):
    summary = report.summarize_run(run, 0.5)
    print(
        f"  {run['method']:14s} seed {run['seed']}: final reward {summary['final_reward']:.3f}, "
        f"peak {summary['peak_reward']:.3f}, {run['seconds']:.0f} s",
        flush=True,
    )


def _machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def _versions():
    import transformers
    import trl

    import kpo_kernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "kpo_kernels": getattr(kpo_kernels, "__version__", None),
    }


if __name__ == "__main__":
    sys.exit(main())
