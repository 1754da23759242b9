"""Every implementation the benchmarks compare, by its exact `impl` name.

- `kpo`: this package, `kpo_kernels.kpo_loss(backend="auto")` (Triton on CUDA, torch otherwise).
- `kpo-torch`, `kpo-triton`: the same with the backend forced.
- `sequential-reference`: `reference/` (shipped as `kpo_kernels._reference`; a Python loop over
  tokens, slow by design).
- `vectorized-cumsum`: the authors' KPO plug-in as docs/math.md (section 6) describes it, reimplemented
  in `baselines.py`: float32 sinh gains and running-product filter, their surrogate and metrics.
- `grpo-eager`: verl's `vanilla` token-ratio PPO-clip loss in eager PyTorch (a different loss:
  no filter).
- `copy`: a device-to-device copy of the bytes a fused implementation must move (GPU only): the
  bandwidth ceiling. Handled by the harness; it has no loss.

`run(batch, settings)` returns (loss, metrics) from a batch dict whose log_prob requires grad;
`filter(batch, settings)` the filtered log-ratio (None for implementations that do not filter).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kpo_kernels
from kpo_kernels import _reference as reference
from kpo_kernels.backends.triton_backend import INTERPRETED, triton_import_error

from . import baselines


@dataclass(frozen=True)
class Settings:
    """Hyperparameters shared by every implementation (the paper's defaults)."""

    q: float = 1e-6
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    agg: str = "seq-mean-token-mean"
    log_ratio_cap: float = 10.0


DEFAULT = Settings()


@dataclass(frozen=True)
class Implementation:
    name: str
    run: Optional[Callable]
    filter: Optional[Callable]
    native_on: tuple  # device types where it runs natively
    kpo: bool = False  # this package: checked against the float64 reference
    # Decides PPO's clip as the textbook loss does: max(-A r, -A clamp(r, 1 - lo, 1 + hi)) on the
    # ratio r = exp(x) in float32, which cannot order the two terms within a few roundings of a
    # bound (correctness.RATIO_TIE_WINDOW); this package decides on x against float64 bounds.
    clips_float32_ratio: bool = False


def _log_ratio(batch):
    """z = log_prob - old_log_prob, subtracted in float32 at least (as the losses do inside):
    a bfloat16 subtraction would round z before any filter sees it."""
    new, old = batch["log_prob"].detach(), batch["old_log_prob"].detach()
    if new.dtype in (torch.float16, torch.bfloat16):
        new, old = new.float(), old.float()
    return new - old


def _kpo(backend):
    def run(batch, s):
        return kpo_kernels.kpo_loss(
            batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"],
            q=s.q, clip_low=s.clip_low, clip_high=s.clip_high, agg=s.agg,
            log_ratio_cap=s.log_ratio_cap, backend=backend,
        )

    def filt(batch, s):
        return kpo_kernels.kalman_filter(_log_ratio(batch), batch["mask"], q=s.q, backend=backend)

    return run, filt


def _reference(batch, s):
    return reference.kpo_loss(
        batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"],
        q=s.q, clip_low=s.clip_low, clip_high=s.clip_high, agg=s.agg, log_ratio_cap=s.log_ratio_cap,
    )


def _reference_filter(batch, s):
    return reference.kalman_filter(_log_ratio(batch), batch["mask"], q=s.q)


def _grpo(batch, s):
    return baselines.grpo_eager(batch, agg=s.agg, clip_low=s.clip_low, clip_high=s.clip_high)


def _cumsum(batch, s):
    return baselines.vectorized_cumsum(
        batch, agg=s.agg, clip_low=s.clip_low, clip_high=s.clip_high, q=s.q, log_ratio_cap=s.log_ratio_cap
    )


def _cumsum_filter(batch, s):
    return baselines.vectorized_cumsum_filter(_log_ratio(batch), batch["mask"], s.q)


IMPLEMENTATIONS = {
    "kpo": Implementation("kpo", *_kpo("auto"), native_on=("cpu", "cuda"), kpo=True),
    "kpo-torch": Implementation("kpo-torch", *_kpo("torch"), native_on=("cpu", "cuda"), kpo=True),
    "kpo-triton": Implementation("kpo-triton", *_kpo("triton"), native_on=("cuda",), kpo=True),
    "sequential-reference": Implementation(
        "sequential-reference", _reference, _reference_filter, ("cpu", "cuda"), clips_float32_ratio=True
    ),
    "vectorized-cumsum": Implementation("vectorized-cumsum", _cumsum, _cumsum_filter, ("cpu", "cuda"), clips_float32_ratio=True),
    "grpo-eager": Implementation("grpo-eager", _grpo, None, ("cpu", "cuda")),
    "copy": Implementation("copy", None, None, ("cuda",)),
}
NAMES = tuple(IMPLEMENTATIONS)


def available(name, device):
    """None if `name` runs natively on `device` (a torch.device), else the reason it is skipped."""
    impl = IMPLEMENTATIONS[name]
    if device.type not in impl.native_on:
        return f"runs natively only on {', '.join(impl.native_on)}"
    if name == "kpo-triton" and triton_import_error() is not None:
        return f"Triton is not importable ({triton_import_error()})"
    if name == "kpo-triton" and INTERPRETED:
        return "TRITON_INTERPRET=1 is set (interpreted kernels are not benchmarked)"
    return None


def auto_backend(device, dtype):
    """The backend `kpo` (backend="auto") resolves to for these inputs: 'torch' or 'triton'."""
    from kpo_kernels.dispatch import resolve_backend

    return resolve_backend("auto", device, dtype).name


def forward_backward(name, batch, settings=DEFAULT):
    """One training step's worth of work: the loss, its metrics and d loss / d log_prob."""
    log_prob = batch["log_prob"].detach().requires_grad_()
    loss, metrics = IMPLEMENTATIONS[name].run({**batch, "log_prob": log_prob}, settings)
    loss.backward()
    return loss, metrics, log_prob.grad


def filtered(name, batch, settings=DEFAULT):
    """The filtered log-ratio of `name`, or None if it does not filter."""
    impl = IMPLEMENTATIONS[name]
    if impl.filter is None:
        return None
    with torch.no_grad():
        return impl.filter(batch, settings)
