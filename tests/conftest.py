"""Test setup: run the real Triton kernels, natively on CUDA or interpreted on the CPU; tiers.

Triton decides at import time whether kernels are interpreted, so TRITON_INTERPRET must be
set before `kpo_kernels` is imported: here, before any test module loads.

Tiers (`--tier`, docs/testing.md): `fast` (the default, what `python -m pytest` runs) leaves out
the tests marked `slow` and runs property tests with a few examples; `slow` runs only what `fast`
leaves out or shortens (tests marked `slow`, and every property test at its full example count);
`all` runs everything at full counts. CI runs `fast`, then `slow`: together, every test.
"""

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kpo_kernels import TorchBackend, TritonBackend  # noqa: E402
from kpo_kernels.backends.triton_backend import triton_import_error  # noqa: E402

TIER_VARIABLE = "KPO_TEST_TIER"  # read by helpers.examples() when test modules are imported


def pytest_addoption(parser):
    parser.addoption(
        "--tier", choices=("fast", "slow", "all"), default="fast",
        help="fast (default): leave out tests marked slow, property tests with few examples; "
        "slow: only those left out or shortened; all: everything at full counts",
    )


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # one worker per core already: no oversubscription
    tier = config.getoption("--tier")
    os.environ[TIER_VARIABLE] = tier
    settings.register_profile("kpo", deadline=None)
    settings.load_profile("kpo")


def _is_long(item):
    """Marked slow, or a property test (its full example count runs only outside the fast tier)."""
    return item.get_closest_marker("slow") is not None or getattr(getattr(item, "obj", None), "is_hypothesis_test", False)


def _named(config):
    """Test ids given on the command line (path::name[param]): those run in every tier."""
    return tuple(arg for arg in config.args if "::" in arg)


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier == "all":
        return
    named = _named(config)

    def asked_for(item):
        return any(item.nodeid == arg or item.nodeid.startswith(arg + "[") or arg.endswith(item.nodeid) for arg in named)

    if tier == "fast":
        keep = [item for item in items if item.get_closest_marker("slow") is None or asked_for(item)]
    else:
        keep = [item for item in items if _is_long(item) or asked_for(item)]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Small blocks make every test cross several block boundaries (the scan carry) and end in a
# partial block; on the interpreter they also keep the tests fast.
SMALL_BLOCK = 16


def triton_backend(block_size=SMALL_BLOCK, tile_size=None, num_warps=None):
    """The Triton backend with NaN-poisoned output buffers (tile_size forces the multi-tile path)."""
    if triton_import_error() is not None:
        pytest.skip(f"Triton is not importable: {triton_import_error()}")
    return TritonBackend(block_size=block_size, tile_size=tile_size, num_warps=num_warps, poison=True)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each backend, the Triton one with small blocks and NaN-poisoned output buffers."""
    return TorchBackend() if request.param == "torch" else triton_backend()


@pytest.fixture
def device():
    return DEVICE
