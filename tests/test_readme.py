"""Every Python block of README.md runs as written; every `python -m` module it names exists.

A block that needs what a test cannot provide (a model, a trainer, a GPU) is marked in the
README by the line `<!-- readme-test: skip (reason) -->` right before it, and is skipped with
that reason.
"""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->\s*$")


def blocks(language):
    """(first line number, code, skip reason or None) of each fenced block in `language`."""
    lines = README.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = SKIP.search(before)
            out.append((start + 1, "\n".join(lines[start:end]) + "\n", match.group(1) if match else None))
            i = end
        i += 1
    return out


PYTHON = blocks("python")


def test_the_readme_has_python_blocks_and_few_skips():
    assert len(PYTHON) >= 3
    assert sum(reason is not None for _, _, reason in PYTHON) <= 1, "keep the skipped set minimal"


@pytest.mark.parametrize("line, code, reason", PYTHON, ids=[f"line{line}" for line, _, _ in PYTHON])
def test_python_block_runs(line, code, reason, capsys):
    if reason is not None:
        pytest.skip(reason)
    namespace = {"__name__": f"readme_line_{line}"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code


def test_training_step_reads_the_metrics_once():
    """The training-step block stacks the metrics and reads them with one .tolist()."""
    (code,) = [code for _, code, _ in PYTHON if "loss.backward()" in code and "logs = " in code]
    assert code.count(".item()") == 0 and code.count(".tolist()") == 1


def test_python_m_modules_exist():
    commands = "\n".join(code for _, code, _ in blocks("bash"))
    modules = set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", commands))
    assert {"kpo_kernels", "pytest", "benchmarks.accuracy"} <= modules
    for module in modules - {"venv", "pip"}:
        assert importlib.util.find_spec(module) is not None, module


def test_quick_start_cpu_index():
    """The CPU-only instruction is PyTorch's own CPU wheel index, before the two commands."""
    text = README.read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):text.index("## Is it right")]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in quick
    commands = [line for _, code, _ in blocks("bash") for line in code.splitlines() if line.startswith("python3 -m venv")]
    assert commands[0].endswith('pip install ".[bench]" && python -m kpo_kernels')
    assert commands[1].endswith('pip install -e ".[test,bench]" && python -m pytest')
