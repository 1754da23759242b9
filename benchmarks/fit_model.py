"""A model of the per-step noise fit's device time on H100 and H200, beside the fused loss's.

    python -m benchmarks.fit_model [--rows 64] [--length 4096] [--no-loss]

No GPU needed (nor used). `estimate_noise` runs on the meta device, which takes the code path of
every device but the CPU (one transform bucket, no host-side shortcuts) and reads no value (any
read raises: tests/test_fitting.py), under a dispatch mode that records each aten operation and
the bytes of its tensor arguments and results. Operations whose result is a view of an input,
and allocations without a fill, launch no kernel; every other one is modelled as one kernel of
time max(LAUNCH_US, bytes / copy bandwidth) (the FFTs: two passes over their bytes), with the
machines and LAUNCH_US of `benchmarks.static_model`. The fused loss's step at the same shape
comes from `benchmarks.static_model` (Triton 3.6 compiled for sm_90a). A MODEL: launch-bound
kernels dominate, so it is the operation count that decides; `benchmarks/RESULTS.md` has the
figures and what they say.
"""

import argparse
import collections
import math
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kpo_kernels
from kpo_kernels.bench.data import rl_batch
from kpo_kernels.fit_options import PER_STEP_MAX_TOKENS

from .static_model import LAUNCH_US, MACHINES

NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default"}
FFT_PASSES = 2  # a batched complex FFT of a few thousand points: about two passes over its data (assumed)


class _Recorder(TorchDispatchMode):
    """Every aten operation as (name, bytes read and written, launches a kernel)."""

    def __init__(self):
        super().__init__()
        self.operations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        returns = func._schema.returns
        view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        self.operations.append((name, moved, not view and name not in NO_KERNEL))
        return out


def record_fit(rows, length, max_tokens):
    batch = rl_batch(rows, length)
    log_ratio = (batch["log_prob"] - batch["old_log_prob"]).to("meta")
    with _Recorder() as recorder:
        kpo_kernels.estimate_noise(log_ratio, batch["mask"].to("meta"), max_tokens=max_tokens)
    return [op for op in recorder.operations if op[2]]


def device_time(kernels, machine):
    total = 0.0
    for name, moved, _ in kernels:
        passes = FFT_PASSES if "fft" in name else 1
        total += max(LAUNCH_US, passes * moved / (machine.copy_tbps * 1e6))
    return total


def loss_time(rows, length):
    from kpo_kernels.bench.cases import Case

    from .static_model import model_case

    return model_case(Case(rows, length, torch.float32), False)["step_us"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--no-loss", action="store_true", help="leave out the loss's model (no Triton compile)")
    args = parser.parse_args(argv)
    loss = None if args.no_loss else loss_time(args.rows, args.length)
    print(f"Model (NOT measured): the per-step fit of a {args.rows} x {args.length} float32 micro-batch on a GPU")
    for label, budget in (("default budget", PER_STEP_MAX_TOKENS), ("every sequence", None)):
        kernels = record_fit(args.rows, args.length, budget)
        moved = sum(op[1] for op in kernels)
        frequent = ", ".join(f"{name} x{count}" for name, count in collections.Counter(op[0] for op in kernels).most_common(4))
        print(f"  {label} (max_tokens={budget}): {len(kernels)} kernels, {moved / 2**20:.1f} MiB moved; most frequent: {frequent}")
        for machine in MACHINES:
            fit = device_time(kernels, machine)
            floor = sum(FFT_PASSES * op[1] if "fft" in op[0] else op[1] for op in kernels) / (machine.copy_tbps * 1e6)
            line = f"    {machine.name}: {fit:.0f} us ({len(kernels) * LAUNCH_US:.0f} us of it the launch floor; bytes alone {floor:.1f} us)"
            if loss is not None:
                line += f"; fused loss fwd + bwd {loss[machine.name]:.1f} us: fit / loss {fit / loss[machine.name]:.1f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
