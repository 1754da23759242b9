"""Smoke test of `python -m benchmarks.training --quick --seeds 1 --workers 1` (every method, one
seed, one run at a time): `pytest benchmarks/test_training.py`. In the benchmark suite, not the
default test run."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("trl") is None:
    pytest.skip("TRL is not installed (.[trl])", allow_module_level=True)

from benchmarks.training.trainers import METHODS  # noqa: E402


def test_quick_training_comparison(tmp_path):
    out_json, out_png = tmp_path / "runs.json", tmp_path / "runs.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.training", "--quick", "--seeds", "1", "--workers", "1", "--json", str(out_json), "--plot", str(out_png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # 9 runs of 150 steps, one at a time: a few minutes on a CPU
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| method |" in result.stdout

    data = json.loads(out_json.read_text())
    assert [run["method"] for run in data["runs"]] == list(METHODS)  # every method, one seed
    for run in data["runs"]:
        rewards = [row["reward"] for row in run["steps"] if "reward" in row]
        assert len(run["steps"]) == data["schedule"]["steps"] and len(rewards) >= 5
        assert run["nonfinite_steps"] == 0
        for row in run["steps"]:
            assert all(math.isfinite(value) for name, value in row.items() if name != "drift_evidence"), row
        if METHODS[run["method"]].options.get("kalman_fit"):
            fitted = [row for row in run["steps"] if row["refit"] == 1.0]
            assert fitted and all(row["kalman_r"] > 0 and math.isfinite(row["drift_evidence"]) for row in fitted)
            assert f"{run['method']}: " in result.stdout  # the tracker's line: fits, their cost
    fits = [fit for run in data["runs"] if run["method"] in ("kpo-fit", "kpo-refit") for fit in run["noise_fits"]]
    assert fits and all(fit["q"] > 0 and fit["r"] > 0 for fit in fits)

    import matplotlib.image

    image = matplotlib.image.imread(out_png)
    assert image.shape[0] > 500 and image.shape[1] > 1000
