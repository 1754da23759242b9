"""KPO as AReaL's actor loss, through AReaL's own loss call site.

Runs AReaL 1.0.4's `FSDPEngine._compute_logprobs_and_loss` (logits -> AReaL's log-probs and
entropy -> the loss function -> AReaL's loss-weight scaling) on CPU, on micro-batches packed by
AReaL's own `pack_tensor_dict`, with a tiny embedding + linear language model whose parameters get
the gradients. The one stand-in: the engine object is made with `FSDPEngine.__new__` and the three
attributes that method reads (`config.is_critic` / `config.temperature`, `enable_tree_training`,
`parallel_helper.tp_size` / `sp_size`), because `FSDPEngine.__init__` and `initialize` load a
Hugging Face checkpoint, build a device mesh and wrap the model in FSDP2 (a process group and a
GPU in AReaL's setup); the method itself and everything it calls are AReaL's.

Identity case (q = 1e8: gain 1 to ~1e-8): loss, gradients and every `stats_tracker` statistic
equal AReaL's own `grpo_loss_fn`. Otherwise: the loss and gradients equal `kpo_loss` on the same
tensors with AReaL's scaling.
"""

import functools
from types import SimpleNamespace

import pytest
import torch

areal_actor = pytest.importorskip("areal.trainer.ppo.actor", reason="AReaL is installed by .ci/run (its own step)")
from areal.api.cli_args import RejectionSamplingConfig  # noqa: E402
from areal.engine.fsdp_engine import FSDPEngine, FSDPTrainContext  # noqa: E402
from areal.utils import stats_tracker  # noqa: E402
from areal.utils.data import pack_tensor_dict  # noqa: E402

from kpo_kernels import NoiseTracker, kpo_loss  # noqa: E402
from kpo_kernels.integrations import areal as kpo_areal  # noqa: E402

VOCAB, HIDDEN = 11, 8
IDENTITY = {"q": 1e8, "r": 1.0}


def _engine():
    engine = FSDPEngine.__new__(FSDPEngine)  # stand-in construction: see the module docstring
    engine.config = SimpleNamespace(is_critic=False, temperature=1.0)
    engine.enable_tree_training = False
    engine.parallel_helper = SimpleNamespace(tp_size=1, sp_size=1)
    return engine


def _batch(seed, *, lengths=(7, 12, 9), prompt=3, drift=0.2, noise=0.3):
    """A padded AReaL batch (attention_mask, input_ids, loss_mask, behaviour `logprobs`,
    `prox_logp`, per-token `advantages`, `versions`), packed by AReaL's pack_tensor_dict. The
    proximal log-probs are `_model()`'s own plus noise, the behaviour ones those plus drift."""
    gen = torch.Generator().manual_seed(seed)
    b, s = len(lengths), max(lengths) + 2
    input_ids = torch.randint(0, VOCAB, (b, s), generator=gen)
    with torch.no_grad():
        current = torch.log_softmax(_model()(input_ids), -1).gather(-1, torch.roll(input_ids, -1, -1)[..., None])[..., 0]
    attention = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    loss_mask = attention & (torch.arange(s)[None, :] >= prompt - 1)
    loss_mask &= torch.arange(s)[None, :] < torch.tensor(lengths)[:, None] - 1  # AReaL's rolled mask
    prox = current + noise * torch.randn(b, s, generator=gen)
    old = prox + drift * torch.randn(b, s, generator=gen)
    adv = torch.randn(b, 1, generator=gen).expand(b, s).contiguous()
    adv[0, :] = -adv[0, :].abs() - 0.5  # a negative-advantage response, for the dual clip
    data = dict(
        attention_mask=attention.long(),
        input_ids=input_ids,
        loss_mask=loss_mask.long(),
        logprobs=old * loss_mask,
        prox_logp=prox * loss_mask,
        advantages=adv * loss_mask,
        versions=torch.randint(0, 3, (b, s), generator=gen),
    )
    return pack_tensor_dict(data)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, VOCAB))


def _run(loss_fn, mb, model, total_weight=None):
    """AReaL's loss call site: (scaled loss, parameter gradients, exported stats, log-probs seen)."""
    seen = {}

    def recording(logprobs, *args, **kwargs):
        seen["logprobs"] = logprobs
        return loss_fn(logprobs, *args, **kwargs)

    stats_tracker.export_all(reset=True)
    model.zero_grad()
    logits = model(mb["input_ids"])
    weight = mb["loss_mask"].count_nonzero()
    total = 2 * weight if total_weight is None else total_weight  # as if a second rank had as many
    loss = _engine()._compute_logprobs_and_loss(
        logits, FSDPTrainContext(model_inputs=mb, mb_input=mb), loss_fn=recording,
        loss_weight_fn=lambda x: x["loss_mask"].count_nonzero(), total_loss_weight=total,
    )
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, stats_tracker.export_all(reset=True), seen["logprobs"].detach(), weight / total


def _coupled(mb, args):
    """AReaL's trainer without the decoupled loss: the proximal log-probs are the behaviour ones."""
    if not args["use_decoupled_loss"]:
        mb = {**mb, "prox_logp": mb["logprobs"]}
    return mb


def _areal_args(**overrides):
    args = dict(eps_clip=0.2, eps_clip_higher=0.28, c_clip=1.5, current_version=3, use_decoupled_loss=True)
    args.update(overrides)
    return args


CASES = {
    "decoupled": {},
    "coupled, symmetric clip, no dual clip": dict(eps_clip_higher=None, c_clip=None, use_decoupled_loss=False),
    "rejection sampling, mask": dict(rejection_sampling=RejectionSamplingConfig(level="token", action="mask", metric="ratio", upper=1.15)),
    "rejection sampling, clamp": dict(rejection_sampling=RejectionSamplingConfig(level="token", action="clamp", metric="ratio", upper=1.1)),
    "m2po": dict(m2_threshold=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_filter_equals_areal_grpo_loss(case):
    args = _areal_args(**CASES[case])
    mb = _coupled(_batch(1), args)
    model = _model()
    ref_loss, ref_grads, ref_stats, _, _ = _run(functools.partial(areal_actor.grpo_loss_fn, **args), mb, _model())
    loss, grads, stats, _, _ = _run(functools.partial(kpo_areal.kpo_grpo_loss_fn, kpo=IDENTITY, **args), mb, model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert 0 < ref_stats["clip_ratio/avg"] < 1 and (args["c_clip"] is None or ref_stats["dual_clip_ratio/avg"] > 0)
    kpo_only = {k for k in stats if "kpo_" in k}
    assert set(stats) - kpo_only == set(ref_stats)
    for key, value in ref_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert stats["kpo_raw_importance_weight/avg"] == pytest.approx(ref_stats["importance_weight/avg"], rel=1e-5)


@pytest.mark.parametrize("case", ["decoupled", "rejection sampling, mask", "coupled, symmetric clip, no dual clip"])
def test_kpo_equals_kpo_loss_on_the_same_tensors(case):
    args = _areal_args(**CASES[case])
    options = {"q": 1e-2, "r": 1.0}
    mb = _coupled(_batch(2), args)
    model = _model()
    loss, grads, stats, logprobs, scale = _run(functools.partial(kpo_areal.kpo_grpo_loss_fn, kpo=options, **args), mb, model)
    prox = mb["prox_logp"]
    mask, weights = mb["loss_mask"].bool(), None
    count = mask.count_nonzero()
    if "rejection_sampling" in args:
        ratio = torch.exp(prox - mb["logprobs"])
        weights = ratio
        mask = mask & (ratio <= args["rejection_sampling"].upper)
    logprobs.requires_grad_()
    high = args["eps_clip"] if args["eps_clip_higher"] is None else args["eps_clip_higher"]
    ref, metrics = kpo_loss(logprobs, prox, mb["advantages"], mask, **options, clip_low=args["eps_clip"], clip_high=high,
                            dual_clip=args["c_clip"], agg="token-mean", batch_num_tokens=count, is_weights=weights,
                            cu_seqlens=mb["cu_seqlens"])
    torch.testing.assert_close(loss, ref.detach() * scale, rtol=1e-5, atol=1e-7)
    # the gradient reaching the model: AReaL's log-probs' own backward of kpo_loss's gradient
    model.zero_grad()
    logits = model(mb["input_ids"])
    from areal.utils.functional.vocab_parallel import gather_logprobs_entropy
    lp, _ = gather_logprobs_entropy(logits, torch.roll(mb["input_ids"], -1, -1))
    (d_lp,) = torch.autograd.grad(ref * scale, logprobs)
    lp.backward(d_lp)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert stats["kpo_ratio_mean"] == pytest.approx(float(metrics["ratio_mean"]), rel=1e-5)
    assert stats["kpo_raw_ratio_mean"] != pytest.approx(stats["kpo_ratio_mean"], rel=1e-6)  # the filter acts


def test_basic_metrics_leave_the_loss_and_other_statistics_alone():
    """kpo={"metrics": "basic"}: the same loss, gradients and statistics as full, without the
    diagnostics among KPO's scalars (nis_mean, the sign flips); a bad value refused by name."""
    args = _areal_args()
    mb = _coupled(_batch(2), args)
    runs = {choice: _run(functools.partial(kpo_areal.kpo_grpo_loss_fn, kpo={"q": 1e-2, "metrics": choice}, **args), mb, _model())
            for choice in ("full", "basic")}
    (full_loss, full_grads, full_stats, _, _), (loss, grads, stats, _, _) = runs["full"], runs["basic"]
    assert torch.equal(loss, full_loss) and all(torch.equal(a, b) for a, b in zip(grads, full_grads))
    diagnostics = {key for key in full_stats if key.startswith(("kpo_nis_mean", "kpo_sign_flip"))}  # and their counts
    assert {"kpo_nis_mean", "kpo_sign_flip_raw", "kpo_sign_flip_filtered"} <= diagnostics
    assert set(stats) == set(full_stats) - diagnostics
    assert all(stats[key] == full_stats[key] for key in stats)
    with pytest.raises(ValueError, match="metrics must be one of"):
        kpo_areal.enable(metrics="none")


def test_kalman_fit_per_step_uses_the_noise_tracker():
    args = _areal_args()
    mb = _batch(3, lengths=(40, 55, 47), drift=0.05)
    options = {"q": 1e-6, "r": 1.0, "kalman_fit": "per_step", "kalman_fit_min_tokens": 8}
    fn = kpo_areal.enable(**options)
    try:
        assert areal_actor.grpo_loss_fn is fn  # the name PPOActor._ppo_update looks up
        loss, _, stats, logprobs, scale = _run(functools.partial(areal_actor.grpo_loss_fn, **args), mb, _model())
    finally:
        kpo_areal.disable()
    assert areal_actor.grpo_loss_fn.__module__ == "areal.trainer.ppo.actor"
    mask = mb["loss_mask"].bool()
    tracker = NoiseTracker("per_step", q=1e-6, r=1.0, min_tokens=8)
    noise = tracker(logprobs - mb["prox_logp"], mask, cu_seqlens=mb["cu_seqlens"])
    assert noise["q"] != 1e-6 and stats["kpo_kalman_q"] == pytest.approx(noise["q"], rel=1e-6)
    ref, _ = kpo_loss(logprobs, mb["prox_logp"], mb["advantages"], mask, **noise, clip_low=0.2, clip_high=0.28, dual_clip=1.5,
                      agg="token-mean", batch_num_tokens=mask.count_nonzero(), cu_seqlens=mb["cu_seqlens"])
    torch.testing.assert_close(loss, ref * scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, match", [
    (dict(use_sapo_loss=True, use_decoupled_loss=False), "use_sapo_loss"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
])
def test_refused_settings_are_named(overrides, match):
    mb = _batch(4)
    with pytest.raises(ValueError, match=match):
        _run(functools.partial(kpo_areal.kpo_grpo_loss_fn, **_areal_args(**overrides)), mb, _model())


def test_enable_refuses_bad_options():
    with pytest.raises(TypeError, match="unexpected KPO options"):
        kpo_areal.enable(qq=1.0)
    with pytest.raises(ValueError):
        kpo_areal.enable(r=0.0)
    with pytest.raises(ValueError, match="kalman_fit_max_tokens"):
        kpo_areal.enable(kalman_fit="per_step", kalman_fit_max_tokens=1)
    assert areal_actor.grpo_loss_fn.__module__ == "areal.trainer.ppo.actor"


class _TrainEngine:
    """Stand-in for the engine `PPOActor` drives (FSDPEngine.train_batch needs FSDP2 on a device
    mesh): `train_batch` packs each micro-batch with AReaL's `pack_tensor_dict`, runs the tiny
    model and AReaL's `_compute_logprobs_and_loss`, and backpropagates; it records the losses."""

    def __init__(self, model):
        self.model, self.losses = model, []

    def train(self):
        pass

    def get_version(self):
        return 3

    def train_batch(self, mb, loss_fn, loss_weight_fn):
        packed = pack_tensor_dict(dict(mb))
        logits = self.model(packed["input_ids"])
        weight = loss_weight_fn(packed)
        loss = _engine()._compute_logprobs_and_loss(
            logits, FSDPTrainContext(model_inputs=packed, mb_input=packed), loss_fn, loss_weight_fn, weight)
        loss.backward()
        self.losses.append(loss.detach())
        return {}


def _ppo_update(padded):
    from areal.api.cli_args import PPOActorConfig

    config = PPOActorConfig(experiment_name="kpo", trial_name="test", path="none", eps_clip=0.2, eps_clip_higher=0.28,
                            c_clip=1.5, use_decoupled_loss=True, ppo_n_minibatches=2)
    engine = _TrainEngine(_model())
    stats_tracker.export_all(reset=True)
    areal_actor.PPOActor(config, engine)._ppo_update({k: v.clone() for k, v in padded.items()})
    return engine.losses, [p.grad.clone() for p in engine.model.parameters()], stats_tracker.export_all(reset=True)


def test_enable_reaches_ppo_actor_update():
    """AReaL's own `PPOActor._ppo_update` (its logging, micro-batch split and loss arguments) with
    `enable(q=1e8)`: the same losses, gradients and statistics as without; with a real filter, the
    KPO statistics appear."""
    gen = torch.Generator().manual_seed(5)
    b, s = 4, 14
    lengths = torch.tensor([9, 14, 11, 12])
    attention = torch.arange(s)[None, :] < lengths[:, None]
    loss_mask = attention & (torch.arange(s)[None, :] >= 3) & (torch.arange(s)[None, :] < lengths[:, None] - 1)
    input_ids = torch.randint(0, VOCAB, (b, s), generator=gen)
    with torch.no_grad():
        current = torch.log_softmax(_model()(input_ids), -1).gather(-1, torch.roll(input_ids, -1, -1)[..., None])[..., 0]
    prox = current + 0.3 * torch.randn(b, s, generator=gen)
    padded = dict(attention_mask=attention.long(), input_ids=input_ids, loss_mask=loss_mask.long(),
                  logprobs=(prox + 0.2 * torch.randn(b, s, generator=gen)) * loss_mask, prox_logp=prox * loss_mask,
                  advantages=torch.randn(b, 1, generator=gen).expand(b, s) * loss_mask, versions=torch.randint(0, 3, (b, s), generator=gen),
                  rewards=torch.randn(b, generator=gen), kl_rewards=torch.zeros(b, s), tot_rewards=torch.zeros(b, s))
    ref_losses, ref_grads, ref_stats = _ppo_update(padded)
    kpo_areal.enable(**IDENTITY)
    try:
        losses, grads, stats = _ppo_update(padded)
        kpo_areal.enable(q=1e-2, r=1.0)
        _, _, filtered_stats = _ppo_update(padded)
    finally:
        kpo_areal.disable()
    assert len(losses) == len(ref_losses) == 2
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5, atol=1e-7)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert {k for k in stats if "kpo_" not in k} == set(ref_stats)
    for key, value in ref_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert "update/kpo_ratio_mean" in filtered_stats
    assert filtered_stats["update/kpo_ratio_mean"] != pytest.approx(filtered_stats["update/kpo_raw_ratio_mean"], rel=1e-6)


def test_kalman_fit_per_generation_refits_when_the_policy_version_moves():
    mb = _batch(6, lengths=(40, 55, 47), drift=0.05)
    fn = kpo_areal.enable(q=1e-6, r=1.0, kalman_fit="per_generation", kalman_fit_min_tokens=8)
    kpo_areal.disable()
    refits = []
    for version in (3, 3, 4):
        _, _, stats, _, _ = _run(functools.partial(fn, **_areal_args(current_version=version)), mb, _model())
        refits.append(stats["kpo_refit"])
    assert refits == [1.0, 0.0, 1.0]
