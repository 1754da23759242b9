"""Every implementation the benchmarks compare, behind one call: loss = run(batch).

`run` computes the loss (and metrics) from a batch dict whose log_prob requires grad; the
benchmarks then call loss.backward(). `filter` returns the filtered log-ratio (for the error
column), or None for implementations that do not filter.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kpo_kernels
import reference
from kpo_kernels.backends.triton_backend import INTERPRETED, triton_import_error

from . import baselines

# Hyperparameters shared by every implementation (the paper's defaults).
Q = 1e-6
CLIP_LOW, CLIP_HIGH = 3e-4, 4e-4
AGG = "seq-mean-token-mean"


@dataclass(frozen=True)
class Implementation:
    name: str
    run: Callable
    filter: Optional[Callable]
    native_on: tuple  # device types where it runs natively (for "where it runs natively")


def _kpo(backend):
    def run(batch):
        return kpo_kernels.kpo_loss(
            batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"],
            q=Q, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg=AGG, backend=backend,
        )

    def filt(batch):
        z = (batch["log_prob"] - batch["old_log_prob"]).detach()
        return kpo_kernels.kalman_filter(z, batch["mask"], q=Q, backend=backend)

    return run, filt


def _reference(batch):
    return reference.kpo_loss(
        batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"],
        q=Q, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg=AGG,
    )


def _reference_filter(batch):
    z = (batch["log_prob"] - batch["old_log_prob"]).detach()
    return reference.kalman_filter(z, batch["mask"], q=Q)


def _grpo(batch):
    return baselines.grpo_eager(batch, agg=AGG, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)


def _cumsum(batch):
    return baselines.vectorized_cumsum(batch, agg=AGG, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, q=Q)


def _cumsum_filter(batch):
    z = (batch["log_prob"] - batch["old_log_prob"]).detach()
    return baselines.vectorized_cumsum_filter(z, batch["mask"], Q)


IMPLEMENTATIONS = {
    "kpo": Implementation("kpo", *_kpo("auto"), native_on=("cpu", "cuda")),
    "kpo-torch": Implementation("kpo-torch", *_kpo("torch"), native_on=("cpu", "cuda")),
    "kpo-triton": Implementation("kpo-triton", *_kpo("triton"), native_on=("cuda",)),
    "sequential-reference": Implementation("sequential-reference", _reference, _reference_filter, ("cpu", "cuda")),
    "vectorized-cumsum": Implementation("vectorized-cumsum", _cumsum, _cumsum_filter, ("cpu", "cuda")),
    "grpo-eager": Implementation("grpo-eager", _grpo, None, ("cpu", "cuda")),
}


def available(name, device):
    """None if `name` runs natively on `device` (a torch.device), else the reason it is skipped."""
    impl = IMPLEMENTATIONS[name]
    if device.type not in impl.native_on:
        return f"runs natively only on {', '.join(impl.native_on)}"
    if name == "kpo-triton" and triton_import_error() is not None:
        return "Triton is not importable"
    if name == "kpo-triton" and INTERPRETED:
        return "TRITON_INTERPRET=1 is set (interpreted kernels are not benchmarked)"
    return None


def forward_backward(name, batch):
    """One training step's worth of work: the loss, its metrics and d loss / d log_prob."""
    log_prob = batch["log_prob"].detach().requires_grad_()
    loss, metrics = IMPLEMENTATIONS[name].run({**batch, "log_prob": log_prob})
    loss.backward()
    return loss, metrics, log_prob.grad
