"""Backends: one interface (`Backend`), two implementations (PyTorch, Triton)."""

from .base import BACKEND_NAMES, Backend, LossForward, check_backend_argument, expand_rows, resolve_backend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "LossForward",
    "TorchBackend",
    "TritonBackend",
    "check_backend_argument",
    "expand_rows",
    "resolve_backend",
]
