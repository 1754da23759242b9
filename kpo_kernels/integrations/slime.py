"""KPO as slime's custom loss, with context parallelism: `kpo_policy_loss`.

slime (THUDM/slime, Megatron backend) calls `fn(args, batch, logits, sum_of_sample_mean)` for
`--loss-type custom_loss --custom-loss-function-path kpo_kernels.integrations.slime.kpo_policy_loss`
(docs/slime.md). Read from slime 0.3.1 (commit 624b824):

- Under context parallelism (cp > 1) a rank holds, of every sample of the micro-batch, the
  response tokens of two of the sample's 2 cp chunks: the whole sequence (prompt + response) is
  cut into chunks of ceil(total / (2 cp)) positions, rank r holds chunks r and 2 cp - 1 - r, and
  response token j is predicted at position prompt - 1 + j (`get_logits_and_tokens_offset_with_cp`).
  The rank's per-sample log-probs, old log-probs and advantages are those tokens, chunk r's then
  chunk 2 cp - 1 - r's; `loss_masks` are whole responses. With `--allgather-cp` slime
  redistributes log-probs into the same layout. With cp = 1 the rule gives the whole response.
- slime sums the loss over the micro-batch's samples, each sample's token losses divided by its
  rollout's valid-token count (`rollout_mask_sums`; `--calculate-per-token-loss`: not divided),
  and every CP rank returns its part: the sum over the CP group is the whole micro-batch's loss.
  Logged values are summed over micro-batches and DP x CP ranks before slime divides them.

The filter needs, at a rank's chunk, the state after the chunks before it on other ranks: the rank
describes its chunks as `Pieces` (`slime_pieces`, pure, no slime needed) and
`context_parallel_kpo_loss` carries the state across the CP group (docs/math.md section 7). The
loss is `agg="token-sum"` with the per-sample weight 1 / rollout_mask_sums as `is_weights`:
slime's own reduction, to rounding.

Everything else is slime's, from its own functions: log-probs and entropy from the logits
(`get_log_probs_and_entropy`, with rollout temperature and top-p replay), the entropy bonus and the
KL loss through `sum_of_sample_mean`. The KPO options come from `args` (attributes `kpo_q`,
`kpo_r`, ... that slime's `--custom-config-path` YAML sets, `KPO_ARGS`); the clip is slime's
`--eps-clip`, `--eps-clip-high`, `--eps-clip-c`.
"""

import itertools
from typing import NamedTuple

import torch

from ..api import KPOLoss, kpo_loss
from ..validation import check_metrics

__all__ = ["KPO_ARGS", "LOGGED_METRICS", "SlimePiece", "slime_pieces", "kpo_options", "cp_rank_loss",
           "kpo_policy_loss"]

# slime `args` attributes (set by --custom-config-path's YAML) -> kpo_loss keyword, and default.
KPO_ARGS = {"kpo_q": ("q", 1e-6), "kpo_r": ("r", 1.0), "kpo_p0": ("p0", 0.0), "kpo_x0": ("x0", 0.0),
            "kpo_mask_mode": ("mask_mode", "skip"), "kpo_log_ratio_cap": ("log_ratio_cap", 10.0),
            "kpo_backend": ("backend", "auto"), "kpo_metrics": ("metrics", "full")}
# kpo_loss metrics logged as `kpo_<name>` (slime's "train/kpo_<name>"); kpo_metrics: basic leaves
# out the diagnostics among them (nis_mean, the sign flips), which kpo_loss then does not compute.
LOGGED_METRICS = ("ratio_mean", "ratio_max", "raw_ratio_mean", "raw_ratio_max", "nis_mean", "sign_flip_raw",
                  "sign_flip_filtered", "capfrac")


class SlimePiece(NamedTuple):
    """One chunk of one sample's response held by a rank: response tokens [start, stop) of
    sample `sequence`, the `order`-th of its 2 cp chunks (empty when start == stop)."""

    sequence: int
    order: int
    start: int
    stop: int


def slime_pieces(total_lengths, response_lengths, cp_rank, cp_size):
    """The response tokens a CP rank holds in slime's zigzag layout, in its local order.

    Args:
        total_lengths, response_lengths: per sample of the micro-batch, prompt + response and
            response token counts (slime's batch keys of the same names).
        cp_rank, cp_size: the rank's place in its context-parallel group and the group's size.

    Returns:
        A list of 2 S `SlimePiece`: per sample, chunk `cp_rank` then chunk `2 cp_size - 1 -
        cp_rank`. The rank's per-sample tensors are those pieces' tokens concatenated.

    Raises:
        ValueError: lengths of different counts, a response longer than its sequence, or a
            rank outside 0..cp_size - 1.
    """
    total_lengths, response_lengths = [int(n) for n in total_lengths], [int(n) for n in response_lengths]
    if len(total_lengths) != len(response_lengths):
        raise ValueError(f"total_lengths has {len(total_lengths)} samples, response_lengths {len(response_lengths)}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside 0..{cp_size - 1}")
    pieces = []
    for s, (total, response) in enumerate(zip(total_lengths, response_lengths)):
        if not 0 <= response < total:
            raise ValueError(f"sample {s}: response_length={response} must be in [0, total_length={total})")
        width = -(-total // (2 * cp_size))
        first = total - response - 1  # the position that predicts response token 0
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            lo, hi = max(chunk * width, first), min((chunk + 1) * width, total - 1)
            start, stop = (lo - first, hi - first) if lo < hi else (0, 0)
            pieces.append(SlimePiece(s, chunk, start, stop))
    return pieces


def kpo_options(args):
    """kpo_loss keywords from slime's `args`: `KPO_ARGS` and slime's clip flags.

    Args:
        args: slime's argument namespace. `kpo_*` attributes (from `--custom-config-path`) set the
            filter; `eps_clip`, `eps_clip_high` (None: eps_clip) and `eps_clip_c` the clip.

    Returns:
        A dict of `kpo_loss` keywords (no tensors).

    Raises:
        TypeError: a `kpo_*` attribute this adapter does not know (a typo would otherwise be
            ignored). ValueError: a value `kpo_loss` refuses, or a slime setting KPO does not
            support (`_refuse`).
    """
    _refuse(args)
    unknown = sorted(k for k in vars(args) if k.startswith("kpo_") and k not in KPO_ARGS)
    if unknown:
        raise TypeError(f"unknown KPO settings {unknown} in slime's args; known: {sorted(KPO_ARGS)}")
    options = {name: getattr(args, key, default) for key, (name, default) in KPO_ARGS.items()}
    check_metrics(options["metrics"], "kpo_metrics")  # by slime's name for it
    clip_high = getattr(args, "eps_clip_high", None)
    options.update(clip_low=args.eps_clip, clip_high=args.eps_clip if clip_high is None else clip_high,
                   dual_clip=getattr(args, "eps_clip_c", None))
    KPOLoss(**options, agg="token-sum")  # refuses a bad value now, naming it
    return options


def _refuse(args):
    estimator = getattr(args, "advantage_estimator", None)
    if estimator in ("gspo", "cispo"):
        raise ValueError(f"--advantage-estimator {estimator}: its loss is not the clipped per-token surrogate that KPO "
                         "filters (GSPO: a sequence ratio; CISPO: a clipped weight); use grpo, ppo or reinforce_plus_plus*")
    for flag, name in (("use_opsm", "--use-opsm"), ("use_tis", "--use-tis"),
                       ("get_mismatch_metrics", "--get-mismatch-metrics")):
        if getattr(args, flag, False):
            raise ValueError(f"{name}: not supported by the KPO adapter (docs/slime.md)")
    if getattr(args, "custom_pg_loss_reducer_function_path", None) is not None:
        raise ValueError("--custom-pg-loss-reducer-function-path: the KPO adapter reduces the loss as slime's "
                         "sum_of_sample_mean does; a custom pg_loss reducer is not applied")


def cp_rank_loss(log_probs, old_log_probs, advantages, loss_masks, total_lengths, response_lengths, *, cp_rank,
                 cp_size, group=None, denominators=None, per_token_loss=False, **options):
    """This CP rank's part of the KPO loss of a micro-batch in slime's layout (no slime needed).

    Args:
        log_probs, old_log_probs, advantages: per sample, 1-D tensors of the rank's response
            tokens in slime's layout (`slime_pieces`); `log_probs` gets the gradient.
        loss_masks: per sample, the whole response's mask (slime's `loss_masks`).
        total_lengths, response_lengths, cp_rank, cp_size: as in `slime_pieces`.
        group: the context-parallel process group (None: the default group); not used when
            cp_size is 1 (then the responses are whole: a packed `kpo_loss`).
        denominators: per sample, slime's `rollout_mask_sums` (None: each mask's own sum); each
            sample's token losses are divided by it, at least 1. Ignored with `per_token_loss`.
        per_token_loss: slime's `--calculate-per-token-loss`: the plain sum of token losses.
        **options: `kpo_loss` keywords (`kpo_options`).

    Returns:
        (loss, metrics): the rank's part of the micro-batch loss (summed over the CP group: the
        loss of the whole responses, as slime's reduction forms it; the gradient at the rank's
        tokens is the whole loss's) and `kpo_loss`'s metrics of the whole micro-batch, the same
        on every rank.
    """
    pieces = slime_pieces(total_lengths, response_lengths, cp_rank, cp_size)
    num = len(response_lengths)
    local = [sum(p.stop - p.start for p in pieces[2 * s:2 * s + 2]) for s in range(num)]
    for name, values in (("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages)):
        got = [int(v.shape[0]) for v in values]
        if got != local:
            raise ValueError(f"{name}: per-sample lengths {got}, but slime's CP layout gives rank {cp_rank} of "
                             f"{cp_size} the lengths {local}")
    log_prob = torch.cat(list(log_probs))
    device = log_prob.device
    mask = torch.cat([loss_masks[p.sequence][p.start:p.stop].to(device) for p in pieces]).bool()
    weights = None
    if not per_token_loss:
        if denominators is None:
            denominators = [m.sum() for m in loss_masks]
        denominators = torch.stack([torch.as_tensor(d, dtype=torch.float64, device=device) for d in denominators]
                                   ) if num else torch.zeros(0, dtype=torch.float64, device=device)
        weights = (1.0 / denominators.clamp(min=1.0)).to(torch.promote_types(log_prob.dtype, torch.float32))
        weights = torch.repeat_interleave(weights, torch.tensor(local, device=device), output_size=log_prob.shape[0])
    tensors = (log_prob, torch.cat(list(old_log_probs)).to(device), torch.cat(list(advantages)).to(device), mask)
    if cp_size == 1:  # whole responses, one after the other: a packed batch
        cu_seqlens = torch.tensor([0, *itertools.accumulate(local)], dtype=torch.int64, device=device)
        return kpo_loss(*tensors, cu_seqlens=cu_seqlens, agg="token-sum", is_weights=weights, **options)
    from ..context_parallel import Pieces, context_parallel_kpo_loss

    layout = Pieces(lengths=torch.tensor([p.stop - p.start for p in pieces], dtype=torch.int64),
                    sequence=torch.tensor([p.sequence for p in pieces], dtype=torch.int64),
                    order=torch.tensor([p.order for p in pieces], dtype=torch.int64), num_sequences=num)
    return context_parallel_kpo_loss(*tensors, group=group, layout=layout, agg="token-sum", is_weights=weights,
                                     **options)


def kpo_policy_loss(args, batch, logits, sum_of_sample_mean):
    """slime's `policy_loss_function` with the KPO surrogate, for `--custom-loss-function-path`.

    Args:
        args: slime's arguments (`kpo_options` lists what is read).
        batch: slime's micro-batch: `unconcat_tokens`, `total_lengths`, `response_lengths`,
            `loss_masks`, `advantages`, `log_probs` or (`--use-rollout-logprobs`)
            `rollout_log_probs`, `rollout_mask_sums`, and `ref_log_probs` with `--use-kl-loss`.
        logits: the policy's logits on this rank, [1, T, V] float32.
        sum_of_sample_mean: slime's reducer for this micro-batch (used for entropy, KL and the
            logged values).

    Returns:
        (loss, metrics) as slime's loss functions return them: the rank's part of the
        micro-batch loss (KPO loss - entropy_coef * entropy + kl_loss_coef * KL), and 0-dim
        tensors `loss`, `pg_loss`, `entropy_loss`, `pg_clipfrac`, `ppo_kl` (`kl_loss`), and
        `kpo_<name>` for `LOGGED_METRICS`, each this rank's part of a sum over samples, as slime
        logs its own.

    Raises:
        ValueError, TypeError: see `kpo_options`; per-sample lengths that do not match slime's CP
            layout.
    """
    from megatron.core import mpu
    from slime.backends.megatron_utils.loss import get_log_probs_and_entropy, get_rollout_top_p_logprob_kwargs
    from slime.utils.ppo_utils import compute_approx_kl

    options = kpo_options(args)
    total_lengths, response_lengths = batch["total_lengths"], batch["response_lengths"]
    _, outputs = get_log_probs_and_entropy(
        logits, args=args, unconcat_tokens=batch["unconcat_tokens"], total_lengths=total_lengths,
        response_lengths=response_lengths, with_entropy=True, **get_rollout_top_p_logprob_kwargs(args, batch),
    )
    log_probs = outputs["log_probs"]
    old = batch["rollout_log_probs"] if args.use_rollout_logprobs else batch.get("log_probs")
    if not old:  # slime's rule: on-policy, the old policy is the current one
        old = [lp.detach() for lp in log_probs]
    cp_size = mpu.get_context_parallel_world_size()
    pg_loss, metrics = cp_rank_loss(
        log_probs, old, batch["advantages"], batch["loss_masks"], total_lengths, response_lengths,
        cp_rank=mpu.get_context_parallel_rank(), cp_size=cp_size,
        group=mpu.get_context_parallel_group() if cp_size > 1 else None, denominators=batch.get("rollout_mask_sums"),
        per_token_loss=args.calculate_per_token_loss, **options,
    )
    log_prob, old_log_prob = torch.cat(log_probs), torch.cat(old)
    entropy_loss = sum_of_sample_mean(torch.cat(outputs["entropy"]))
    loss = pg_loss - args.entropy_coef * entropy_loss
    reported = {}
    if args.use_kl_loss:
        ratio = torch.exp(log_prob - old_log_prob) if getattr(args, "use_unbiased_kl", False) else None
        kl = compute_approx_kl(log_prob, torch.cat(batch["ref_log_probs"]), kl_loss_type=args.kl_loss_type,
                               importance_ratio=ratio)
        reported["kl_loss"] = sum_of_sample_mean(kl).detach()
        loss = loss + args.kl_loss_coef * sum_of_sample_mean(kl)
    if log_prob.numel() == 0:  # slime's rule: keep the graph through the logits on every rank
        loss = loss + 0 * logits.sum()
    # A micro-batch metric logged as if each valid token carried it: slime sums these parts over
    # CP ranks, micro-batches and DP ranks, then divides as it does its own.
    weight = sum_of_sample_mean(torch.ones_like(log_prob, dtype=torch.float32)).detach()
    return loss, {
        "loss": loss.detach(), "pg_loss": pg_loss.detach(), "entropy_loss": entropy_loss.detach(),
        "pg_clipfrac": metrics["clipfrac"] * weight, "ppo_kl": sum_of_sample_mean(old_log_prob - log_prob).detach(),
        **reported, **{f"kpo_{name}": metrics[name] * weight for name in LOGGED_METRICS if name in metrics},
    }
