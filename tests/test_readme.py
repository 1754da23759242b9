"""Every Python block of README.md and of every docs/*.md page runs as written; every `python -m`
module they name exists; every relative link they hold points to a file that exists; every
section of docs/math.md that the code cites exists.

A block that needs what a test cannot provide (a model, a trainer, a GPU) is marked by the line
`<!-- readme-test: skip (reason) -->` right before it, and is skipped with that reason.
"""

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

import kpo_kernels

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->\s*$")
FENCE = re.compile(r"^\s*```")


def name(page):
    return page.relative_to(ROOT).as_posix()


def blocks(language, pages=PAGES):
    """(page, first line number, code, skip reason or None) of each fenced block in `language`."""
    out = []
    for page in pages:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if FENCE.match(lines[i]):
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                if lines[i].strip() == f"```{language}":
                    before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                    match = SKIP.search(before)
                    indent = len(lines[i]) - len(lines[i].lstrip())
                    code = "\n".join(line[indent:] for line in lines[start:end]) + "\n"
                    out.append((page, start + 1, code, match.group(1) if match else None))
                i = end
            i += 1
    return out


PYTHON = blocks("python")


def prose(page):
    """The page's text outside fenced blocks and inline code spans."""
    kept, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def test_the_pages_have_python_blocks_and_few_skips():
    assert len(blocks("python", [README])) >= 1
    assert len(PYTHON) >= 5
    assert sum(reason is not None for *_, reason in PYTHON) <= 1, "keep the skipped set minimal"


@pytest.mark.parametrize("page, line, code, reason", PYTHON, ids=[f"{name(p)}:{line}" for p, line, _, _ in PYTHON])
def test_python_block_runs(page, line, code, reason, monkeypatch):
    """Each block runs as a module that is importable while it runs, as a script's `__main__` is:
    Dynamo (torch 2.11) imports the module of a compiled function's globals by name."""
    if reason is not None:
        pytest.skip(reason)
    module = types.ModuleType(f"doc_block_{line}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, f"{name(page)}:{line}", "exec"), module.__dict__)  # noqa: S102 - the documentation's own code


def test_training_step_reads_the_metrics_once():
    """The README's training-step block stacks the metrics and reads them with one .tolist()."""
    (code,) = [code for _, _, code, _ in blocks("python", [README]) if "loss.backward()" in code and "logs = " in code]
    assert code.count(".item()") == 0 and code.count(".tolist()") == 1


def test_python_m_modules_exist():
    commands = "\n".join(code for _, _, code, _ in blocks("bash"))
    modules = set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", commands))
    assert {"kpo_kernels", "pytest", "benchmarks.accuracy", "benchmarks.training"} <= modules
    for module in modules - {"venv", "pip"}:
        assert importlib.util.find_spec(module) is not None, module


def test_quick_start_in_the_order_a_person_types_it():
    """The CPU-only torch (PyTorch's own CPU wheel index, said to be for machines without a GPU)
    comes right after the virtual environment and before anything else is installed."""
    text = README.read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):]
    quick = quick[:quick.index("\n## ")]
    commands = [line.strip() for _, _, code, _ in blocks("bash", [README]) for line in code.splitlines()
                if line.strip() and line.strip() in quick]
    assert commands[0].startswith("python3 -m venv .venv")
    assert commands[1] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert commands[2] == 'pip install ".[bench]" && python -m kpo_kernels'
    assert commands[3] == 'pip install -e ".[test,bench]" && python -m pytest'
    cpu_step = quick[:quick.index(commands[1])]
    assert "without a GPU" in cpu_step[cpu_step.rindex("python3 -m venv"):]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_point_to_files(page):
    """Every relative link names an existing file, without an anchor (headings get reworded)."""
    targets = [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", t)]
    for target in targets:
        assert "#" not in target, f"{name(page)}: link with an anchor: {target}"
        assert (page.parent / target).is_file(), f"{name(page)}: no such file: {target}"


def test_every_doc_page_is_linked_from_the_readme_and_the_index():
    for index in (README, DOCS / "index.md"):
        linked = {(index.parent / t).resolve() for t in LINK.findall(prose(index))}
        for page in DOCS.glob("*.md"):
            assert page == index or page.resolve() in linked, f"{name(index)} does not link {name(page)}"


def test_the_math_sections_the_code_cites_exist():
    headings = set(re.findall(r"^## (\d+[a-z]?)\. ", (DOCS / "math.md").read_text(encoding="utf-8"), re.M))
    assert {"2", "3", "4", "5", "5b", "5c", "6"} <= headings
    cited = set()
    for folder in ("kpo_kernels", "reference", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"\bspec (sections?|\d)", text), f"{path}: cites a spec, not docs/math.md"
            for words in re.findall(r"docs/math\.md \(?sections? ([\w ,]+)", text):
                cited |= set(re.findall(r"\b\d+[a-z]?\b", words))
    assert cited and cited <= headings, cited - headings


PUBLIC_FUNCTIONS = ("kalman_filter", "kalman_gains", "kpo_loss", "prepare", "fit_noise", "estimate_noise", "release_tables")
PUBLIC_CLASSES = ("KPOLoss", "NoiseFit", "NoiseEstimate", "NoiseTracker", "Backend", "TorchBackend", "TritonBackend", "PinnedTables")


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_functions_document_every_argument(name):
    """help() alone is enough: every argument by name, what it returns and raises, a doc page."""
    import inspect

    function = getattr(kpo_kernels, name)
    doc = inspect.getdoc(function)
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc, f"{name}: no {section} section"
    missing = [p for p in inspect.signature(function).parameters if not re.search(rf"\b{p}\b", doc)]
    assert not missing, f"{name}'s docstring does not describe {missing}"
    assert re.search(r"docs/[\w-]+\.md", doc) and all((ROOT / page).is_file() for page in re.findall(r"docs/[\w-]+\.md", doc))


@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_public_classes_are_documented(name):
    import inspect

    doc = inspect.getdoc(getattr(kpo_kernels, name))
    assert len(doc.splitlines()) >= 4, f"{name}: a one-line docstring"
    pages = re.findall(r"docs/[\w-]+\.md", doc)
    assert pages and all((ROOT / page).is_file() for page in pages), f"{name}: no existing doc page named"
