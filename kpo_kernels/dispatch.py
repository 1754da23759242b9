"""Which backend runs a call, and the string keys by which the custom ops find it again.

Custom ops take no Python objects, so a backend crosses the op boundary as a key: built-in
backends as their settings (the same settings give the same key, which keeps compiled graphs
reusable), any other `Backend` instance by identity, kept alive here.
"""

import torch

from .backends import Backend, TorchBackend, TritonBackend
from .backends.triton_backend import triton_import_error

BACKEND_NAMES = ("auto", "torch", "triton")

_BY_KEY = {}


def check_backend_argument(backend):
    if not isinstance(backend, Backend) and (not isinstance(backend, str) or backend not in BACKEND_NAMES):
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or a Backend instance, got {backend!r}")


def resolve_backend(backend, device, dtype):
    """The backend object for a `backend` argument (a name or a `Backend`) and the inputs."""
    check_backend_argument(backend)
    if isinstance(backend, Backend):
        chosen = backend
    elif backend == "torch":
        chosen = TorchBackend()
    elif backend == "triton":
        if triton_import_error() is not None:
            raise ValueError(f"backend='triton' needs Triton, which failed to import: {triton_import_error()}")
        chosen = TritonBackend()
    else:
        # float64 inputs stay in float64 on the torch backend; Triton computes in float32.
        auto_triton = device.type == "cuda" and dtype != torch.float64 and triton_import_error() is None
        chosen = TritonBackend() if auto_triton else TorchBackend()
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend={chosen.name!r} cannot run here: {reason}")
    return chosen


def backend_key(impl):
    """The key of a backend object (registered, so that `lookup` finds it)."""
    key = impl.key()
    _BY_KEY.setdefault(key, impl)
    return key


def lookup(key):
    """The backend a key names."""
    impl = _BY_KEY.get(key)
    if impl is None:
        raise ValueError(f"unknown kpo_kernels backend key {key!r}")
    return impl
