"""The interface every backend implements, and the choice of backend for a call."""

import math
from dataclasses import dataclass
from typing import Optional

import torch

BACKEND_NAMES = ("auto", "torch", "triton")


@dataclass
class LossForward:
    """What a backend's loss forward returns.

    loss: 0-dim aggregated loss. metrics: vector in `options.METRIC_NAMES` order.
    grad: per-token d(token loss)/d(log_prob), masked, *without* the aggregation weights, or
    None when no gradient is needed. row_scale: (B,) or (S,) aggregation weight of each row or
    packed sequence, so that d loss / d log_prob[b, t] = row_scale[b] * grad[b, t].
    """

    loss: torch.Tensor
    metrics: torch.Tensor
    grad: Optional[torch.Tensor]
    row_scale: torch.Tensor
    layout: object = None  # backend-specific launch layout that backward reuses


class Backend:
    """A way to compute the filter and the loss. Subclasses implement the three methods."""

    name = "abstract"

    def unavailable_reason(self, device):
        """None if this backend can run on tensors of `device`, else why not (for the error)."""
        return None

    def check_options(self, options):
        """Refuse (ValueError naming the argument) `FilterOptions` this backend cannot compute
        exactly; called before any kernel runs."""

    def filter(self, log_ratio, mask, options, cu_seqlens=None):
        """Filtered log-ratio of a (B, T) batch, or of a packed (N,) one with `cu_seqlens`:
        float32 (float64 for float64 input where the backend supports it), 0 where the mask
        is 0."""
        raise NotImplementedError

    def loss_forward(self, batch, options, need_grad):
        """Returns a `LossForward` for a checked `TokenBatch` and `LossOptions`."""
        raise NotImplementedError

    def loss_backward(self, saved, grad_output, dtype):
        """d loss / d log_prob in `dtype`, given the `LossForward` and d out / d loss."""
        raise NotImplementedError


def expand_rows(row_values, shape, cu_seqlens):
    """Per-row values broadcast to every token of a (B, T) batch, or repeated over the tokens of
    each packed sequence (no host synchronisation: the output size is known)."""
    if cu_seqlens is None:
        return row_values[:, None].expand(shape)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(row_values, lengths, output_size=shape[0])


def log1p_neg(x):
    """log(1 - x), and -inf for x >= 1: a lower clip bound <= 0 never binds."""
    return math.log1p(-x) if x < 1 else -math.inf


def check_backend_argument(backend):
    if not isinstance(backend, Backend) and (not isinstance(backend, str) or backend not in BACKEND_NAMES):
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or a Backend instance, got {backend!r}")


def resolve_backend(backend, device, dtype):
    """The backend object for a `backend` argument (a name or a `Backend`) and the inputs."""
    from .torch_backend import TorchBackend
    from .triton_backend import TritonBackend, triton_import_error

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
