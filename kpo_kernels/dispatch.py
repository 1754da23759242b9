"""Which backend runs a call, and the string keys by which the custom ops find it again.

Custom ops take no Python objects, so a backend crosses the op boundary as a string key:
built-in backends as their settings (the same settings give the same key, which keeps compiled
graphs reusable), any other `Backend` object by identity (base.INSTANCES).
"""

import functools

import torch

from .backends import Backend, TorchBackend, TritonBackend
from .backends.base import INSTANCES
from .backends.triton_backend import triton_import_error

BACKEND_NAMES = ("auto", "torch", "triton")
# The backends that names stand for, made once, here (not inside a compiled region).
_BY_NAME = {"torch": TorchBackend(), "triton": TritonBackend()}


def check_backend_argument(backend):
    if not isinstance(backend, Backend) and (not isinstance(backend, str) or backend not in BACKEND_NAMES):
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or a Backend instance, got {backend!r}")


def resolve_backend(backend, device, dtype):
    """The backend object for a `backend` argument (a name or a `Backend`) and the inputs."""
    check_backend_argument(backend)
    if isinstance(backend, Backend):
        chosen = backend
    elif backend == "torch":
        chosen = _BY_NAME["torch"]
    elif backend == "triton":
        if triton_import_error() is not None:
            raise ValueError(f"backend='triton' needs Triton, which failed to import: {triton_import_error()}")
        chosen = _BY_NAME["triton"]
    else:
        # float64 inputs stay in float64 on the torch backend; Triton computes in float32.
        auto_triton = device.type == "cuda" and dtype != torch.float64 and triton_import_error() is None
        chosen = _BY_NAME["triton" if auto_triton else "torch"]
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend={chosen.name!r} cannot run here: {reason}")
    return chosen


def backend_key(impl):
    """The string by which a backend crosses the custom-op boundary (see `lookup`)."""
    return impl.key()


@functools.lru_cache(maxsize=None)
def _built_in(key):
    if key == "torch":
        return TorchBackend()
    kind, block, tile, warps, poison = key.split(":")
    if kind != "triton":
        raise ValueError(f"unknown kpo_kernels backend key {key!r}")
    number = lambda text: None if text == "None" else int(text)  # noqa: E731
    return TritonBackend(block_size=number(block), tile_size=number(tile), num_warps=number(warps), poison=poison == "1")


def lookup(key):
    """The backend a key names: a built-in backend rebuilt from its settings (cached), or any
    other Backend object, found by identity while it is alive."""
    impl = INSTANCES.get(key)
    if impl is not None:
        return impl
    if "@" in key:
        raise ValueError(f"the backend object {key!r} no longer exists")
    return _built_in(key)
