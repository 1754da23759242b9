"""`python -m kpo_kernels`: is it right, and how fast is it, on this machine?

On the best device here (CUDA if there is one, else the CPU): builds synthetic off-policy GRPO
batches, checks this package's filter, loss, gradient and metrics against the sequential
reference in float64 and a float64 recursion, measures how the errors of this package and of the
authors' vectorized filter grow with the sequence length, then times forward + backward of every
implementation (this package and today's baselines) and prints a table. Everything it needs
ships with the package (`kpo_kernels.bench`, `kpo_kernels._reference`): it runs the same from an
installed wheel as from a source checkout. This module parses the arguments and checks every
one of them before any work (an argparse error, exit status 2, naming the option): values,
combinations, the dependencies they need, and that output paths can be written.
"""

import argparse
import math
import os
import sys
from pathlib import Path

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # kpo_kernels.bench.cases.DTYPES, checked equal in the tests


def _positive_int(text):
    return _int_at_least(text, 1)


def _count(text):
    return _int_at_least(text, 0)


def _int_at_least(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _noise_ratio(text):
    """The filter's Q/R, checked by the package's own validation (as kpo_loss checks q with r = 1)."""
    from kpo_kernels.validation import check_filter_params

    try:
        return check_filter_params(q=float(text), r=1.0, p0=0.0, x0=0.0).q
    except ValueError as error:  # float("x") or the package's check, which names q
        raise argparse.ArgumentTypeError(str(error)) from None


def _seed(text):
    value = _count(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be < 2^63, got {value}")
    return value


def _dtypes(text):
    names = text.split(",")
    unknown = [name for name in names if name not in DTYPE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(repr(n) for n in unknown)} in {text!r}; a comma-separated list of {', '.join(DTYPE_NAMES)}"
        )
    return text


def _output_path(text):
    """A file path whose folder exists and can be written (checked before the run, not after it)."""
    path = Path(text)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} cannot be written (permissions)")
    return path


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m kpo_kernels",
        description="Check kpo_kernels against float64 and time it against today's baselines "
        "(default: a short run, under a minute on a 2-core CPU).",
    )
    parser.add_argument("--full", action="store_true", help="the whole sweep: many short rows, few long rows, fp32 and bf16 (measured: about 2 minutes "
        "on an H200, about 9 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present, else cpu")
    parser.add_argument("--rows", type=_positive_int, help="one case of ROWS responses (B); needs --length")
    parser.add_argument("--length", type=_positive_int, help="tokens per response (T) of that case")
    parser.add_argument("--dtype", type=_dtypes, help="comma-separated fp32, bf16, fp16 (default fp32 with --rows; filters the cases otherwise)")
    parser.add_argument("--impl", help="comma-separated implementation names (default: all that run here; kpo is always included)")
    parser.add_argument("--q", type=_noise_ratio, default=1e-6, help="process noise Q/R of the filter (default 1e-6, the paper's)")
    parser.add_argument("--json", type=_output_path, metavar="PATH", help="write the rows as JSON (a list, each with an `impl` field)")
    parser.add_argument("--plot", type=_output_path, metavar="PATH",
                        help="write a PNG: error against float64 vs T, and time vs tokens, per implementation")
    parser.add_argument("--markdown", type=_output_path, metavar="PATH", help="write the table as markdown")
    parser.add_argument("--reference-max-length", type=_count, default=None, metavar="T",
                        help="time sequential-reference only up to this T (default 1024 on CPUs, 4096 on GPUs)")
    parser.add_argument("--budget", type=_seconds, default=0.4, metavar="SECONDS",
                        help="CPU: time each implementation for at least this long (default 0.4)")
    parser.add_argument("--accuracy-max-length", type=_count, default=131072, metavar="T",
                        help="accuracy sweep (kpo and vectorized-cumsum vs float64, 4 rows, T = 256 ...) up to this T "
                        "(default 131072; 0: no sweep)")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads (torch.set_num_threads); "
                        "fewer give steadier CPU timings on a busy machine")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def parse_args(argv=None):
    """The checked arguments; on a bad option an argparse error naming it (SystemExit(2))."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_together(parser, args)
    return args


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_together(parser, args):
    """What one option's type cannot see: the dependencies, combinations, the device, the cases."""
    missing = [name for name in ("numpy",) + (("matplotlib",) if args.plot else ()) if not _importable(name)]
    if missing:
        parser.exit(2, f"python -m kpo_kernels needs {' and '.join(missing)}: install the package with its `bench` "
                    "extra, e.g. pip install \".[bench]\" from a checkout\n")
    if (args.rows is None) != (args.length is None):
        parser.error("--rows and --length go together")
    if args.impl is not None:
        from kpo_kernels.bench.implementations import IMPLEMENTATIONS

        names = [n.strip() for n in args.impl.split(",") if n.strip()]
        unknown = [n for n in names if n not in IMPLEMENTATIONS]
        if unknown or not names:
            parser.error(f"--impl: unknown {unknown or args.impl!r}; a comma-separated list of {', '.join(IMPLEMENTATIONS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    if args.dtype and args.rows is None:
        from kpo_kernels.bench.cases import DTYPE_NAMES as measured, default_cases, sweep_cases
        from kpo_kernels.bench.environment import resolve_device

        device = resolve_device(args.device)
        cases = sweep_cases(device) if args.full else default_cases(device)
        if not any(measured[c.dtype] in args.dtype.split(",") for c in cases):
            parser.error(f"--dtype {args.dtype}: no case of this run has that dtype (cases: "
                         f"{', '.join(c.label for c in cases)}); give --rows and --length for a case of your own")


def main(argv=None):
    args = parse_args(argv)
    from kpo_kernels.bench.command import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
