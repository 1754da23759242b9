"""KPO in TRL (1.16.x): `KPOGRPOTrainer`, TRL's `GRPOTrainer` with `kpo_loss` as its policy loss.

    from kpo_kernels.integrations.trl import KPOGRPOConfig, KPOGRPOTrainer

    args = KPOGRPOConfig(output_dir="out", kalman_q=1e-6, loss_type="grpo", num_iterations=2)
    trainer = KPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)

Everything but the policy loss is TRL's: generation, rewards, advantages, old log-probs, the
reference model. The policy term is `kpo_loss` on the per-token log-probs (current and old), the
advantages and the completion mask (tool-output tokens masked, as TRL masks them), with

- `epsilon` / `epsilon_high`: the clip range of the *filtered* ratio (paper defaults 3e-4 / 4e-4);
- `delta` (TRL's two-sided clip bound, INTELLECT-2): the dual clip c = delta, which is the same
  loss whenever delta >= 1 + epsilon_high (required here);
- `loss_type`: the normalisation, mapped onto `kpo_loss`'s `agg` (`LOSS_TYPE_AGG`); loss types
  that change the surrogate itself (cispo, sapo, vespo) are rejected;
- TRL's token weights (the high-entropy mask of `top_entropy_quantile`, the off-policy sequence
  mask of `off_policy_mask_threshold`, vLLM importance-sampling correction) as `is_weights`;
- the KL penalty (`beta`), the static entropy bonus (`entropy_coef`) and the MoE router loss
  added as TRL adds them.

KPO's metrics are logged in TRL's metrics as `kpo/<name>` (see `LOGGED_METRICS`; under
`kpo_metrics="basic"` all but the filter's diagnostics, which kpo_loss then does not compute).

`kalman_fit` ("off", "per_generation", "per_step") fits Q and R with a `NoiseTracker`: on the
first stale micro-batch of each generation, or on every stale micro-batch before its loss
(micro-batches of the optimizer step that generated them are on-policy and never fitted). The
fit's metrics are logged as `kpo/<name>` for each name of `FIT_METRICS`.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import GRPOConfig, GRPOTrainer

from ..api import KPOLoss, kpo_loss
from ..fit_options import (
    FIT_MODES, PER_STEP_MAX_TOKENS, check_fit_mode, check_fit_prior, check_fit_range, check_max_tokens, check_min_tokens,
)
from ..tracker import FIT_METRICS, NoiseTracker
from ..validation import check_metrics, config_names

__all__ = ["LOGGED_METRICS", "LOSS_TYPE_AGG", "KPOGRPOConfig", "KPOGRPOTrainer", "fit_options"]

# TRL loss_type -> kpo_loss agg. The counts that make each one TRL's normalisation exactly are in
# `KPOGRPOTrainer._aggregation`.
LOSS_TYPE_AGG = {
    # mean over the local sequences (empty ones included) of each sequence's token mean
    "grpo": "seq-mean-token-mean",
    # sum over the local tokens / local valid-token count
    "bnpo": "token-mean",
    # sum over the local tokens / (local sequences * max_completion_length)
    "dr_grpo": "seq-mean-token-sum-norm",
    # sum over the local tokens / valid-token count of the accumulated global batch per process
    "dapo": "token-mean",
    # mean over the local sequences of each sequence's token sum
    "luspo": "seq-mean-token-sum",
}
# loss types whose surrogate is not a clipped ratio: KPO has no counterpart.
UNSUPPORTED_LOSS_TYPES = ("cispo", "sapo", "vespo")

# kpo_loss metric -> logged as `kpo/<metric>`; means are reduced across processes as sums of
# numerator and denominator (each with its own count, below), maxima by max.
LOGGED_METRICS = (
    "clipfrac",
    "clipfrac_lower",
    "ppo_kl",
    "ratio_mean",
    "ratio_max",
    "raw_ratio_mean",
    "raw_ratio_max",
    "nis_mean",
    "log_likelihood",
    "sign_flip_raw",
    "sign_flip_filtered",
    "clipfrac_high",
    "clipfrac_low",
    "capfrac",
)
# mean metric -> the count it is a mean over (a kpo_loss metric too)
_MEAN_METRICS = {
    "clipfrac": "num_tokens",
    "clipfrac_lower": "num_tokens",
    "ppo_kl": "num_tokens",
    "ratio_mean": "num_tokens",
    "raw_ratio_mean": "num_tokens",
    "nis_mean": "innovation_tokens",
    "log_likelihood": "innovation_tokens",
    "sign_flip_raw": "sign_flip_pairs",
    "sign_flip_filtered": "sign_flip_pairs",
    "clipfrac_high": "num_tokens",
    "clipfrac_low": "num_tokens",
    "capfrac": "num_tokens",
}
_COUNTS = ("num_tokens", "innovation_tokens", "sign_flip_pairs")
_MAX_METRICS = ("ratio_max", "raw_ratio_max")

# Optional model inputs that TRL's GRPOTrainer forwards from a batch to its forward pass.
_MODEL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class KPOGRPOConfig(GRPOConfig):
    """`GRPOConfig` with KPO's hyperparameters, and the paper's clip range and aggregation as
    defaults (`epsilon=3e-4`, `epsilon_high=4e-4`, `loss_type="grpo"`, i.e. seq-mean-token-mean).

    As in TRL, `epsilon_high=None` means `epsilon`; setting `epsilon` alone leaves `epsilon_high`
    at 4e-4.
    """

    kalman_q: float = field(default=1e-6, metadata={"help": "Process noise variance Q of the Kalman filter."})
    kalman_r: float = field(default=1.0, metadata={"help": "Observation noise variance R of the Kalman filter."})
    kalman_p0: float = field(default=0.0, metadata={"help": "Prior variance P0 of the filter (inf: diffuse prior)."})
    kalman_x0: float = field(default=0.0, metadata={"help": "Prior log importance ratio of the filter."})
    is_clip: bool = field(
        default=True, metadata={"help": "Clipped surrogate of the filtered ratio (KPO-clipped); False: plain KPO."}
    )
    mask_mode: str = field(
        default="skip",
        metadata={"help": "'skip': masked tokens (tool output) are invisible to the filter; 'position': z = 0 there."},
    )
    log_ratio_cap: Optional[float] = field(
        default=10.0, metadata={"help": "Upper cap of the filtered log-ratio before exp (None: no cap)."}
    )
    kalman_fit: str = field(
        default="off",
        metadata={"help": f"Fit Q and R to the log-ratios: one of {FIT_MODES} (kalman_q, kalman_r until the first fit)."},
    )
    kalman_fit_q_min: float = field(default=1e-10, metadata={"help": "Lowest ratio Q / R a fit searches."})
    kalman_fit_q_max: float = field(default=1e2, metadata={"help": "Highest ratio Q / R a fit searches."})
    kalman_fit_min_tokens: int = field(
        default=64, metadata={"help": "A micro-batch with fewer valid tokens (over the processes) keeps Q and R."}
    )
    kalman_fit_max_tokens: Optional[int] = field(
        default=PER_STEP_MAX_TOKENS,
        metadata={"help": "Per-step fit's budget of positions per micro-batch (larger: every k-th sequence; None: all)."},
    )
    kpo_backend: str = field(default="auto", metadata={"help": "kpo_loss backend: 'auto', 'torch' or 'triton'."})
    kpo_metrics: str = field(
        default="full",
        metadata={"help": "'full': log every kpo/ metric; 'basic': leave out the filter's diagnostics (nis_mean, "
                          "log_likelihood, sign flips), which the fused GPU forward then skips (same loss and gradient)."},
    )
    epsilon: float = field(default=3e-4, metadata={"help": "Lower clip range of the filtered ratio."})
    epsilon_high: Optional[float] = field(
        default=4e-4, metadata={"help": "Upper clip range of the filtered ratio (None: epsilon)."}
    )
    loss_type: str = field(
        default="grpo",
        metadata={"help": f"Normalisation of the KPO loss, one of {tuple(LOSS_TYPE_AGG)} (see LOSS_TYPE_AGG)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type in UNSUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} replaces the clipped-ratio surrogate, which KPO defines; use one of "
                f"{tuple(LOSS_TYPE_AGG)} (they differ only in the normalisation)"
            )
        if self.loss_type not in LOSS_TYPE_AGG:
            raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPE_AGG)}, got {self.loss_type!r}")
        if self.importance_sampling_level != "token":
            raise ValueError(
                "KPO filters per-token ratios: importance_sampling_level must be 'token', "
                f"got {self.importance_sampling_level!r}"
            )
        if self.use_adaptive_entropy:
            raise ValueError("KPOGRPOTrainer does not implement use_adaptive_entropy; use a fixed entropy_coef")
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if self.delta is not None and not self.delta >= 1 + epsilon_high:
            raise ValueError(
                f"delta ({self.delta}) must be >= 1 + epsilon_high ({1 + epsilon_high}): it becomes KPO's dual clip, "
                "which equals TRL's two-sided clip only there"
            )
        check_metrics(self.kpo_metrics, "kpo_metrics")  # by its config name
        with config_names(CONFIG_NAMES):  # checks every value, as kpo_loss will, by the config's names
            KPOLoss(**kpo_options(self), backend=self.kpo_backend)
        fit_options(self)  # and the fit's, by their config names


def fit_options(args):
    """(mode, NoiseTracker keywords) from a KPOGRPOConfig, checked by the config's names."""
    mode = check_fit_mode("kalman_fit", args.kalman_fit)
    q_range = check_fit_range("kalman_fit_q_min, kalman_fit_q_max", (args.kalman_fit_q_min, args.kalman_fit_q_max))
    min_tokens = check_min_tokens("kalman_fit_min_tokens", args.kalman_fit_min_tokens)
    max_tokens = check_max_tokens("kalman_fit_max_tokens", args.kalman_fit_max_tokens)
    if mode != "off":
        check_fit_prior("kalman_p0", float(args.kalman_p0) / float(args.kalman_r), mode)
    return mode, {"q_range": q_range, "min_tokens": min_tokens, "max_tokens": max_tokens}


# kpo_loss keywords -> the KPOGRPOConfig fields they come from (kpo_options)
CONFIG_NAMES = {"q": "kalman_q", "r": "kalman_r", "p0": "kalman_p0", "x0": "kalman_x0", "clip": "is_clip",
                "clip_low": "epsilon", "clip_high": "epsilon_high", "dual_clip": "delta", "metrics": "kpo_metrics",
                "backend": "kpo_backend"}


def kpo_options(args):
    """kpo_loss keywords (filter, surrogate) from a KPOGRPOConfig."""
    return {
        "q": args.kalman_q,
        "r": args.kalman_r,
        "p0": args.kalman_p0,
        "x0": args.kalman_x0,
        "clip": args.is_clip,
        "clip_low": args.epsilon,
        "clip_high": args.epsilon if args.epsilon_high is None else args.epsilon_high,
        "dual_clip": args.delta,
        "mask_mode": args.mask_mode,
        "log_ratio_cap": args.log_ratio_cap,
        "metrics": args.kpo_metrics,
    }


class KPOGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer whose policy loss is `kpo_loss` (the arguments are GRPOTrainer's; `args`
    must be a `KPOGRPOConfig`)."""

    _tag_names = ["trl", "grpo", "kpo"]
    _name = "KPO-GRPO"

    def __init__(self, model, reward_funcs=None, args=None, *positional, **kwargs):
        if args is None:
            args = KPOGRPOConfig()
        if not isinstance(args, KPOGRPOConfig):
            raise TypeError(f"KPOGRPOTrainer needs a KPOGRPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        self._kpo_options = {**kpo_options(args), "backend": args.kpo_backend}
        mode, settings = fit_options(args)
        self.noise_tracker = None
        if mode != "off":
            filter_options = {key: self._kpo_options[key] for key in ("q", "r", "p0", "x0", "mask_mode")}
            self.noise_tracker = NoiseTracker(mode, **filter_options, **settings, backend=args.kpo_backend)
        self._kpo_generated_at = None

    def _generate_and_score_completions(self, inputs):
        """TRL's generation; a training one marks a new rollout batch for the noise tracker (an
        evaluation's is none: the next training steps would look on-policy, and go unfitted)."""
        if self.model.training:
            self._kpo_generated_at = self.state.global_step
            if self.noise_tracker is not None:
                self.noise_tracker.new_generation()
        return super()._generate_and_score_completions(inputs)

    def _aggregation(self, batch_size, inputs, mode):
        """(agg, count keywords, divisor): TRL's normalisation of `self.loss_type` as kpo_loss's
        aggregation, followed by a division (gradient accumulation; dapo's global count)."""
        train = mode == "train"
        accumulation = self.current_gradient_accumulation_steps if train else 1
        if self.loss_type == "dapo":
            # TRL's count is a tensor (the valid tokens of the whole generation batch, gathered):
            # dividing token-sum by it equals token-mean with that batch_num_tokens, without
            # reading it on the host.
            count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                count = count * accumulation / self.args.steps_per_generation
            return "token-sum", {}, count
        counts = {}
        if self.loss_type in ("grpo", "dr_grpo", "luspo"):
            counts["global_batch_size"] = batch_size  # TRL counts empty sequences too
        if self.loss_type == "dr_grpo":
            counts["loss_scale_factor"] = self.max_completion_length
        return LOSS_TYPE_AGG[self.loss_type], counts, accumulation

    @staticmethod
    def _aggregate(values, mask, agg, counts):
        """A (B, T) per-token term (the KL penalty) reduced with the policy term's aggregation."""
        masked = values * mask
        if agg == "token-mean":
            return masked.sum() / mask.sum().clamp(min=1.0)
        if agg == "seq-mean-token-mean":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / counts["global_batch_size"]
        if agg == "token-sum":
            return masked.sum()
        return masked.sum() / counts["global_batch_size"] / counts.get("loss_scale_factor", 1)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        log_prob, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _MODEL_INPUTS},
        )
        old_log_prob = inputs.get("old_per_token_logps")
        if old_log_prob is None:  # TRL leaves it out when the batch is on-policy
            old_log_prob = log_prob.detach()
        advantages = inputs["advantages"]

        # TRL's multiplicative token weights, which do not change the normalisation.
        weights = []
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            weights.append(entropy_mask)
        if self.off_policy_mask_threshold is not None:
            weights.append(
                self.get_off_policy_mask(
                    advantages=advantages if advantages.dim() == 2 else advantages[:, None],
                    per_token_logps=log_prob,
                    sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_log_prob),
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                )
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        is_weights = None
        for weight in weights:
            weight = weight.to(log_prob.dtype).expand(mask.shape)
            is_weights = weight if is_weights is None else is_weights * weight

        agg, counts, divisor = self._aggregation(mask.shape[0], inputs, mode)
        options = dict(self._kpo_options)
        if self.noise_tracker is not None:
            # Fitted in training only, on micro-batches generated under earlier weights.
            stale = mode == "train" and self.state.global_step != self._kpo_generated_at
            options.update(self.noise_tracker(log_prob.detach() - old_log_prob, mask, stale=stale))
        loss, metrics = kpo_loss(
            log_prob, old_log_prob, advantages, mask, agg=agg, is_weights=is_weights, **counts, **options
        )

        per_token_kl = None
        if self.beta != 0.0:
            ref_gap = inputs["ref_per_token_logps"] - log_prob
            per_token_kl = torch.exp(ref_gap) - ref_gap - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(log_prob - old_log_prob)
            # Added after the token weights, as in TRL, and normalised like the policy term.
            loss = loss + self.beta * self._aggregate(per_token_kl, mask, agg, counts)
        # TRL logs its policy loss before the gradient-accumulation scaling (dapo's is in its count).
        policy_loss = (loss / divisor if self.loss_type == "dapo" else loss).detach()
        loss = loss / divisor

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self._entropy_bonus_enabled:
            token_mask = mask if entropy_mask is None else mask * entropy_mask
            bonus = (entropies * token_mask).sum() / token_mask.sum().clamp(min=1.0) / accumulation
            loss = loss - self.entropy_coef * bonus
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_kpo_metrics(mode, metrics, entropies, per_token_kl, mask)
        return loss

    def _log_kpo_metrics(self, mode, metrics, entropies, per_token_kl, mask):
        """KPO's metrics (global over processes), the entropy and the KL, with one host sync."""
        tokens = metrics["num_tokens"]
        valid = mask.to(entropies.dtype)
        means = {name: count for name, count in _MEAN_METRICS.items() if name in metrics}  # kpo_metrics=basic:
        counts = [count for count in _COUNTS if count in metrics]  # no diagnostics, nor their counts
        sums = [metrics[name] * metrics[count] for name, count in means.items()]
        sums += [metrics[count] for count in counts]
        sums += [(entropies.detach() * valid).sum().to(tokens), valid.sum().to(tokens)]
        if per_token_kl is not None:
            sums.append((per_token_kl.detach() * valid).sum().to(tokens))
        sums = self.accelerator.reduce(torch.stack(sums), reduction="sum")
        maxima = torch.stack([metrics[name] for name in _MAX_METRICS])
        maxima = self.accelerator.gather(maxima).view(-1, len(_MAX_METRICS)).amax(0)
        values = torch.cat([sums, maxima]).tolist()  # the one host sync

        counts = {count: max(values[len(means) + i], 1.0) for i, count in enumerate(counts)}
        logged = self._metrics[mode]
        for i, (name, count) in enumerate(means.items()):
            logged[f"kpo/{name}"].append(values[i] / counts[count])
        for i, name in enumerate(_MAX_METRICS):
            logged[f"kpo/{name}"].append(values[len(sums) + i])
        # TRL's "clip_ratio/region_mean" counts the tokens whose clipped branch is active: KPO's clipfrac.
        logged["clip_ratio/region_mean"].append(values[0] / counts["num_tokens"])
        rest = len(means) + len(counts)
        entropy_sum, entropy_tokens = values[rest], values[rest + 1]
        logged["entropy"].append(entropy_sum / max(entropy_tokens, 1.0))
        if per_token_kl is not None:
            logged["kl"].append(values[rest + 2] / max(entropy_tokens, 1.0))
        if self.noise_tracker is not None:  # host floats, the same on every process
            for name in FIT_METRICS:
                logged[f"kpo/{name}"].append(float(self.noise_tracker.metrics[name]))
