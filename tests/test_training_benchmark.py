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
from benchmarks.training.trainers import METHODS, ratio_statistics  # noqa: E402
from helpers import make_mask  # noqa: E402
from kpo_kernels import fit_noise, kpo_loss  # noqa: E402
from kpo_kernels.tracker import RATIO_STEPS_PER_DECADE  # noqa: E402


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


TINY = Schedule(steps=4, batch_size=8, num_generations=4, length=16, steps_per_generation=2, num_iterations=2)


@pytest.fixture
def loss_calls(monkeypatch):
    """Every kpo_loss call of KPOGRPOTrainer: (z = log_prob - old_log_prob, mask, q, r)."""
    calls = []
    real = integration.kpo_loss

    def spy(log_prob, old_log_prob, advantages, mask, **options):
        calls.append(((log_prob.detach() - old_log_prob).clone(), mask.clone(), options["q"], options["r"]))
        return real(log_prob, old_log_prob, advantages, mask, **options)

    monkeypatch.setattr(integration, "kpo_loss", spy)
    return calls


def test_fitted_kpo_uses_the_fit_of_its_first_stale_batch(tmp_path, loss_calls):
    """kpo-fit: the loss runs with the paper's q until the first stale micro-batch, then with
    fit_noise's q and r of that micro-batch's own log-ratios; before it, z = 0 (on-policy)."""
    run = train("kpo-fit", 0, TINY, str(tmp_path))
    (fit,) = run["noise_fits"]
    assert len(loss_calls) == 4 and fit["step"] == 1  # fitted before optimizer step 2
    z, mask, q, r = loss_calls[0]
    assert float(z.abs().max()) == 0.0 and (q, r) == (1e-6, 1.0)  # on-policy: first micro-batch of the generation
    z, mask, q, r = loss_calls[1]
    assert float(z.abs().max()) > 0 and (q, r) == (fit["q"], fit["r"])
    again = fit_noise(z, mask)
    assert (again.q, again.r) == (fit["q"], fit["r"])  # the fit of this very micro-batch
    assert all(call[2:] == (fit["q"], fit["r"]) for call in loss_calls[1:])
    assert fit["q"] != 1e-6 and math.isfinite(fit["r"]) and fit["r"] > 0
    assert [row["stale"] for row in run["steps"]] == [0.0, 1.0, 1.0, 1.0]
    assert run["nonfinite_steps"] == 0


def test_refitted_kpo_fits_each_generation(tmp_path, loss_calls):
    schedule = Schedule(**{**TINY.__dict__, "steps": 8})
    run = train("kpo-refit", 0, schedule, str(tmp_path))
    fits = run["noise_fits"]
    assert [fit["step"] for fit in fits] == [1, 5]  # generations at steps 0 and 4 (0-based), fitted on the next
    assert [call[2:] for call in loss_calls[1:4]] == [(fits[0]["q"], fits[0]["r"])] * 3
    assert [call[2:] for call in loss_calls[5:]] == [(fits[1]["q"], fits[1]["r"])] * 3
    assert fits[0]["q"] != fits[1]["q"]


@pytest.mark.parametrize("method", ["kpo-per-step", "kpo-per-step-wide-clip", "kpo-per-generation"])
def test_product_fit_reaches_the_loss_and_is_timed(tmp_path, loss_calls, method):
    """kpo-per-step / kpo-per-generation: KPOGRPOConfig.kalman_fit's tracker sets the loss's q
    and r; its values and the time around its call are in the curves."""
    run = train(method, 0, Schedule(**{**TINY.__dict__, "steps": 8}), str(tmp_path))
    rows = run["steps"]
    assert [row["refit"] for row in rows] == (
        [0.0, 1.0, 1.0, 1.0] * 2 if "per-step" in method else [0.0, 1.0, 0.0, 0.0] * 2
    )  # fitted on stale micro-batches only; per generation: the first stale one
    for row, (z, mask, q, r) in zip(rows, loss_calls):
        assert (q, r) == (row["kalman_q"], row["kalman_r"])
        assert row["fit_seconds"] >= 0 and row["loss_seconds"] > row["fit_seconds"]
    # fit_noise in float64; the tracker's fit is float32 (docs: Q/R to ~1e-4), its ratio rounded to the grid
    fitted = fit_noise(*loss_calls[1][:2])
    ratio_error = abs(math.log(rows[1]["kalman_q"] / rows[1]["kalman_r"] / (fitted.q / fitted.r)))
    assert ratio_error <= math.log(10) / 2 / RATIO_STEPS_PER_DECADE + 1e-3
    assert rows[1]["kalman_r"] == pytest.approx(fitted.r, rel=1e-3)
    assert loss_calls[0][2:] == (1e-6, 1.0)  # the paper's q and R until the first fit
    assert math.isnan(rows[0]["drift_evidence"]) and run["nonfinite_steps"] == 0  # NaN only until the first fit
    assert report.nonfinite_steps([{**rows[1], "loss": math.nan}]) == 1
    summary = report.summarize([run], 0.5)[method]
    assert summary["fits"]["values"] == [6 if "per-step" in method else 2]
    assert summary["fit_ms_per_step"]["mean"] > 0 and 0 < summary["fit_share_of_loss"]["mean"] < 1
    assert f"{method}: " in report.table(report.summarize([run], 0.5), 0.5)


@pytest.mark.parametrize(
    ("method", "kpo_clip", "clip"),
    [
        ("grpo-paper-clip", None, (3e-4, 4e-4)),
        ("grpo-paper-clip", (0.1, 0.1), (3e-4, 4e-4)),
        ("kpo-per-step-wide-clip", (0.1, 0.1), (0.2, 0.2)),
        ("kpo-per-step", None, (3e-4, 4e-4)),
        ("kpo-per-step", (0.1, 0.1), (0.1, 0.1)),
    ],
)
def test_controls_train_with_their_own_clip_range(tmp_path, monkeypatch, method, kpo_clip, clip):
    """The controls' clip range is part of the method; --kpo-clip changes only the others'."""
    seen = []
    real = METHODS[method].trainer.__init__

    def spy(self, *args, **kwargs):
        seen.append((kwargs["args"].epsilon, kwargs["args"].epsilon_high))
        real(self, *args, **kwargs)

    monkeypatch.setattr(METHODS[method].trainer, "__init__", spy)
    train(method, 0, Schedule(**{**TINY.__dict__, "steps": 1, "kpo_clip": kpo_clip}), str(tmp_path))
    assert seen == [clip]


@pytest.mark.parametrize(("method", "stale"), [("grpo", [0.0, 1.0, 1.0, 1.0]), ("grpo-onpolicy", [0.0] * 4)])
def test_observer_of_trl_grpo(tmp_path, method, stale):
    run = train(method, 0, TINY, str(tmp_path))
    assert [row["stale"] for row in run["steps"]] == stale
    for row in run["steps"]:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        if row["stale"]:
            assert row["raw_abs_log_mean"] > 0 and 0 <= row["sign_flip_raw"] <= 1
        else:
            assert row["raw_abs_log_mean"] == 0.0 and row["raw_ratio_max"] == 1.0
    assert "sign_flip_filtered" not in run["steps"][0]


def test_observer_agrees_with_kpo_metrics_in_a_run(tmp_path):
    """The observer's raw statistics equal KPOGRPOTrainer's own kpo/ metrics, step by step."""
    run = train("kpo-paper", 0, TINY, str(tmp_path))
    for row in run["steps"]:
        assert row["sign_flip_raw"] == pytest.approx(row["kpo_sign_flip_raw"], abs=1e-6)
        assert row["raw_ratio_max"] == pytest.approx(row["kpo_raw_ratio_max"], rel=1e-6)


def test_summaries_of_synthetic_runs():
    def run(method, seed, rewards, every=2, grad_norm=1.0):
        """A generation every `every` steps (reward logged there), the other steps stale."""
        steps = []
        for i, value in enumerate(rewards):
            for k in range(every):
                row = {"step": every * i + k + 1, "loss": 0.0, "grad_norm": grad_norm, "stale": float(k > 0)}
                if k == 0:
                    row["reward"] = value
                else:
                    row["clipfrac"] = 0.25
                steps.append(row)
        return {"method": method, "seed": seed, "seconds": 1.0, "steps": steps, "nonfinite_steps": 0}

    rising = [0.1 * i for i in range(11)]  # 0 .. 1
    collapsing = rising[:6] + [0.0] * 5
    runs = [run("a", 0, rising, every=8), run("a", 1, rising, every=8), run("b", 0, collapsing, every=8)]
    # The same rewards generated every step, over 1/8 of the steps.
    runs.append(run("c", 0, [value for value in rising for _ in range(8)], every=1))
    summary = report.summarize(runs, threshold=0.5)
    a, b, c = summary["a"], summary["b"], summary["c"]
    # Moving average over 40 steps = 5 generations at 8 steps each: first >= 0.5 at generation 7
    # (0.3 .. 0.7), at step 57; the last 40 steps (of 88) hold 5 generations.
    assert a["steps_to_threshold"]["values"] == [57, 57] and a["steps_to_threshold"]["reached"] == "2/2"
    assert a["final_reward"]["mean"] == pytest.approx(0.8) and a["final_reward"]["std"] == 0.0
    assert b["steps_to_threshold"]["reached"] == "0/1" and b["steps_to_threshold"]["median"] is None
    assert b["peak_reward"]["mean"] == pytest.approx(0.3)  # 0.1 .. 0.5
    assert b["drop_from_peak"]["mean"] == pytest.approx(0.3)
    assert a["stale_clipfrac"]["mean"] == pytest.approx(0.25) and a["stale_fraction"]["mean"] == pytest.approx(7 / 8)
    # Windows are in steps: the every-step run is smoothed over the same training time.
    assert c["final_reward"]["mean"] == pytest.approx(a["final_reward"]["mean"])
    assert c["peak_reward"]["mean"] == pytest.approx(a["peak_reward"]["mean"])
    text = report.table(summary, 0.5)
    assert "| a | 0.800 ± 0.000 |" in text and "| b |" in text


def test_seed_table_and_merged_json_files(tmp_path):
    import json

    from benchmarks.training.__main__ import _load_records

    def run(method, seed, grad_norm):
        steps = [{"step": 1, "loss": 0.0, "grad_norm": grad_norm, "stale": 0.0, "reward": 0.25}]
        return {"method": method, "seed": seed, "seconds": 1.0, "steps": steps, "nonfinite_steps": 0}

    def write(name, runs, steps=600):
        path = tmp_path / name
        record = {"schedule": {"steps": steps}, "machine": "m", "date": "d", "commit": name, "threshold": 0.5, "runs": runs}
        path.write_text(json.dumps(record))
        return str(path)

    first = write("a.json", [run("grpo", 0, 547785.5), run("grpo", 1, 93.2)])
    second = write("b.json", [run("kpo-paper", 0, 1.35)])
    merged = _load_records([first, second])
    assert [source["commit"] for source in merged["sources"]] == ["a.json", "b.json"]
    text = report.seed_table(report.summarize(merged["runs"], 0.5))
    assert "| grpo | 0, 1 | 0.25, 0.25 | 5.5e5, 93 |" in text and "| kpo-paper | 0 | 0.25 | 1.4 |" in text
    with pytest.raises(SystemExit, match="another schedule"):
        _load_records([first, write("c.json", [run("kpo-paper", 1, 1.0)], steps=150)])
    with pytest.raises(SystemExit, match="repeat"):
        _load_records([first, first])


def test_first_seed_runs_later_seeds_and_reports_them(tmp_path, monkeypatch, capsys):
    """--seeds 2 --first-seed 5 trains seeds 5 and 6 (each run seeded with its own number), and
    the JSON, the per-seed table and --from-json merging with seeds 0, 1 all name those seeds."""
    import json

    import benchmarks.training.__main__ as command

    trained = []

    def fake_train_job(job):
        method, seed, schedule, _ = job
        trained.append((method, seed))
        steps = [{"step": 1, "loss": 0.0, "grad_norm": 1.0 + seed, "stale": 0.0, "reward": seed / 10}]
        return {"method": method, "seed": seed, "seconds": 1.0, "steps": steps, "nonfinite_steps": 0}

    monkeypatch.setattr(command, "train_job", fake_train_job)
    options = ["--methods", "grpo,kpo-paper", "--steps", "3", "--workers", "1", "--threads", "1"]
    later, first = tmp_path / "later.json", tmp_path / "first.json"
    assert command.main([*options, "--seeds", "2", "--first-seed", "5", "--json", str(later)]) == 0
    assert trained == [("grpo", 5), ("kpo-paper", 5), ("grpo", 6), ("kpo-paper", 6)]
    record = json.loads(later.read_text())
    assert record["seeds"] == [5, 6] and [run["seed"] for run in record["runs"]] == [5, 5, 6, 6]
    assert record["summary"]["grpo"]["seeds"] == [5, 6]
    assert "| grpo | 5, 6 | 0.50, 0.60 | 6, 7 |" in capsys.readouterr().out

    trained.clear()
    assert command.main([*options, "--seeds", "2", "--json", str(first)]) == 0  # default: from seed 0
    assert trained == [("grpo", 0), ("kpo-paper", 0), ("grpo", 1), ("kpo-paper", 1)]
    capsys.readouterr()
    merged = tmp_path / "merged.json"
    assert command.main(["--from-json", f"{later},{first}", "--json", str(merged)]) == 0
    assert "| kpo-paper | 0, 1, 5, 6 | 0.00, 0.10, 0.50, 0.60 | 1, 2, 6, 7 |" in capsys.readouterr().out
    assert json.loads(merged.read_text())["seeds"] == [0, 1, 5, 6]

    with pytest.raises(SystemExit):
        command.parse(["--from-json", str(later), "--first-seed", "5"])  # --from-json does not train
    with pytest.raises(SystemExit):
        command.parse(["--first-seed", "-1"])
