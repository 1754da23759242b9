"""What the Triton backend's code depends on in its process, decided once at import, as Triton
decides whether @triton.jit functions are interpreted. Imports no Triton, so that the launcher
and the kernels' modules can both use it without an import cycle."""

import os

import torch


def interpreted(value):
    """Whether Triton interprets @triton.jit functions for this TRITON_INTERPRET value (its
    getBoolEnv: "1", "true" or "on", in any case)."""
    return value.lower() in ("1", "true", "on")


INTERPRETED = interpreted(os.environ.get("TRITON_INTERPRET", ""))
# NVIDIA's PTX may be inlined (triton_common._exp) only where Triton compiles for an NVIDIA GPU:
# not under the interpreter, and not on a ROCm build of PyTorch (whose GPUs are "cuda" devices too).
NVIDIA_PTX = not INTERPRETED and torch.version.hip is None
