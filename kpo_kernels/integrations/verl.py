"""KPO as a verl policy loss (verl 0.9.x): `actor_rollout_ref.actor.policy_loss.loss_mode=kpo`.

Importing this module registers `kpo` in verl's policy-loss registry
(`verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`), so that verl's actor finds it through
`get_policy_loss_fn("kpo")`. The import has to happen in every process that computes the actor
loss (verl's Ray workers), not only in the driver: see docs/verl.md for the overrides that
do that (`actor_rollout_ref.model.external_lib`, which verl imports in each worker, or the
policy-loss config's `_target_`, which Hydra imports wherever the actor config is built).

Where the loss takes its settings from (verl's actor config, an `ActorConfig` or a DictConfig):

- `clip_ratio_low` / `clip_ratio_high` (falling back to `clip_ratio`, as verl's `vanilla` loss
  does): the clip range of the filtered ratio;
- `policy_loss`: a `KPOPolicyLossConfig` with the filter's and the surrogate's hyperparameters
  (a plain `PolicyLossConfig` gives KPO's defaults);
- the `loss_agg_mode` argument and `global_batch_info` (`dp_size`, `batch_num_tokens`,
  `global_batch_size`, `loss_scale_factor`): the aggregation, exactly as verl's `agg_loss`;
- `rollout_is_weights` multiplies the per-token loss.

verl's `clip_ratio_c` is not used: the dual clip is `policy_loss.dual_clip` (None: off).

Two verl features would silently train something other than KPO; both are refused by name:

- `algorithm.rollout_correction.bypass_mode=True`: verl's `apply_bypass_mode` rewrites the
  actor's `policy_loss.loss_mode` to its own `bypass_mode` loss. Importing this module wraps that
  function so that it raises for `loss_mode=kpo`, and `KPOPolicyLossConfig` refuses a rewritten
  `loss_mode` when a worker builds it.
- KPO as the policy loss of on-policy distillation (`distillation.distillation_loss.
  policy_loss_mode=kpo`): verl then passes its distillation loss config, which has no
  `policy_loss` with KPO's hyperparameters; the loss refuses such a config rather than fall back
  to defaults. (verl 0.9.1 itself allows only `vanilla` there.)
"""

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from verl.trainer.ppo import rollout_corr_helper
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig

from ..api import KPOLoss, kpo_loss
from ..fit_options import (
    PER_STEP_MAX_TOKENS, check_fit_mode, check_fit_prior, check_fit_range, check_max_tokens, check_min_tokens,
)
from ..tracker import FIT_METRICS, NoiseTracker
from ..validation import check_metrics, config_names

__all__ = ["LOSS_MODE", "METRICS", "FIT_METRIC_NAMES", "KPOPolicyLossConfig", "compute_policy_loss_kpo", "kpo_loss_options"]

LOSS_MODE = "kpo"

# Metric name logged by verl -> key of `kpo_loss`'s metrics. The first three are the names verl's
# own PPO losses log, with the same meaning (for the filtered ratio).
METRICS = {
    "actor/pg_clipfrac": "clipfrac",
    "actor/ppo_kl": "ppo_kl",
    "actor/pg_clipfrac_lower": "clipfrac_lower",
    "actor/kpo_ratio_mean": "ratio_mean",
    "actor/kpo_ratio_max": "ratio_max",
    "actor/kpo_raw_ratio_mean": "raw_ratio_mean",
    "actor/kpo_raw_ratio_max": "raw_ratio_max",
    # What the filter sees (docs/math.md section 5b, docs/choosing-q-and-r.md); the first four are
    # diagnostics, left out under policy_loss.kpo_metrics=basic
    "actor/kpo_nis_mean": "nis_mean",
    "actor/kpo_log_likelihood": "log_likelihood",
    "actor/kpo_sign_flip_raw": "sign_flip_raw",
    "actor/kpo_sign_flip_filtered": "sign_flip_filtered",
    "actor/kpo_clipfrac_high": "clipfrac_high",
    "actor/kpo_clipfrac_low": "clipfrac_low",
    "actor/kpo_capfrac": "capfrac",
}

# With kalman_fit != "off": the NoiseTracker's metrics (docs/choosing-q-and-r.md), logged as
# actor/kpo_<name>: the Q and R in use, the last fit's drift evidence and boundary (-1 lower end of
# the ratio range, +1 upper, 0 inside), its status (0 fitted, 1 on-policy, 2 too few tokens,
# 3 non-finite, -1 none yet) and whether this micro-batch was fitted.
FIT_METRIC_NAMES = {f"actor/kpo_{name}": name for name in FIT_METRICS}

# Keys of verl's `ActorConfig.global_batch_info`, passed by name to `kpo_loss` (as verl passes them
# to `agg_loss`).
GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


@dataclass
class KPOPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` with KPO's hyperparameters (docs/verl.md and docs/math.md define them).

    kalman_q, kalman_r, kalman_p0, kalman_x0: process noise Q, observation noise R, prior variance
        and prior log-ratio of the filter (`kpo_loss`'s q, r, p0, x0).
    is_clip: clipped surrogate ("KPO-clipped") or plain filtered-ratio surrogate ("KPO").
    dual_clip: c > 1 bounds the loss of a negative-advantage token at -c A; None disables it.
    mask_mode: "skip" (masked tokens are invisible to the filter) or "position".
    log_ratio_cap: the filtered log-ratio is clamped above at this value (None: no cap).
    kalman_fit: "off" (default: kalman_q and kalman_r as given), "per_generation" (Q and R fitted
        on the first stale micro-batch after an on-policy one, i.e. once per rollout batch, then
        fixed) or "per_step" (fitted on every micro-batch before its loss); kalman_q and
        kalman_r are the values until the first fit. A fit keeps P0 / R (kalman_p0 / kalman_r:
        0 or inf). docs/verl.md.
    kalman_fit_q_min, kalman_fit_q_max: the range of Q / R searched.
    kalman_fit_min_tokens: a micro-batch with fewer valid tokens (over the data-parallel group)
        keeps the previous Q and R.
    kalman_fit_max_tokens: the per-step fit's budget of positions per micro-batch (32768; a larger
        micro-batch is fitted on every k-th sequence); null: every sequence.
    kpo_metrics: "full" (default) logs every metric of METRICS; "basic" leaves out the filter's
        diagnostics (actor/kpo_nis_mean, actor/kpo_log_likelihood, actor/kpo_sign_flip_raw,
        actor/kpo_sign_flip_filtered: `kpo_loss(metrics="basic")`), which the fused forward on a
        GPU then does not compute: the same loss and gradient, a cheaper step. docs/verl.md.

    Build it from Hydra with `policy_loss._target_=kpo_kernels.integrations.verl.KPOPolicyLossConfig`;
    the hyperparameters are checked here, when verl builds the config, not at the first step.
    """

    loss_mode: str = LOSS_MODE
    kalman_q: float = 1e-6
    kalman_r: float = 1.0
    kalman_p0: float = 0.0
    kalman_x0: float = 0.0
    is_clip: bool = True
    dual_clip: Optional[float] = None
    mask_mode: str = "skip"
    log_ratio_cap: Optional[float] = 10.0
    kalman_fit: str = "off"
    kalman_fit_q_min: float = 1e-10
    kalman_fit_q_max: float = 1e2
    kalman_fit_min_tokens: int = 64
    kalman_fit_max_tokens: Optional[int] = PER_STEP_MAX_TOKENS
    kpo_metrics: str = "full"

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.loss_mode != LOSS_MODE:
            raise ValueError(
                f"KPOPolicyLossConfig has loss_mode={self.loss_mode!r}, not {LOSS_MODE!r}"
                + (f": {_BYPASS_MESSAGE}" if self.loss_mode == "bypass_mode" else "")
            )
        check_metrics(self.kpo_metrics, "kpo_metrics")  # by its config name
        with config_names({keyword: field for field, keyword in _HYPERPARAMETERS.items()}):
            KPOLoss(**_hyperparameters(self))  # checks every value, as kpo_loss will, by the config's names
        _fit_settings(self)  # and the fit's options, by their config names


_BYPASS_MESSAGE = (
    "algorithm.rollout_correction.bypass_mode=True replaces actor_rollout_ref.actor.policy_loss."
    "loss_mode=kpo with verl's own bypass_mode loss, which is not KPO. Set "
    "algorithm.rollout_correction.bypass_mode=False (old_log_prob then comes from the actor), or "
    "use verl's bypass_mode loss without KPO"
)


def _refuse_bypass_for_kpo(apply_bypass_mode):
    """verl's `apply_bypass_mode`, raising instead of replacing loss_mode=kpo."""

    @functools.wraps(apply_bypass_mode)
    def wrapper(batch, rollout_corr_config=None, policy_loss_config=None):
        if policy_loss_config is not None and policy_loss_config.get("loss_mode", None) == LOSS_MODE:
            raise ValueError(_BYPASS_MESSAGE)
        return apply_bypass_mode(batch, rollout_corr_config, policy_loss_config)

    wrapper.refuses_kpo = True
    return wrapper


if not getattr(rollout_corr_helper.apply_bypass_mode, "refuses_kpo", False):  # once per process
    rollout_corr_helper.apply_bypass_mode = _refuse_bypass_for_kpo(rollout_corr_helper.apply_bypass_mode)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KPOPolicyLossConfig)}
# KPOPolicyLossConfig field -> kpo_loss keyword
_HYPERPARAMETERS = {
    "kalman_q": "q",
    "kalman_r": "r",
    "kalman_p0": "p0",
    "kalman_x0": "x0",
    "is_clip": "clip",
    "dual_clip": "dual_clip",
    "mask_mode": "mask_mode",
    "log_ratio_cap": "log_ratio_cap",
    "kpo_metrics": "metrics",
}


def _hyperparameters(policy_loss):
    """kpo_loss keywords from a policy-loss config; fields it lacks take KPO's defaults."""
    if policy_loss is None:
        policy_loss = {}
    return {keyword: policy_loss.get(field, _DEFAULTS[field]) for field, keyword in _HYPERPARAMETERS.items()}


def _fit_settings(policy_loss):
    """(mode, NoiseTracker keywords) of a policy-loss config, checked by their config names."""
    if policy_loss is None:
        policy_loss = {}
    get = lambda field: policy_loss.get(field, _DEFAULTS[field])  # noqa: E731
    mode = check_fit_mode("kalman_fit", get("kalman_fit"))
    q_range = check_fit_range("kalman_fit_q_min, kalman_fit_q_max", (get("kalman_fit_q_min"), get("kalman_fit_q_max")))
    min_tokens = check_min_tokens("kalman_fit_min_tokens", get("kalman_fit_min_tokens"))
    max_tokens = check_max_tokens("kalman_fit_max_tokens", get("kalman_fit_max_tokens"))
    if mode != "off":
        check_fit_prior("kalman_p0", float(get("kalman_p0")) / float(get("kalman_r")), mode)
    return mode, {"q_range": q_range, "min_tokens": min_tokens, "max_tokens": max_tokens}


# One NoiseTracker per process and setting: verl calls the loss with the same actor config for
# every micro-batch of a worker.
_TRACKERS = {}


def _tracker(config, options):
    mode, settings = _fit_settings(config.get("policy_loss", None))
    if mode == "off":
        return None
    filter_options = {key: options[key] for key in ("q", "r", "p0", "x0", "mask_mode")}
    key = (mode, tuple(sorted(settings.items())), tuple(sorted(filter_options.items())))
    if key not in _TRACKERS:
        _TRACKERS[key] = NoiseTracker(mode, **filter_options, **settings)
    return _TRACKERS[key]


def kpo_loss_options(config) -> dict[str, Any]:
    """The `kpo_loss` keywords (all but agg and is_weights) that a verl actor config defines."""
    options = _hyperparameters(config.get("policy_loss", None))
    clip_ratio = config.get("clip_ratio", None)
    clip_low, clip_high = config.get("clip_ratio_low", None), config.get("clip_ratio_high", None)
    options["clip_low"] = clip_ratio if clip_low is None else clip_low
    options["clip_high"] = clip_ratio if clip_high is None else clip_high
    info = config.get("global_batch_info", None) or {}
    unknown = sorted(set(info) - set(GLOBAL_BATCH_KEYS))
    if unknown:
        raise ValueError(
            f"global_batch_info has keys {unknown} that the kpo loss does not know (known: {GLOBAL_BATCH_KEYS})"
        )
    options.update({key: info[key] for key in GLOBAL_BATCH_KEYS if info.get(key) is not None})
    return options


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_kpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl policy loss `kpo`: (loss, metrics), metrics as the floats verl logs (one host sync).

    The arguments are those of every verl policy loss (see `verl.trainer.ppo.core_algos.PolicyLossFn`):
    (B, T) log-probs, advantages and response mask, the aggregation mode, the actor config and
    optional (B, T) rollout importance weights.
    """
    if config is None:
        raise ValueError("the kpo policy loss needs verl's actor config (clip ratios, policy_loss, global_batch_info)")
    if config.get("policy_loss", None) is None and config.get("policy_loss_mode", None) is not None:
        raise ValueError(
            "kpo as distillation.distillation_loss.policy_loss_mode: verl passes the distillation loss "
            "config, which has no policy_loss with KPO's hyperparameters (kalman_q, kalman_r, ...); "
            "KPO refuses to run on defaults there. Use policy_loss_mode=vanilla for distillation"
        )
    options = kpo_loss_options(config)
    tracker = _tracker(config, options)
    if tracker is not None:  # per_step: the fit's one host read, before the loss
        options.update(tracker(log_prob.detach() - old_log_prob, response_mask))
    loss, metrics = kpo_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        agg=loss_agg_mode,
        is_weights=rollout_is_weights,
        **options,
    )
    shown = [logged_name for logged_name, name in METRICS.items() if name in metrics]  # all but the
    stacked = [metrics[METRICS[name]] for name in shown]  # diagnostics under kpo_metrics=basic
    if tracker is not None:  # whether this micro-batch is on-policy, read with the metrics
        valid = response_mask.bool()
        stale = ((log_prob.detach() != old_log_prob) & valid).any()
        stacked += [stale.to(stacked[0].dtype), valid.any().to(stacked[0].dtype)]
    values = torch.stack(stacked).tolist()  # the one host sync
    logged = dict(zip(shown, values))
    if tracker is not None:
        if values[-2] == 0.0 and values[-1] == 1.0:  # on-policy (not all masked): a new rollout batch
            tracker.new_generation()
        logged.update({name: float(tracker.metrics[key]) for name, key in FIT_METRIC_NAMES.items()})
    return loss, logged
