"""KPO as slime's custom loss under context parallelism (kpo_kernels.integrations.slime).

slime is not installable from a package registry, so nothing here imports it. What is tested:
the rank layout (`slime_pieces`) against the chunking rule as read in slime 0.3.1's
`cp_utils.get_logits_and_tokens_offset_with_cp` / `slice_log_prob_with_cp`, written below per
token (not per interval, as the adapter does); the options read from slime's `args`; and the
rank losses of real gloo process groups against the unsharded `kpo_loss` with slime's reduction.
"""

import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from kpo_kernels import DIAGNOSTIC_METRICS, kpo_loss
from kpo_kernels.integrations import slime as kpo_slime


def slime_rank_tokens(total, response, cp_rank, cp_size):
    """The response tokens rank `cp_rank` holds, in its local order, per slime's rule (read in
    `get_logits_and_tokens_offset_with_cp`): the whole sequence's positions are cut into 2 cp
    chunks of ceil(total / (2 cp)); the rank holds chunks cp_rank and 2 cp - 1 - cp_rank, in that
    order; response token j is predicted at position (total - response) - 1 + j."""
    width = -(-total // (2 * cp_size))
    chunk_of = [(total - response - 1 + j) // width for j in range(response)]
    return [j for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank) for j in range(response) if chunk_of[j] == chunk]


def random_lengths(rng, count):
    response = [rng.choice([0, 1, 2, 3, rng.randint(1, 40)]) for _ in range(count)]
    return [r + rng.choice([1, 2, rng.randint(1, 50)]) for r in response], response


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_pieces_are_slimes_layout_and_tile_each_response_once(cp_size):
    rng = random.Random(cp_size)
    for _ in range(200):
        total, response = random_lengths(rng, rng.randint(1, 5))
        every = []
        for rank in range(cp_size):
            pieces = kpo_slime.slime_pieces(total, response, rank, cp_size)
            assert len(pieces) == 2 * len(total)  # every rank: the same piece count
            for s in range(len(total)):
                mine = [j for p in pieces[2 * s:2 * s + 2] for j in range(p.start, p.stop)]
                assert mine == slime_rank_tokens(total[s], response[s], rank, cp_size)
            every += pieces
        for s in range(len(total)):
            ordered = sorted((p for p in every if p.sequence == s), key=lambda p: p.order)
            assert [p.order for p in ordered] == list(range(2 * cp_size))
            tokens = [j for p in ordered for j in range(p.start, p.stop)]
            assert tokens == list(range(response[s]))  # consecutive when sorted by order, each once


def test_pieces_refuse_inconsistent_lengths():
    with pytest.raises(ValueError, match="response_length=5"):
        kpo_slime.slime_pieces([5], [5], 0, 2)
    with pytest.raises(ValueError, match="samples"):
        kpo_slime.slime_pieces([5, 6], [2], 0, 2)
    with pytest.raises(ValueError, match="cp_rank=2"):
        kpo_slime.slime_pieces([5], [2], 2, 2)


def slime_args(**overrides):
    args = dict(eps_clip=3e-4, eps_clip_high=4e-4, eps_clip_c=None, advantage_estimator="grpo", use_opsm=False,
                use_tis=False, get_mismatch_metrics=False, custom_pg_loss_reducer_function_path=None)
    return SimpleNamespace(**{**args, **overrides})


def test_options_from_args():
    options = kpo_slime.kpo_options(slime_args(kpo_q=1e-4, kpo_r=0.5, eps_clip_high=None, eps_clip_c=3.0))
    assert options == {"q": 1e-4, "r": 0.5, "p0": 0.0, "x0": 0.0, "mask_mode": "skip", "log_ratio_cap": 10.0,
                       "backend": "auto", "metrics": "full", "clip_low": 3e-4, "clip_high": 3e-4, "dual_clip": 3.0}
    assert kpo_slime.kpo_options(slime_args(kpo_metrics="basic"))["metrics"] == "basic"


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"kpo_qq": 1.0}, TypeError, "kpo_qq"),
        ({"kpo_r": 0.0}, ValueError, "r"),
        ({"advantage_estimator": "gspo"}, ValueError, "gspo"),
        ({"advantage_estimator": "cispo"}, ValueError, "cispo"),
        ({"use_opsm": True}, ValueError, "--use-opsm"),
        ({"use_tis": True}, ValueError, "--use-tis"),
        ({"custom_pg_loss_reducer_function_path": "m.f"}, ValueError, "reducer"),
        ({"kpo_metrics": "diagnostics"}, ValueError, "kpo_metrics must be one of"),
    ],
)
def test_options_refused_by_name(overrides, error, match):
    with pytest.raises(error, match=match):
        kpo_slime.kpo_options(slime_args(**overrides))


OPTIONS = {"q": 1e-3, "r": 0.5, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "backend": "torch"}
# (total_lengths, response_lengths): one-token prompts, an empty response, responses shorter than
# a chunk (so that some ranks hold none of them), a fully masked sample.
LENGTHS = ([40, 9, 2, 30, 57, 25], [31, 4, 1, 0, 50, 3])


def micro_batch(seed, lengths=LENGTHS):
    """Whole responses in float64: current and old log-probs (a drifting log-ratio plus token
    noise), per-token advantages constant along each response (slime's GRPO), 0/1 int masks."""
    gen = torch.Generator().manual_seed(seed)
    total, response = lengths
    new = [-1.0 - torch.rand(n, generator=gen, dtype=torch.float64) for n in response]
    drift = [torch.cumsum(0.05 * torch.randn(n, generator=gen, dtype=torch.float64), 0) for n in response]
    old = [p - d - 0.2 * torch.randn(n, generator=gen, dtype=torch.float64) for p, d, n in zip(new, drift, response)]
    adv = [torch.full((n,), float(a), dtype=torch.float64) for n, a in zip(response, torch.randn(len(response), generator=gen))]
    masks = [(torch.rand(n, generator=gen) > 0.2).int() for n in response]
    masks[1].zero_()
    return total, response, new, old, adv, masks


def rollout_sums(masks):
    """slime's `rollout_mask_sums` when samples 2i and 2i + 1 are one rollout."""
    sums = [int(m.sum()) for m in masks]
    return [sums[i] + sums[i ^ 1] if (i ^ 1) < len(sums) else sums[i] for i in range(len(sums))]


def unsharded(batch, denominators, per_token_loss):
    """slime's reduction of KPO's token losses over whole responses, from `kpo_loss` on a
    right-padded batch: sum over samples of sum_t m L / max(denominator, 1), or the plain sum."""
    total, response, new, old, adv, masks = batch
    width = max(response)
    pad = lambda ts: torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0])) for t in ts])  # noqa: E731
    log_prob = pad(new).requires_grad_()
    if per_token_loss:
        weights = None
    else:
        den = [float(m.sum()) for m in masks] if denominators is None else [float(d) for d in denominators]
        weights = (1.0 / torch.tensor(den, dtype=torch.float64).clamp(min=1.0))[:, None].expand(len(response), width)
    loss, metrics = kpo_loss(log_prob, pad(old), pad(adv), pad(masks).bool(), agg="token-sum", is_weights=weights,
                             **OPTIONS)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), [grad[s, :n] for s, n in enumerate(response)], metrics


def rank_loss(batch, rank, cp_size, denominators, per_token_loss):
    """One CP rank: its slices of the whole responses, `cp_rank_loss`, the loss, the gradient at
    its tokens (scattered back into whole-response tensors, 0 elsewhere) and the metrics."""
    total, response, new, old, adv, masks = batch
    pieces = kpo_slime.slime_pieces(total, response, rank, cp_size)
    local = lambda ts: [torch.cat([ts[s][p.start:p.stop] for p in pieces[2 * s:2 * s + 2]]) for s in range(len(ts))]  # noqa: E731
    log_probs = [t.clone().requires_grad_() for t in local(new)]
    loss, metrics = kpo_slime.cp_rank_loss(
        log_probs, local(old), local(adv), masks, total, response, cp_rank=rank, cp_size=cp_size,
        denominators=denominators, per_token_loss=per_token_loss, **OPTIONS,
    )
    grads = torch.autograd.grad(loss, log_probs, allow_unused=True)
    whole = [torch.zeros(n, dtype=torch.float64) for n in response]
    for s, g in enumerate(grads):
        if g is not None:
            index = torch.tensor([j for p in pieces[2 * s:2 * s + 2] for j in range(p.start, p.stop)], dtype=torch.int64)
            whole[s][index] = g
    return loss.detach(), whole, {k: v.detach() for k, v in metrics.items()}


VARIANTS = [(None, False), ("rollout", False), (None, True)]


def check_against_unsharded(batch, results):
    """`results[variant]`: the (loss, whole-response gradients, metrics) of every rank."""
    for (denominators, per_token_loss), ranks in zip(VARIANTS, results):
        den = rollout_sums(batch[5]) if denominators == "rollout" else None
        loss, grads, metrics = unsharded(batch, den, per_token_loss)
        assert float(sum(r[0] for r in ranks)) == pytest.approx(float(loss), rel=1e-12, abs=1e-14)
        for s in range(len(grads)):
            torch.testing.assert_close(sum(r[1][s] for r in ranks), grads[s], rtol=1e-10, atol=1e-14)
        for _, _, rank_metrics in ranks:
            for name, value in metrics.items():
                torch.testing.assert_close(rank_metrics[name].to(value.dtype), value, rtol=1e-10, atol=1e-12,
                                           msg=lambda m, name=name: f"{name}: {m}")


def test_basic_metrics_leave_the_loss_and_gradient_alone(monkeypatch):
    """kpo_metrics: basic on a rank (cp = 1): the same loss, gradient and other metrics as full,
    no diagnostics among them."""
    batch = micro_batch(3)
    full = rank_loss(batch, 0, 1, None, False)
    monkeypatch.setitem(OPTIONS, "metrics", "basic")
    basic = rank_loss(batch, 0, 1, None, False)
    assert torch.equal(basic[0], full[0]) and all(torch.equal(a, b) for a, b in zip(basic[1], full[1]))
    assert set(basic[2]) == set(full[2]) - set(DIAGNOSTIC_METRICS)
    assert all(torch.equal(basic[2][name], full[2][name]) for name in basic[2])


def test_without_context_parallelism_the_loss_is_slimes_reduction_of_kpo_loss():
    batch = micro_batch(0)
    results = []
    for denominators, per_token_loss in VARIANTS:
        den = rollout_sums(batch[5]) if denominators == "rollout" else None
        results.append([rank_loss(batch, 0, 1, den, per_token_loss)])
    check_against_unsharded(batch, results)


def _cp_rank(rank, cp_size, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=cp_size)
    try:
        batch = micro_batch(0)
        results = []
        for denominators, per_token_loss in VARIANTS:
            den = rollout_sums(batch[5]) if denominators == "rollout" else None
            results.append(rank_loss(batch, rank, cp_size, den, per_token_loss))  # group None: the default group
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cp_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_context_parallel_ranks_sum_to_the_unsharded_loss_and_gradient(cp_size, tmp_path):
    """cp_size gloo processes, each with its zigzag slices of the same micro-batch: the rank losses
    sum to slime's reduction of the unsharded `kpo_loss`, each rank's gradient is the unsharded
    gradient at its tokens, and every rank gets the unsharded metrics."""
    mp.spawn(_cp_rank, args=(cp_size, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=cp_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(cp_size)]
    check_against_unsharded(micro_batch(0), [[r[v] for r in per_rank] for v in range(len(VARIANTS))])
