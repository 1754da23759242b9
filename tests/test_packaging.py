"""What `pip install .` (not editable) installs: one top-level package, with everything the main
command needs inside it; and that main command, run from that copy alone, outside the checkout."""

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


BUILT_FROM = "c0ffee1"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Asked of the installed distributions, not of the import system: finding the module `pip`
    # in this process makes setuptools' distutils shim stand down for the rest of it, and a later
    # torch.compile (inductor imports setuptools) then fails in the same test worker.
    try:
        importlib.metadata.version("pip"), importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip and setuptools are needed to build the wheel here")
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the files git does not ignore, built there: no build/ or *.egg-info lands in the
    # checkout, and no stale build/ of the checkout leaks into the wheel.
    tree = out / "tree"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=False)
    if files.returncode != 0:
        pytest.skip("the checkout has no git metadata to list its files")
    for name in files.stdout.decode().split("\0"):
        if not name:
            continue
        source, target = ROOT / name, tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():  # a tracked file deleted in the work tree is skipped
            target.write_bytes(source.read_bytes())
    # The copy has no .git: the commit the wheel records comes from KPO_COMMIT, as on a build
    # machine that exports it (a build from a clone reads it from git).
    env = {**os.environ, "KPO_COMMIT": BUILT_FROM}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("kpo_kernels-*.whl")
    return path


def test_wheel_installs_one_package_with_the_reference_inside(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {name.split("/")[0] for name in names}
        info = next(t for t in top if t.endswith(".dist-info"))
        assert top == {"kpo_kernels", info}, top  # no `reference`, `benchmarks` or `tests` in site-packages
        assert archive.read(f"{info}/top_level.txt").decode().split() == ["kpo_kernels"]
        for source in (ROOT / "reference").glob("*.py"):  # the readable twin, byte for byte
            assert archive.read(f"kpo_kernels/_reference/{source.name}") == source.read_bytes()
        for module in ("cases", "command", "correctness", "data", "baselines", "implementations", "report", "run"):
            assert f"kpo_kernels/bench/{module}.py" in names


CHECK = """
import sys
from kpo_kernels.__main__ import main
status = main(sys.argv[1:])
import kpo_kernels
here = kpo_kernels.__file__
outside = [name for name, module in sys.modules.items()
           if name.split(".")[0] in ("kpo_kernels", "reference", "benchmarks", "tests")
           and not str(getattr(module, "__file__", None) or "").startswith(SITE)]
print("STATUS", status, "FROM", here, "OUTSIDE", outside)
"""


def test_installed_copy_runs_the_main_command_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "KPO_COMMIT")}
    env["PYTHONPATH"] = str(site)  # ahead of site-packages, where an editable install may also be
    args = ["--device", "cpu", "--rows", "4", "--length", "128", "--budget", "0.01", "--accuracy-max-length", "256",
            "--reference-max-length", "128", "--no-memory", "--quiet"]
    script = CHECK.replace("SITE", repr(str(site)))
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference/ filter in float64 (its Python loop) vs the recursion: max |diff| 0.0e+00" in proc.stdout
    assert "all 3 kpo results agree with the float64 reference" in proc.stdout  # accuracy 4x256, kpo, kpo-torch
    # An installed copy reports the commit it was built from (and no other repository's).
    assert f"| commit {BUILT_FROM} (installed) |" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"STATUS 0 FROM {site / 'kpo_kernels' / '__init__.py'} OUTSIDE []", last


def test_an_installed_copy_without_build_record_names_its_version(monkeypatch):
    from types import SimpleNamespace

    import kpo_kernels
    from kpo_kernels.bench import environment

    monkeypatch.delenv("KPO_COMMIT", raising=False)
    monkeypatch.setitem(sys.modules, "kpo_kernels._build", SimpleNamespace(COMMIT=None))
    assert environment._installed_commit().startswith(f"unknown (kpo_kernels {kpo_kernels.__version__}: ")
    assert environment.git_commit(package_dir=Path("/nonexistent/kpo_kernels")) == environment._installed_commit()
