"""What the Triton backend launches on an H100/H200, compiled for sm_90a without a GPU.

- `record(run, sm_count)` runs the backend's launcher on CPU tensors with the kernels replaced
  by recorders and returns every launch (kernel, grid, arguments) exactly as it would be made on
  a CUDA device with `sm_count` SMs (the launcher's CUDA tiling, not the interpreter's).
- `compile_launch(kernel, args, kwargs)` compiles one launch the way Triton's JIT does at launch
  time (`JITFunction.run(..., warmup=True)`: its binder specialises integers equal to 1,
  16-divisible integers and 16-byte-aligned pointers), against an sm_90a target given by a
  stand-in driver, so that the code is the code that would run.
- `resources(compiled)` and `sass(cubin)` read registers, spills, shared memory and the SASS with
  the `cuobjdump` Triton ships.

Must run in a process without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""

import contextlib
import os
import re
import subprocess
import tempfile

import torch

from kpo_kernels.backends import triton_backend as launcher
from kpo_kernels.backends import triton_launch as launch
from kpo_kernels.backends.triton_env import interpreted

KERNELS = (
    "kalman_filter_kernel",
    "kpo_loss_fwd_kernel",
    "kpo_loss_finalize_kernel",
    "kpo_loss_bwd_kernel",
    "tile_count_kernel",
    "tile_aggregate_kernel",
    "tile_offsets_kernel",
    "chunk_maps_kernel",
    "fit_layout_kernel",
    "noise_filter_kernel",
    "noise_profile_kernel",
)


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, tuple(grid), args, kwargs))


def record(run, sm_count=132):
    """Every kernel launch `run()` makes, as (kernel, grid, args, kwargs), planned as on CUDA."""
    launches = []
    originals = {name: getattr(launcher.kernels, name) for name in KERNELS}
    interpreted, tile, sms = launcher.INTERPRETED, launcher.TritonBackend._tile, launch._sm_count
    checks = launcher.assert_mask_values, launcher.assert_cu_seqlens_values  # read flags the recorded kernels never write

    def cuda_tile(self, rows, tokens, longest, block, device):
        return tile(self, rows, tokens, longest, block, torch.device("cuda", 0))

    try:
        for name, kernel in originals.items():
            setattr(launcher.kernels, name, _Recorder(kernel, launches))
        launcher.INTERPRETED = True  # let the launcher accept CPU tensors
        launcher.TritonBackend._tile = cuda_tile
        launch._sm_count = lambda index: sm_count
        launcher.assert_mask_values = launcher.assert_cu_seqlens_values = lambda *args, **kwargs: None
        run()
    finally:
        for name, kernel in originals.items():
            setattr(launcher.kernels, name, kernel)
        launcher.INTERPRETED, launcher.TritonBackend._tile, launch._sm_count = interpreted, tile, sms
        launcher.assert_mask_values, launcher.assert_cu_seqlens_values = checks
    return launches


class _Sm90Driver:
    """The parts of Triton's active driver that JITFunction.run(warmup=True) asks for."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True


@contextlib.contextmanager
def sm90_target():
    from triton.runtime import driver

    previous = driver._active
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(kernel, args, kwargs):
    """The CompiledKernel Triton's JIT would build for this launch on sm_90a."""
    if interpreted(os.environ.get("TRITON_INTERPRET", "")):
        raise RuntimeError("compile_launch needs a process without TRITON_INTERPRET set")
    with sm90_target():
        return kernel.run(*args, grid=None, warmup=True, **kwargs)


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin, flag):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([_tool("cuobjdump"), flag, handle.name], capture_output=True, text=True, check=True).stdout


def resources(compiled):
    """{'registers', 'shared' (static and Triton's dynamic bytes), 'stack' (bytes a thread), 'local' (local-memory
    loads and stores in the SASS), 'local_in_loops' (those inside a loop), 'local_stores_in_loops' (the stores among
    them), 'spill_bytes' (ptxas's spill stores + loads)} of a compiled
    kernel (compile_launch's). On sm_90 cuobjdump's LOCAL field stays 0 when ptxas spills (the
    spills sit in STACK), and local accesses also come from libdevice's local arrays (sin and
    cos keep one for huge arguments) that spill nothing: so where the SASS touches local memory
    at all, ptxas -v on the same PTX says how many bytes are spills."""
    cubin = compiled.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    found = {key: int(re.search(rf"{tag}:(\d+)", usage).group(1)) for key, tag in (("registers", "REG"), ("stack", "STACK"))}
    shared = re.search(r"SHARED:(\d+)", usage)
    found["shared"] = (int(shared.group(1)) if shared else 0) + getattr(compiled.metadata, "shared", 0)  # + Triton's dynamic
    instructions = sass(cubin)
    local = [(address, opcode) for address, opcode, _ in instructions if opcode.split(".")[0] in ("LDL", "STL")]
    in_loops = [opcode for a, opcode in local if any(start <= a <= end for start, end in loops(instructions))]
    found["local"] = len(local)
    found["local_in_loops"] = len(in_loops)
    found["local_stores_in_loops"] = sum(opcode.startswith("STL") for opcode in in_loops)
    found["spill_bytes"] = _ptxas_spill_bytes(compiled.asm["ptx"]) if found["local"] else 0
    return found


def _ptxas():
    """The ptxas Triton assembles sm_90 code with (Triton 3.9 uses its newer `ptxas-blackwell`,
    whose PTX the older bundled `ptxas` refuses)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):
        return _tool("ptxas")


def _ptxas_spill_bytes(ptx):
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        log = subprocess.run([_ptxas(), "--gpu-name", "sm_90a", "-v", source, "-o", source + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
    # one line per function: the kernel's, and a function it calls (triton_finalize.finalize)
    return sum(int(stores) + int(loads) for stores, loads in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(cubin):
    """The SASS of a one-kernel cubin: a list of (address, opcode with modifiers, operands)."""
    listing = _cuobjdump(cubin, "-sass")
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _SASS_LINE.finditer(listing)]


def loops(instructions):
    """(start, end) addresses of every loop of a SASS listing: a branch back to an earlier address."""
    found = []
    for address, opcode, operands in instructions:
        if opcode.startswith("BRA") and operands.startswith("0x"):
            target = int(operands.split()[0].rstrip(","), 16)
            if target < address:
                found.append((target, address))
    return found
