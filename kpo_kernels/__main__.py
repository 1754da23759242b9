"""`python -m kpo_kernels`: is it right, and how fast is it, on this machine?

On the best device here (CUDA if there is one, else the CPU): builds synthetic off-policy GRPO
batches, checks this package's loss, gradient and filter against `reference/` in float64 and a
float64 recursion, then times forward + backward of every implementation (this package and
today's baselines) and prints a table. The harness lives in `benchmarks/` of the source
checkout; this module only parses the arguments.
"""

import argparse
import sys
from pathlib import Path


def checkout_root(package_dir=None):
    """The source checkout holding this package, `benchmarks/` and `reference/`, or None."""
    root = Path(package_dir or Path(__file__).resolve().parent).parent
    if (root / "benchmarks" / "harness.py").is_file() and (root / "reference" / "__init__.py").is_file():
        return root
    return None


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
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of time against tokens per implementation")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the table as markdown")
    parser.add_argument("--reference-max-length", type=int, default=None, metavar="T",
                        help="time sequential-reference only up to this T (default 1024 on CPUs, 4096 on GPUs)")
    parser.add_argument("--budget", type=float, default=0.4, metavar="SECONDS",
                        help="CPU: time each implementation for at least this long (default 0.4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None):
    args = parse_args(argv)
    root = checkout_root()
    if root is None:
        print(
            "python -m kpo_kernels needs the source checkout (its benchmarks/ and reference/ folders are not\n"
            "installed with the package). Clone the repository and install it editable: pip install -e \".[bench]\"",
            file=sys.stderr,
        )
        return 2
    missing = [name for name in ("numpy",) + (("matplotlib",) if args.plot else ()) if not _importable(name)]
    if missing:
        print(f"python -m kpo_kernels needs {' and '.join(missing)}: pip install -e \".[bench]\"", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.command import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
