"""TRL integration (`KPOGRPOTrainer`), tested with the real TRL 1.16 GRPOTrainer on the CPU.

Models and tokenizers are built in memory from a config (nothing is downloaded); the Hub is
switched off for every test.
"""

import importlib.util
import math

import pytest
import torch

# Skipped only when TRL is not installed: an installed TRL that fails to import is an error.
if importlib.util.find_spec("trl") is None:
    pytest.skip("TRL is not installed (pip install -e '.[trl]')", allow_module_level=True)

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import kpo_kernels.integrations.trl as integration  # noqa: E402
from helpers import assert_close, oracle  # noqa: E402
from kpo_kernels.integrations.trl import LOSS_TYPE_AGG, KPOGRPOConfig, KPOGRPOTrainer  # noqa: E402

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + list("abcdefghij")
KPO_KEYS = [f"kpo/{name}" for name in integration.LOGGED_METRICS]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may be fetched from the Hub (models and tokenizers are built here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_tokenizer():
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(seed=0):
    """A randomly initialised 2-layer Llama with hidden size 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def prompts():
    return Dataset.from_dict({"prompt": ["a b c", "d e f", "g h", "i j a", "b b", "c a e", "f", "h i"]})


def reward_a(completions, **kwargs):
    """Toy reward: how often the completion says 'a'."""
    return [float(completion.split().count("a")) for completion in completions]


def config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    return KPOGRPOConfig(**{**base, **overrides})


# --- a real training run ------------------------------------------------------------------------


def test_trl_kpo_grpo_trainer_trains(tmp_path, monkeypatch):
    """A real GRPOTrainer run: 2 generations, each used for 2 iterations x 2 batches, so 3 of the 4
    optimisation steps per generation see old log-probs from earlier weights."""
    calls = []
    real_kpo_loss = integration.kpo_loss

    def spy(log_prob, old_log_prob, advantages, mask, **options):
        valid = mask.bool()
        gap = (log_prob.detach() - old_log_prob).abs().where(valid, 0.0)
        calls.append({"max_gap": float(gap.max()), "options": options, "mask": mask.detach().clone()})
        return real_kpo_loss(log_prob, old_log_prob, advantages, mask, **options)

    monkeypatch.setattr(integration, "kpo_loss", spy)
    args = config(
        tmp_path,
        steps_per_generation=2,
        num_iterations=2,
        max_steps=8,
        kalman_q=1e-2,
        epsilon=0.2,
        epsilon_high=0.28,
    )
    trainer = KPOGRPOTrainer(
        model=tiny_model(), reward_funcs=reward_a, args=args, train_dataset=prompts(), processing_class=tiny_tokenizer()
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    # Our loss was the loss of every optimisation step, with the options of the config.
    assert len(calls) == 8
    assert all(c["options"]["q"] == 1e-2 and c["options"]["agg"] == "seq-mean-token-mean" for c in calls)
    assert all(c["options"]["clip_low"] == 0.2 and c["options"]["clip_high"] == 0.28 for c in calls)
    # Off-policy data: old log-probs differ from the current ones (after the first step of each generation).
    assert max(c["max_gap"] for c in calls) > 1e-3
    assert sum(c["max_gap"] > 1e-4 for c in calls) >= 4
    # Completions of different lengths: the mask has padding the filter must skip.
    assert any(not bool(c["mask"].bool().all()) for c in calls)

    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    assert max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.model.named_parameters()) > 1e-3

    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 8
    for log in steps:
        assert math.isfinite(log["loss"])
        for key in KPO_KEYS + ["entropy", "clip_ratio/region_mean"]:
            assert key in log and math.isfinite(log[key]), key
    # The filter acts: the filtered ratios are those of a smoothed log-ratio, not the raw ones.
    off_policy = [log for log in steps if log["kpo/ppo_kl"] != 0.0]
    assert off_policy
    assert any(log["kpo/ratio_max"] < log["kpo/raw_ratio_max"] for log in off_policy)
    assert any(log["kpo/ratio_mean"] != log["kpo/raw_ratio_mean"] for log in off_policy)


# --- the loss against TRL's own and against the reference -----------------------------------------


def fixed_batch(trainer, seed=0, batch=6, prompt_len=3, completion_len=9, noise=0.3):
    """A GRPOTrainer batch (left-padded prompts, right-padded completions, a multi-turn tool mask),
    and (log_prob, entropies) that the patched forward returns."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 7, 0, 9, 2])[:batch]
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    tool_mask = torch.ones(batch, completion_len, dtype=torch.long)
    tool_mask[0, 3:5] = 0  # tool output inside two responses
    tool_mask[2, 1:3] = 0
    log_prob = -torch.rand(batch, completion_len, generator=gen) * 3
    old_log_prob = log_prob + noise * torch.randn(batch, completion_len, generator=gen)
    advantages = torch.tensor([0.8, -1.2, 0.3, 0.5, -0.7, 1.1])[:batch]
    old_log_prob[1, 2] = log_prob[1, 2] - 1.5  # stale tokens with negative advantages: ratio 4.5
    old_log_prob[4, 6] = log_prob[4, 6] - 1.5
    inputs = {
        "prompt_ids": torch.randint(4, len(VOCAB), (batch, prompt_len), generator=gen),
        "prompt_mask": torch.ones(batch, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(4, len(VOCAB), (batch, completion_len), generator=gen),
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": advantages,
        "old_per_token_logps": old_log_prob,
        "ref_per_token_logps": log_prob + noise * torch.randn(batch, completion_len, generator=gen),
        "num_items_in_batch": (completion_mask * tool_mask).sum() * 3,
    }
    entropies = torch.rand(batch, completion_len, generator=gen) * 2
    return inputs, log_prob, entropies


def loss_and_grad(compute, trainer, inputs, log_prob, entropies, train=True):
    """compute(trainer, model, inputs) with the forward pass replaced by fixed log-probs (a leaf)
    (and a fixed router loss for a mixture-of-experts model)."""
    leaf = log_prob.clone().requires_grad_()
    aux_loss = torch.tensor(0.37) if trainer.aux_loss_enabled else None

    def forward(model, input_ids, attention_mask, logits_to_keep, *args, compute_aux_loss=False, **kwargs):
        assert logits_to_keep == leaf.shape[1]
        assert compute_aux_loss == trainer.aux_loss_enabled
        return leaf, entropies, aux_loss

    trainer._get_per_token_logps_and_entropies = forward
    trainer.model.train(train)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    loss = compute(trainer, trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def tiny_moe_model(seed=0):
    """A randomly initialised 1-layer Mixtral with 2 experts: a model with a router loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MixtralForCausalLM(config)


def make_trainer(tmp_path, moe=False, **overrides):
    model = tiny_moe_model() if moe else tiny_model()
    if overrides.get("beta", 0.0) != 0.0:  # TRL builds the reference model from the policy's path
        model.save_pretrained(tmp_path / "policy")
        model = str(tmp_path / "policy")
    args = config(tmp_path, steps_per_generation=4, gradient_accumulation_steps=2, **overrides)
    return KPOGRPOTrainer(
        model=model, reward_funcs=reward_a, args=args, train_dataset=prompts(), processing_class=tiny_tokenizer()
    )


PARITY_CASES = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo"},
    "luspo": {"loss_type": "luspo"},
    "grpo-on-policy": {"loss_type": "grpo"},  # no old log-probs in the batch (TRL's on-policy case)
    "grpo-kl": {"loss_type": "grpo", "beta": 0.05},
    "bnpo-kl": {"loss_type": "bnpo", "beta": 0.05},
    "dr_grpo-kl": {"loss_type": "dr_grpo", "beta": 0.05},
    "luspo-kl": {"loss_type": "luspo", "beta": 0.05},
    "dapo-kl-bias-corrected": {"loss_type": "dapo", "beta": 0.05, "use_bias_correction_kl": True},
    "bnpo-entropy": {"loss_type": "bnpo", "entropy_coef": 0.01, "top_entropy_quantile": 0.5},
    "dr_grpo-off-policy-mask": {"loss_type": "dr_grpo", "off_policy_mask_threshold": 0.01},
    "grpo-delta": {"loss_type": "grpo", "delta": 1.5},
    "dapo-moe-router-loss": {"loss_type": "dapo", "moe": True, "router_aux_loss_coef": 0.02},
    "bnpo-vllm-is-correction": {"loss_type": "bnpo"},
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_trl_identity_filter_is_grpo_trainers_loss(tmp_path, case):
    """q = 1e8 (K = 1): KPOGRPOTrainer's loss and gradient are GRPOTrainer's own, for every
    loss_type normalisation, with the KL term, the entropy bonus and mask, the off-policy mask and
    TRL's two-sided clip (delta). The logged metrics that both compute agree too."""
    trainer = make_trainer(tmp_path, kalman_q=1e8, epsilon=0.2, epsilon_high=0.28, **PARITY_CASES[case])
    inputs, log_prob, entropies = fixed_batch(trainer)
    on_policy = case.endswith("on-policy")
    if on_policy:
        del inputs["old_per_token_logps"]
    if case.endswith("vllm-is-correction"):
        # What _compute_loss reads when the rollouts come from vLLM (vLLM itself is not needed here).
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(
            log_prob.shape, generator=torch.Generator().manual_seed(3)
        )
    loss, grad = loss_and_grad(KPOGRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies)
    ours = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    want_loss, want_grad = loss_and_grad(GRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies)
    theirs = trainer._metrics["train"]
    assert_close("loss", loss, want_loss, rtol=1e-5)
    assert_close("grad", grad, want_grad, rtol=1e-5)
    assert float(grad.abs().max()) > 0
    shared = {"clip_ratio/region_mean", "entropy", "kl", "policy_loss", "aux_loss"} & set(theirs)
    assert trainer.aux_loss_enabled == ("aux_loss" in shared) == PARITY_CASES[case].get("moe", False)
    assert {"clip_ratio/region_mean", "entropy"} <= shared
    for key in shared:
        assert_close(
            key, torch.tensor(ours[key], dtype=torch.float64), torch.tensor(theirs[key], dtype=torch.float64), rtol=1e-5
        )
    if on_policy:
        assert ours["kpo/ratio_max"] == ours["kpo/raw_ratio_max"] == [1.0]
    else:
        assert 0 < ours["clip_ratio/region_mean"][0] < 1  # the clip acts on this batch
    if "delta" in PARITY_CASES[case]:
        assert ours["kpo/clipfrac_lower"][0] > 0  # and so does TRL's two-sided clip
    for key in KPO_KEYS:
        assert len(ours[key]) == 1 and math.isfinite(ours[key][0]), key


@pytest.mark.parametrize("loss_type", list(LOSS_TYPE_AGG))
def test_trl_identity_filter_is_grpo_trainers_loss_in_evaluation(tmp_path, loss_type):
    """Evaluation batches are neither accumulated nor split: TRL normalises them differently."""
    trainer = make_trainer(tmp_path, kalman_q=1e8, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, beta=0.05)
    inputs, log_prob, entropies = fixed_batch(trainer, seed=4)
    loss, grad = loss_and_grad(KPOGRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies, train=False)
    want_loss, want_grad = loss_and_grad(GRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies, train=False)
    assert_close("loss", loss, want_loss, rtol=1e-5)
    assert_close("grad", grad, want_grad, rtol=1e-5)
    assert set(trainer._metrics["eval"]) >= set(KPO_KEYS) and not trainer._metrics["train"]


def expected_aggregation(loss_type, trainer, inputs, mask):
    """agg, counts and divisor of each TRL normalisation, written out from TRL's definitions."""
    batch = mask.shape[0]
    accumulation = trainer.args.gradient_accumulation_steps
    if loss_type == "grpo":
        return {"agg": "seq-mean-token-mean", "global_batch_size": batch}, accumulation
    if loss_type == "bnpo":
        return {"agg": "token-mean"}, accumulation
    if loss_type == "dr_grpo":
        return {
            "agg": "seq-mean-token-sum-norm",
            "global_batch_size": batch,
            "loss_scale_factor": trainer.args.max_completion_length,
        }, accumulation
    if loss_type == "luspo":
        return {"agg": "seq-mean-token-sum", "global_batch_size": batch}, accumulation
    count = float(inputs["num_items_in_batch"]) * accumulation / trainer.args.steps_per_generation
    return {"agg": "token-mean", "batch_num_tokens": count}, 1.0


@pytest.mark.parametrize("mask_mode", ["skip", "position"])
@pytest.mark.parametrize("loss_type", list(LOSS_TYPE_AGG))
def test_trl_loss_is_the_reference_kpo_loss(tmp_path, loss_type, mask_mode):
    """The Kalman-filtered loss (q = 1e-2) and its gradient, against the float64 reference, on a
    batch with right padding and tool-output holes."""
    # delta just above 1 + epsilon_high: KPO's dual clip acts on the filtered ratios.
    trainer = make_trainer(
        tmp_path, loss_type=loss_type, kalman_q=1e-2, kalman_x0=0.01, mask_mode=mask_mode, delta=1.001
    )
    inputs, log_prob, entropies = fixed_batch(trainer, seed=1)
    loss, grad = loss_and_grad(KPOGRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies)
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    options, divisor = expected_aggregation(loss_type, trainer, inputs, mask)
    batch = {
        "log_prob": log_prob,
        "old_log_prob": inputs["old_per_token_logps"],
        "advantages": inputs["advantages"],
        "mask": mask,
    }
    want_loss, want_metrics, want_grad = oracle(
        batch, q=1e-2, x0=0.01, mask_mode=mask_mode, clip_low=3e-4, clip_high=4e-4, dual_clip=1.001, **options
    )
    assert 0 < want_metrics["clipfrac"] < 1 and want_metrics["clipfrac_lower"] > 0
    assert_close("loss", loss, want_loss / divisor, rtol=2e-6)
    assert_close("grad", grad, want_grad / divisor, rtol=2e-6)
    logged = trainer._metrics["train"]
    for name in integration.LOGGED_METRICS:
        assert_close(
            name, torch.tensor(logged[f"kpo/{name}"], dtype=torch.float64), want_metrics[name].reshape(1), rtol=2e-6
        )


def test_trl_basic_metrics_from_a_config_file_leave_out_the_diagnostics(tmp_path):
    """kpo_metrics: basic in a TRL YAML config (TrlParser, as a TRL user sets it): the same loss,
    gradient and other kpo/ metrics as full; the diagnostics are not logged at all."""
    from trl import TrlParser

    runs = {}
    for choice in ("full", "basic"):
        path = tmp_path / f"{choice}.yaml"
        path.write_text(f"kpo_metrics: {choice}\nkalman_q: 0.01\nloss_type: bnpo\n")
        (args,) = TrlParser((KPOGRPOConfig,)).parse_args_and_config(
            args=["--config", str(path), "--output_dir", str(tmp_path / choice), "--use_cpu", "true", "--bf16", "false",
                  "--report_to", "none", "--per_device_train_batch_size", "4", "--num_generations", "4"]
        )
        assert args.kpo_metrics == choice and args.kalman_q == 0.01
        trainer = make_trainer(tmp_path / choice, **{k: getattr(args, k) for k in ("kpo_metrics", "kalman_q", "loss_type")})
        inputs, log_prob, entropies = fixed_batch(trainer, seed=3)
        runs[choice] = (*loss_and_grad(KPOGRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies),
                        {k: v for k, v in trainer._metrics["train"].items() if k.startswith("kpo/")})
    (full_loss, full_grad, full_logged), (loss, grad, logged) = runs["full"], runs["basic"]
    assert torch.equal(loss, full_loss) and torch.equal(grad, full_grad)
    diagnostics = {"kpo/nis_mean", "kpo/log_likelihood", "kpo/sign_flip_raw", "kpo/sign_flip_filtered"}
    assert set(full_logged) == set(KPO_KEYS) and set(logged) == set(KPO_KEYS) - diagnostics
    assert all(logged[key] == full_logged[key] for key in logged)


def test_trl_skip_mode_ignores_tool_output(tmp_path):
    """skip mode: the loss of a multi-turn batch is that of the same assistant tokens packed
    together (tool output removed); position mode differs."""
    results = {}
    for mode in ("skip", "position"):
        trainer = make_trainer(
            tmp_path / mode, loss_type="bnpo", kalman_q=1e-2, mask_mode=mode, epsilon=0.2, epsilon_high=0.2
        )
        inputs, log_prob, entropies = fixed_batch(trainer, seed=2)
        results[mode] = loss_and_grad(KPOGRPOTrainer._compute_loss, trainer, inputs, log_prob, entropies)[0]
        mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
        packed, packed_log_prob = dict(inputs), log_prob.clone()
        packed["old_per_token_logps"] = inputs["old_per_token_logps"].clone()
        packed["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
        packed["tool_mask"] = torch.ones_like(inputs["tool_mask"])
        for b in range(mask.shape[0]):
            valid = mask[b].nonzero().flatten()
            packed_log_prob[b, : valid.numel()] = log_prob[b, valid]
            packed["old_per_token_logps"][b, : valid.numel()] = inputs["old_per_token_logps"][b, valid]
            packed["completion_mask"][b, : valid.numel()] = 1
        results[mode + "-packed"] = loss_and_grad(
            KPOGRPOTrainer._compute_loss, trainer, packed, packed_log_prob, entropies
        )[0]
    assert_close("skip == packed", results["skip"], results["skip-packed"], rtol=1e-6)
    assert_close("position == skip on packed", results["position-packed"], results["skip-packed"], rtol=1e-6)
    assert abs(float(results["position"] - results["skip"])) > 1e-5


# --- configuration -------------------------------------------------------------------------------


def test_trl_config_extends_grpo_config_with_paper_defaults(tmp_path):
    args = config(tmp_path)
    assert isinstance(args, GRPOConfig)
    assert (args.kalman_q, args.kalman_r, args.kalman_p0, args.kalman_x0) == (1e-6, 1.0, 0.0, 0.0)
    assert (args.epsilon, args.epsilon_high, args.loss_type) == (3e-4, 4e-4, "grpo")
    assert args.is_clip is True and args.mask_mode == "skip" and args.log_ratio_cap == 10.0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"loss_type": "cispo"}, "replaces the clipped-ratio surrogate"),
        ({"loss_type": "sapo"}, "replaces the clipped-ratio surrogate"),
        ({"loss_type": "vespo"}, "replaces the clipped-ratio surrogate"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"delta": 1.0001}, "delta"),
        ({"kalman_r": 0.0}, "observation noise"),
        ({"mask_mode": "holes"}, "mask_mode"),
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy"),
        ({"kpo_backend": "cuda"}, "backend"),
        ({"kpo_metrics": "none"}, "kpo_metrics must be one of"),
        ({"kpo_metrics": None}, "kpo_metrics must be one of"),
    ],
)
def test_trl_config_rejects_what_kpo_cannot_do(tmp_path, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config(tmp_path, **bad)


def test_trl_trainer_needs_a_kpo_config(tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
    )
    with pytest.raises(TypeError, match="KPOGRPOConfig"):
        KPOGRPOTrainer(
            model=tiny_model(),
            reward_funcs=reward_a,
            args=args,
            train_dataset=prompts(),
            processing_class=tiny_tokenizer(),
        )
