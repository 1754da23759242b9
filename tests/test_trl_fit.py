"""TRL `kalman_fit` (issue 17): a real GRPOTrainer run with Q and R fitted per step and per
generation, the fit's metrics in TRL's logs, and bad values refused by their config names."""

import importlib.util
import math

import pytest

if importlib.util.find_spec("trl") is None:
    pytest.skip("TRL is not installed (pip install -e '.[trl]')", allow_module_level=True)

import kpo_kernels.integrations.trl as integration  # noqa: E402
from kpo_kernels.integrations.trl import KPOGRPOTrainer  # noqa: E402
from kpo_kernels.tracker import FIT_METRICS  # noqa: E402
from test_trl import config, prompts, reward_a, tiny_model, tiny_tokenizer  # noqa: E402


def train(tmp_path, monkeypatch, kalman_fit, evaluate=False):
    """The training calls of kpo_loss (q, r, stale) and TRL's step logs; evaluate: an evaluation
    (its own generation and loss) after every optimizer step."""
    calls = []
    real_kpo_loss = integration.kpo_loss

    def spy(log_prob, old_log_prob, advantages, mask, **options):
        if log_prob.requires_grad:  # a training micro-batch (evaluation runs without gradients)
            calls.append((options["q"], options["r"], bool((log_prob.detach() != old_log_prob).any())))
        return real_kpo_loss(log_prob, old_log_prob, advantages, mask, **options)

    monkeypatch.setattr(integration, "kpo_loss", spy)
    evaluation = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4) if evaluate else {}
    args = config(tmp_path, steps_per_generation=2, num_iterations=2, max_steps=8, kalman_fit=kalman_fit,
                  kalman_fit_min_tokens=8, max_completion_length=16, **evaluation)
    trainer = KPOGRPOTrainer(model=tiny_model(), reward_funcs=reward_a, args=args, train_dataset=prompts(),
                             eval_dataset=prompts() if evaluate else None, processing_class=tiny_tokenizer())
    assert trainer.noise_tracker.backend == args.kpo_backend  # the fit runs where the loss runs
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    return calls, steps


@pytest.mark.parametrize("evaluate", [False, True], ids=["train", "with-evaluation"])
@pytest.mark.parametrize("kalman_fit", ["per_step", "per_generation"])
def test_trl_fits_q_and_r_while_training(tmp_path, monkeypatch, kalman_fit, evaluate):
    """2 generations x 4 optimizer steps: the first step of each generation is on-policy (never
    fitted); per_step fits the other three, per_generation the first of them only. The same
    with an evaluation after every step: its generation is no rollout batch of training."""
    calls, steps = train(tmp_path, monkeypatch, kalman_fit, evaluate)
    assert len(calls) == 8 and len(steps) == 8
    assert calls[0][:2] == (1e-6, 1.0)  # before any fit: kalman_q, kalman_r
    refits = [log["kpo/refit"] for log in steps]
    stale = [i % 4 != 0 for i in range(8)]
    if kalman_fit == "per_step":
        assert refits == [float(s) for s in stale]
    else:
        assert refits == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        assert calls[2][:2] == calls[1][:2] == calls[3][:2]  # fixed within a generation
    assert calls[1][:2] != (1e-6, 1.0)
    for log, call in zip(steps, calls):
        for name in FIT_METRICS:
            assert f"kpo/{name}" in log
        assert (log["kpo/kalman_q"], log["kpo/kalman_r"]) == pytest.approx(call[:2])
        assert math.isfinite(log["loss"])


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"kalman_fit": "always"}, "kalman_fit"),
        ({"kalman_fit": "per_step", "kalman_p0": 0.5}, "kalman_p0"),
        ({"kalman_fit_q_min": -1.0}, "kalman_fit_q_min"),
        ({"kalman_fit_min_tokens": 0}, "kalman_fit_min_tokens"),
        ({"kalman_fit_max_tokens": 1}, "kalman_fit_max_tokens"),
    ],
)
def test_trl_config_refuses_bad_fit_options_by_name(tmp_path, bad, words):
    with pytest.raises((TypeError, ValueError), match=words):
        config(tmp_path, **bad)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"epsilon": -0.1}, "^epsilon: clip_low must be >= 0"),
        ({"epsilon_high": -0.1}, "^epsilon_high: clip_high must be >= 0"),
        ({"is_clip": "yes"}, "^is_clip: clip must be a bool"),
        ({"kalman_q": -1.0}, "^kalman_q: q .*process noise"),
        ({"kalman_x0": math.inf}, "^kalman_x0: x0 must be finite"),
    ],
)
def test_trl_config_refuses_bad_loss_options_by_name(tmp_path, bad, words):
    """The loss's options are checked as kpo_loss checks them, and named by the config's fields."""
    with pytest.raises((TypeError, ValueError), match=words):
        config(tmp_path, **bad)
