"""The interface every backend implements (the choice of backend for a call: `kpo_kernels.dispatch`)."""

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LossForward:
    """What a backend's loss forward returns.

    loss: 0-dim aggregated loss. metrics: vector in `options.METRIC_NAMES` order.
    grad: per-token d(token loss)/d(log_prob), masked, *without* the aggregation weights, or
    None when no gradient is needed. row_scale: (B,) or (S,) aggregation weight of each row or
    packed sequence, so that d loss / d log_prob[b, t] = row_scale[b] * grad[b, t].
    plan: what backward reuses of the forward's planning, an int32 tensor of
    `Backend.backward_plan_shape` (None: nothing, an empty one).
    """

    loss: torch.Tensor
    metrics: torch.Tensor
    grad: Optional[torch.Tensor]
    row_scale: torch.Tensor
    plan: Optional[torch.Tensor] = None


# Every Backend object by its instance key, so that the custom ops find a backend they were
# handed by key (kpo_kernels.dispatch). Registered at construction: outside any compiled region.
INSTANCES = weakref.WeakValueDictionary()


class Backend:
    """The interface every backend implements (`TorchBackend`, `TritonBackend`).

    An instance passed as `backend=` to `kpo_loss`, `kalman_filter`, `fit_noise` or `prepare`
    selects it. Subclasses implement the filter, the fused loss forward and its backward; the
    public functions check every input and option before calling them. docs/api.md.
    """

    name = "abstract"

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        INSTANCES[self.instance_key()] = self
        return self

    def unavailable_reason(self, device):
        """None if this backend can run on tensors of `device`, else why not (for the error)."""
        return None

    def check_options(self, options):
        """Refuse (ValueError naming the argument) `FilterOptions` this backend cannot compute
        exactly; called before any kernel runs."""

    def filter(self, log_ratio, mask, options, cu_seqlens=None, state=None):
        """Filtered log-ratio of a (B, T) batch, or of a packed (N,) one with `cu_seqlens`:
        float32 (float64 for float64 input where the backend supports it), 0 where the mask
        is 0. state: None, or a `state.FilterState` of (B,) / (S,) tensors on the data's device
        that each sequence enters with instead of (x0, no observation, no valid token)
        (docs/math.md section 7)."""
        raise NotImplementedError

    def loss_forward(self, batch, options, need_grad, state=None):
        """Returns a `LossForward` for a checked `TokenBatch` and `LossOptions`; `state` as in
        `filter`. Where `checks_mask_values(batch.mask)`, it also checks that the mask's values
        are 0 or 1 (tensor_checks.assert_mask_values)."""
        raise NotImplementedError

    def checks_cu_seqlens_values(self, cu_seqlens):
        """Whether `loss_forward` checks the offsets' values itself, before any kernel reads its
        tiles (in place of tensor_checks.check_cu_seqlens_values's own kernels)."""
        return False

    def checks_mask_values(self, mask):
        """Whether `loss_forward` checks the mask's values itself (on the way, in place of
        tensor_checks.check_mask_values's own passes over the mask)."""
        return False

    def chunk_maps(self, log_prob, old_log_prob, mask, options, cu_seqlens, count):
        """The `state.ChunkMaps` of each sequence of a (B, T) or packed (N,) batch of log-ratios
        z = log_prob - old_log_prob (old_log_prob None: log_prob is z) whose sequences consumed
        `count` ((B,) / (S,) int64 on the data's device) observations before (docs/math.md
        section 7)."""
        raise NotImplementedError

    def loss_backward(self, grad, row_scale, grad_output, cu_seqlens, dtype, plan=None):
        """d loss / d log_prob in `dtype`: grad_output * row_scale[sequence] * grad, from the
        `LossForward` fields grad, row_scale and plan (None or empty: none kept), d out / d loss
        (0-dim) and the batch's cu_seqlens (None when padded)."""
        raise NotImplementedError

    def backward_plan_shape(self, cu_seqlens, need_grad):
        """The shape of `LossForward.plan` for a batch with these offsets (None: padded); the
        loss op's fake implementation reads it. This default: (0,), nothing kept."""
        return (0,)

    def noise_layout(self, log_ratio, mask, cu_seqlens, mask_mode, x0, max_tokens):
        """`estimate_noise`'s sequences (fit_spectrum.sequences; packed ones under max_tokens
        subsampled as there), or None to let the caller lay them out with torch. Called for
        log-ratios of any float dtype but float64. This default: None."""
        return None

    def noise_fit(self, z, lengths, *, diffuse, bins, low, high, min_tokens, fallback, group):
        """`estimate_noise`'s transform and search as a `NoiseEstimate`, from the (S, T) float32
        sequences z and their lengths (fit_spectrum.sequences), or None to let the caller run
        both in torch (fit_spectrum.spectral_sums, then fit_search.staged_search, which describes
        the other arguments). `group`: None, or a process group over which the transform's sums
        are all-reduced; every rank must get the same result, and must decline (None) alike.
        This default: None."""
        return None

    def prepare(self, length, q, r, p0, device):
        """Build what calls whose tables are sized by `length` (kpo_kernels.tables) will need on
        `device`, through the cache of `tables`: `kpo_kernels.prepare` pins what is looked up
        here, so that nothing is allocated or freed under a CUDA graph."""

    def output_dtypes(self, dtype):
        """Dtypes of the results for inputs of `dtype`: filter, loss (and metrics), grad (the
        stored per-token derivative), row_scale and maps (the float fields of `chunk_maps`). The custom ops' fake implementations
        allocate with them, so they must be what the methods above return."""
        return dict.fromkeys(("filter", "loss", "grad", "row_scale", "maps"), torch.float32)

    def key(self):
        """A string that identifies this backend and its settings (`dispatch.lookup` turns it
        back into a backend). Built-in backends: their settings; others: the object itself."""
        return self.instance_key()

    def instance_key(self):
        return f"{type(self).__module__}.{type(self).__qualname__}@{id(self):x}"


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
