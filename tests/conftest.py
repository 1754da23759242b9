"""Test setup: run the real Triton kernels, natively on CUDA or interpreted on the CPU.

Triton decides at import time whether kernels are interpreted, so TRITON_INTERPRET must be
set before `kpo_kernels` is imported: here, before any test module loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kpo_kernels import TorchBackend, TritonBackend  # noqa: E402
from kpo_kernels.backends.triton_backend import triton_import_error  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Small blocks make every test cross several block boundaries (the scan carry) and end in a
# partial block; on the interpreter they also keep the tests fast.
SMALL_BLOCK = 16


def triton_backend(block_size=SMALL_BLOCK, tile_size=None):
    """The Triton backend with NaN-poisoned output buffers (tile_size forces the multi-tile path)."""
    if triton_import_error() is not None:
        pytest.skip(f"Triton is not importable: {triton_import_error()}")
    return TritonBackend(block_size=block_size, tile_size=tile_size, poison=True)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each backend, the Triton one with small blocks and NaN-poisoned output buffers."""
    return TorchBackend() if request.param == "torch" else triton_backend()


@pytest.fixture
def device():
    return DEVICE
