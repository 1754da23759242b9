"""A model of the per-step noise fit's device time on H100 and H200, beside the fused loss's.

    python -m benchmarks.fit_model [--rows 64] [--length 4096] [--no-loss]

No GPU needed (nor used). `estimate_noise` runs on the meta device, which takes the code path of
every device but the CPU (one transform bucket, no host-side shortcuts) and reads no value (any
read raises: tests/test_fitting.py), under a dispatch mode that records each aten operation and
the bytes of its tensor arguments and results; on the Triton backend (what a GPU runs) the
fit's Triton kernels are recorded in their place in the stream, as launched. After one warm-up
call (what the backend caches per size: the search grid, the chunks' entering variances).

- aten operations: those whose result is a view of an input, bare allocations and wrapped
  Python numbers launch no kernel; every other one is one kernel of time
  max(LAUNCH_US, bytes / copy bandwidth) (the FFTs: two passes over their bytes);
- the layout kernel: the same, from the bytes of its tensor arguments;
- the filter and profile kernels: compiled for sm_90a as launched (Triton's own
  specialisation, benchmarks/sm90.py); their SASS instructions times the trip counts of the
  loops around them (`filter_time`, `profile_time`: tokens and chunks of each program, from the
  batch's own lengths, which the meta device does not hold), issued by each SM at
  `static_model.ISSUE_EFFICIENCY` of 4 warp-instructions a cycle (the rate measured for the fused
  forward at 2 warps a scheduler; fewer warps, in proportion), or at 2 a cycle for float64
  instructions (64 float64 lanes an SM), whichever takes longer; the busiest SM's programs
  (programs go to the SMs in launch order), the profile's last program after them, and the
  filters at least their longest chunk times CHAIN_CYCLES; plus LAUNCH_US.

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
FIT_KERNELS = ("fit_layout_kernel", "noise_filter_kernel", "noise_profile_kernel")
# noise_filter_kernel's dependent chain a token (FADD, FADD, MUFU.RCP, FMUL: the variance's
# recursion), in cycles: an assumption, not read from the code; a chunk takes at least its tokens
# times this
CHAIN_CYCLES = 30
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
    # the layout's lengths, which the meta device does not hold, for the filters' model: each row's
    # valid tokens, every k-th row under the budget (fitting.estimate_noise's subsampling)
    step = -(-batch["mask"].numel() // max_tokens) if max_tokens is not None and batch["mask"].numel() > max_tokens else 1
    lengths = batch["mask"][::step].sum(1)
    found, kernels = [], iter(launches)
    for name, moved, launched in recorder.operations:
        if launched:
            launch = next(kernels) if name.startswith("triton.") else None
            if name in ("triton.noise_filter_kernel", "triton.noise_profile_kernel"):
                kernel, grid, args, kwargs = launch
                launch = (kernel, grid, args[:3] + (lengths,) + args[4:], kwargs)
            found.append((name, moved, launch))
    return found


def _compiled(launch):
    from .sm90 import compile_launch, sass

    kernel, grid, args, kwargs = launch
    stand_ins = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    compiled = compile_launch(kernel, stand_ins, kwargs)
    return compiled, sass(compiled.asm["cubin"])


def _cycles(per_warp, resident_warps):
    """Cycles an SM takes to issue `per_warp` = (warp-instructions, of them float64) for each of
    `resident_warps` warps: 2 warps a scheduler issue at ISSUE_EFFICIENCY of one instruction a
    cycle (fewer, in proportion), float64 ones at FLOAT64_WARP_INSTRUCTIONS_PER_CYCLE an SM."""
    rate = 4 * ISSUE_EFFICIENCY * min(1.0, resident_warps / 8)
    return max(per_warp[0] * resident_warps / rate, per_warp[1] * resident_warps / FLOAT64_WARP_INSTRUCTIONS_PER_CYCLE)


def _is_float64(opcode):
    return opcode.split(".")[0] in FLOAT64_OPCODES


def _counted(instructions, keep):
    """(warp-instructions, of them float64) a warp among the instructions at addresses `keep` accepts."""
    ops = [op for address, op, _ in instructions if keep(address)]
    return len(ops), sum(map(_is_float64, ops))


def _program_cost(instructions, found, outside):
    """cost(steps) -> (warp-instructions, of them float64) a warp, or None for no step: a program
    running the instructions at addresses `outside` accepts once and one loop `steps` times,
    which ptxas may have unrolled into `found`: the loop with the most loads is the main one, the
    other (if any) the remainder, the ratio of their loads the steps a main iteration does."""
    loads = [sum(op.startswith("LDG") for address, op, _ in instructions if start <= address <= end) for start, end in found]
    ranked = sorted(zip(found, loads), key=lambda pair: -pair[1])
    (main, main_loads), (rest, rest_loads) = ranked[0], (ranked[1] if len(ranked) > 1 else (None, 0))
    unroll = max(1, main_loads // rest_loads) if rest is not None and rest_loads else 1
    per_block = _counted(instructions, lambda address: main[0] <= address <= main[1])
    per_rest = _counted(instructions, lambda address: rest is not None and rest[0] <= address <= rest[1])
    once = _counted(instructions, outside)
    return lambda steps: tuple(once[i] + (steps // unroll) * per_block[i] + (steps % unroll) * per_rest[i] for i in range(2))


def _busiest_sm(works, warps, machine):
    """Cycles of the busiest SM when programs with the given (instructions, float64 ones) a warp go
    to the SMs in launch order, one after the other (all resident at once at these sizes), each
    SM issuing its programs' warps as `_cycles` says."""
    per_sm = [[0.0, 0.0, 0] for _ in range(machine.sms)]
    for program, work in enumerate(works):
        if work is not None:
            sm = per_sm[program % machine.sms]
            sm[0], sm[1], sm[2] = sm[0] + work[0], sm[1] + work[1], sm[2] + 1
    return max((_cycles((w / k, f / k), k * warps) if k else 0.0) for w, f, k in per_sm)


def filter_time(launch, machine):
    """noise_filter_kernel's modelled time in microseconds. Each program with tokens: its token
    loop's SASS (unrolled by ptxas: _program_cost, one load a token) times its tokens, plus the code
    outside the loops; the busiest SM's programs (_busiest_sm), and at least the longest chunk's
    tokens times CHAIN_CYCLES (the variance's dependent recursion)."""
    compiled, instructions = _compiled(launch)
    _, grid, args, kwargs = launch
    lengths, chunk_count, chunk_length = args[3], args[10], args[11]
    found = static_loops(instructions)
    if len(found) not in (1, 2):
        raise RuntimeError(f"unexpected loops in noise_filter_kernel's SASS: {found}")
    cost = _program_cost(instructions, found, lambda address: not any(s <= address <= e for s, e in found))
    scored = (lengths - (1 if kwargs["DIFFUSE"] else 0)).clamp(min=0)
    starts = torch.arange(chunk_count)[None, :] * chunk_length
    tokens = (scored[:, None] - starts).clamp(min=0, max=chunk_length).flatten().tolist() * grid[1]  # launch order
    issue = _busiest_sm([cost(n) if n else None for n in tokens], compiled.metadata.num_warps, machine)
    latency = max(tokens, default=0) * CHAIN_CYCLES
    return max(issue, latency) / (machine.clock_ghz * 1e3) + LAUNCH_US


def profile_time(launch, machine):
    """noise_profile_kernel's modelled time in microseconds (its _LOCAL stage, one program a
    sequence): each program's code before its atomic, its chunk loop (unrolled by ptxas:
    _program_cost) run once a chunk of its sequence; the busiest SM's programs
    (_busiest_sm); then the last program's code after the atomic, its loop over the sequences
    ceil(sequences / BLOCK_S) times and any later loop (the finish's) ceil(POINTS / BLOCK_F)
    times, issued by one program as `_cycles` says; at least LAUNCH_US."""
    compiled, instructions = _compiled(launch)
    _, grid, args, kwargs = launch
    lengths, sequences, chunk_count, chunk_length = args[3], args[7], args[8], args[9]
    finish_from = next(address for address, opcode, _ in instructions if opcode.startswith("ATOMG"))
    found = static_loops(instructions)
    before = [loop for loop in found if loop[1] < finish_from]
    after = [loop for loop in found if loop[0] > finish_from]
    if not before or len(before) > 2 or not after or len(before) + len(after) != len(found):
        raise RuntimeError(f"unexpected loops in noise_profile_kernel's SASS: {found} (the atomic at {finish_from})")
    cost = _program_cost(instructions, before,
                         lambda address: address < finish_from and not any(s <= address <= e for s, e in before))
    scored = (lengths - (1 if kwargs["DIFFUSE"] else 0)).clamp(min=0)
    chunks = ((scored + chunk_length - 1) // chunk_length).tolist() * grid[1]  # launch order
    warps = compiled.metadata.num_warps
    shared = _busiest_sm([cost(k) for k in chunks], warps, machine)
    trips = {after[0]: math.ceil(sequences / kwargs["BLOCK_S"])}
    trips.update({loop: math.ceil(kwargs["POINTS"] / kwargs["BLOCK_F"]) for loop in after[1:]})
    finish = [0.0, 0.0]
    for address, opcode, _ in instructions:
        if address > finish_from:
            times = math.prod(count for (start, end), count in trips.items() if start <= address <= end)
            finish[0] += times
            finish[1] += times if _is_float64(opcode) else 0
    return (shared + _cycles(finish, warps)) / (machine.clock_ghz * 1e3) + LAUNCH_US


def device_time(kernels, machine, detail=None):
    """Modelled device time of the recorded kernels in microseconds; `detail`, a dict, gets
    each Triton kernel's time."""
    total = 0.0
    for name, moved, launch in kernels:
        if name == "triton.noise_filter_kernel":
            time = filter_time(launch, machine)
        elif name == "triton.noise_profile_kernel":
            time = profile_time(launch, machine)
        else:
            passes = FFT_PASSES if "fft" in name else 1
            time = passes * moved / (machine.copy_tbps * 1e6) + LAUNCH_US
        if detail is not None and name.startswith("triton."):
            detail[name] = detail.get(name, 0.0) + time
        total += time
    return total


TABLE_KINDS = {"full": ("gains", "variance_ratios", "log_variance_ratios"), "basic": ("gains",)}  # the fused loss's, by metrics


def table_time(length, machine):
    """The three tables' modelled time in microseconds, built by `triton_tables.table_kernel` in
    one launch for a new Q / R: its SASS (no loop: one entry a thread) for each warp of a program,
    one program an SM (`_cycles`), plus LAUNCH_US."""
    from kpo_kernels.backends import triton_tables
    from kpo_kernels.tables import table_length

    size = table_length(length, 3e-7, 1.0, 0.0)
    parts, flags = triton_tables.table_launch(3e-7, 1.0, 0.0)
    grid = (math.ceil(size / triton_tables.BLOCK),)
    outputs = [torch.empty(size) for _ in range(3)]
    compiled, instructions = _compiled((triton_tables.table_kernel, grid, (*outputs, size, *parts), flags))
    per_warp = _counted(instructions, lambda address: True)
    return _cycles(per_warp, compiled.metadata.num_warps) / (machine.clock_ghz * 1e3) + LAUNCH_US


def torch_table_launches(kind, length):
    """Kernels the torch operations of `tables._build` launch for one float32 table (traced on
    the meta device, where the table kernel does not run)."""
    from kpo_kernels import tables

    with _Recorder() as recorder:
        tables._build(kind, tables.table_length(length, 3e-7, 1.0, 0.0), 3e-7, 1.0, 0.0, torch.device("meta"), torch.float32)
    return sum(launches for _, _, launches in recorder.operations)


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
    default_fit = {}  # machine name -> the Triton fit at the default budget, us
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
                if backend == "triton" and budget == PER_STEP_MAX_TOKENS:
                    default_fit[machine.name] = fit
                floor = sum(FFT_PASSES * op[1] if "fft" in op[0] else op[1] for op in kernels) / (machine.copy_tbps * 1e6)
                line = f"    {machine.name}: {fit:.1f} us (launch floor {len(kernels) * LAUNCH_US:.0f} us; bytes alone {floor:.1f} us"
                line += "".join(f"; {name[7:]} {time:.1f}" for name, time in detail.items()) + ")"
                if loss is not None:
                    line += f"; fused loss fwd + bwd {loss[machine.name]:.1f} us: fit / loss {fit / loss[machine.name]:.2f}"
                print(line)
    print(f"  A ratio Q / R new to the process: the fused loss's float32 tables of {args.length} entries, built once each")
    for metrics, kinds in TABLE_KINDS.items():
        launches = sum(torch_table_launches(kind, args.length) for kind in kinds)
        for machine in MACHINES:
            kernel = table_time(args.length, machine)
            line = (f"    metrics={metrics!r}, {machine.name}: table kernel (all three) one launch {kernel:.1f} us; "
                    f"torch operations {launches} launches {launches * LAUNCH_US:.0f} us")
            if loss is not None:
                line += f" ({kernel / loss[machine.name]:.2f} and {launches * LAUNCH_US / loss[machine.name]:.2f} fused losses)"
            print(line)
    if loss is not None:
        print("  A fitted step (the Triton fit at the default budget, then the fused loss) in plain losses: with the ratio's "
              "tables cached (tracker.round_fitted: most steps) / with the table kernel first (a ratio new to the process)")
        for machine in MACHINES:
            plain, fit = loss[machine.name], default_fit[machine.name]
            print(f"    {machine.name}: {(fit + plain) / plain:.2f} / {(fit + table_time(args.length, machine) + plain) / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
