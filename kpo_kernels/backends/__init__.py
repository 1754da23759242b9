"""Backends: one interface (`Backend`), two implementations (PyTorch, Triton)."""

from .base import Backend, LossForward, expand_rows
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

__all__ = ["Backend", "LossForward", "TorchBackend", "TritonBackend", "expand_rows"]
