"""kpo_loss(metrics="basic"): the diagnostics (DIAGNOSTIC_METRICS) are neither computed nor
returned; the loss, the gradient and every other metric are those of metrics="full", on both
backends (Triton with small blocks, several tiles a row, NaN-poisoned outputs), over layouts,
branches, packing and entering states; bad values are refused by name."""

import math

import pytest
import torch

import kpo_kernels
from conftest import DEVICE, triton_backend
from helpers import make_batch
from kpo_kernels import DIAGNOSTIC_METRICS, METRIC_NAMES, FilterState
from kpo_kernels.backends.torch_backend import TorchBackend

CASES = {
    "right": dict(layout="right"),
    "holes": dict(layout="holes"),
    "empty rows, per-token weights": dict(layout="empty_rows", is_weights=True),
    "no mask": dict(layout="none"),
}
OPTIONS = {
    "defaults": {},
    "dual clip, cap, position": dict(q=1e-2, r=0.01, dual_clip=3.0, log_ratio_cap=0.02, mask_mode="position"),
    "diffuse prior, no clip": dict(q=1e-3, r=0.1, p0=math.inf, clip=False, agg="token-mean"),
}


def _run(backend, batch, **options):
    log_prob = batch["log_prob"].detach().clone().to(DEVICE).requires_grad_()
    rest = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "log_prob"}
    out = kpo_kernels.kpo_loss(log_prob, **rest, backend=backend, **options)
    out[0].backward()
    return out, log_prob.grad


def _assert_basic_is_full_less_diagnostics(backend, batch, **options):
    (full_loss, full_metrics, *full_state), full_grad = _run(backend, batch, **options)
    (loss, metrics, *state), grad = _run(backend, batch, metrics="basic", **options)
    assert list(full_metrics) == list(METRIC_NAMES)
    assert list(metrics) == [name for name in METRIC_NAMES if name not in DIAGNOSTIC_METRICS]
    assert torch.equal(loss, full_loss) and torch.equal(grad, full_grad)
    for name, value in metrics.items():
        assert torch.equal(value, full_metrics[name]), name
    for got, want in zip(state, full_state):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_basic_is_full_without_the_diagnostics(name, case, options):
    backend = TorchBackend() if name == "torch" else triton_backend(tile_size=32)
    batch = make_batch(5, 97, seed=3, **case)
    _assert_basic_is_full_less_diagnostics(backend, batch, **options)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_basic_packed_and_with_states(name):
    """Packed sequences (one longer than a tile) and an entering state with return_state."""
    backend = TorchBackend() if name == "torch" else triton_backend(tile_size=32)
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([70, 1, 33, 0, 12])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
    n = int(lengths.sum())
    old = -torch.rand(n, generator=gen) * 2
    batch = {
        "log_prob": old + torch.randn(n, generator=gen) * 0.05,
        "old_log_prob": old,
        "advantages": torch.randn(5, 1, generator=gen),
        "mask": torch.rand(n, generator=gen) > 0.2,
        "cu_seqlens": cu_seqlens,
    }
    state = FilterState(torch.randn(5, generator=gen, dtype=torch.float64).to(DEVICE),
                        torch.tensor([0, 3, 100, 7, 1]).to(DEVICE), torch.tensor([9, 4, 0, 8, 2], dtype=torch.int8).to(DEVICE))
    _assert_basic_is_full_less_diagnostics(backend, batch, q=1e-3, initial_state=state, return_state=True)


def test_kpo_loss_module_and_bad_values():
    batch = make_batch(3, 20, seed=1)
    _, metrics = kpo_kernels.KPOLoss(metrics="basic")(batch["log_prob"], batch["old_log_prob"], batch["advantages"],
                                                      batch["mask"])
    assert not set(metrics) & set(DIAGNOSTIC_METRICS)
    for bad, error in (("all", ValueError), ("Basic", ValueError), (None, TypeError), (1, TypeError)):
        with pytest.raises(error, match="metrics"):
            kpo_kernels.kpo_loss(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], metrics=bad)
        with pytest.raises(error, match="metrics"):
            kpo_kernels.KPOLoss(metrics=bad)


def test_compiled_basic_matches_eager():
    """Under torch.compile the option is a graph constant; the op still drops the diagnostics."""
    batch = make_batch(3, 40, seed=2)

    def step(log_prob):
        loss, metrics = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"],
                                             metrics="basic", backend="torch")
        return loss, metrics

    eager_loss, eager_metrics = step(batch["log_prob"])
    loss, metrics = torch.compile(step, fullgraph=True, backend="eager")(batch["log_prob"])
    assert torch.equal(loss, eager_loss) and set(metrics) == set(eager_metrics)
