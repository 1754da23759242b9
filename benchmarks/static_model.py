"""A static performance model of the Triton backend on H100 and H200, from its compiled code.

    python -m benchmarks.static_model [--json PATH] [--cases 512x8192:fp32,... | --few-long-rows]

No GPU needed (nor used). For each standard case it records every launch the backend makes on a
CUDA device (`benchmarks/sm90.py`: the launcher's CUDA plan with 132 SMs), compiles each with
Triton's launch-time specialisation for sm_90a, and reads from the cubin and its SASS:

- registers, spills, shared memory, and from them resident programs per SM and waves;
- the main loop (the largest backward branch of the SASS): its instructions, barriers and
  global loads/stores by width; per token: loop instructions x warps / BLOCK tokens per pass
  (a loop the compiler unrolled: per block of the trip); its block steps as _locate places the
  tiles ("x 1.09 steps": steps over the blocks the walked tokens fill; partial blocks and
  FLAT's reach-back), passes 1 and 2 only over the tiles before each sequence's last;
- bytes: every tensor argument touched once (inputs read, outputs written; a lower bound);
- the tail of the fused forward (FINISHING_KERNELS: the SASS after its atomic count of finished
  programs, the finalize its last program runs): once, on one SM, after everything else, at
  its instructions' issue time or FINALIZE_STEP_US a step of its loops (`finalize_steps`),
  whichever is longer;
- the step's torch launches: an asynchronous assertion of the flag the kernels write for packed
  offsets and for masks other than bool (their values, checked on the way), LAUNCH_US each.

Then a roofline per kernel: time = max(issue, bandwidth) + tail + a launch cost, where issue =
ceil(programs / SMs) x warp-instructions per program / (4 schedulers x clock x ISSUE_EFFICIENCY)
(the busiest SM, at the fraction of the peak issue rate measured on an H200), bandwidth =
bytes / copy bandwidth and tail = the tail's warp-instructions at one SM's rate. Last, each
few-long-rows case's throughput against the many-row case of its dtype (`few_long_rows`). Everything
here is a MODEL; `benchmarks/RESULTS.md` sets it beside what a GPU measured. Assumptions are in MACHINES and LAUNCH_US.
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

import kpo_kernels
from kpo_kernels.bench.cases import DTYPES, LONG_ROWS, Case, fused_bytes
from kpo_kernels.bench.data import rl_batch

from . import sm90


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    clock_ghz: float  # sustained SM clock under load (assumed)
    copy_tbps: float  # device-to-device copy, bytes read + written per second (see note)


MACHINES = (
    # H100 SXM: 3.35 TB/s peak HBM3; copy assumed at 90% of peak. Clock: 1.755 GHz sustained (assumed).
    Machine("H100 SXM", 132, 1.755, 3.0),
    # H200: 4.8 TB/s peak HBM3e; a device-to-device copy of 8.6 GB measured 4.3 TB/s on this
    # project's lent H200 machines (2026-10-28); 1.98 GHz read by nvidia-smi under load.
    Machine("H200", 132, 1.98, 4.3),
)
LAUNCH_US = 2.0  # device-side cost of one kernel launch back to back in a stream or graph (assumed)
# Achieved fraction of the peak issue rate, measured: the fused forward at 512 x 8192 (fp32 and
# bf16) ran 84.8 / 83.2 us on an H200 (profiler, 2026-12-04) against 46.5 / 46.9 us at one
# instruction per scheduler per cycle: 0.55 and 0.56 (dependent scan steps and 19 barriers per
# pass keep the schedulers from issuing every cycle). 1.0 gives the pure lower bound.
ISSUE_EFFICIENCY = 0.55
REGISTER_FILE, MAX_WARPS, MAX_PROGRAMS, SHARED_BYTES = 65536, 64, 32, 228 * 1024
DEFAULT_CASES = ("64x4096:fp32,512x8192:fp32,512x8192:bf16,512x8192:bf16:packed,512x8192:fp32:packed,2x131072:fp32,"
                 "8x131072:bf16,512x8192:fp32:basic,512x8192:bf16:packed:basic,512x8192:fp32:int64mask")
# --few-long-rows: the speed issue's grid of few long rows (B = 1..8, T = 32k..128k), each dtype beside
# the many-row case its throughput is compared with
FEW_LONG_ROWS = ",".join(f"{rows}x{length}:{dtype}" for dtype in ("fp32", "bf16") for length in (32768, 131072)
                         for rows in (1, 2, 4, 8)) + ",512x8192:fp32,512x8192:bf16"


def parse_cases(text):
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        rows, length = (int(v) for v in parts[0].split("x"))
        flags = parts[2:]
        cases.append((Case(rows, length, DTYPES[parts[1] if len(parts) > 1 else "fp32"]), "packed" in flags,
                      "basic" if "basic" in flags else "full", torch.int64 if "int64mask" in flags else torch.bool))
    return cases


def _fused_step(case, packed, metrics="full", mask_dtype=torch.bool):
    """One forward + backward of kpo_loss as the Triton backend runs it (values irrelevant), and
    the tokens its kernels walk (B x T padded; the valid tokens of the stream packed). metrics:
    kpo_loss's option ("basic": the diagnostics compiled out). mask_dtype: the padded mask's
    (int64: verl's response masks; the forward checks the values of a mask other than bool)."""
    batch = rl_batch(case.rows, case.length, dtype=case.dtype, device="cpu")
    if packed:
        lengths = batch["mask"].sum(1)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        args = (batch["log_prob"][batch["mask"]], batch["old_log_prob"][batch["mask"]], batch["advantages"][:, None], None)
        extra, tokens = {"cu_seqlens": cu}, int(lengths.sum())
    else:
        args, extra = (batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"].to(mask_dtype)), {}
        tokens = case.tokens

    def run():
        log_prob = args[0].clone().requires_grad_()
        loss, _ = kpo_kernels.kpo_loss(log_prob, *args[1:], backend=kpo_kernels.TritonBackend(), metrics=metrics, **extra)
        loss.backward()

    return run, tokens


def programs_per_sm(registers, warps, shared):
    per_warp = math.ceil(registers * 32 / 256) * 256  # registers are allocated per warp in 256s
    limits = [REGISTER_FILE // (per_warp * warps), MAX_WARPS // warps, MAX_PROGRAMS]
    if shared:
        limits.append(SHARED_BYTES // (shared + 1024))  # 1 KB reserved per program
    return max(0, min(limits))


loops = sm90.loops


def main_loop(instructions):
    """(start, end) addresses of the largest loop."""
    return max(loops(instructions), key=lambda span: span[1] - span[0], default=None)


_SELF_INCREMENT = re.compile(r"^(R\d+), (R\d+), (0x[0-9a-f]+|\d+)")


def loop_unroll(body, block):
    """Blocks of `block` tokens one trip of a loop body walks: the compiler unrolls the small
    loops (ptxas runs the backward's four blocks a trip, with remainder code for the rest). Read
    from the loop's counter: a register of the body's last compare (ISETP, the one that closes
    the loop) that the body adds a multiple of `block` to (VIADD / IADD3 Rk, Rk, constant), when
    the body's global loads are as many times a block's; 1 otherwise."""
    compares = [operands for _, op, operands in body if op.startswith("ISETP")]
    if not compares:
        return 1
    closing = set(re.findall(r"\bR\d+\b", compares[-1]))
    loads = sum(_memory_ops(body, "LDG").values())
    for _, op, operands in body:
        found = _SELF_INCREMENT.match(operands) if op.split(".")[0] in ("VIADD", "IADD3") else None
        if found and found.group(1) == found.group(2) and found.group(1) in closing:
            step = int(found.group(3), 0)
            if step >= block and step % block == 0 and loads % (step // block) == 0:
                return step // block
    return 1


# Passes 1 and 2 of a multi-tile sequence skip its last tile (no tile after it reads them)
# unless EVERY_TILE: they walk the tokens of the other tiles only.
EARLIER_TILE_KERNELS = ("tile_count_kernel", "tile_aggregate_kernel")
# Kernels whose FLAT tiles start at the block that reaches back to a flat multiple of 16
REACH_BACK_KERNELS = ("kpo_loss_fwd_kernel", "tile_aggregate_kernel")


def walked(kernel, grid, args, kwargs, tokens):
    """(tokens, block steps) of a launch's main loops, placed as triton_common._locate places
    the tiles: per tile its steps of BLOCK tokens (FLAT: from the block that reaches back to a
    flat index that is a multiple of 16, which can take one step more), for passes 1 and 2
    only the tiles before the last of each sequence. Kernels without tiles: (tokens,
    tokens / BLOCK)."""
    named = dict(zip(kernel.arg_names, args))
    block = kwargs.get("BLOCK")
    if block is None or "tile_size" not in named or "cu_seqlens_ptr" not in named:
        return tokens, tokens / block if block else 0.0
    tile, flat = named["tile_size"], bool(kwargs.get("FLAT"))
    if kwargs.get("IS_VARLEN"):
        offsets = named["cu_seqlens_ptr"].to(torch.int64)
        starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
    else:
        rows, width = grid[0], named["T"]
        starts, lengths = torch.arange(rows, dtype=torch.int64) * width, torch.full((rows,), width, dtype=torch.int64)
    most = int(((lengths + tile - 1) // tile).max()) if lengths.numel() else 0
    k = torch.arange(most, dtype=torch.int64)[None, :]
    starts, lengths = starts[:, None], lengths[:, None]
    begin, end = k * tile, torch.minimum((k + 1) * tile, lengths)
    present = begin < lengths
    last = end == lengths
    first = begin
    if flat:
        shift = starts % 16
        begin = torch.clamp(begin - shift, min=0)
        end = torch.where(last, end, torch.maximum(end - shift, begin))
        first = begin - (starts + begin) % 16 if kernel.fn.__name__ in REACH_BACK_KERNELS else begin
    if kernel.fn.__name__ in EARLIER_TILE_KERNELS and not kwargs.get("EVERY_TILE"):
        present &= ~last
    steps = torch.where(present & (end > begin), (end - first + block - 1) // block, 0)
    return int(torch.where(present, end - begin, 0).sum()), float(steps.sum())


def _memory_ops(body, prefix):
    widths = {}
    for _, opcode, _ in body:
        if opcode.split(".")[0] == prefix:  # LDG, not LDGSTS / LDGDEPBAR
            width = next((w for w in ("128", "64", "U16", "S16", "U8", "S8") if f".{w}" in opcode), "32")
            widths[width] = widths.get(width, 0) + 1
    return widths


# Kernels whose last program to finish runs more work after an atomic count of the finished
# programs (the fused forward's finalize): that tail runs once, after every other program.
FINISHING_KERNELS = ("kpo_loss_fwd_kernel",)
FINALIZE_KERNEL = "kpo_loss_finalize_kernel"
# A step of the finalize's loops waits for its loads from L2 (what other programs wrote) on one
# SM: its time is the round trip, not the instructions. Measured: the finalize kernel of
# 2026-12-04 took 4.4 us on an H200 at 512 x 8192 (profiler) in 11 such steps after a launch of
# LAUNCH_US, 0.22 us a step.
FINALIZE_STEP_US = 0.22


def finalize_steps(kernel, grid, args, kwargs):
    """The steps of triton_finalize.finalize's loops (the fused forward's tail, or the finalize
    kernel): tile slots BLOCK_S at a time, sequences SEQ_BLOCK at a time and their tiles TILES
    at a time, then the sequences again (row_scale's scaling)."""
    named = dict(zip(kernel.arg_names, args))
    slots, sequences = named["num_slots"], named["num_seqs"]
    if kernel.fn.__name__ == FINALIZE_KERNEL or named["cu_seqlens_ptr"].numel() > 1:  # packed: the mean
        tiles = math.ceil(slots / max(1, sequences))
    else:
        tiles = grid[1]
    passes = math.ceil(sequences / kwargs["SEQ_BLOCK"])
    return math.ceil(slots / kwargs["BLOCK_S"]) + passes * math.ceil(tiles / kwargs["TILES"]) + passes


def finishing_tail(instructions):
    """The instructions after the first atomic add of a finishing kernel: its last program's tail."""
    start = next((address for address, opcode, _ in instructions if opcode.startswith("ATOMG") and ".ADD" in opcode), None)
    return [] if start is None else [i for i in instructions if i[0] > start]


def analyse(kernel, grid, args, kwargs, tokens):
    compiled = sm90.compile_launch(kernel, args, kwargs)
    cubin = compiled.asm["cubin"]
    found = sm90.resources(compiled)
    warps = compiled.metadata.num_warps
    instructions = sm90.sass(cubin)
    tail = finishing_tail(instructions) if kernel.fn.__name__ in FINISHING_KERNELS else []
    loop = main_loop(instructions[: len(instructions) - len(tail)])
    body = [i for i in instructions if loop and loop[0] <= i[0] <= loop[1]]
    block = kwargs.get("BLOCK")
    programs = math.prod(grid)
    row = {
        "kernel": kernel.fn.__name__, "grid": list(grid), "programs": programs, "warps": warps, "block": block,
        "registers": found["registers"], "spill_bytes": found["spill_bytes"], "local_in_loops": found["local_in_loops"],
        "shared": found["shared"],
        "sass_instructions": len(instructions), "loop_instructions": len(body),
        "loop_barriers": sum(op.startswith("BAR") for _, op, _ in body),
        "loop_loads": _memory_ops(body, "LDG"), "loop_stores": _memory_ops(body, "STG"),
    }
    row["walked_tokens"], row["block_steps"] = walked(kernel, grid, args, kwargs, tokens)
    # Bytes: each tensor argument once; a tensor of a token each (or more: a padded batch's
    # B x T) only as far as the programs walk their tokens.
    share = row["walked_tokens"] / tokens if tokens else 1.0
    row["bytes"] = sum(a.numel() * a.element_size() * (share if a.numel() >= tokens else 1.0)
                       for a in args if isinstance(a, torch.Tensor) and a.numel() > 1)
    row["programs_per_sm"] = programs_per_sm(row["registers"], warps, row["shared"])
    token_loop = block is not None and body
    unroll = loop_unroll(body, block) if token_loop else 1
    per_block = len(body) / unroll  # a block's instructions in the loop
    row["loop_unroll"] = unroll
    row["instructions_per_token"] = per_block * warps / block if token_loop else None
    # block steps over the blocks the walked tokens would fill: partial and reach-back steps
    row["step_overhead"] = row["block_steps"] * block / row["walked_tokens"] if token_loop and row["walked_tokens"] else None
    # Each program runs the rest once (roughly), less the unrolled loop's remainder code: about
    # unroll - 1 more blocks' worth, charged with the loop's blocks instead.
    rest = len(instructions) - len(body) - len(tail) - (unroll - 1) * per_block
    outside = max(rest, 0) * warps * programs
    looped = per_block * warps * row["block_steps"] if token_loop else 0
    row["warp_instructions"] = outside + looped
    row["tail_instructions"] = len(tail)
    row["tail_warp_instructions"] = len(tail) * warps  # once, its loops counted once (as a one-program kernel's)
    finalizing = kernel.fn.__name__ == FINALIZE_KERNEL or bool(tail)
    row["finalize_steps"] = finalize_steps(kernel, grid, args, kwargs) if finalizing else 0
    return row


def roofline(row, machine):
    slots = max(1, row["programs_per_sm"]) * machine.sms
    waves = math.ceil(row["programs"] / slots)
    per_program = row["warp_instructions"] / row["programs"]
    # The busiest SM issues the instructions of ceil(programs / SMs) programs, however many of
    # them are resident at once (occupancy hides latency, which this bound ignores).
    rate = 4 * machine.clock_ghz * 1e3 * ISSUE_EFFICIENCY  # warp-instructions per us on one SM
    issue_us = math.ceil(row["programs"] / machine.sms) * per_program / rate
    bandwidth_us = row["bytes"] / (machine.copy_tbps * 1e6)
    # the last program's tail, on one SM after the rest: its instructions, or its steps' waits
    tail_us = max(row.get("tail_warp_instructions", 0) / rate, row.get("finalize_steps", 0) * FINALIZE_STEP_US)
    if row.get("kernel") == FINALIZE_KERNEL:  # one program: all of it is its steps' waits or its instructions
        issue_us = max(issue_us, row["finalize_steps"] * FINALIZE_STEP_US)
    return {"waves": waves, "issue_us": issue_us, "bandwidth_us": bandwidth_us, "tail_us": tail_us,
            "model_us": max(issue_us, bandwidth_us) + tail_us + LAUNCH_US,
            "bound": "issue" if issue_us > bandwidth_us else "bandwidth"}


def model_case(case, packed, metrics="full", mask_dtype=torch.bool):
    run, tokens = _fused_step(case, packed, metrics, mask_dtype)
    rows = []
    for kernel, grid, args, kwargs in sm90.record(run):
        row = analyse(kernel, grid, args, kwargs, tokens)
        row.update({m.name: roofline(row, m) for m in MACHINES})
        rows.append(row)
    label = case.label + (" packed" if packed else "") + (" metrics=basic" if metrics == "basic" else "")
    label += "" if mask_dtype == torch.bool else f" {str(mask_dtype).split('.')[-1]} mask"
    # torch launches of the step besides the kernels: torch._assert_async of the flags the
    # kernels write, for the packed offsets' values and for a mask other than bool's
    torch_launches = ["aten._assert_async.msg"] * (int(packed) + int(mask_dtype != torch.bool))
    step = {m.name: sum(r[m.name]["model_us"] for r in rows) + LAUNCH_US * len(torch_launches) for m in MACHINES}
    moved = fused_bytes(case) * tokens // case.tokens  # packed: only the valid tokens travel
    floor = {m.name: moved / (m.copy_tbps * 1e6) for m in MACHINES}
    plain = not packed and metrics == "full" and mask_dtype == torch.bool
    return {"case": label, "rows": case.rows, "length": case.length, "dtype": case.dtype_name, "plain": plain,
            "tokens": tokens, "fused_bytes": moved, "launches": rows, "torch_launches": torch_launches,
            "step_us": step, "copy_floor_us": floor}


def few_long_rows(results, machine):
    """Throughput (tokens / us) of each plain few-long-rows case (T > LONG_ROWS, padded, every
    metric, a bool mask) over that of the plain many-row case of the same dtype with the most
    tokens in `results` (the speed issue's goal: at least 1/2), and its marginal throughput:
    between it and the case of the same T and dtype with the next fewer rows, the added tokens
    over the added time, over the many-row throughput. The rest of a step is a fixed cost
    (launches, the last program's finalize) that a few rows do not amortise."""
    def rate(result):
        return result["tokens"] / result["step_us"][machine]

    plain = [r for r in results if r.get("plain")]
    many = {}
    for r in plain:
        if r["length"] <= LONG_ROWS and r["tokens"] > many.get(r["dtype"], {"tokens": 0})["tokens"]:
            many[r["dtype"]] = r
    rows = []
    for r in sorted((r for r in plain if r["length"] > LONG_ROWS and r["dtype"] in many),
                    key=lambda r: (r["dtype"], r["length"], r["rows"])):
        base = rate(many[r["dtype"]])
        fewer = [o for o in plain if (o["dtype"], o["length"]) == (r["dtype"], r["length"]) and o["rows"] < r["rows"]]
        marginal = None
        if fewer:
            prev = max(fewer, key=lambda o: o["rows"])
            added = r["step_us"][machine] - prev["step_us"][machine]
            marginal = (r["tokens"] - prev["tokens"]) / added / base if added > 0 else None
        rows.append({"case": r["case"], "against": many[r["dtype"]]["case"], "ratio": rate(r) / base, "marginal": marginal})
    return rows


def report(results):
    lines = ["Static model (NOT measured): fused forward + backward of kpo_loss, Triton 3.6 for sm_90a", ""]
    for result in results:
        lines.append(f"{result['case']}: " + ", ".join(
            f"{m.name} {result['step_us'][m.name]:.1f} us ({result['copy_floor_us'][m.name] / result['step_us'][m.name]:.0%} of copy)"
            for m in MACHINES))
        for r in result["launches"]:
            h = r[MACHINES[-1].name]
            per_token = "" if r["instructions_per_token"] is None else f" {r['instructions_per_token']:.1f} instr/token,"
            if r.get("step_overhead"):
                per_token = per_token[:-1] + f" x {r['step_overhead']:.2f} steps,"
            loads = ",".join(f"{w}x{n}" for w, n in sorted(r["loop_loads"].items())) or "-"
            lines.append(
                f"  {r['kernel']:26s} grid {r['programs']:>6} x {r['warps']}w, {r['registers']:>3} regs"
                f"{' SPILLS ' + str(r['spill_bytes']) + ' B' if r['spill_bytes'] else ''}, {r['programs_per_sm']}/SM,"
                f" {h['waves']} waves,{per_token} {r['loop_barriers']} bar/pass, LDG {loads};"
                f" H200 {h['model_us']:.1f} us ({h['bound']})"
            )
        lines.extend(f"  {name:26s} one launch, {LAUNCH_US:.1f} us" for name in result.get("torch_launches", []))
    machine = MACHINES[0].name
    compared = few_long_rows(results, machine)
    if compared:
        lines += ["", f"Few long rows against many rows ({machine}; tokens per us over the many-row case's, goal >= 0.5;"
                      " marginal: the tokens added over the case with fewer rows, over the time they add):"]
        lines += [f"  {c['case']:18s} {c['ratio']:.2f} of {c['against']}"
                  + ("" if c["marginal"] is None else f", marginal {c['marginal']:.2f}") for c in compared]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cases", default=DEFAULT_CASES, help="ROWSxLENGTH:DTYPE[:packed][:basic][:int64mask], comma-separated")
    which.add_argument("--few-long-rows", action="store_true", help="the speed issue's few-long-rows grid (B = 1..8, "
                        "T = 32768 and 131072, fp32 and bf16) beside 512 x 8192")
    parser.add_argument("--json", help="write the model here")
    args = parser.parse_args(argv)
    cases = parse_cases(FEW_LONG_ROWS if args.few_long_rows else args.cases)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    results = [model_case(*item) for item in cases]
    print(report(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machines": [m.__dict__ for m in MACHINES], "launch_us": LAUNCH_US, "results": results}, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
