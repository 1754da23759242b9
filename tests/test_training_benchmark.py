"""The pieces of `python -m benchmarks.training` that its numbers rest on: the reward, the ratio
statistics, the noise fit actually reaching the loss, and the summaries. (The whole command's
smoke test is in the benchmark suite: benchmarks/test_training.py.)"""

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("trl") is None:
    pytest.skip("TRL is not installed (pip install -e '.[trl]')", allow_module_level=True)

import kpo_kernels.integrations.trl as integration  # noqa: E402
from benchmarks.training import report, task  # noqa: E402
from benchmarks.training.run import Schedule, train  # noqa: E402
from benchmarks.training.trainers import ratio_statistics  # noqa: E402
from helpers import make_mask  # noqa: E402
from kpo_kernels import kpo_loss  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_stride_reward_grades_each_position_against_the_previous_digit():
    reward = task.stride_reward(4)
    prompts = ["3 2", "9 1", "0 3", "5 1", "5 1"]
    completions = [
        "5 7 9 1",  # all right
        "0 1 2 3",  # wraps at 10
        "3 6 0 3",  # 9 + 3 = 2 (mod 10), not 0; the next digit is graded against the 0
        "6 7",  # two of the four positions are missing
        "6 7 8 9 0 1",  # positions past the length do not count
    ]
    assert reward(prompts, completions) == [1.0, 1.0, 0.75, 0.5, 1.0]


def test_tokenizer_round_trips_digits_and_generation_never_samples_specials():
    tokenizer = task.tokenizer()
    ids = tokenizer("3 1 4 1 5")["input_ids"]
    assert tokenizer.decode(ids) == "3 1 4 1 5"
    assert set(task.special_token_ids()) == {tokenizer.convert_tokens_to_ids(t) for t in task.SPECIAL}
    assert not set(ids) & set(task.special_token_ids())


@pytest.mark.parametrize("layout", ["none", "right", "holes", "empty_rows"])
@pytest.mark.parametrize("seed", range(3))
def test_ratio_statistics_match_kpo_loss_raw_metrics(layout, seed):
    """The observer's raw statistics (logged for GRPO too) are those kpo_loss reports."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(6, 33, generator=generator, dtype=torch.float64)
    new = old + 0.05 * torch.randn(6, 33, generator=generator, dtype=torch.float64)
    mask = make_mask(6, 33, layout, generator)
    mask = torch.ones(6, 33, dtype=torch.bool) if mask is None else mask
    stats = ratio_statistics(new - old, mask)
    _, metrics = kpo_loss(new, old, torch.ones(6), mask.double(), backend="torch")
    assert stats["sign_flip_raw"] == pytest.approx(float(metrics["sign_flip_raw"]), abs=1e-12)
    assert stats["raw_mean"] == pytest.approx(float(metrics["raw_ratio_mean"]), rel=1e-12)
    assert stats["raw_max"] == pytest.approx(float(metrics["raw_ratio_max"]), rel=1e-12)
    z = (new - old)[mask]
    assert stats["abs_log_mean"] == pytest.approx(float(z.abs().mean()), rel=1e-12)


def test_ratio_statistics_of_an_empty_batch_are_empty():
    assert ratio_statistics(torch.zeros(2, 3), torch.zeros(2, 3)) == {}


def test_fitted_kpo_uses_the_fit_of_its_first_stale_batch(tmp_path, monkeypatch):
    """kpo-fit: the loss runs with the paper's q until the first stale micro-batch, then with
    fit_noise's q and r on that batch's log-ratios; before it, z = 0 (on-policy)."""
    calls = []
    real = integration.kpo_loss

    def spy(log_prob, old_log_prob, advantages, mask, **options):
        gap = (log_prob.detach() - old_log_prob).abs().max()
        calls.append((float(gap), options["q"], options["r"]))
        return real(log_prob, old_log_prob, advantages, mask, **options)

    monkeypatch.setattr(integration, "kpo_loss", spy)
    schedule = Schedule(steps=4, batch_size=8, num_generations=4, length=16, steps_per_generation=2, num_iterations=2)
    run = train("kpo-fit", 0, schedule, str(tmp_path))
    fit = run["noise_fit"]
    assert len(calls) == 4
    assert calls[0] == (0.0, 1e-6, 1.0)  # on-policy: the first micro-batch of the generation
    assert calls[1][0] > 0 and calls[1][1:] == (fit["q"], fit["r"])
    assert all(call[1:] == (fit["q"], fit["r"]) for call in calls[1:])
    assert fit["q"] != 1e-6 and math.isfinite(fit["r"]) and fit["r"] > 0
    stale = [row["stale"] for row in run["steps"]]
    assert stale == [0.0, 1.0, 1.0, 1.0]
    assert all(math.isfinite(row["loss"]) for row in run["steps"])


def test_summaries_of_synthetic_runs():
    def run(method, seed, rewards, grad_norm=1.0):
        steps = []
        for i, value in enumerate(rewards):
            steps.append({"step": 2 * i + 1, "loss": 0.0, "grad_norm": grad_norm, "reward": value, "stale": 0.0})
            steps.append({"step": 2 * i + 2, "loss": 0.0, "grad_norm": grad_norm, "stale": 1.0, "clipfrac": 0.25})
        return {"method": method, "seed": seed, "seconds": 1.0, "steps": steps, "nonfinite_steps": 0}

    rising = [0.1 * i for i in range(11)]  # 0 .. 1 over 11 generations
    collapsing = rising[:6] + [0.0] * 5
    summary = report.summarize([run("a", 0, rising), run("a", 1, rising), run("b", 0, collapsing)], threshold=0.5)
    a, b = summary["a"], summary["b"]
    # Moving average over 5 generations: first >= 0.5 at generation 7 (0.3..0.7), step 15.
    assert a["steps_to_threshold"]["values"] == [15, 15] and a["steps_to_threshold"]["reached"] == "2/2"
    assert a["final_reward"]["mean"] == pytest.approx(0.8) and a["final_reward"]["std"] == 0.0
    assert b["steps_to_threshold"]["reached"] == "0/1" and b["steps_to_threshold"]["median"] is None
    assert b["peak_reward"]["mean"] == pytest.approx(0.3)  # 0.1 .. 0.5
    assert b["drop_from_peak"]["mean"] == pytest.approx(0.3)
    assert a["stale_clipfrac"]["mean"] == pytest.approx(0.25) and a["stale_fraction"]["mean"] == 0.5
    text = report.table(summary, 0.5)
    assert "| a | 0.800 ± 0.000 |" in text and "| b |" in text
