"""Every kernel specialisation the launcher produces compiles for an H100 (sm_90a), without spills.

The interpreter accepts code that the GPU compiler rejects (loop-carried type changes,
unsupported operations), so on machines without a GPU this is the check that the real kernels
build. `sm90_compile.py` runs in a child process without TRITON_INTERPRET, captures the exact
launch arguments and compiles each launch as Triton's JIT does at launch time, with Triton's
bundled ptxas.

Asserted on every Triton the package allows: every launch compiles, and none spills registers to
local memory. Register counts, and from them the programs resident per SM, are facts of one
compiler version and one set of launch arguments: they are reported (`pytest -rP`, and as junit
properties), not asserted. `python -m benchmarks.static_model` turns them into a performance
model; variants below the occupancy the launcher assumes are listed there and here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static_model import programs_per_sm
from kpo_kernels.backends import triton_backend as launcher
from sm90_compile import KERNELS, LOSS_CONFIGS, RUN_ABLATED, SPILLING_CONTROL

pytestmark = pytest.mark.skipif(launcher.kernels is None, reason="Triton is not importable")
HERE = Path(__file__).parent
SPILL_OUTSIDE_LOOPS = 48  # bytes a thread, ptxas's spill stores and loads together
RELOADS_IN_LOOPS = 4  # local loads inside a loop, of values stored before it (no store in a loop)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "sm90_compile.py")], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr.lower() or "cuda" in proc.stderr.lower() and "not found" in proc.stderr.lower():
            pytest.skip(f"this Triton cannot assemble for sm_90: {proc.stderr[-500:]}")
        raise AssertionError(proc.stderr[-4000:])
    return json.loads(proc.stdout)


def test_every_launch_compiles(compiled):
    failures = {k: v["error"] for k, v in compiled.items() if not v["ok"]}
    assert not failures, failures
    kernels = {key.split(":")[1] for key in compiled}
    assert kernels == set(KERNELS) | {"table_kernel"}, "every kernel is launched by some case"


def test_no_register_spills(compiled):
    """No spill store inside a loop, at most RELOADS_IN_LOOPS local loads there and at most
    SPILL_OUTSIDE_LOOPS bytes in all. ptxas keeps a few values that a loop does not change in
    local memory, stored before it, for a step of occupancy (its choice, not forced: the PTX
    asks for nothing): one at 64-80 registers in the 512-token, 8-warp forward, loaded after its
    loop; six (36 bytes) in the bf16 metrics="basic" forward of 1024-token blocks at 128
    registers (4 programs an SM), loaded after it; in the bf16 forward with per-token advantages
    and weights at 168 registers (3 programs an SM) one of them is loaded at the loop's head each
    block, an L1 hit against about 1,300 instructions a warp a block. The transposed forward with
    every option (255 registers) holds without on Triton 3.6 and reloads 3 values a block on
    Triton 3.9."""
    launched = {k: v for k, v in compiled.items() if v["ok"] and not k.startswith(SPILLING_CONTROL)}
    spilling = {k: v for k, v in launched.items() if not _spill_free(v)}
    assert not spilling, spilling


def _spill_free(result):
    """test_no_register_spills's rule."""
    return (result["local_stores_in_loops"] == 0 and result["local_in_loops"] <= RELOADS_IN_LOOPS
            and result["spill_bytes"] <= SPILL_OUTSIDE_LOOPS)


def test_statistics_summed_per_thread_save_registers(compiled):
    """The fused forward sums each thread's run of tokens before its statistics take them (RUN 8
    in the wide blocks): one register a statistic where a lane each held 8. Any grouping gives
    the same sums, so only the compiled code can show it: the fp32 forward of 1024-token
    blocks, compiled again with RUN = 1, holds at least 24 registers more (47 on Triton 3.6)."""
    summed = compiled[f"{RUN_ABLATED}:kpo_loss_fwd_kernel"]
    per_lane = compiled[f"{RUN_ABLATED}-run-1:kpo_loss_fwd_kernel"]
    assert summed["ok"] and per_lane["ok"]
    assert summed["registers"] + 24 <= per_lane["registers"], (summed["registers"], per_lane["registers"])


def test_the_spill_check_sees_spills(compiled):
    """The control (4096-token blocks at 4 warps) spills thousands of bytes, in its loop: the
    check above can fail. (cuobjdump's LOCAL field reads 0 for it on sm_90.)"""
    control = {k: v for k, v in compiled.items() if k.startswith(SPILLING_CONTROL) and "kpo_loss_fwd_kernel" in k}
    assert control and all(v["ok"] and v["spill_bytes"] > 1000 and v["local_in_loops"] > 0 for v in control.values()), control


def test_fused_loss_kernel_registers_reported(compiled, record_property):
    """Registers a thread of the fused loss forward and programs resident per SM, per
    specialisation: printed (pytest -rP shows them) and recorded as junit properties; none
    below the programs per SM the launcher's tile sizes assume (launcher.PROGRAMS_PER_SM)."""
    import triton

    forward = {k: v for k, v in compiled.items() if v["ok"] and "kpo_loss_fwd_kernel" in k and not k.startswith(SPILLING_CONTROL)}
    missing = [name for name in LOSS_CONFIGS if not any(key.startswith(f"loss-{name}-") for key in forward)]
    assert not missing, f"loss configurations of sm90_compile.py without a register count: {missing}"
    assert all(0 < v["registers"] <= 255 for v in forward.values()), forward  # 255: the sm_90 limit a thread
    resident = {k: programs_per_sm(v["registers"], v["num_warps"], v["shared"]) for k, v in forward.items()}
    record_property("triton", triton.__version__)
    record_property("kpo_loss_fwd_registers", json.dumps({k: v["registers"] for k, v in forward.items()}, sort_keys=True))
    print(f"Triton {triton.__version__}: kpo_loss_fwd_kernel registers per thread, programs per SM "
          f"(the launcher assumes {launcher.PROGRAMS_PER_SM}):")
    for key, v in sorted(forward.items()):
        low = " (below the launcher's assumption)" if resident[key] < launcher.PROGRAMS_PER_SM else ""
        print(f"  {v['registers']:4d} regs x {v['num_warps']} warps: {resident[key]}/SM{low}  {key.split(':')[0]}")
    assert all(n >= launcher.PROGRAMS_PER_SM for n in resident.values()), resident


def test_state_variants_cost_no_occupancy(compiled):
    """The HAS_STATE variants (an entering FilterState, docs/math.md section 7) compile without
    spills; the fused loss keeps the programs per SM of its stateless twin (the same case without
    the state), the filter at least the launcher's assumption (launcher.PROGRAMS_PER_SM)."""
    state = {k: v for k, v in compiled.items() if k.startswith("state-")}
    assert any("kpo_loss_fwd_kernel" in k for k in state) and any("kalman_filter_kernel" in k for k in state)
    assert any("chunk_maps_kernel" in k for k in state) and any("tile_aggregate_kernel" in k for k in state)
    assert all(v["ok"] and _spill_free(v) for v in state.values()), state
    resident = {k: programs_per_sm(v["registers"], v["num_warps"], v["shared"]) for k, v in compiled.items() if v["ok"]}
    compared = 0
    for key in sorted(state):
        twin = key[len("state-"):]
        if twin in compiled and ("kpo_loss_fwd_kernel" in key or "kalman_filter_kernel" in key):
            print(f"  {compiled[twin]['registers']:4d} -> {state[key]['registers']:4d} regs, "
                  f"{resident[twin]} -> {resident[key]}/SM: {key}")
            compared += 1
        if "kpo_loss_fwd_kernel" in key:
            assert resident[key] >= resident[twin], (key, state[key], compiled[twin])
        if "kalman_filter_kernel" in key:
            assert resident[key] >= launcher.PROGRAMS_PER_SM, (key, state[key])
    assert compared >= 8, compared


def test_flat_addressing_where_rows_are_not_aligned():
    """kpo_loss_fwd_kernel's FLAT (tiles and blocks aligned to the flat token index): packed
    batches, and padded rows of a length that is not a multiple of 16 laid end to end in every
    token input, when no row's last block would take a step more for the reach-back or the
    tiles take enough steps that one more costs less than the unaligned layout; never for
    blocks below 16 tokens (the alignment would be false) nor for aligned padded rows."""
    import torch

    from kpo_kernels.backends.triton_layout import flat_layout as flat
    rows = torch.zeros(4, 37)
    assert flat(True, 5, 64, (torch.zeros(9),))
    assert not flat(True, 5, 8, (torch.zeros(9),))
    assert flat(False, 37, 64, (rows, rows.bool(), None))
    assert not flat(False, 32, 64, (torch.zeros(4, 32),))
    assert not flat(False, 37, 64, (rows, torch.zeros(4, 40)[:, :37]))
    assert flat(False, 37, 64, (rows, torch.zeros(4, 74)[:, ::2]))  # token stride 2, row stride 74
    wide = torch.zeros(2, 1023)
    assert not flat(False, 1023, 1024, (wide,), warps=4)  # 1023 + 15 > 1024: a second block step
    assert flat(False, 1009, 1024, (torch.zeros(2, 1009),))  # 1009 + 15 <= 1024
    # The step more costs at most 1 / steps: FLAT from 16 steps a tile at the wide blocks (whose
    # anchored unaligned layout costs 1.05-1.10x), from 10 at the others (1.11-1.88x)
    rows = torch.zeros(2, 16383)
    assert flat(False, 16383, 1024, (rows,), warps=4) and not flat(False, 16383, 1024, (rows,), tile=8192, warps=4)
    assert not flat(False, 8191, 1024, (torch.zeros(2, 8191),), warps=4)
    narrow = torch.zeros(2, 10239)
    assert not flat(False, 10239, 1024, (narrow,), warps=4) and flat(False, 10239, 1024, (narrow,), warps=8)
    assert flat(False, 175, 16, (torch.zeros(2, 175),), warps=1) and not flat(False, 143, 16, (torch.zeros(2, 143),), warps=1)
    assert not flat(False, 8191, 1024, (rows,))  # warps unknown: not the wide blocks' layout


@pytest.mark.parametrize("block, warps, expected", [
    (None, None, 2), (1024, None, 2), (None, 4, 2), (2048, 8, 1), (4096, 8, 1), (1024, 16, 1), (1024, 32, 1),
    (1024, 2, 2), (64, 1, 2),
])
def test_tiles_never_assume_more_programs_than_fit(block, warps, expected):
    """Tiles are sized for PROGRAMS_PER_SM programs an SM with the default blocks and warps (the
    variants above reach it), and with a chosen block size or warp count for what fits at 255
    registers a thread, the most any variant can take: a variant of 8 warps or more is one
    program an SM (a held-out sweep found 16- and 32-warp forwards, and 2048- and 4096-token
    blocks at 8 warps, below the old fixed assumption of two)."""
    from kpo_kernels.backends.triton_launch import WORST_CASE_WARPS_PER_SM

    backend = launcher.TritonBackend(block_size=block, num_warps=warps)
    chosen = block or 1024
    assert backend._programs_per_sm(chosen) == expected
    warps_used = backend._warps(chosen)
    assert backend._programs_per_sm(chosen) <= max(1, programs_per_sm(255, warps_used, 0))
    assert WORST_CASE_WARPS_PER_SM == 8


def test_the_forward_takes_the_ptx_exp_on_nvidia(compiled):
    """Compiled for sm_90a the fused forward's ratios come from ex2.approx.ftz (triton_common._exp:
    the inline PTX, three instructions a ratio fewer than tl.exp's); the interpreter, and a ROCm
    build of PyTorch, keep tl.exp (triton_env: TRITON_INTERPRET read as Triton reads it)."""
    import torch

    from kpo_kernels.backends import triton_env

    forward = {k: v for k, v in compiled.items() if v["ok"] and "kpo_loss_fwd_kernel" in k}
    assert forward and all(v["ex2_ftz"] for v in forward.values())
    assert all(triton_env.interpreted(v) for v in ("1", "true", "TRUE", "On"))
    assert not any(triton_env.interpreted(v) for v in ("", "0", "false", "off"))
    assert triton_env.NVIDIA_PTX == (not triton_env.INTERPRETED and torch.version.hip is None)
    assert launcher.INTERPRETED == triton_env.INTERPRETED
