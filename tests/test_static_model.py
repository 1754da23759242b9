"""benchmarks.static_model: its occupancy and loop arithmetic, and a run on small shapes (compiled
for sm_90a in a process without the interpreter, as tests/test_compile_sm90.py does)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import static_model

ROOT = Path(__file__).resolve().parents[1]


def test_programs_per_sm_follow_the_register_file():
    # 80 registers x 8 warps: 80 * 32 = 2560 per warp = 10 units of 256; 65536 / (2560 * 8) = 3.2
    assert static_model.programs_per_sm(80, 8, 0) == 3
    # 81-88 registers round up to 88 * 32 = 2816 per warp: only 2 programs of 8 warps fit
    assert static_model.programs_per_sm(81, 8, 0) == 2 == static_model.programs_per_sm(94, 8, 0)
    assert static_model.programs_per_sm(32, 4, 0) == 16  # warp-limited: 64 warps per SM
    assert static_model.programs_per_sm(26, 8, 100 * 1024) == 2  # shared memory limits it


def test_main_loop_is_the_largest_backward_branch():
    sass = [(0x00, "MOV", "R1, c[0x0][0x28]"), (0x10, "BRA", "0x90"), (0x20, "LDG.E.128", "R4, desc[UR4][R2.64]"),
            (0x28, "LDGSTS.E.BYPASS.128", "[R5], desc[UR4][R2.64]"),
            (0x30, "BAR.SYNC.DEFER_BLOCKING", "0x0"), (0x40, "BRA", "0x30"), (0x50, "FADD", "R1, R2, R3"),
            (0x60, "BRA", "0x20"), (0x70, "EXIT", ""), (0x80, "BRA", "0x80")]
    assert static_model.main_loop(sass) == (0x20, 0x60)  # the self-branch at the end is no loop
    body = [i for i in sass if 0x20 <= i[0] <= 0x60]
    assert static_model._memory_ops(body, "LDG") == {"128": 1}  # LDGSTS is an async copy, not a load


def test_an_unrolled_loop_counts_its_blocks():
    """ptxas unrolls the backward's loop four blocks a trip: its counter, a register of the
    compare that closes the loop, steps by 4 x BLOCK, and the body loads four blocks. A step
    of one block, a register of another compare, a pointer's byte step (never compared) and
    loads that do not grow with the step are one block a trip."""
    loads = [(0x00 + i, "LDG.E.128", f"R{8 + 4 * i}, desc[UR4][R18.64+{hex(16 * i)}]") for i in range(4)]
    unrolled = loads + [(0x10, "VIADD", "R5, R5, 0x1000"), (0x20, "IADD3", "R18, P3, R18, 0x4000, RZ"),
                        (0x30, "ISETP.GE.AND", "P1, PT, R5, R2, PT"), (0x40, "BRA", "0x0")]
    assert static_model.loop_unroll(unrolled, 1024) == 4
    assert static_model.loop_unroll(unrolled, 4096) == 1
    assert static_model.loop_unroll(unrolled[3:], 1024) == 1  # one load a trip: not four blocks
    one = [(0x00, "VIADD", "R133, R133, 0x400"), (0x10, "VIADD", "R7, R7, 0x1000"), (0x20, "ISETP.GE.AND", "P0, PT, R7, R9, PT"),
           (0x30, "ISETP.GE.AND", "P0, PT, R133, R2, PT")]
    assert static_model.loop_unroll(loads + one, 1024) == 1  # R7 is compared, but the loop closes on R133
    assert static_model.loop_unroll([(0x00, "IADD3", "R5, R5, 0x10, RZ"), (0x10, "ISETP.LT.AND", "P0, PT, R5, R9, PT")], 16) == 1


def test_the_model_walks_the_tiles_as_the_kernels_place_them():
    """(tokens, block steps) of a launch: tile_count_kernel and tile_aggregate_kernel skip each
    sequence's last tile (a packed batch of sequences shorter than a tile walks no token, padded
    rows all tiles but one, every tile with EVERY_TILE); a partial block is a whole step; with
    FLAT a sequence's first block reaches back to a flat index that is a multiple of 16, which
    can take one step more."""
    import types

    import torch

    def kernel(name, arg_names=("cu_seqlens_ptr", "tile_size", "T")):  # what walked() reads of a JITFunction
        return types.SimpleNamespace(fn=types.SimpleNamespace(__name__=name), arg_names=list(arg_names))

    aggregate, forward = kernel("tile_aggregate_kernel"), kernel("kpo_loss_fwd_kernel")
    packed = (torch.tensor([0, 5000, 6020, 26020]), 8192, 0)  # lengths 5000, 1020, 20000: 0, 0, 2 earlier tiles
    assert static_model.walked(aggregate, (40,), packed, {"IS_VARLEN": True, "BLOCK": 1024}, 26020) == (2 * 8192, 16)
    # 5000 + 1020 + 20000 tokens in 5 + 1 + (8 + 8 + 4) steps; with FLAT (starts 0, 5000, 6020:
    # shifts 0, 8, 4) the second sequence's 1020 tokens and 8 more pass a block, the third's
    # tiles keep their steps (the boundaries between them move back 4 tokens)
    assert static_model.walked(forward, (40,), packed, {"IS_VARLEN": True, "BLOCK": 1024}, 26020) == (26020, 26)
    assert static_model.walked(forward, (40,), packed, {"IS_VARLEN": True, "BLOCK": 1024, "FLAT": True}, 26020) == (26020, 27)
    # pass 2 with FLAT: an emptied last tile runs no block (nor reaches back); the third
    # sequence's first tile reaches back 4 tokens within its 8192
    assert static_model.walked(aggregate, (40,), packed, {"IS_VARLEN": True, "BLOCK": 1024, "FLAT": True}, 26020) == (2 * 8192 - 4, 16)
    padded = (torch.zeros(1), 1024, 4000)  # 4 tiles a row, the last of 928 tokens
    assert static_model.walked(aggregate, (8, 4), padded, {"BLOCK": 1024}, 32000) == (8 * 3 * 1024, 24)
    assert static_model.walked(aggregate, (8, 4), padded, {"BLOCK": 1024, "EVERY_TILE": True}, 32000) == (32000, 32)
    # rows of 4095 tokens in one tile: starts r * 4095 shift by (-r) % 16, so every row but the
    # first takes a fifth step with FLAT
    whole = (torch.zeros(1), 4096, 4095)
    assert static_model.walked(forward, (8, 1), whole, {"BLOCK": 1024}, 8 * 4095) == (8 * 4095, 32)
    assert static_model.walked(forward, (8, 1), whole, {"BLOCK": 1024, "FLAT": True}, 8 * 4095) == (8 * 4095, 39)
    # a kernel without tiles walks every token, BLOCK at a time
    assert static_model.walked(kernel("other", ("x_ptr", "n")), (1,), (None, 1), {"BLOCK": 64}, 640) == (640, 10)


def test_the_last_programs_tail_is_what_follows_the_count():
    sass = [(0x00, "LDG.E", ""), (0x10, "ATOMG.E.ADD.STRONG.GPU", ""), (0x20, "ISETP.NE.AND", ""), (0x30, "EXIT", ""),
            (0x40, "LDG.E", ""), (0x50, "ATOMG.E.EXCH.STRONG.GPU", ""), (0x60, "EXIT", "")]
    assert [a for a, _, _ in static_model.finishing_tail(sass)] == [0x20, 0x30, 0x40, 0x50, 0x60]
    assert static_model.finishing_tail(sass[:1]) == []
    row = {"programs": 132, "programs_per_sm": 1, "warp_instructions": 132 * 1000.0, "bytes": 0, "tail_warp_instructions": 500}
    machine = static_model.Machine("test", 132, 1.0, 1.0)
    bound = static_model.roofline(row, machine)
    assert bound["tail_us"] == pytest.approx(500 / 4e3 / static_model.ISSUE_EFFICIENCY)
    assert bound["model_us"] == pytest.approx(bound["issue_us"] + bound["tail_us"] + static_model.LAUNCH_US)


def test_the_finalize_waits_a_step_at_a_time():
    """The finalize's loops wait for L2 each step: its time is FINALIZE_STEP_US a step when
    that is longer than its instructions' issue time (the fused forward's tail, or the kernel)."""
    machine = static_model.Machine("test", 132, 1.0, 1.0)
    tail = {"programs": 132, "programs_per_sm": 1, "warp_instructions": 132.0, "bytes": 0, "tail_warp_instructions": 4,
            "finalize_steps": 40}
    assert static_model.roofline(tail, machine)["tail_us"] == pytest.approx(40 * static_model.FINALIZE_STEP_US)
    alone = {"kernel": static_model.FINALIZE_KERNEL, "programs": 1, "programs_per_sm": 1, "warp_instructions": 4.0,
             "bytes": 0, "finalize_steps": 40}
    assert static_model.roofline(alone, machine)["issue_us"] == pytest.approx(40 * static_model.FINALIZE_STEP_US)


def test_issue_bound_charges_the_busiest_sm():
    """512 programs on 132 SMs: the busiest SM runs 4 of them, whatever the residency."""
    row = {"programs": 512, "programs_per_sm": 3, "warp_instructions": 512 * 1000.0, "bytes": 0}
    machine = static_model.Machine("test", 132, 1.0, 1.0)
    bound = static_model.roofline(row, machine)
    assert bound["waves"] == 2
    assert bound["issue_us"] == pytest.approx(4 * 1000 / 4e3 / static_model.ISSUE_EFFICIENCY)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_model_of_small_cases(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "model.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.static_model", "--cases", "16x512:fp32,4x512:bf16:packed,16x512:fp32:basic", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOT measured" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["case"] for r in results] == ["16x512 fp32", "4x512 bf16 packed", "16x512 fp32 metrics=basic"]
    for result in results:
        kernels = {launch["kernel"]: launch for launch in result["launches"]}
        # the forward's last program finalizes: no finalize launch, a tail counted once
        assert {"kpo_loss_fwd_kernel", "kpo_loss_bwd_kernel"} <= set(kernels) and "kpo_loss_finalize_kernel" not in kernels
        forward = kernels["kpo_loss_fwd_kernel"]
        # tests/test_compile_sm90.py's rule: no local memory in a loop, a few bytes outside (at
        # 80 registers and 8 warps ptxas keeps one value in local memory across the main loop)
        assert forward["local_in_loops"] == 0 and forward["spill_bytes"] <= 16 and forward["programs_per_sm"] >= 1
        assert forward["instructions_per_token"] > 0 and forward["loop_barriers"] >= 1
        assert 0 < forward["tail_instructions"] and forward["tail_warp_instructions"] < forward["warp_instructions"]
        assert 3 <= forward["finalize_steps"] <= 8  # slots, sequences (and their tiles), row_scale's scaling
        for machine in ("H100 SXM", "H200"):
            assert forward[machine]["tail_us"] > 0
            assert result["step_us"][machine] >= static_model.LAUNCH_US * len(result["launches"])
            assert 0 < result["copy_floor_us"][machine] < result["step_us"][machine]
    # metrics="basic" compiles the diagnostics out of the forward: fewer instructions and barriers
    full, basic = ({l["kernel"]: l for l in r["launches"]}["kpo_loss_fwd_kernel"] for r in (results[0], results[2]))
    assert basic["instructions_per_token"] < 0.7 * full["instructions_per_token"]
    assert basic["loop_barriers"] < full["loop_barriers"]


def test_the_fit_model_counts_kernels_not_views():
    """benchmarks.fit_model: the per-step fit traced on the meta device; views and bare
    allocations launch nothing, each other operation one kernel of at least LAUNCH_US; the
    budget shrinks the bytes, not the kernel count; on the Triton backend the fit is its five
    kernels and torch's FFTs."""
    from benchmarks import fit_model

    capped = fit_model.record_fit(8, 256, 512)
    whole = fit_model.record_fit(8, 256, None)
    names = {name for name, _, _ in capped}
    assert "aten._fft_c2c.default" in names and not names & {"aten.select.int", "aten.view.default", "aten.empty.memory_format"}
    assert len(capped) == len(whole) and sum(op[1] for op in capped) < sum(op[1] for op in whole)
    machine = static_model.MACHINES[-1]
    assert fit_model.device_time(capped, machine) >= len(capped) * static_model.LAUNCH_US
    # the Triton backend: its three kernels in stream order and nothing else (torch's grid and
    # entering variances are cached from the warm-up)
    fused = fit_model.record_fit(8, 256, 512, backend="triton")
    names = [name for name, _, _ in fused]
    assert names == [f"triton.{kernel}" for kernel in fit_model.FIT_KERNELS]



@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_the_fit_model_runs():
    """python -m benchmarks.fit_model (a process without TRITON_INTERPRET: the filter and profile
    kernels are compiled for sm_90a): both backends, each Triton kernel's time, fit / loss."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fit_model", "--rows", "8", "--length", "512"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOT measured" in proc.stdout and "backend=triton" in proc.stdout and "backend=torch" in proc.stdout
    assert proc.stdout.count("noise_filter_kernel ") >= 4 and proc.stdout.count("noise_profile_kernel ") >= 4
    assert "fit / loss" in proc.stdout


def test_a_packed_step_plans_its_tiles_once():
    """A packed forward + backward launches tile_offsets_kernel once: backward reads the
    forward's tile table (the loss op's `plan` output), where it used to plan again. Padded
    batches have none to plan."""
    import torch

    from benchmarks import sm90
    from kpo_kernels.bench.cases import Case

    for packed, expected in ((True, 1), (False, 0)):
        run, _ = static_model._fused_step(Case(3, 300, torch.float32), packed)
        names = [kernel.fn.__name__ for kernel, _, _, _ in sm90.record(run)]
        assert names.count("tile_offsets_kernel") == expected, names
        assert names.count("kpo_loss_bwd_kernel") == 1, names


def test_few_long_rows_against_many_rows():
    """Each plain few-long-rows case over the many-row case of its dtype with the most tokens,
    and the marginal throughput from the case with the next fewer rows; packed or basic cases
    and other dtypes are not compared."""
    machine = static_model.MACHINES[0].name

    def result(rows, length, us, dtype="fp32", plain=True):
        return {"case": f"{rows}x{length} {dtype}", "rows": rows, "length": length, "dtype": dtype, "plain": plain,
                "tokens": rows * length, "step_us": {machine: us}}

    results = [result(64, 4096, 10.0), result(512, 8192, 40.0), result(512, 8192, 1.0, plain=False),
               result(2, 131072, 16.0), result(8, 131072, 28.0), result(4, 131072, 20.0), result(1, 32768, 10.0),
               result(8, 131072, 1.0, dtype="bf16")]
    compared = static_model.few_long_rows(results, machine)
    many = 512 * 8192 / 40.0
    assert [c["case"] for c in compared] == ["1x32768 fp32", "2x131072 fp32", "4x131072 fp32", "8x131072 fp32"]
    assert all(c["against"] == "512x8192 fp32" for c in compared)
    assert compared[1]["ratio"] == pytest.approx(2 * 131072 / 16.0 / many)
    assert compared[0]["marginal"] is None and compared[1]["marginal"] is None  # no case with fewer rows at its T
    assert compared[2]["marginal"] == pytest.approx(2 * 131072 / 4.0 / many)  # 2 -> 4 rows in 4 us more
    assert compared[3]["marginal"] == pytest.approx(4 * 131072 / 8.0 / many)
