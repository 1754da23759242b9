"""verl integration (`loss_mode=kpo`), tested through the real verl 0.9 package on the CPU.

Everything here goes through verl's own code: its policy-loss registry (`get_policy_loss_fn`), its
actor config dataclasses, its Hydra config tree and loader (`omega_conf_to_dataclass`), its
`vanilla` loss, the `ppo_loss` that verl's engines call, and its worker import hooks.
"""

import contextlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

# Skipped only when verl is not installed: an installed verl that fails to import is an error.
if importlib.util.find_spec("verl") is None:
    pytest.skip("verl is not installed (pip install -e '.[verl]'; CI's recipe is in .ci/run)", allow_module_level=True)

import verl  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

import kpo_kernels  # noqa: E402
from conftest import DEVICE  # noqa: E402
from helpers import assert_close, make_batch, oracle  # noqa: E402
from kpo_kernels.integrations.verl import (  # noqa: E402
    METRICS,
    KPOPolicyLossConfig,
    compute_policy_loss_kpo,
)

AGGS = kpo_kernels.AGG_MODES
VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command-line overrides docs/verl.md gives for verl (test_docs_give_these_overrides keeps them identical).
README_OVERRIDES = [
    "actor_rollout_ref.model.external_lib=kpo_kernels.integrations.verl",
    "actor_rollout_ref.actor.policy_loss._target_=kpo_kernels.integrations.verl.KPOPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=kpo",
    "+actor_rollout_ref.actor.policy_loss.kalman_q=1e-6",
    "+actor_rollout_ref.actor.policy_loss.kalman_r=1.0",
    "actor_rollout_ref.actor.clip_ratio_low=3e-4",
    "actor_rollout_ref.actor.clip_ratio_high=4e-4",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
]


def actor_config(agg="token-mean", clip_low=0.2, clip_high=0.28, global_batch_info=None, **kpo):
    """A real verl actor config (FSDP), with `kpo` keywords for its KPOPolicyLossConfig."""
    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        loss_agg_mode=agg,
        policy_loss=KPOPolicyLossConfig(**kpo),
    )
    # verl's ppo_loss writes the global counts into this dict before every call.
    config.global_batch_info.update(global_batch_info or {})
    return config


def call_verl_loss(name, batch, config):
    """(loss, metrics, grad) of a loss looked up in verl's registry, called as verl's ppo_loss calls it."""
    log_prob = batch["log_prob"].detach().clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=batch["mask"],
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=batch.get("is_weights"),
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach().cpu(), metrics, grad.cpu()


def reference_options(config):
    """The kpo_loss keywords a verl actor config stands for, written out independently."""
    policy = config.policy_loss
    options = {
        "q": policy.kalman_q,
        "r": policy.kalman_r,
        "p0": policy.kalman_p0,
        "x0": policy.kalman_x0,
        "clip": policy.is_clip,
        "dual_clip": policy.dual_clip,
        "mask_mode": policy.mask_mode,
        "log_ratio_cap": policy.log_ratio_cap,
        "clip_low": config.clip_ratio_low,
        "clip_high": config.clip_ratio_high,
        "agg": config.loss_agg_mode,
    }
    options.update({k: v for k, v in config.global_batch_info.items() if v is not None})
    return options


def f64(value):
    """A logged float as a float64 tensor (torch.as_tensor would round it to float32)."""
    return torch.tensor(float(value), dtype=torch.float64)


def check_against_reference(batch, config, rtol=1e-10):
    loss, metrics, grad = call_verl_loss("kpo", batch, config)
    want_loss, want_metrics, want_grad = oracle(batch, **reference_options(config))
    assert_close("loss", loss, want_loss, rtol=rtol)
    assert_close("grad", grad, want_grad, rtol=rtol)
    assert set(metrics) == set(METRICS)
    for verl_name, kpo_name in METRICS.items():
        assert isinstance(metrics[verl_name], float), verl_name
        assert_close(verl_name, f64(metrics[verl_name]), want_metrics[kpo_name], rtol=rtol)
    return loss, grad


def multi_turn_batch(seed, dtype=torch.float64, **kwargs):
    """Per-token advantages, rollout IS weights and multi-turn masks (tool output masked)."""
    return make_batch(
        6, 41, layout="holes", seed=seed, dtype=dtype, device=DEVICE, adv_per_token=True, is_weights=True, **kwargs
    )


def split_rows(batch, rows):
    return {k: (v[rows] if v is not None else None) for k, v in batch.items()}


def global_counts(batch, dp_size, loss_scale_factor=None):
    mask = batch["mask"].cpu()
    info = {
        "dp_size": dp_size,
        "batch_num_tokens": int(mask.sum()),
        "global_batch_size": int((mask.sum(-1) > 0).sum()),
        "loss_scale_factor": loss_scale_factor,
    }
    return info


# --- registry and signature ---------------------------------------------------------------------


def test_kpo_is_in_verls_registry_with_verls_signature():
    assert get_policy_loss_fn("kpo") is compute_policy_loss_kpo
    assert POLICY_LOSS_REGISTRY["kpo"] is compute_policy_loss_kpo
    ours = list(inspect.signature(compute_policy_loss_kpo).parameters)
    verls = list(inspect.signature(get_policy_loss_fn("vanilla")).parameters)
    expected = ["old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config"]
    assert ours == verls == expected + ["rollout_is_weights"]


def test_importing_kpo_kernels_imports_neither_verl_nor_trl():
    code = (
        "import sys, kpo_kernels, kpo_kernels.integrations; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('verl', 'trl', 'ray', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- configuration -----------------------------------------------------------------------------


def test_policy_loss_config_is_a_verl_policy_loss_config_with_kpo_defaults():
    config = KPOPolicyLossConfig()
    assert isinstance(config, PolicyLossConfig)
    assert config.loss_mode == "kpo"
    assert (config.kalman_q, config.kalman_r, config.kalman_p0, config.kalman_x0) == (1e-6, 1.0, 0.0, 0.0)
    assert config.is_clip is True and config.dual_clip is None
    assert config.mask_mode == "skip" and config.log_ratio_cap == 10.0
    # verl's BaseConfig: a Mapping, frozen after construction.
    assert config.get("kalman_q") == 1e-6 and config["mask_mode"] == "skip"
    with pytest.raises(Exception, match="frozen"):
        config.kalman_q = 1.0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kalman_r": 0.0}, "^kalman_r: r .*observation noise"),  # the config's name first
        ({"kalman_q": -1.0}, "^kalman_q: q .*process noise"),
        ({"kalman_x0": float("nan")}, "^kalman_x0: x0 must be finite"),
        ({"mask_mode": "holes"}, "^mask_mode must be one of"),
        ({"dual_clip": 1.0}, "^dual_clip must be > 1"),
        ({"is_clip": "yes"}, "^is_clip: clip must be a bool"),
        ({"kpo_metrics": "none"}, "kpo_metrics must be one of"),
        ({"kpo_metrics": True}, "kpo_metrics must be one of"),
    ],
)
def test_bad_hyperparameters_fail_when_the_config_is_built(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        KPOPolicyLossConfig(**bad)


def compose_ppo_config(overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(
            config_name="ppo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", *overrides]
        )


def test_readme_overrides_build_the_actor_config_through_verls_loader():
    """verl's Hydra tree + the overrides of docs/verl.md -> verl's omega_conf_to_dataclass -> the loss."""
    cfg = compose_ppo_config(
        README_OVERRIDES
        + [
            "+actor_rollout_ref.actor.policy_loss.kalman_x0=0.01",
            "+actor_rollout_ref.actor.policy_loss.dual_clip=3.0",
            "+actor_rollout_ref.actor.policy_loss.mask_mode=position",
        ]
    )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, FSDPActorConfig)
    policy = actor.policy_loss
    assert type(policy) is KPOPolicyLossConfig
    assert policy.loss_mode == "kpo"
    assert (policy.kalman_q, policy.kalman_r, policy.kalman_x0, policy.dual_clip) == (1e-6, 1.0, 0.01, 3.0)
    assert policy.mask_mode == "position" and policy.is_clip is True and policy.log_ratio_cap == 10.0
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (3e-4, 4e-4, "seq-mean-token-mean")
    # The loss reads exactly these values: compare with the reference written out by hand.
    batch = multi_turn_batch(seed=1)
    loss, metrics, grad = call_verl_loss(actor.policy_loss.loss_mode, batch, actor)
    want_loss, want_metrics, want_grad = oracle(
        batch,
        q=1e-6,
        r=1.0,
        x0=0.01,
        dual_clip=3.0,
        mask_mode="position",
        clip_low=3e-4,
        clip_high=4e-4,
        agg="seq-mean-token-mean",
    )
    assert_close("loss", loss, want_loss, rtol=1e-10)
    assert_close("grad", grad, want_grad, rtol=1e-10)
    assert_close("clipfrac", f64(metrics["actor/pg_clipfrac"]), want_metrics["clipfrac"], rtol=1e-10)
    assert 0 < metrics["actor/pg_clipfrac"] < 1  # the paper's clip range is active on this batch
    # verl's loss signature also allows the actor config as an (unconverted) DictConfig.
    raw = cfg.actor_rollout_ref.actor
    raw_loss, raw_metrics, raw_grad = call_verl_loss("kpo", batch, raw)
    assert torch.equal(raw_loss, loss) and torch.equal(raw_grad, grad) and raw_metrics == metrics


def test_basic_metrics_through_verls_loader_leave_out_the_diagnostics():
    """policy_loss.kpo_metrics=basic, set as a verl user sets it: the same loss, gradient and
    other metrics as full, bitwise; the four diagnostics not logged at all (rather than as 0)."""
    batch = multi_turn_batch(seed=2)
    logged = {}
    for choice in ("full", "basic"):
        cfg = compose_ppo_config(README_OVERRIDES + [f"+actor_rollout_ref.actor.policy_loss.kpo_metrics={choice}"])
        actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
        assert actor.policy_loss.kpo_metrics == choice
        logged[choice] = call_verl_loss("kpo", batch, actor)
    (full_loss, full_metrics, full_grad), (loss, metrics, grad) = logged["full"], logged["basic"]
    assert torch.equal(loss, full_loss) and torch.equal(grad, full_grad)
    diagnostics = {"actor/kpo_nis_mean", "actor/kpo_log_likelihood", "actor/kpo_sign_flip_raw", "actor/kpo_sign_flip_filtered"}
    assert set(full_metrics) == set(METRICS) and set(metrics) == set(METRICS) - diagnostics
    assert all(metrics[name] == full_metrics[name] for name in metrics)


def test_bad_hyperparameters_fail_in_verls_loader():
    cfg = compose_ppo_config(README_OVERRIDES + ["actor_rollout_ref.actor.policy_loss.kalman_r=0"])
    with pytest.raises(InstantiationException, match="observation noise"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_a_plain_policy_loss_config_gives_kpo_defaults():
    """loss_mode=kpo without the _target_ override: verl's PolicyLossConfig, KPO's defaults."""
    cfg = compose_ppo_config(["actor_rollout_ref.actor.policy_loss.loss_mode=kpo"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert type(actor.policy_loss) is PolicyLossConfig
    batch = multi_turn_batch(seed=2)
    loss, _, grad = call_verl_loss("kpo", batch, actor)
    want_loss, _, want_grad = oracle(
        batch, clip_low=actor.clip_ratio_low, clip_high=actor.clip_ratio_high, agg=actor.loss_agg_mode
    )
    assert_close("loss", loss, want_loss, rtol=1e-10)
    assert_close("grad", grad, want_grad, rtol=1e-10)


# --- worker registration hooks -------------------------------------------------------------------


def save_tiny_model(path):
    """A tokenizer and a model config on disk (nothing downloaded): what actor_rollout_ref.model.path needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)


HOOK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    from verl.utils.config import omega_conf_to_dataclass

    overrides = json.loads(sys.argv[1])
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    seen = {"after_import_verl": "kpo" in POLICY_LOSS_REGISTRY}
    # What verl's worker does in init_model (verl/workers/engine_workers.py): model config first,
    # then the actor config; then the actor's loss looks the loss mode up in the registry.
    omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    seen["after_model_config"] = "kpo" in POLICY_LOSS_REGISTRY
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    seen["after_actor_config"] = "kpo" in POLICY_LOSS_REGISTRY
    seen["policy_loss_config"] = type(actor.policy_loss).__name__
    print(json.dumps(seen))
    """
)


# Each case starts a Python process that imports verl (about 5 s): one in the fast tier.
@pytest.mark.parametrize("hook", ["external_lib", *(pytest.param(h, marks=pytest.mark.slow) for h in ("env", "target", "none"))])
def test_worker_processes_register_kpo_through_verls_hooks(hook, tmp_path):
    """A fresh interpreter, as a Ray worker is: kpo is registered by the hook, not by our test."""
    save_tiny_model(tmp_path)
    overrides = [
        f"actor_rollout_ref.model.path={tmp_path}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.policy_loss.loss_mode=kpo",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    if hook == "external_lib":
        overrides.append("actor_rollout_ref.model.external_lib=kpo_kernels.integrations.verl")
    elif hook == "env":
        env["VERL_USE_EXTERNAL_MODULES"] = "kpo_kernels.integrations.verl"
    elif hook == "target":
        overrides.append(
            "actor_rollout_ref.actor.policy_loss._target_=kpo_kernels.integrations.verl.KPOPolicyLossConfig"
        )
    out = subprocess.run(
        [sys.executable, "-c", HOOK_SCRIPT, json.dumps(overrides)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {
        "external_lib": [False, True, True],
        "env": [True, True, True],
        "target": [False, False, True],
        "none": [False, False, False],
    }[hook]
    assert [seen["after_import_verl"], seen["after_model_config"], seen["after_actor_config"]] == expected
    assert seen["policy_loss_config"] == ("KPOPolicyLossConfig" if hook == "target" else "PolicyLossConfig")


# --- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
def test_equals_the_reference_in_every_aggregation_mode(agg):
    batch = multi_turn_batch(seed=3)
    config = actor_config(agg, clip_low=3e-4, clip_high=4e-4, kalman_q=1e-3, dual_clip=3.0)
    loss, _ = check_against_reference(batch, config)
    assert loss != 0


@pytest.mark.parametrize("agg", AGGS)
def test_multi_rank_global_batch_info(agg):
    """Two data-parallel ranks: each rank's loss is the reference with verl's global counts, and
    the ranks' averaged gradient (what DDP/FSDP apply) is the single-process gradient."""
    batch = multi_turn_batch(seed=4, garbage=False)
    batch["mask"][4] = False  # an empty response on rank 1
    info = global_counts(batch, dp_size=2, loss_scale_factor=64)
    ranks = [torch.arange(0, 3), torch.arange(3, 6)]
    kpo = {"kalman_q": 1e-2, "dual_clip": 3.0}
    grads, losses = [], []
    for rows in ranks:
        config = actor_config(agg, global_batch_info=info, **kpo)
        loss, grad = check_against_reference(split_rows(batch, rows), config)
        losses.append(loss)
        grads.append(grad)
    single = actor_config(agg, global_batch_info={**info, "dp_size": 1}, **kpo)
    whole_loss, _, whole_grad = call_verl_loss("kpo", batch, single)
    assert_close("averaged loss", sum(losses) / 2, whole_loss, rtol=1e-12)
    assert_close("averaged gradient", torch.cat(grads) / 2, whole_grad, rtol=1e-12)


def test_float32_and_float_masks():
    """verl's float32 log-probs and a float 0/1 mask (as verl's response_mask can be)."""
    batch = multi_turn_batch(seed=5, dtype=torch.float32)
    batch["mask"] = batch["mask"].float()
    config = actor_config("seq-mean-token-mean", kalman_q=1e-2, dual_clip=3.0)
    loss, metrics, grad = call_verl_loss("kpo", batch, config)
    want_loss, want_metrics, want_grad = oracle({**batch, "mask": batch["mask"].bool()}, **reference_options(config))
    assert grad.dtype == torch.float32
    assert_close("loss", loss, want_loss, rtol=2e-6)
    assert_close("grad", grad, want_grad, rtol=2e-6)
    assert_close("ratio_mean", f64(metrics["actor/kpo_ratio_mean"]), want_metrics["ratio_mean"], rtol=2e-6)


@pytest.mark.parametrize("with_counts", [False, True], ids=["local", "global-counts"])
@pytest.mark.parametrize("agg", AGGS)
def test_identity_filter_is_verls_vanilla_loss(agg, with_counts):
    """q = 1e8 (K = 1) with dual_clip = clip_ratio_c = 3: verl's own `vanilla` loss, gradient and
    logged metrics, through the same registry and the same actor config."""
    # Noisy ratios, so that both clips act; no NaN padding (verl's masked sums turn it into NaN).
    batch = multi_turn_batch(seed=6, garbage=False, noise=0.5)
    info = global_counts(batch, dp_size=3, loss_scale_factor=50) if with_counts else {}
    config = actor_config(agg, clip_low=0.2, clip_high=0.28, global_batch_info=info, kalman_q=1e8, dual_clip=3.0)
    assert config.clip_ratio_c == 3.0
    loss, metrics, grad = call_verl_loss("kpo", batch, config)
    want_loss, want_metrics, want_grad = call_verl_loss("vanilla", batch, config)
    # K = 1 - 1e-8 (not exactly 1) and verl's 1e-8 in seq-mean-token-mean: agreement to ~1e-8.
    assert_close("loss", loss, want_loss, rtol=1e-6)
    assert_close("grad", grad, want_grad, rtol=1e-6)
    for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert_close(name, f64(metrics[name]), f64(want_metrics[name]), rtol=1e-6)
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0  # both clips are exercised


def test_skip_and_position_on_multi_turn_masks():
    """skip: the filter never sees tool output, so a multi-turn response gives the loss of its
    assistant tokens packed together; position (the authors' semantics) does not."""
    batch = multi_turn_batch(seed=7, garbage=False)
    mask = batch["mask"]
    spans = [row.nonzero().flatten() for row in mask.cpu() if row.any()]
    assert any(int(v[-1] - v[0]) + 1 > v.numel() for v in spans)  # some response has tool-output holes
    packed = {k: v.clone() for k, v in batch.items()}
    for b in range(mask.shape[0]):
        valid = mask[b].nonzero().flatten()
        n = valid.numel()
        for key in ("log_prob", "old_log_prob", "advantages", "is_weights"):
            packed[key][b, :n] = batch[key][b, valid]
        packed["mask"][b] = torch.arange(mask.shape[1], device=mask.device) < n
    results = {}
    for mode in ("skip", "position"):
        config = actor_config("seq-mean-token-mean", kalman_q=1e-2, dual_clip=3.0, mask_mode=mode)
        results[mode] = check_against_reference(batch, config)
        results[mode + "-packed"] = check_against_reference(packed, config)
    assert_close("skip == packed", results["skip"][0], results["skip-packed"][0], rtol=1e-12)
    assert_close("position == skip on packed", results["position-packed"][0], results["skip-packed"][0], rtol=1e-12)
    assert abs(float(results["position"][0] - results["skip"][0])) > 1e-6


# --- verl's own caller, metrics and host syncs ---------------------------------------------------


def test_through_verls_ppo_loss():
    """The engine-side caller (verl.workers.utils.losses.ppo_loss): unpadded model output, the
    global counts it writes into the config, and the Metric objects it builds."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    B, P, R = 4, 3, 12
    batch = make_batch(
        B, R, layout="holes", seed=8, dtype=torch.float64, adv_per_token=True, is_weights=True, garbage=False
    )
    mask = batch["mask"]
    # Response lengths (attention) cover every valid token; holes inside are tool output.
    resp_len = torch.tensor([int(row.nonzero().max()) + 1 if row.any() else 1 for row in mask])
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), (torch.arange(R)[None] < resp_len[:, None]).long()], 1)
    segments = []  # the engine's flat log-probs: token j of the response sits at prompt_len - 1 + j
    for b in range(B):
        segment = torch.zeros(P + int(resp_len[b]), dtype=torch.float64)
        segment[P - 1 : P - 1 + int(resp_len[b])] = batch["log_prob"][b, : int(resp_len[b])]
        segments.append(segment)
    flat = torch.cat(segments).requires_grad_()
    data = TensorDict(
        {
            "prompts": torch.zeros(B, P, dtype=torch.long),
            "responses": torch.zeros(B, R, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": mask.long(),
            "old_log_probs": batch["old_log_prob"],
            "advantages": batch["advantages"],
            "rollout_is_weights": batch["is_weights"],
        },
        batch_size=[B],
    )
    info = global_counts(batch, dp_size=2)
    tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=info["batch_num_tokens"] + 5, global_batch_size=2 * B)
    config = actor_config("token-mean", kalman_q=1e-2, dual_clip=3.0)
    policy_loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    (flat_grad,) = torch.autograd.grad(policy_loss, flat)

    padded = {**batch, "log_prob": torch.where(attention[:, P:].bool(), batch["log_prob"], 0.0)}
    counts = {"dp_size": 2, "batch_num_tokens": info["batch_num_tokens"] + 5, "global_batch_size": 2 * B}
    want_loss, want_metrics, want_grad = oracle(padded, **{**reference_options(config), **counts})
    assert_close("loss", policy_loss.detach(), want_loss, rtol=1e-12)
    grad = torch.zeros(B, R, dtype=torch.float64)
    offset = 0
    for b in range(B):
        n = int(resp_len[b])
        grad[b, :n] = flat_grad[offset + P - 1 : offset + P - 1 + n]
        offset += P + n
    assert_close("grad", grad, want_grad, rtol=1e-12)
    for verl_name, kpo_name in METRICS.items():
        assert_close(verl_name, f64(metrics[verl_name].aggregate()), want_metrics[kpo_name], rtol=1e-12)
    assert_close("actor/pg_loss", f64(metrics["actor/pg_loss"].aggregate()), want_loss, rtol=1e-12)


@contextlib.contextmanager
def count_host_reads():
    """Records every tensor method call that reads values back to the host, with the tensor's
    device and the calling file; on CUDA also torch's own count of synchronising operations."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    own = {name for name in names if name in vars(torch.Tensor)}
    calls = []

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            calls.append((name, self.device.type, os.path.abspath(sys._getframe(1).f_code.co_filename)))
            return method(self, *args, **kwargs)

        return counted

    for name, method in originals.items():
        setattr(torch.Tensor, name, wrap(name, method))
    sync_warnings = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield calls, sync_warnings
            finally:
                if DEVICE.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        sync_warnings += [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        for name, method in originals.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_one_host_sync_per_call(agg):
    """The loss reads its metrics back once (one stacked .tolist()); nothing else it runs reads a
    device tensor. On the CPU the core may inspect CPU tensors (no device to wait for); on CUDA
    torch's sync debug mode must report exactly one synchronising operation."""
    import kpo_kernels.integrations.verl as integration

    batch = multi_turn_batch(seed=9, dtype=torch.float32)
    config = actor_config(agg, global_batch_info=global_counts(batch, dp_size=2), kalman_q=1e-2, dual_clip=3.0)
    log_prob = batch["log_prob"].clone().requires_grad_()
    args = (batch["old_log_prob"], log_prob, batch["advantages"], batch["mask"], agg, config, batch["is_weights"])
    compute_policy_loss_kpo(*args)  # warm-up: gain tables, kernel compilation
    with count_host_reads() as (calls, sync_warnings):
        loss, metrics = compute_policy_loss_kpo(*args)
    here = os.path.abspath(integration.__file__)
    assert [name for name, _, where in calls if where == here] == ["tolist"], calls
    device_reads = [name for name, device, _ in calls if device != "cpu"]
    assert device_reads == (["tolist"] if DEVICE.type != "cpu" else []), calls
    if DEVICE.type == "cuda":
        assert len(sync_warnings) == 1, [str(w.message) for w in sync_warnings]
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()


def test_ppo_kl_matches_vanilla_beyond_its_clamp():
    """verl's vanilla loss clamps the log-ratio to [-20, 20] before its ppo_kl; so does kpo's
    (one token at -30 gave 7.5 instead of verl's 5.0)."""
    batch = multi_turn_batch(seed=7, garbage=False)
    mask = batch["mask"]
    row, col = (int(i) for i in mask.nonzero()[0])
    batch["log_prob"][row, col] = batch["old_log_prob"][row, col] - 30.0
    second = mask.nonzero()[1]
    batch["log_prob"][tuple(second)] = batch["old_log_prob"][tuple(second)] + 25.0
    config = actor_config("token-mean", kalman_q=1e8)
    _, metrics, _ = call_verl_loss("kpo", batch, config)
    _, want, _ = call_verl_loss("vanilla", batch, config)
    assert_close("actor/ppo_kl", f64(metrics["actor/ppo_kl"]), f64(want["actor/ppo_kl"]), rtol=1e-6)


@pytest.mark.parametrize("empty", [{"batch_num_tokens": 0}, {"global_batch_size": 0}])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_an_empty_global_batch_gives_loss_zero(empty, agg):
    """A global batch without valid tokens (every rank's responses empty) must give loss 0, as
    docs/numerics.md promises, not a ValueError."""
    batch = multi_turn_batch(seed=8)
    batch["mask"] = torch.zeros_like(batch["mask"])
    info = {"dp_size": 2, "batch_num_tokens": 0, "global_batch_size": 0, **empty}
    config = actor_config(agg, global_batch_info=info)
    loss, metrics, grad = call_verl_loss("kpo", batch, config)
    assert float(loss) == 0.0 and (grad == 0).all() and metrics["actor/pg_clipfrac"] == 0.0


def test_extreme_noise_ratio_configs_are_accepted_and_exact():
    """kalman_q = 1e308 (K = 1: no filtering) is accepted and gives verl's vanilla loss."""
    batch = multi_turn_batch(seed=9, garbage=False)
    config = actor_config("token-mean", kalman_q=1e308)
    loss, _, grad = call_verl_loss("kpo", batch, config)
    want_loss, _, want_grad = call_verl_loss("vanilla", batch, actor_config("token-mean"))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close("loss", loss, want_loss, rtol=1e-6)
    assert_close("grad", grad, want_grad, rtol=1e-6)


def test_docs_give_these_overrides():
    """docs/verl.md's command-line overrides are README_OVERRIDES, in order."""
    import re

    with open(os.path.join(REPO_ROOT, "docs", "verl.md"), encoding="utf-8") as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    assert [line.strip().rstrip("\\").strip() for line in block.splitlines() if line.strip()] == README_OVERRIDES


# ----------------------------------------------------------------------------- verl's traps


def _bypass_batch():
    from verl import DataProto

    log_probs = torch.randn(2, 5)
    return DataProto.from_dict(tensors={"rollout_log_probs": log_probs, "old_log_probs": log_probs + 1})


def test_bypass_mode_refuses_to_replace_kpo():
    """verl's trainer calls rollout_corr_helper.apply_bypass_mode, which would set loss_mode to its
    own bypass_mode loss: with loss_mode=kpo it raises, naming the setting."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo import rollout_corr_helper

    policy_loss = OmegaConf.create({"loss_mode": "kpo", "kalman_q": 1e-4})
    with pytest.raises(ValueError, match=r"algorithm\.rollout_correction\.bypass_mode=True"):
        rollout_corr_helper.apply_bypass_mode(_bypass_batch(), OmegaConf.create({"bypass_mode": True}), policy_loss)
    assert policy_loss.loss_mode == "kpo"
    # Other losses keep verl's behaviour.
    vanilla, batch = OmegaConf.create({"loss_mode": "vanilla"}), _bypass_batch()
    rollout_corr_helper.apply_bypass_mode(batch, OmegaConf.create({"bypass_mode": True}), vanilla)
    assert vanilla.loss_mode == "bypass_mode"
    assert torch.equal(batch.batch["old_log_probs"], batch.batch["rollout_log_probs"])


def test_a_rewritten_loss_mode_is_refused_where_workers_build_the_config():
    with pytest.raises(ValueError, match="bypass_mode=True replaces"):
        KPOPolicyLossConfig(loss_mode="bypass_mode")
    with pytest.raises(ValueError, match="loss_mode='vanilla', not 'kpo'"):
        KPOPolicyLossConfig(loss_mode="vanilla")


def test_distillation_config_is_refused_by_name():
    """On-policy distillation passes its own loss config (no policy_loss, no kalman_* fields)."""
    from verl.workers.config.distillation import DistillationLossConfig

    config = DistillationLossConfig(use_policy_gradient=True)
    batch = make_batch(2, 6, seed=3)
    with pytest.raises(ValueError, match="distillation.distillation_loss.policy_loss_mode"):
        compute_policy_loss_kpo(batch["old_log_prob"], batch["log_prob"], batch["advantages"][:, None].expand(2, 6),
                                batch["mask"], config=config)
