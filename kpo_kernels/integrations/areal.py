"""KPO as AReaL's (1.0.x) actor loss: `kpo_grpo_loss_fn`, a drop-in for `grpo_loss_fn`.

AReaL has no loss registry: `PPOActor._ppo_update` looks up `areal.trainer.ppo.actor.grpo_loss_fn`
for every PPO update and hands it to `engine.train_batch`. `enable(q=..., r=...)` replaces that
name with `kpo_grpo_loss_fn` bound to KPO's options, in the process that calls it; call it at the
top of the training script, before the trainer is built (docs/areal.md). Everything but the
surrogate is AReaL's, from its own functions: the proximal log-prob (`prox_logp_method`), M2PO
masking, rejection sampling of the behaviour weight, the per-micro-batch token mean that the
engine rescales by loss weight, and the statistics logged to `stats_tracker`.

What maps to what (AReaL's `actor.*` config -> `kpo_loss`):

- the ratio KPO filters is AReaL's PPO ratio, log pi_theta - log pi_prox (with
  `use_decoupled_loss=false` AReaL sets pi_prox to the behaviour policy, so it is the
  behaviour ratio); `eps_clip` / `eps_clip_higher` clip the *filtered* ratio (`clip_low`,
  `clip_high`); `c_clip` is `dual_clip` (the same rule);
- the decoupled objective's behaviour weight pi_prox / pi_behave, after AReaL's
  `rejection_sampling` (mask or clamp), is `is_weights`, unfiltered; tokens rejected by
  rejection sampling or M2PO leave the loss and the filter, and the mean divides by AReaL's count
  (`batch_num_tokens`), as `ppo_actor_loss_fn` does;
- `importance_sampling_level=sequence` (GSPO), `use_sapo_loss` and distillation (`teacher_logp`)
  have no KPO counterpart and are refused.
"""

import functools

import torch
from areal.trainer.ppo import actor as areal_actor
from areal.trainer.ppo.stats import infer_token_denominator
from areal.utils import stats_tracker
from areal.utils.functional import functional as areal_functional

from ..api import kalman_filter, kpo_loss
from ..fit_options import (
    PER_STEP_MAX_TOKENS, check_fit_mode, check_fit_prior, check_fit_range, check_max_tokens, check_min_tokens,
)
from ..tracker import FIT_METRICS, NoiseTracker

__all__ = ["KPO_OPTIONS", "LOGGED_METRICS", "kpo_grpo_loss_fn", "enable", "disable"]

# Keyword options of kpo_grpo_loss_fn beyond grpo_loss_fn's, with their defaults.
KPO_OPTIONS = {"q": 1e-6, "r": 1.0, "p0": 0.0, "x0": 0.0, "mask_mode": "skip", "log_ratio_cap": 10.0,
               "backend": "auto", "kalman_fit": "off", "kalman_fit_q_min": 1e-10, "kalman_fit_q_max": 1e2,
               "kalman_fit_min_tokens": 64, "kalman_fit_max_tokens": PER_STEP_MAX_TOKENS, "metrics": "full"}
# kpo_loss metrics logged per micro-batch with stats_tracker.scalar as `kpo_<name>` (in AReaL's
# "update" scope: `update/kpo_<name>`); with kalman_fit the NoiseTracker's FIT_METRICS too.
LOGGED_METRICS = ("ratio_mean", "ratio_max", "raw_ratio_mean", "raw_ratio_max", "nis_mean", "sign_flip_raw",
                  "sign_flip_filtered", "capfrac")
_FILTER_KEYS = ("q", "r", "p0", "x0", "mask_mode")


def _check_options(options):
    """The options with defaults filled in, checked; the NoiseTracker (or None) they define."""
    unknown = set(options) - set(KPO_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected KPO options {sorted(unknown)}; known: {sorted(KPO_OPTIONS)}")
    options = {**KPO_OPTIONS, **options}
    kpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
             **{k: options[k] for k in (*_FILTER_KEYS, "log_ratio_cap", "backend", "metrics")})
    mode = check_fit_mode("kalman_fit", options["kalman_fit"])
    q_range = check_fit_range("kalman_fit_q_min, kalman_fit_q_max", (options["kalman_fit_q_min"], options["kalman_fit_q_max"]))
    min_tokens = check_min_tokens("kalman_fit_min_tokens", options["kalman_fit_min_tokens"])
    max_tokens = check_max_tokens("kalman_fit_max_tokens", options["kalman_fit_max_tokens"])
    if mode == "off":
        return options, None
    check_fit_prior("p0", float(options["p0"]) / float(options["r"]), mode)
    tracker = NoiseTracker(mode, **{k: options[k] for k in _FILTER_KEYS}, q_range=q_range, min_tokens=min_tokens,
                           max_tokens=max_tokens)
    return options, tracker


def _refuse(use_sapo_loss, importance_sampling_level, input_data):
    if use_sapo_loss:
        raise ValueError("actor.use_sapo_loss=true: SAPO's soft gates replace the clipped surrogate that KPO filters; "
                         "use actor.use_sapo_loss=false with KPO")
    if importance_sampling_level != "token":
        raise ValueError(f"actor.importance_sampling_level={importance_sampling_level!r}: KPO filters per-token ratios "
                         "and has no sequence-ratio (GSPO) counterpart; use 'token'")
    if input_data.get("teacher_logp") is not None:
        raise ValueError("teacher_logp in the batch (AReaL's distillation loss): not supported with KPO's actor loss")


def kpo_grpo_loss_fn(
    logprobs,
    entropy,
    input_data,
    eps_clip,
    eps_clip_higher,
    c_clip,
    rejection_sampling=None,
    m2_threshold=None,
    importance_sampling_level="token",
    current_version=None,
    prox_logp_method="recompute",
    use_sapo_loss=False,
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    use_decoupled_loss=False,
    vocab_min_logits=None,
    vocab_max_logits=None,
    *,
    kpo=None,
    tracker=None,
):
    """AReaL's `grpo_loss_fn` with the KPO surrogate: same arguments, same return, same statistics.

    Args:
        logprobs, entropy, input_data, eps_clip, eps_clip_higher, c_clip, rejection_sampling,
        m2_threshold, importance_sampling_level, current_version, prox_logp_method,
        use_sapo_loss, sapo_tau_pos, sapo_tau_neg, use_decoupled_loss, vocab_min_logits,
        vocab_max_logits: AReaL's, as `PPOActor._ppo_update` and the engine pass them (packed
            1-D tensors with `input_data["cu_seqlens"]`, or padded 2-D ones).
        kpo: dict of `KPO_OPTIONS` (None: the defaults). `enable` binds it.
        tracker: a `NoiseTracker` for `kalman_fit` (None: q and r as given). `enable` binds it.

    Returns:
        The micro-batch's loss, a 0-dim tensor: the token mean of the KPO per-token loss over
        AReaL's loss mask (the engine rescales it by loss weight, as it does AReaL's).

    Raises:
        ValueError: SAPO, GSPO (`importance_sampling_level="sequence"`) or distillation, which
            have no KPO counterpart; what AReaL's helpers or `kpo_loss` raise.
    """
    _refuse(use_sapo_loss, importance_sampling_level, input_data)
    options = {**KPO_OPTIONS, **(kpo or {})}
    old_logp = input_data["logprobs"]
    advantages = input_data["advantages"]
    loss_mask = input_data["loss_mask"].bool()
    cu_seqlens = input_data.get("cu_seqlens") if logprobs.ndim == 1 else None
    prox_logp_gt = input_data.get("prox_logp")
    entropy = entropy.detach()
    prox_logp = areal_actor._resolve_proximal_logp(
        prox_logp_gt=prox_logp_gt, prox_logp_method=prox_logp_method, old_logp=old_logp,
        logprobs=logprobs.detach(), versions=input_data.get("versions"), current_version=current_version,
    )
    if m2_threshold is not None:
        loss_mask = areal_actor._apply_m2po_masking(old_logp, prox_logp, loss_mask, m2_threshold)
    # ppo_actor_loss_fn's denominator: the count before rejection sampling masks tokens.
    count = loss_mask.count_nonzero().clamp(min=1)
    weights, stat, logged_mask = None, {}, loss_mask  # AReaL's statistics count tokens before rejection
    if rejection_sampling is not None:
        rs = areal_functional.apply_rejection_sampling(
            proximal_logprobs=prox_logp, old_logprobs=old_logp, loss_mask=loss_mask, cu_seqlens=cu_seqlens,
            config=rejection_sampling,
        )
        loss_mask, weights = rs.loss_mask.bool(), rs.behave_imp_weight.detach()
        behave_mask = (weights > 0) & loss_mask
        stat = dict(behave_imp_weight=weights, behave_approx_kl=torch.where(behave_mask, prox_logp - old_logp, 0.0).detach(),
                    behave_mask=behave_mask, filtered_fraction=rs.filtered_fraction)

    filter_options = {k: options[k] for k in _FILTER_KEYS}
    raw = (logprobs.detach() - prox_logp).float()
    if tracker is not None:
        if current_version is not None and current_version != getattr(tracker, "_areal_version", None):
            tracker._areal_version = current_version  # a new rollout batch: AReaL's policy version moved
            tracker.new_generation()
        stale = bool(((raw != 0) & loss_mask).any())
        filter_options.update(tracker(raw, loss_mask, cu_seqlens=cu_seqlens, stale=stale))
    clip_high = eps_clip if eps_clip_higher is None else eps_clip_higher
    loss, metrics = kpo_loss(
        logprobs, prox_logp, advantages, loss_mask, clip_low=eps_clip, clip_high=clip_high, dual_clip=c_clip,
        log_ratio_cap=options["log_ratio_cap"], agg="token-mean", batch_num_tokens=count, is_weights=weights,
        cu_seqlens=cu_seqlens, backend=options["backend"], metrics=options["metrics"], **filter_options,
    )
    _log(logprobs.detach(), entropy, input_data, old_logp, prox_logp, prox_logp_gt, loss_mask, logged_mask, advantages, raw,
         weights, stat, eps_clip, clip_high, c_clip, options, filter_options, cu_seqlens, metrics, tracker,
         prox_logp_method, current_version, vocab_min_logits, vocab_max_logits)
    return loss


def _log(logprobs, entropy, input_data, old_logp, prox_logp, prox_logp_gt, loss_mask, logged_mask, advantages, raw, weights, stat,
         eps_clip, clip_high, c_clip, options, filter_options, cu_seqlens, metrics, tracker, prox_logp_method,
         current_version, vocab_min_logits, vocab_max_logits):
    """grpo_loss_fn's statistics, with KPO's filtered ratio where AReaL logs its ratio, and KPO's."""
    filtered = kalman_filter(raw, loss_mask, cu_seqlens=cu_seqlens, backend=options["backend"], **filter_options)
    if options["log_ratio_cap"] is not None:
        filtered = filtered.clamp(max=options["log_ratio_cap"])
    ratio = torch.where(loss_mask, filtered.exp(), 0.0)
    pg1, pg2 = -advantages * ratio, -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + clip_high)
    clip_mask = (pg1 < pg2) & loss_mask
    token_loss = torch.max(pg1, pg2)
    dual_clip_mask = torch.zeros_like(clip_mask)
    if c_clip is not None:
        bound = torch.sign(advantages) * c_clip * advantages
        dual_clip_mask = (bound < token_loss) & loss_mask
        token_loss = torch.min(token_loss, bound)
    if weights is not None:
        token_loss = token_loss * weights
    stats_tracker.denominator(
        n_tokens=infer_token_denominator(input_data, logged_mask), n_valid_tokens=logged_mask,
        clipped_tokens=clip_mask, dual_clipped_tokens=dual_clip_mask,
    )
    stats_tracker.stat(
        importance_weight=ratio, approx_kl=logprobs - prox_logp, new_logp=logprobs, old_logp=old_logp,
        entropy=entropy.float(), actor_loss=token_loss, clip_ratio=clip_mask.float(),
        dual_clip_ratio=dual_clip_mask.float(), kpo_raw_importance_weight=torch.where(loss_mask, raw.exp(), 0.0),
        denominator="n_valid_tokens",
    )
    if "behave_imp_weight" in stat:
        stats_tracker.denominator(unclipped_behave_tokens=stat["behave_mask"])
        stats_tracker.stat(behave_imp_weight=stat["behave_imp_weight"], behave_approx_kl=stat["behave_approx_kl"],
                           denominator="unclipped_behave_tokens")
        stats_tracker.scalar(rs_filtered_fraction=stat["filtered_fraction"])
    if vocab_min_logits is not None and vocab_max_logits is not None:
        stats_tracker.stat(vocab_min_logits=vocab_min_logits, vocab_max_logits=vocab_max_logits, denominator="n_tokens")
    stats_tracker.stat(clipped_new_logp=torch.where(clip_mask, logprobs, 0.0),
                       clipped_old_logp=torch.where(clip_mask, old_logp, 0.0), denominator="clipped_tokens")
    compute_logp_mask = stat.get("behave_mask", logged_mask)
    areal_actor._log_proximal_approximation_stats(
        prox_logp_method=prox_logp_method, prox_logp_gt=prox_logp_gt, old_logp=old_logp, logprobs=logprobs,
        versions=input_data.get("versions"), current_version=current_version, compute_logp_mask=compute_logp_mask,
    )
    if "versions" in input_data and current_version is not None:
        areal_actor._log_version_staleness_stats(versions=input_data["versions"], current_version=current_version,
                                                 version_metrics_mask=compute_logp_mask)
    shown = [name for name in LOGGED_METRICS if name in metrics]  # metrics="basic": no diagnostics
    values = torch.stack([metrics[name].float() for name in shown]).tolist()  # one host read
    scalars = {f"kpo_{name}": value for name, value in zip(shown, values)}
    if tracker is not None:
        scalars.update({f"kpo_{name}": float(tracker.metrics[name]) for name in FIT_METRICS})
    stats_tracker.scalar(**scalars)


_saved = {}


def enable(**options):
    """Make AReaL's PPO actor in this process train with `kpo_grpo_loss_fn`.

    Replaces `areal.trainer.ppo.actor.grpo_loss_fn`, which `PPOActor._ppo_update` looks up at
    every update, by `kpo_grpo_loss_fn` bound to the options (and a fresh `NoiseTracker` when
    `kalman_fit` is not "off"). Calling it again replaces the options.

    Args:
        **options: keywords of `KPO_OPTIONS`: q, r, p0, x0, mask_mode, log_ratio_cap, backend
            (as in `kpo_loss`; log_ratio_cap caps the filtered log-ratio), kalman_fit ("off",
            "per_generation": fitted on the first stale micro-batch after AReaL's policy version
            changes, "per_step": every micro-batch), kalman_fit_q_min, kalman_fit_q_max,
            kalman_fit_min_tokens, kalman_fit_max_tokens (the NoiseTracker's q_range, min_tokens
            and max_tokens: the per-step fit's budget, None for every sequence).

    Returns:
        The bound loss function now in place (a `functools.partial`).

    Raises:
        TypeError: an unknown option. ValueError: an option `kpo_loss` or `NoiseTracker` refuses.
    """
    options, tracker = _check_options(options)
    if not _saved:
        _saved["grpo_loss_fn"] = areal_actor.grpo_loss_fn
    loss_fn = functools.partial(kpo_grpo_loss_fn, kpo=options, tracker=tracker)
    areal_actor.grpo_loss_fn = loss_fn
    return loss_fn


def disable():
    """Undo `enable`: AReaL's own `grpo_loss_fn` again.

    Returns:
        None.
    """
    if _saved:
        areal_actor.grpo_loss_fn = _saved.pop("grpo_loss_fn")
