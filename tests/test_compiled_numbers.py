"""Compiled steps whose numbers change between calls (issue 19, items 3-5).

`torch.compile(step, fullgraph=True)` with dynamic=True, or with mark_dynamic, must accept every
numeric option changing from call to call (Python numbers, and counts as 0-dim tensors on the
CPU or the data's device), give the eager values, and compile at most once per new kind of input
(None, a number, a tensor). The numbers' checks run inside the op when compiled: a bad value
still fails with the error that names it. Compile counts: `torch._dynamo.testing.CompileCounter`.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

import kpo_kernels
from conftest import DEVICE, triton_backend
from helpers import assert_close, examples, make_batch

BATCH = make_batch(3, 9, layout="holes", seed=3, device=DEVICE)


def _step(backend="torch"):
    def step(log_prob, old_log_prob, advantages, mask, **numbers):
        loss, metrics = kpo_kernels.kpo_loss(log_prob, old_log_prob, advantages, mask, backend=backend, **numbers)
        return loss, metrics["clipfrac"] + metrics["ratio_mean"]

    return step


def _run(step, **numbers):
    log_prob = BATCH["log_prob"].detach().clone().requires_grad_()
    loss, metric = step(log_prob, BATCH["old_log_prob"], BATCH["advantages"], BATCH["mask"], **numbers)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), metric.detach(), grad


def _assert_same(got, want):
    for name, a, b in zip(("loss", "metric", "grad"), got, want):
        assert_close(name, a, b, rtol=1e-6)


def _numbers(i):
    """Every numeric option of kpo_loss, a different value each call."""
    return {
        "q": 1e-3 * (i + 1),
        "r": 1.0 + 0.5 * i,
        "p0": 0.1 * i,
        "x0": 0.01 * i,
        "clip_low": 0.2 + 0.01 * i,
        "clip_high": 0.28 + 0.01 * i,
        "dual_clip": 3.0 + i,
        "log_ratio_cap": 5.0 + i,
        "loss_scale_factor": 8.0 * (i + 1),
        "agg": "token-mean",
        "dp_size": 2,
        "batch_num_tokens": 30.0 + i,
    }


def _compiled(step, counter, **kwargs):
    torch._dynamo.reset()
    return torch.compile(step, fullgraph=True, backend=counter, **kwargs)


def test_every_number_changing_compiles_once_with_dynamic_true():
    counter = CompileCounter()
    compiled = _compiled(_step(), counter, dynamic=True)
    for i in range(4):
        _assert_same(_run(compiled, **_numbers(i)), _run(_step(), **_numbers(i)))
    assert counter.frame_count == 1


def test_every_number_changing_with_mark_dynamic_recompiles_at_most_once():
    """Without dynamic=True the first call specialises the numbers, the second makes them
    symbolic (automatic dynamic): one recompile, then none."""
    counter = CompileCounter()
    compiled = _compiled(_step(), counter)

    def marked(*tensors, **numbers):
        for tensor in (tensors[0], tensors[1], tensors[3]):
            torch._dynamo.mark_dynamic(tensor, 1)
        return compiled(*tensors, **numbers)

    for i in range(4):
        _assert_same(_run(marked, **_numbers(i)), _run(_step(), **_numbers(i)))
    assert counter.frame_count <= 2


@pytest.mark.parametrize("where", ["cpu", "data"])
def test_counts_as_zero_dim_tensors_change_between_compiled_calls(where):
    """batch_num_tokens / global_batch_size as verl and gloo pass them: 0-dim tensors."""
    device = "cpu" if where == "cpu" else DEVICE
    counter = CompileCounter()
    compiled = _compiled(_step(), counter, dynamic=True)
    for i, agg in enumerate(["token-mean", "token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum-norm"]):
        numbers = {"agg": agg, "dp_size": 2, "batch_num_tokens": torch.tensor(30.0 + i, device=device)}
        numbers["global_batch_size"] = torch.tensor(3.0 + i, device=device)
        _assert_same(_run(compiled, **numbers), _run(_step(), **numbers))
    assert counter.frame_count == 2  # one per agg (a string: part of the graph)


def test_a_new_kind_of_count_compiles_once_more():
    counter = CompileCounter()
    compiled = _compiled(_step(), counter, dynamic=True)
    kinds = [30.0, 31.0, torch.tensor(32.0), torch.tensor(33.0), 34.0]
    for value in kinds:
        numbers = {"agg": "token-mean", "dp_size": 2, "batch_num_tokens": value}
        _assert_same(_run(compiled, **numbers), _run(_step(), **numbers))
    assert counter.frame_count == 2  # number, tensor


def test_numbers_as_cpu_tensors_change_between_compiled_calls():
    """q, r, clip_low, ... as 0-dim CPU tensors (as eager calls accept them): read inside the op."""
    counter = CompileCounter()
    compiled = _compiled(_step(), counter, dynamic=True)
    for i in range(3):
        numbers = {k: torch.tensor(v) if isinstance(v, float) else v for k, v in _numbers(i).items()}
        _assert_same(_run(compiled, **numbers), _run(_step(), **numbers))
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "override, name",
    [
        ({"q": -1e-3}, "q"),
        ({"r": 0.0}, "r"),
        ({"x0": math.nan}, "x0"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"batch_num_tokens": -2.0}, "batch_num_tokens"),
        ({"batch_num_tokens": torch.tensor(-2.0)}, "batch_num_tokens"),
        ({"q": torch.tensor(-1.0)}, "q"),
        ({"loss_scale_factor": math.inf}, "loss_scale_factor"),
    ],
)
def test_bad_numbers_are_refused_under_compile(override, name):
    counter = CompileCounter()
    compiled = _compiled(_step(), counter, dynamic=True)
    _run(compiled, **_numbers(0))  # compiled with good values first: the bad ones reuse the graph
    with pytest.raises(ValueError) as info:
        _run(compiled, **{**_numbers(1), **override})
    assert name in str(info.value)


def test_kalman_filter_with_changing_q_compiles_once():
    counter = CompileCounter()
    z = BATCH["log_prob"] - BATCH["old_log_prob"]

    def step(z, q, r):
        return kpo_kernels.kalman_filter(z, BATCH["mask"], q=q, r=r, backend="torch")

    compiled = _compiled(step, counter, dynamic=True)
    for q, r in [(1e-3, 1.0), (2e-2, 0.5), (0.0, 2.0)]:
        assert_close("filter", compiled(z, q, r), step(z, q, r), rtol=1e-6)
    assert counter.frame_count == 1


def test_triton_step_with_changing_numbers_compiles_once():
    backend = triton_backend(block_size=16)
    counter = CompileCounter()
    compiled = _compiled(_step(backend), counter, dynamic=True)
    for i in range(2):
        _assert_same(_run(compiled, **_numbers(i)), _run(_step(backend), **_numbers(i)))
    assert counter.frame_count == 1


_PROPERTY = {}


@settings(max_examples=examples(6), deadline=None, derandomize=True)
@given(
    q=st.floats(0.0, 1.0),
    r=st.floats(1e-3, 1e3),
    clip_low=st.floats(0.0, 0.5),
    dual_clip=st.floats(1.5, 10.0),
    tokens=st.floats(1.0, 1e6),
    tokens_as_tensor=st.booleans(),
)
def test_compiled_calls_with_changing_numbers_match_eager(q, r, clip_low, dual_clip, tokens, tokens_as_tensor):
    if not _PROPERTY:
        _PROPERTY["counter"] = CompileCounter()
        _PROPERTY["step"] = _compiled(_step(), _PROPERTY["counter"], dynamic=True)
    count = torch.tensor(tokens) if tokens_as_tensor else tokens
    numbers = {"q": q, "r": r, "clip_low": clip_low, "dual_clip": dual_clip, "agg": "token-mean", "dp_size": 2,
               "batch_num_tokens": count}
    _assert_same(_run(_PROPERTY["step"], **numbers), _run(_step(), **numbers))
    assert _PROPERTY["counter"].frame_count <= 2  # a Python count, a tensor count
