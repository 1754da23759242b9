"""Checked hyperparameters and inputs, as the backends receive them."""

from dataclasses import dataclass
from typing import Optional, Union

import torch

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
MASK_MODES = ("skip", "position")

# ppo_kl averages -z with z clamped to [-KL_CLAMP, KL_CLAMP], as verl's PPO losses compute it.
KL_CLAMP = 20.0

# Order of the entries of a backend's metric vector; `kpo_loss` returns them as a dict.
METRIC_NAMES = (
    "clipfrac",
    "clipfrac_lower",
    "ppo_kl",
    "ratio_mean",
    "ratio_max",
    "raw_ratio_mean",
    "raw_ratio_max",
    "num_tokens",
    # What the filter sees (docs/math.md section 5b; docs/choosing-q-and-r.md says how to read them).
    "nis_mean",
    "log_likelihood",
    "sign_flip_raw",
    "sign_flip_filtered",
    "clipfrac_high",
    "clipfrac_low",
    "capfrac",
    "innovation_tokens",  # the denominator of nis_mean and log_likelihood
    "sign_flip_pairs",  # the denominator of the sign-flip rates
)
# kpo_loss(metrics=...): "full" computes every metric; "basic" leaves out the innovation and
# sign-flip diagnostics (DIAGNOSTIC_METRICS), the costliest part of the fused forward.
METRIC_SETS = ("full", "basic")
DIAGNOSTIC_METRICS = ("nis_mean", "log_likelihood", "sign_flip_raw", "sign_flip_filtered", "innovation_tokens",
                      "sign_flip_pairs")


@dataclass(frozen=True)
class FilterOptions:
    q: float
    r: float
    p0: float
    x0: float
    mask_mode: str

    @property
    def skip(self):
        return self.mask_mode == "skip"


@dataclass(frozen=True)
class LossOptions:
    filter: FilterOptions
    clip: bool
    clip_low: float
    clip_high: float
    dual_clip: Optional[float]
    log_ratio_cap: Optional[float]
    agg: str
    dp_size: int
    batch_num_tokens: Optional[Union[float, torch.Tensor]]  # a device tensor is read by the kernels
    global_batch_size: Optional[Union[float, torch.Tensor]]
    loss_scale_factor: Optional[float]
    diagnostics: bool = True  # metrics="full"; False for "basic" (no DIAGNOSTIC_METRICS)


@dataclass(frozen=True)
class TokenBatch:
    """A padded (B, T) batch, or a packed (N,) one with `cu_seqlens` (S + 1,) offsets.

    `mask` is None when every token counts; `advantages` is per sequence ((B,) / (S,)) or, when
    `advantages_per_token`, per token (same shape as log_prob). Tensors keep the caller's dtypes, strides and values:
    backends read them, never write them.
    """

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    is_weights: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor] = None
    advantages_per_token: bool = False

    @property
    def num_sequences(self):
        return self.cu_seqlens.numel() - 1 if self.cu_seqlens is not None else self.log_prob.shape[0]

    @property
    def shape(self):
        return self.log_prob.shape

    @property
    def device(self):
        return self.log_prob.device

    @property
    def result_dtype(self):
        """Dtype of the loss and metrics: float64 for float64 inputs, float32 otherwise."""
        return torch.float64 if self.log_prob.dtype == torch.float64 else torch.float32
