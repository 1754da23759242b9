"""The test tiers of conftest.py: fast + slow is every test, only property tests are in both, and
a test named on the command line runs in any tier."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _is_property_test(node_id):
    path, name = node_id.split("::")
    module = importlib.import_module(Path(path).stem)
    return getattr(getattr(module, name), "is_hypothesis_test", False)


def _collected(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line for line in proc.stdout.splitlines() if "::" in line}


@pytest.mark.slow  # three collections of the whole suite
def test_fast_and_slow_make_every_test():
    fast, slow, everything = _collected(), _collected("--tier", "slow"), _collected("--tier", "all")
    assert fast | slow == everything
    both = {test.split("[")[0] for test in fast & slow}
    assert both and all(_is_property_test(name) for name in both), both  # a few examples, then all of them
    assert len(fast) < len(everything) and slow


def test_a_slow_test_named_on_the_command_line_runs():
    name = "tests/test_filter.py::test_float32_precision_on_long_rows_triton"
    assert _collected(name) and all(test.startswith(name) for test in _collected(name))
