"""OpenRLHF integration (`KPOPolicyLoss`), tested through the real OpenRLHF 0.11.2 package on the CPU.

The loss is called where OpenRLHF calls it: `ActorPPOTrainer.training_step` of
`openrlhf.trainer.ray.ppo_actor`, with OpenRLHF's `Actor` around a small random transformers model,
its `Experience`, its `get_loss_batch_info`, and arguments parsed by its own command-line parser
(`openrlhf.cli.train_ppo_ray`). Stand-ins, each for something that needs a GPU build:

- `vllm` (imported by `openrlhf.trainer.ray.vllm_engine`, reached through the package
  `openrlhf.trainer.ray`): a CUDA build only; the stand-in has the three names imported at module
  level and is never called.
- `flash_attn` (imported by `openrlhf.models.ring_attn_utils` at module level): a CUDA build
  only; used for packed samples, which these tests do not use (the stand-in raises if called).
- `torch.cuda.synchronize` and `torch.cuda.current_device` (called unconditionally by
  `ActorPPOTrainer.__init__` and its `NaiveReplayBuffer`, which training_step does not use):
  a no-op and 0 here.
- the DeepSpeed engine behind `strategy.backward` / `optimizer_step` (`Strategy` below): plain
  `loss.backward()`, recording the gradients. It runs after the loss, which is what is tested.

Each stand-in is installed only when the real module is missing.
"""

import argparse
import importlib
import importlib.util
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

# Skipped only when OpenRLHF is not installed: an installed OpenRLHF that fails to import is an error.
if importlib.util.find_spec("openrlhf") is None:
    pytest.skip("OpenRLHF is not installed (CI's recipe is in .ci/run)", allow_module_level=True)


# The stand-ins (see the module docstring), as source: this module runs it, and so does the
# subprocess of test_worker_hook_waits_for_the_actor_module.
STAND_INS = textwrap.dedent("""
    import importlib.machinery, importlib.util, sys, types

    import transformers.modeling_utils  # transformers decides at import that flash-attn is absent

    def _stand_in(name, **attributes):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package="__path__" in attributes)
        module.__dict__.update(attributes)
        sys.modules[name] = module

    def _not_here(*args, **kwargs):
        raise RuntimeError("flash_attn stand-in (tests/test_openrlhf.py): packed samples need the CUDA build")

    if importlib.util.find_spec("vllm") is None:
        _stand_in("vllm", __version__="0.0.0", __path__=[])
        _stand_in("vllm.inputs", TokensPrompt=dict)
        _stand_in("vllm.utils", random_uuid=lambda: "0")
    if importlib.util.find_spec("flash_attn") is None:
        _stand_in("flash_attn", __path__=[])
        _stand_in("flash_attn.bert_padding", index_first_axis=_not_here, pad_input=_not_here, rearrange=_not_here, unpad_input=_not_here)
        _stand_in("flash_attn.utils", __path__=[])
        _stand_in("flash_attn.utils.distributed", all_gather=_not_here)
""")
exec(STAND_INS)

import openrlhf  # noqa: E402, F401
import torch.distributed as dist  # noqa: E402
from openrlhf.models import Actor  # noqa: E402
from openrlhf.models.loss import PolicyLoss  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ray import ppo_actor  # noqa: E402
from openrlhf.utils.config import hierarchize  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kpo_kernels import kpo_loss  # noqa: E402
from kpo_kernels.integrations import openrlhf as kpo_openrlhf  # noqa: E402
from kpo_kernels.integrations._openrlhf_worker import ENV_VAR, HOOK  # noqa: E402
from kpo_kernels.integrations.openrlhf import KPOPolicyLoss, disable, enable, split_arguments  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# OpenRLHF has bound what it imports: the stand-ins leave sys.modules, so that other test files
# run by the same pytest worker (TRL and verl probe for vllm) see no vllm or flash-attn.
for _name in [m for m in sys.modules if m.split(".")[0] in ("vllm", "flash_attn") and sys.modules[m].__spec__.loader is None]:
    del sys.modules[_name]

IDENTITY = dict(q=1e8, r=1.0)  # K = 1 at every token: the filtered ratio is the token ratio (docs/math.md)


def assert_grads_close(got, want):
    """fp32 gradients of the same loss by two routes: equal to rounding, relative to the largest entry."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class _Parsed(Exception):
    pass


def openrlhf_args(monkeypatch, *flags):
    """The arguments OpenRLHF's own parser (`openrlhf.cli.train_ppo_ray`) gives for `flags`, with
    the two normalisations its `__main__` applies before training."""
    parse = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", ["train_ppo_ray", *flags])
    with pytest.raises(_Parsed) as parsed:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    args = hierarchize(parsed.value.args[0])
    if args.actor.eps_clip_low_high is None:
        args.actor.eps_clip_low_high = (args.actor.eps_clip, args.actor.eps_clip)
    if len(args.algo.advantage.is_correction_threshold) == 1:
        args.algo.advantage.is_correction_threshold.insert(0, 0.0)
    return args


class Strategy:
    """Stand-in for OpenRLHF's DeepspeedStrategy after the loss: backward and record gradients."""

    ring_attn_group = None

    def __init__(self, args):
        self.args, self.grads, self.losses = args, None, []

    def backward(self, loss, model, optimizer):
        self.losses.append(loss.detach())
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name=None):
        self.grads = [p.grad.clone() for p in model.parameters()]
        optimizer.zero_grad()

    def get_grad_norm(self, model):
        return 0.0


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A one-process gloo group: ActorPPOTrainer.__init__ calls a barrier, get_loss_batch_info all_reduce."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def no_cuda_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    yield
    disable()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random Llama saved as a checkpoint, loaded by OpenRLHF's Actor as a model path."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_trainer(args, model_dir):
    actor = Actor(model_dir, attn_implementation="eager").float()  # OpenRLHF loads bf16; fp32 for tight comparisons
    optim = torch.optim.SGD(actor.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    return ppo_actor.ActorPPOTrainer(Strategy(args), actor, None, optim, scheduler, micro_train_batch_size=4)


def make_experience(trainer, seed=1, staleness=0.3):
    """A left-padded batch of 4 responses of different lengths; old and rollout log-probs are the
    actor's own plus noise (off-policy), advantages per response broadcast over tokens."""
    g = torch.Generator().manual_seed(seed)
    B, prompt, A = 4, 5, 7
    sequences = torch.randint(1, 64, (B, prompt + A), generator=g)
    attention_mask = torch.ones(B, prompt + A, dtype=torch.long)
    attention_mask[0, :2] = 0  # left padding of a short prompt
    action_mask = torch.ones(B, A, dtype=torch.bool)
    action_mask[1, 4:] = False  # shorter responses, right padded
    action_mask[2, 2:] = False
    attention_mask[1, prompt + 4 :] = 0
    attention_mask[2, prompt + 2 :] = 0
    with torch.no_grad():
        current = trainer.actor(sequences, action_mask, attention_mask=attention_mask)
    old = current + staleness * torch.randn(B, A, generator=g)
    rollout = old + 0.2 * torch.randn(B, A, generator=g)
    advantages = torch.randn(B, 1, generator=g).expand(B, A).clone()
    experience = Experience(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        action_log_probs=old,
        base_action_log_probs=old.clone(),
        rollout_log_probs=rollout,
        advantages=advantages,
    )
    return experience, current


def step(args, model_dir, experience_seed=1, loss_batch_info=None):
    """OpenRLHF's training_step on a fresh trainer (same weights every call): its status, the
    trainer, the gradients and the experience."""
    trainer = make_trainer(args, model_dir)
    experience, current = make_experience(trainer, experience_seed)
    status = trainer.training_step(experience, 0.0, 0, loss_batch_info)
    return status, trainer, trainer.strategy.grads, experience, current


CONFIGS = {
    "token-mean": [],
    "seq-mean-token-mean, dual clip": ["--actor.loss_agg_mode", "seq-mean-token-mean", "--actor.dual_clip", "3.0"],
    "IS correction token mask": ["--actor.eps_clip_low_high", "0.1", "0.3", "--algo.advantage.is_correction_level", "token", "--algo.advantage.is_correction_threshold", "0.8", "1.2"],
    "IS correction seq, tv": ["--actor.loss_agg_mode", "seq-mean-token-mean", "--algo.advantage.is_correction_level", "seq", "--algo.advantage.is_correction_gating", "tv", "--algo.advantage.is_correction_threshold", "0.2"],
    "IS correction token clip": ["--algo.advantage.is_correction_level", "token", "--algo.advantage.is_correction_mode", "clip"],
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dp", [None, 2])
def test_identity_filter_equals_openrlhf_policy_loss(monkeypatch, model_dir, name, dp):
    """With K = 1 the filtered ratio is the token ratio: training_step with KPO gives OpenRLHF's
    own vanilla loss, metrics and gradients, for each aggregation, dual clip and IS correction."""
    args = openrlhf_args(monkeypatch, *CONFIGS[name])
    info = None if dp is None else {"dp_size": dp, "batch_num_tokens": torch.tensor(31.0), "global_batch_size": torch.tensor(6.0)}
    vanilla, trainer, vanilla_grads, _, _ = step(args, model_dir, loss_batch_info=info)
    assert type(trainer.actor_loss_fn) is PolicyLoss
    enable(**IDENTITY)
    kpo, trainer, kpo_grads, _, _ = step(args, model_dir, loss_batch_info=info)
    assert isinstance(trainer.actor_loss_fn, KPOPolicyLoss)
    shared = [k for k in vanilla["metrics"] if isinstance(vanilla["metrics"][k], torch.Tensor)]
    assert {"policy_loss", "ppo_clip_ratio", "ppo_kl"} <= set(shared)
    assert ("vllm_kl" in shared) == ("IS correction" in name)
    for key in shared:
        torch.testing.assert_close(kpo["metrics"][key], vanilla["metrics"][key], rtol=2e-6, atol=1e-7, msg=key)
    for got, want in zip(kpo_grads, vanilla_grads):
        assert_grads_close(got, want)
    assert any(g.abs().max() > 0 for g in kpo_grads)
    assert {f"kpo/{m}" for m in kpo_openrlhf.LOGGED_METRICS} <= set(kpo["metrics"])
    assert all(kpo["weights"][f"kpo/{m}"] == "token" for m in kpo_openrlhf.LOGGED_METRICS)


@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-mean, dual clip", "IS correction token mask"])
def test_filter_equals_kpo_loss(monkeypatch, model_dir, name):
    """With a real filter, training_step's loss and gradient are `kpo_loss`'s on the same tensors
    with OpenRLHF's arguments mapped: clip range, dual clip, aggregation, global counts, IS weights."""
    args = openrlhf_args(monkeypatch, *CONFIGS[name])
    enable(q=1e-3, r=1.0, mask_mode="skip")
    info = {"dp_size": 2, "batch_num_tokens": torch.tensor(31.0), "global_batch_size": torch.tensor(6.0)}
    status, trainer, grads, experience, current = step(args, model_dir, loss_batch_info=info)
    loss_fn = trainer.actor_loss_fn
    weights = None
    if loss_fn.is_correction_level != "off":
        weights, _ = loss_fn._is_correction(experience.action_log_probs, experience.rollout_log_probs, experience.action_mask)
    token = args.actor.loss_agg_mode == "token-mean"
    expected, metrics = kpo_loss(
        current, experience.action_log_probs, experience.advantages, experience.action_mask,
        q=1e-3, r=1.0, log_ratio_cap=20.0, clip_low=args.actor.eps_clip_low_high[0], clip_high=args.actor.eps_clip_low_high[1],
        dual_clip=args.actor.dual_clip, agg="token-mean" if token else "seq-mean-token-mean", is_weights=weights,
        dp_size=2, **({"batch_num_tokens": 31.0} if token else {"global_batch_size": 6.0}),
    )  # fmt: skip
    torch.testing.assert_close(status["metrics"]["policy_loss"], expected, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(status["metrics"]["ppo_clip_ratio"], metrics["clipfrac"])
    # The same loss through autograd on the actor: the gradients training_step produced.
    trainer.actor.zero_grad()
    log_probs = trainer.actor(experience.sequences, experience.action_mask, attention_mask=experience.attention_mask)
    again, _ = kpo_loss(log_probs, experience.action_log_probs, experience.advantages, experience.action_mask, **{
        **loss_fn.kpo_options, "clip_low": loss_fn.clip_eps_low, "clip_high": loss_fn.clip_eps_high, "dual_clip": loss_fn.dual_clip,
        "agg": "token-mean" if token else "seq-mean-token-mean", "is_weights": weights, "dp_size": 2,
        **({"batch_num_tokens": 31.0} if token else {"global_batch_size": 6.0})})  # fmt: skip
    again.backward()
    for got, param in zip(grads, trainer.actor.parameters()):
        assert_grads_close(got, param.grad)
    vanilla = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2)(current, experience.action_log_probs, experience.advantages, experience.action_mask)[0]
    assert abs(float(expected - vanilla)) > 1e-6  # the filter changed the loss


def test_basic_metrics_from_the_launcher_flag(monkeypatch, model_dir):
    """`--kpo.metrics basic`: the same training_step loss, clip ratio and gradients as full, and
    KPO's logged metrics without the diagnostics (nis_mean, the sign flips)."""
    options, rest = split_arguments(["--kpo.q", "1e-3", "--kpo.metrics", "basic"])
    assert options == {"q": 1e-3, "metrics": "basic"} and rest == []
    args = openrlhf_args(monkeypatch, *CONFIGS["token-mean"])
    info = {"dp_size": 1, "batch_num_tokens": torch.tensor(31.0), "global_batch_size": torch.tensor(6.0)}
    runs = {}
    for choice in ("full", "basic"):
        enable(q=1e-3, metrics=choice)
        runs[choice] = step(args, model_dir, loss_batch_info=info)
    (full, _, full_grads, _, _), (basic, _, basic_grads, _, _) = runs["full"], runs["basic"]
    for key in ("policy_loss", "ppo_clip_ratio"):
        assert torch.equal(basic["metrics"][key], full["metrics"][key]), key
    for got, want in zip(basic_grads, full_grads):
        assert torch.equal(got, want)
    logged = {key for key in basic["metrics"] if key.startswith("kpo/")}
    assert logged == {f"kpo/{m}" for m in kpo_openrlhf.LOGGED_METRICS} - {"kpo/nis_mean", "kpo/sign_flip_raw", "kpo/sign_flip_filtered"}
    with pytest.raises(ValueError, match="metrics must be one of"):
        enable(metrics="none")


def test_default_loss_batch_info(monkeypatch, model_dir):
    """training_step without precomputed counts: OpenRLHF's get_loss_batch_info (all_reduce over
    the process group) gives the global counts, and the identity case still equals OpenRLHF's."""
    args = openrlhf_args(monkeypatch)
    vanilla = step(args, model_dir)[0]
    enable(**IDENTITY)
    kpo = step(args, model_dir)[0]
    torch.testing.assert_close(kpo["metrics"]["policy_loss"], vanilla["metrics"]["policy_loss"], rtol=2e-6, atol=1e-7)


def test_gspo_and_bad_options_refused(monkeypatch, model_dir):
    args = openrlhf_args(monkeypatch, "--actor.policy_loss_type", "gspo")
    enable()
    with pytest.raises(ValueError, match="GSPO"):
        make_trainer(args, model_dir)
    with pytest.raises(ValueError):
        enable(q=-1.0)
    with pytest.raises(TypeError, match="unexpected options"):
        enable(kalman_q=1e-6)
    with pytest.raises(AssertionError, match="dual_clip"):  # OpenRLHF's own check, kept
        KPOPolicyLoss(dual_clip=0.5)


def test_disable_restores_openrlhf(monkeypatch, model_dir):
    args = openrlhf_args(monkeypatch)
    enable(q=1e-4)
    assert isinstance(make_trainer(args, model_dir).actor_loss_fn, KPOPolicyLoss)
    disable()
    trainer = make_trainer(args, model_dir)
    assert type(trainer.actor_loss_fn) is PolicyLoss
    assert ppo_actor.ActorPPOTrainer.training_step.__qualname__ == "ActorPPOTrainer.training_step"


def test_launcher_arguments():
    options, rest = split_arguments(["--kpo.q", "1e-5", "--actor.eps_clip", "0.2", "--kpo.r=2", "--kpo.mask_mode", "position", "--kpo.log_ratio_cap", "none"])
    assert options == {"q": 1e-5, "r": 2.0, "mask_mode": "position", "log_ratio_cap": None}
    assert rest == ["--actor.eps_clip", "0.2"]
    with pytest.raises(ValueError, match="unknown flag --kpo.kalman_q"):
        split_arguments(["--kpo.kalman_q", "1"])
    with pytest.raises(ValueError, match="needs a value"):
        split_arguments(["--kpo.q"])
    with pytest.raises(ValueError, match=r"--kpo.q must be a number \(or none, where the option allows it\), got 'abc'"):
        split_arguments(["--kpo.q", "abc"])
    with pytest.raises(ValueError, match=r"^--kpo.q: q \(process noise variance\) must be >= 0"):
        kpo_openrlhf.main(["--kpo.q=-1"])  # checked by the flag's name before Ray starts


def test_launcher_runs_openrlhf_with_the_worker_hook(monkeypatch, capsys):
    """`python -m kpo_kernels.integrations.openrlhf <flags>` runs OpenRLHF's train_ppo_ray (here
    up to its parser's --help) with the KPO flags removed; OpenRLHF's ray.init then gets the
    options and the worker setup hook in its runtime_env (ray.init is recorded, not run)."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, runtime_env=None, **k: calls.append(runtime_env))
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    monkeypatch.setenv(ENV_VAR, "{}")  # main sets it; restored (removed) after the test
    with pytest.raises(SystemExit) as exit_code:
        kpo_openrlhf.main(["--kpo.q", "1e-5", "--help"])
    assert exit_code.value.code == 0 and "--actor.eps_clip_low_high" in capsys.readouterr().out
    ray.init(runtime_env={"env_vars": {"NCCL_DEBUG": "WARN"}})
    assert calls == [{"env_vars": {"NCCL_DEBUG": "WARN", ENV_VAR: '{"q": 1e-05}'}, "worker_process_setup_hook": HOOK}]


def test_worker_hook_enables_kpo_in_this_process(monkeypatch, model_dir):
    """The hook in a process that has imported OpenRLHF's actor module: KPO at once, with the options."""
    monkeypatch.setenv(ENV_VAR, '{"q": 0.001, "mask_mode": "position"}')
    setup_hook = importlib.import_module(HOOK.rpartition(".")[0])
    setup_hook.setup()
    loss_fn = make_trainer(openrlhf_args(monkeypatch), model_dir).actor_loss_fn
    assert isinstance(loss_fn, KPOPolicyLoss) and loss_fn.kpo_options["q"] == 1e-3 and loss_fn.kpo_options["mask_mode"] == "position"


def test_worker_hook_waits_for_the_actor_module(tmp_path):
    """The hook in a fresh worker (a subprocess): nothing of OpenRLHF or DeepSpeed is imported
    until the actor module is; right after that import the trainer's PolicyLoss is KPO's."""
    script = STAND_INS + textwrap.dedent(f"""
        import os, sys
        os.environ[{ENV_VAR!r}] = '{{"r": 2.0}}'
        from kpo_kernels.integrations import _openrlhf_worker
        _openrlhf_worker.setup()
        assert not any(m.split(".")[0] in ("openrlhf", "deepspeed") for m in sys.modules), "imported too early"
        from openrlhf.trainer.ray import ppo_actor
        from kpo_kernels.integrations.openrlhf import KPOPolicyLoss
        loss_fn = ppo_actor.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.3)
        assert isinstance(loss_fn, KPOPolicyLoss) and loss_fn.kpo_options["r"] == 2.0
        print("kpo enabled")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0 and "kpo enabled" in run.stdout, run.stderr[-3000:]
