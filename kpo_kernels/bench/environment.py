"""What every row records about where it was measured: device, versions, commit, date, load."""

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import kpo_kernels

PACKAGE_DIR = Path(kpo_kernels.__file__).resolve().parent


def _git(*args, cwd):
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)


def _installed_commit():
    """For a copy that is not a git checkout: the commit it was built from (setup.py writes
    kpo_kernels/_build.py into wheels), else what is known: the version."""
    try:
        from kpo_kernels import _build
    except ImportError:
        _build = None
    commit = getattr(_build, "COMMIT", None)
    if commit:
        return f"{commit} (installed)"
    return f"unknown (kpo_kernels {kpo_kernels.__version__}: neither a git checkout nor a built copy with its commit)"


def git_commit(package_dir=PACKAGE_DIR):
    """Short commit of the source checkout this package runs from, '-dirty' if tracked files
    differ; for an installed copy (its folder is not the `kpo_kernels/` of a git work tree) the
    commit it was built from, or what is known. KPO_COMMIT overrides (a copy of the checkout
    without .git)."""
    if os.environ.get("KPO_COMMIT"):
        return os.environ["KPO_COMMIT"]
    try:
        top = _git("rev-parse", "--show-toplevel", cwd=package_dir.parent)
        if top.returncode != 0 or (Path(top.stdout.strip()) / "kpo_kernels").resolve() != package_dir:
            return _installed_commit()
        head = _git("rev-parse", "--short", "HEAD", cwd=package_dir.parent)
        if head.returncode != 0:
            return None
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=package_dir.parent)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):  # no git binary: what the copy itself records
        return _installed_commit()


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "device": device.type,
        "device_name": name,
        "load_avg_1m": load,  # at the start: other processes make CPU timings slower and noisier
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "kpo_kernels": kpo_kernels.__version__,
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device
