"""KPO in OpenRLHF (0.11.x): `KPOPolicyLoss`, a drop-in for `openrlhf.models.loss.PolicyLoss`.

One line in an OpenRLHF run: launch with this module instead of OpenRLHF's PPO entry point,

    python -m kpo_kernels.integrations.openrlhf --kpo.q 1e-6 --kpo.r 1.0 <train_ppo_ray's arguments>

Everything but the policy loss is OpenRLHF's (rollouts, advantages, old and rollout log-probs,
the KL and entropy terms, DeepSpeed). `ActorPPOTrainer` builds its loss from OpenRLHF's own
arguments and calls it in `training_step` with the same arguments and return tuple:

- `--actor.eps_clip_low_high` (or `--actor.eps_clip`): the clip range of the *filtered* ratio;
  `--actor.dual_clip`: `kpo_loss`'s `dual_clip` (the same rule);
- `--actor.loss_agg_mode`: `token-mean` -> `agg="token-mean"` with OpenRLHF's `batch_num_tokens`,
  otherwise `agg="seq-mean-token-mean"` with its `global_batch_size`; `dp_size` with either (without
  a global count OpenRLHF takes the local mean and ignores `dp_size`, and so does this loss);
- `--algo.advantage.is_correction_*` (the vLLM / DeepSpeed log-prob mismatch correction from
  `rollout_log_probs`): the same per-token coefficient, passed as `is_weights`, and the same
  `vllm_kl` and `is_filter_ratio`;
- OpenRLHF clamps the raw log-ratio at +-20: here `log_ratio_cap=20.0` caps the filtered one.

`--actor.policy_loss_type gspo` (a sequence-level ratio) has no KPO counterpart and is refused.
KPO's metrics are logged with OpenRLHF's as `kpo/<name>` (`LOGGED_METRICS`).
"""

import json
import os
import sys

import torch
from openrlhf.models.loss import PolicyLoss
from openrlhf.models.utils import masked_mean

from ..api import kpo_loss
from ..validation import config_names

__all__ = ["KPO_OPTIONS", "LOGGED_METRICS", "KPOPolicyLoss", "enable", "disable", "main"]

# Keyword arguments of KPOPolicyLoss beyond PolicyLoss's, with their defaults; each is also a
# launcher flag `--kpo.<name>`.
KPO_OPTIONS = {"q": 1e-6, "r": 1.0, "p0": 0.0, "x0": 0.0, "mask_mode": "skip", "log_ratio_cap": 20.0, "backend": "auto",
               "metrics": "full"}
# kpo_loss metrics added to OpenRLHF's training_step metrics as `kpo/<name>`, each a token-weighted
# mean over micro-batches and ranks (as OpenRLHF reduces its own 0-dim metrics).
LOGGED_METRICS = ("ratio_mean", "ratio_max", "raw_ratio_mean", "raw_ratio_max", "nis_mean", "sign_flip_raw", "sign_flip_filtered", "capfrac")


class KPOPolicyLoss(PolicyLoss):
    """OpenRLHF's `PolicyLoss` with the KPO surrogate: same constructor, `forward` and return tuple.

    Args:
        clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
        is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold:
            OpenRLHF's, with its meanings and checks (`policy_loss_type` must be "ppo").
        q, r, p0, x0, mask_mode, log_ratio_cap, backend, metrics: the filter and `kpo_loss`
            options (`KPO_OPTIONS` gives the defaults; metrics="basic" leaves the diagnostics
            nis_mean and the sign flips out of what is computed and logged).

    Raises:
        ValueError: `policy_loss_type="gspo"`, or an option OpenRLHF or `kpo_loss` refuses.

    forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
    batch_num_tokens, global_batch_size) returns `(loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio)` as OpenRLHF's does (the last two None without IS correction); the last
    call's `kpo_loss` metrics are in `self.metrics`.
    """

    def __init__(self, *args, q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", log_ratio_cap=20.0, backend="auto",
                 metrics="full", **kwargs):
        super().__init__(*args, **kwargs)
        if self.policy_loss_type != "ppo":
            raise ValueError(
                f"policy_loss_type={self.policy_loss_type!r}: KPO filters per-token ratios and has no sequence-ratio "
                "(GSPO) counterpart; use --actor.policy_loss_type ppo"
            )
        self.kpo_options = dict(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode, log_ratio_cap=log_ratio_cap, backend=backend,
                                metrics=metrics)
        self.metrics = {}
        kpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), **self.kpo_options)  # refuse bad options now

    def forward(
        self,
        log_probs,
        old_log_probs,
        advantages,
        action_mask=None,
        rollout_log_probs=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        weights = vllm_kl = is_filter_ratio = None
        if self.is_correction_level != "off":
            weights, filtered = self._is_correction(old_log_probs, rollout_log_probs, action_mask)
            if self.is_correction_level == "seq":
                is_filter_ratio = filtered.float().mean()
            else:
                is_filter_ratio = masked_mean(filtered.float(), action_mask, dim=None)
            vllm_kl = masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        # OpenRLHF's aggregate_loss: a global count (with dp_size) when given, else the local mean.
        if self.token_level_loss:
            agg, counts = "token-mean", ({} if batch_num_tokens is None else {"batch_num_tokens": batch_num_tokens, "dp_size": dp_size})
        else:
            agg, counts = "seq-mean-token-mean", ({} if global_batch_size is None else {"global_batch_size": global_batch_size, "dp_size": dp_size})
        loss, metrics = kpo_loss(
            log_probs,
            old_log_probs,
            advantages,
            action_mask,
            clip_low=self.clip_eps_low,
            clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            agg=agg,
            is_weights=weights,
            **counts,
            **self.kpo_options,
        )
        self.metrics = metrics
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), action_mask, dim=None)
        return loss, metrics["clipfrac"], ppo_kl, vllm_kl, is_filter_ratio

    def _is_correction(self, old_log_probs, rollout_log_probs, action_mask):
        """The train/rollout mismatch coefficient per token (detached) and which units the gate
        rejects or clamps, by OpenRLHF's rule: a statistic per token or per sequence, the ratio
        pi_old / pi_rollout or a divergence of the sampled token's probabilities, gated to
        [low, high]; mode "mask" keeps the token ratio inside the band and 0 outside, mode "clip"
        clamps the ratio to the band."""
        low, high = self.is_correction_threshold
        per_seq = self.is_correction_level == "seq"
        log_ratio = (old_log_probs - rollout_log_probs).detach()
        if self.is_correction_gating == "ratio":
            stat = masked_mean(log_ratio, action_mask, dim=-1).unsqueeze(-1) if per_seq else log_ratio
            stat = stat.exp()
        else:
            p_rollout = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            p_old = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "tv":
                stat = (p_rollout - p_old).abs()
            else:  # binary_kl: KL between Bernoulli(p_rollout) and Bernoulli(p_old)
                stat = p_rollout * (p_rollout / p_old).log() + (1 - p_rollout) * ((1 - p_rollout) / (1 - p_old)).log()
            if per_seq:
                stat = masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            return stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        keep = (stat >= low) & (stat <= high)  # a NaN statistic is dropped
        return torch.where(keep, log_ratio.exp(), 0.0), ~keep


_saved = {}


def enable(**options):
    """Make this process's `ActorPPOTrainer` build `KPOPolicyLoss` and log KPO's metrics.

    Replaces the `PolicyLoss` that `openrlhf.trainer.ray.ppo_actor` looks up when a trainer is
    constructed (trainers built before the call keep theirs) and wraps
    `ActorPPOTrainer.training_step` to add `kpo/<name>` metrics. Calling it again replaces the
    options. The launcher (`main`) calls it in every actor process.

    Args:
        **options: keyword arguments of `KPO_OPTIONS` (q, r, p0, x0, mask_mode, log_ratio_cap, backend,
            metrics).

    Raises:
        TypeError: an unknown option. ValueError: an option `kpo_loss` refuses.
    """
    from openrlhf.trainer.ray import ppo_actor

    unknown = set(options) - set(KPO_OPTIONS)
    if unknown:
        raise TypeError(f"enable got unexpected options {sorted(unknown)}; known: {sorted(KPO_OPTIONS)}")
    KPOPolicyLoss(**options)  # check the options before anything is replaced
    if not _saved:
        _saved.update(PolicyLoss=ppo_actor.PolicyLoss, training_step=ppo_actor.ActorPPOTrainer.training_step)

    def policy_loss(*args, **kwargs):
        return KPOPolicyLoss(*args, **kwargs, **options)

    original_step = _saved["training_step"]

    def training_step(self, *args, **kwargs):
        status = original_step(self, *args, **kwargs)
        logged = self.actor_loss_fn.metrics if isinstance(self.actor_loss_fn, KPOPolicyLoss) else {}
        for name in (name for name in LOGGED_METRICS if name in logged):  # metrics="basic": no diagnostics
            status["metrics"][f"kpo/{name}"] = self.actor_loss_fn.metrics[name].detach()
            status["weights"][f"kpo/{name}"] = "token"
        return status

    ppo_actor.PolicyLoss = policy_loss
    ppo_actor.ActorPPOTrainer.training_step = training_step


def disable():
    """Undo `enable`: trainers constructed afterwards use OpenRLHF's `PolicyLoss` again.

    Returns:
        None.
    """
    if _saved:
        from openrlhf.trainer.ray import ppo_actor

        ppo_actor.PolicyLoss = _saved.pop("PolicyLoss")
        ppo_actor.ActorPPOTrainer.training_step = _saved.pop("training_step")


def split_arguments(argv):
    """Separate the launcher's `--kpo.<name> value` flags from OpenRLHF's arguments.

    Args:
        argv: the command-line arguments (without the program name).

    Returns:
        (options, rest): the KPO options as a dict of numbers or strings, and the other
        arguments in their order.

    Raises:
        ValueError: an unknown `--kpo.` flag or one without a value.
    """
    options, rest, i = {}, [], 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--kpo."):
            rest.append(flag)
            i += 1
            continue
        name, _, value = flag[len("--kpo."):].partition("=")
        if name not in KPO_OPTIONS:
            raise ValueError(f"unknown flag --kpo.{name}; known: {', '.join('--kpo.' + k for k in KPO_OPTIONS)}")
        if not value:
            if i + 1 >= len(argv):
                raise ValueError(f"--kpo.{name} needs a value")
            value, i = argv[i + 1], i + 1
        default = KPO_OPTIONS[name]
        if isinstance(default, str) or value.lower() == "none":
            options[name] = value if isinstance(default, str) else None
        else:
            try:
                options[name] = float(value)
            except ValueError:
                raise ValueError(f"--kpo.{name} must be a number (or none, where the option allows it), got {value!r}") from None
        i += 1
    return options, rest


def main(argv=None):
    """The launcher: `openrlhf.cli.train_ppo_ray` with `KPOPolicyLoss` as the actor's loss.

    `--kpo.<name> value` flags set `KPO_OPTIONS`; every other argument goes to OpenRLHF, whose
    `ray.init` gets two more `runtime_env` entries: the options (environment variable
    `KPO_OPENRLHF_OPTIONS`) and the `worker_process_setup_hook`
    `kpo_kernels.integrations._openrlhf_worker.setup`, which calls `enable` in each Ray worker
    that imports OpenRLHF's actor module (the vLLM engines never do, and never import this).

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        None (OpenRLHF's training runs to its end).

    Raises:
        ValueError: a bad `--kpo.` flag; what OpenRLHF raises.
    """
    import runpy

    import ray

    from ._openrlhf_worker import ENV_VAR, HOOK

    options, rest = split_arguments(sys.argv[1:] if argv is None else argv)
    with config_names({name: f"--kpo.{name}" for name in KPO_OPTIONS}):
        KPOPolicyLoss(**options)  # fail before Ray starts, naming the flag
    os.environ[ENV_VAR] = json.dumps(options)
    ray_init = ray.init

    def init_with_options(*args, runtime_env=None, **kwargs):
        runtime_env = dict(runtime_env or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), ENV_VAR: os.environ[ENV_VAR]}
        runtime_env["worker_process_setup_hook"] = HOOK
        return ray_init(*args, runtime_env=runtime_env, **kwargs)

    ray.init = init_with_options
    sys.argv = ["openrlhf.cli.train_ppo_ray", *rest]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
