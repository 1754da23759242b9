"""Smoke test of `python -m benchmarks.training --quick` (about 2 minutes on 2 idle CPU cores):
`pytest benchmarks/test_training.py`. In the benchmark suite, not the default test run."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (.[trl])")


def test_quick_training_comparison(tmp_path):
    out_json, out_png = tmp_path / "runs.json", tmp_path / "runs.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.training", "--quick", "--json", str(out_json), "--plot", str(out_png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # --quick takes about 2 minutes on 2 idle CPU cores
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| method |" in result.stdout

    data = json.loads(out_json.read_text())
    methods = {run["method"] for run in data["runs"]}
    assert {"grpo", "kpo-paper", "kpo-fit", "kpo-refit", "grpo-onpolicy"} <= methods
    for run in data["runs"]:
        rewards = [row["reward"] for row in run["steps"] if "reward" in row]
        assert len(run["steps"]) == data["schedule"]["steps"] and len(rewards) >= 5
        assert run["nonfinite_steps"] == 0
        for row in run["steps"]:
            assert all(math.isfinite(value) for value in row.values()), row
    fits = [fit for run in data["runs"] if run["method"] in ("kpo-fit", "kpo-refit") for fit in run["noise_fits"]]
    assert fits and all(fit["q"] > 0 and fit["r"] > 0 for fit in fits)

    import matplotlib.image

    image = matplotlib.image.imread(out_png)
    assert image.shape[0] > 500 and image.shape[1] > 1000
