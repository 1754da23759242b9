import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _source_commit():
    """The short commit of the checkout being built ('-dirty' if tracked files differ), or None."""
    if os.environ.get("KPO_COMMIT"):
        return os.environ["KPO_COMMIT"]
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True, timeout=10)  # noqa: E731
        top = run("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != HERE:
            return None  # not this project's checkout (an sdist unpacked inside another repository)
        head, dirty = run("rev-parse", "--short", "HEAD"), run("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class BuildWithCommit(build_py):
    """Records the commit a wheel is built from in kpo_kernels/_build.py, inside the build only
    (the source tree never holds it): the main command reports it from an installed copy."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "kpo_kernels" / "_build.py"
        if getattr(self, "editable_mode", False) or not target.parent.is_dir():
            return  # an editable install runs from the checkout, whose commit git knows
        target.write_text(f'"""Written by setup.py when this copy was built."""\n\nCOMMIT = {_source_commit()!r}\n')

setup(
    name="kpo-kernels",
    version="0.1.0",
    description="Exact, fused Kalman Policy Optimization (KPO) losses: Triton kernels and PyTorch backends",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # One top-level package. kpo_kernels._reference is the repository's reference/ (the sequential
    # definition, shipped for `python -m kpo_kernels`): in the source tree it is a link to that
    # folder, in the wheel a copy of its files. kpo_kernels.bench holds the rest of the main command.
    packages=find_packages(include=["kpo_kernels", "kpo_kernels.*"]),
    cmdclass={"build_py": BuildWithCommit},
    install_requires=["torch>=2.4"],
    extras_require={
        # Triton ships with CUDA builds of torch; CPU installs add it for TRITON_INTERPRET=1 tests.
        "triton": ["triton>=3.2"],
        # numpy 2.4 removed the array-to-scalar conversion that Triton 3.6's interpreter relies on.
        # pytest-xdist: the default test run uses every core (pytest.ini's -n auto).
        "test": ["triton>=3.2", "pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "numpy<2.4"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "numpy<2.4"],
        # Trainer integrations (kpo_kernels.integrations), pinned to the versions they are tested with.
        "verl": ["verl==0.9.1"],
        "trl": ["trl==1.16.0"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
