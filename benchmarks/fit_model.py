"""A model of the per-step noise fit's device time on H100 and H200, beside the fused loss's.

    python -m benchmarks.fit_model [--rows 64] [--length 4096] [--no-loss]

No GPU needed (nor used). `estimate_noise` runs on the meta device, which takes the code path of
every device but the CPU (one transform bucket, no host-side shortcuts) and reads no value (any
read raises: tests/test_fitting.py), under a dispatch mode that records each aten operation and
the bytes of its tensor arguments and results; on the Triton backend (what a GPU runs) the
fit's Triton kernels are recorded in their place in the stream, as launched. After one warm-up
call (what the backend caches per size: the bins' edge angles).

- aten operations: those whose result is a view of an input, bare allocations and wrapped
  Python numbers launch no kernel; every other one is one kernel of time
  max(LAUNCH_US, bytes / copy bandwidth) (the FFTs: two passes over their bytes);
- the transform's Triton kernels: the same, from the bytes of their tensor arguments;
- the search kernel: compiled for sm_90a as launched (Triton's own specialisation,
  benchmarks/sm90.py); its SASS instructions times the trip counts of the loops around them
  (bins, sequences and grid points per loop step), split at its atomic into the part every
  program runs and the last program's finish; each issued by its SM at
  `static_model.ISSUE_EFFICIENCY` of 4 warp-instructions a cycle (the rate measured for the fused
  forward at 2 warps a scheduler; fewer warps, in proportion), or at 2 a cycle for its float64
  instructions (64 float64 lanes an SM), whichever takes longer; the busiest SM's programs,
  then the finish; at least LAUNCH_US.

Machines and LAUNCH_US are `benchmarks.static_model`'s; the fused loss's step at the same shape
comes from `benchmarks.static_model` (Triton 3.6 compiled for sm_90a). A MODEL;
`benchmarks/RESULTS.md` has the figures and what they say.
"""

import argparse
import collections
import contextlib
import math
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kpo_kernels
from kpo_kernels.bench.data import rl_batch
from kpo_kernels.fit_options import PER_STEP_MAX_TOKENS

from .static_model import ISSUE_EFFICIENCY, LAUNCH_US, MACHINES
from .static_model import loops as static_loops

# bare allocations; and Python numbers wrapped as 0-dim CPU tensors (torch.where(mask, x, 0.0))
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default", "aten.scalar_tensor.default"}
FIT_KERNELS = ("fit_layout_kernel", "fit_chirp_kernel", "fit_coefficients_kernel", "fit_bins_kernel", "noise_search_kernel")
FLOAT64_WARP_INSTRUCTIONS_PER_CYCLE = 2  # 64 float64 lanes an SM (H100, H200)
FLOAT64_OPCODES = ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX")
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


class _KernelRecorder:
    """Stands in for one Triton kernel: each launch goes into the operation list (in stream
    order) and, with its arguments, into `launches`."""

    def __init__(self, kernel, operations, launches):
        self.kernel, self.operations, self.launches = kernel, operations, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            moved = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
            self.operations.append((f"triton.{self.kernel.fn.__name__}", moved, True))
            self.launches.append((self.kernel, tuple(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def _triton_on_meta(operations, launches):
    from kpo_kernels.backends import triton_backend as launcher

    originals = {name: getattr(launcher.kernels, name) for name in FIT_KERNELS}
    unavailable = launcher.TritonBackend.unavailable_reason
    try:
        for name, kernel in originals.items():
            setattr(launcher.kernels, name, _KernelRecorder(kernel, operations, launches))
        launcher.TritonBackend.unavailable_reason = lambda self, device: None  # meta tensors too
        yield
    finally:
        for name, kernel in originals.items():
            setattr(launcher.kernels, name, kernel)
        launcher.TritonBackend.unavailable_reason = unavailable


def record_fit(rows, length, max_tokens, backend="torch"):
    """The fit's kernels in stream order, (name, bytes moved, launch or None) each: the launch
    (kernel, grid, args, kwargs) of a Triton kernel, None for an aten operation."""
    batch = rl_batch(rows, length)
    log_ratio = (batch["log_prob"] - batch["old_log_prob"]).to("meta")
    mask = batch["mask"].to("meta")
    run = lambda: kpo_kernels.estimate_noise(log_ratio, mask, max_tokens=max_tokens, backend=backend)  # noqa: E731
    launches = []
    with contextlib.ExitStack() as stack:
        recorder = _Recorder()
        if backend == "triton":
            stack.enter_context(_triton_on_meta(recorder.operations, launches))
        run()  # warm-up: what the backend caches
        recorder.operations.clear()
        launches.clear()
        with recorder:
            run()
    found, kernels = [], iter(launches)
    for name, moved, launched in recorder.operations:
        if launched:
            found.append((name, moved, next(kernels) if name.startswith("triton.") else None))
    return found


def search_time(launch, machine):
    """The search kernel's modelled time in microseconds (the module docstring): its programs'
    shared part (each evaluates RATIOS grid points), then the last program's finish."""
    from .sm90 import compile_launch, sass

    kernel, grid, args, kwargs = launch
    stand_ins = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    compiled = compile_launch(kernel, stand_ins, kwargs)
    instructions = sass(compiled.asm["cubin"])
    finish_from = next(address for address, opcode, _ in instructions if opcode.startswith("ATOMG"))
    bins, sequences = args[2], args[4]
    steps = {"bins": math.ceil(bins / kwargs["BLOCK_B"]), "sequences": math.ceil(sequences / kwargs["BLOCK_S"]),
             "points": math.ceil(kwargs["POINTS"] / kwargs["BLOCK_F"])}
    loops = static_loops(instructions)
    shared = [loop for loop in loops if loop[1] < finish_from]
    finish = [loop for loop in loops if loop[0] > finish_from]
    if len(shared) != 2 or len(finish) != 1 or len(loops) != 3:
        raise RuntimeError(f"unexpected loops in noise_search_kernel's SASS: {loops} (the atomic at {finish_from})")
    # the profile's loops: over the bins (four loads a step: the moments and centres) and over the sequences
    # (one: the lengths); the finish's: over the grid's points
    loads = [sum(opcode.startswith("LDG") for address, opcode, _ in instructions if start <= address <= end) for start, end in shared]
    bins_loop, sequences_loop = sorted(shared, key=lambda loop: -loads[shared.index(loop)])
    trips = {bins_loop: steps["bins"], sequences_loop: steps["sequences"], finish[0]: steps["points"]}
    counts = {"shared": [0.0, 0.0], "finish": [0.0, 0.0]}  # warp-instructions a warp: all, float64
    for address, opcode, _ in instructions:
        times = math.prod(count for (start, end), count in trips.items() if start <= address <= end)
        part = counts["shared" if address < finish_from else "finish"]
        part[0] += times
        part[1] += times if opcode.split(".")[0] in FLOAT64_OPCODES else 0
    warps = compiled.metadata.num_warps
    programs = math.prod(grid)
    busiest = math.ceil(programs / machine.sms)  # programs on the busiest SM (all resident at once)

    def cycles(per_warp, resident_warps):
        # 2 warps a scheduler issue at ISSUE_EFFICIENCY of one instruction a cycle; fewer, in proportion
        rate = 4 * ISSUE_EFFICIENCY * min(1.0, resident_warps / 8)
        return max(per_warp[0] * resident_warps / rate, per_warp[1] * resident_warps / FLOAT64_WARP_INSTRUCTIONS_PER_CYCLE)

    total = cycles(counts["shared"], busiest * warps) + cycles(counts["finish"], warps)
    return total / (machine.clock_ghz * 1e3) + LAUNCH_US


def device_time(kernels, machine, detail=None):
    """Modelled device time of the recorded kernels in microseconds; `detail`, a dict, gets
    each Triton kernel's time."""
    total = 0.0
    for name, moved, launch in kernels:
        if name == "triton.noise_search_kernel":
            time = search_time(launch, machine)
        else:
            passes = FFT_PASSES if "fft" in name else 1
            time = passes * moved / (machine.copy_tbps * 1e6) + LAUNCH_US
        if detail is not None and name.startswith("triton."):
            detail[name] = detail.get(name, 0.0) + time
        total += time
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
    for backend in ("triton", "torch"):
        for label, budget in (("default budget", PER_STEP_MAX_TOKENS), ("every sequence", None)):
            kernels = record_fit(args.rows, args.length, budget, backend)
            moved = sum(op[1] for op in kernels)
            frequent = ", ".join(f"{name} x{count}" for name, count in collections.Counter(op[0] for op in kernels).most_common(4))
            print(f"  backend={backend}, {label} (max_tokens={budget}): {len(kernels)} kernels, {moved / 2**20:.1f} MiB moved; "
                  f"most frequent: {frequent}")
            for machine in MACHINES:
                detail = {}
                fit = device_time(kernels, machine, detail)
                floor = sum(FFT_PASSES * op[1] if "fft" in op[0] else op[1] for op in kernels) / (machine.copy_tbps * 1e6)
                line = f"    {machine.name}: {fit:.1f} us (launch floor {len(kernels) * LAUNCH_US:.0f} us; bytes alone {floor:.1f} us"
                line += "".join(f"; {name[7:]} {time:.1f}" for name, time in detail.items()) + ")"
                if loss is not None:
                    line += f"; fused loss fwd + bwd {loss[machine.name]:.1f} us: fit / loss {fit / loss[machine.name]:.2f}"
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
