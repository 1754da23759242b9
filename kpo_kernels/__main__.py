"""`python -m kpo_kernels`: is it right, and how fast is it, on this machine?

On the best device here (CUDA if there is one, else the CPU): builds synthetic off-policy GRPO
batches, checks this package's filter, loss, gradient and metrics against the sequential
reference in float64 and a float64 recursion, measures how the errors of this package and of the
authors' vectorized filter grow with the sequence length, then times forward + backward of every
implementation (this package and today's baselines) and prints a table. Everything it needs
ships with the package (`kpo_kernels.bench`, `kpo_kernels._reference`): it runs the same from an
installed wheel as from a source checkout. This module only parses the arguments.
"""

import argparse
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kpo_kernels",
        description="Check kpo_kernels against float64 and time it against today's baselines "
        "(default: a short run, under a minute on a 2-core CPU).",
    )
    parser.add_argument("--full", action="store_true", help="the whole sweep: many short rows, few long rows, fp32 and bf16")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present, else cpu")
    parser.add_argument("--rows", type=int, help="one case of ROWS responses (B); needs --length")
    parser.add_argument("--length", type=int, help="tokens per response (T) of that case")
    parser.add_argument("--dtype", help="comma-separated fp32, bf16, fp16 (default fp32 with --rows; filters the cases otherwise)")
    parser.add_argument("--impl", help="comma-separated implementation names (default: all that run here; kpo is always included)")
    parser.add_argument("--q", type=float, default=1e-6, help="process noise Q/R of the filter (default 1e-6, the paper's)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows as JSON (a list, each with an `impl` field)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="write a PNG: error against float64 vs T, and time vs tokens, per implementation")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the table as markdown")
    parser.add_argument("--reference-max-length", type=int, default=None, metavar="T",
                        help="time sequential-reference only up to this T (default 1024 on CPUs, 4096 on GPUs)")
    parser.add_argument("--budget", type=float, default=0.4, metavar="SECONDS",
                        help="CPU: time each implementation for at least this long (default 0.4)")
    parser.add_argument("--accuracy-max-length", type=int, default=131072, metavar="T",
                        help="accuracy sweep (kpo and vectorized-cumsum vs float64, 4 rows, T = 256 ...) up to this T "
                        "(default 131072; 0: no sweep)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (torch.set_num_threads); "
                        "fewer give steadier CPU timings on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None):
    args = parse_args(argv)
    missing = [name for name in ("numpy",) + (("matplotlib",) if args.plot else ()) if not _importable(name)]
    if missing:
        print(f"python -m kpo_kernels needs {' and '.join(missing)}: install the package with its `bench` extra, "
              "e.g. pip install \".[bench]\" from a checkout", file=sys.stderr)
        return 2
    from kpo_kernels.bench.command import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
