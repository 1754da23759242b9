"""Compiled training steps: the custom ops under torch.compile, opcheck, no graph breaks.

A step that calls `kpo_loss` (or `kalman_filter`) must trace into one graph with
`fullgraph=True` and give the eager loss, gradient and metrics. The GPU side (CUDA graphs,
no host synchronisation) is in test_gpu.py.
"""

import pytest
import torch

import kpo_kernels
from conftest import DEVICE, triton_backend
from helpers import assert_close, make_batch
from kpo_kernels import ops

OPTION_FAMILIES = {
    "default": {},
    "unclipped-position": {"clip": False, "mask_mode": "position", "q": 1e-2},
    "dual-clip-weights": {"dual_clip": 3.0, "clip_low": 0.2, "clip_high": 0.28, "is_weights": True},
    "prior-no-cap": {"p0": float("inf"), "x0": 0.1, "log_ratio_cap": None, "q": 1e-3},
    "token-mean-counts": {"agg": "token-mean", "dp_size": 2, "batch_num_tokens": 40.0},
    "seq-norm-counts": {"agg": "seq-mean-token-sum-norm", "dp_size": 2, "global_batch_size": 3.0, "loss_scale_factor": 64.0},
    "per-token-advantages": {"adv_per_token": True, "agg": "token-sum"},
}


def _inputs(family, packed, dtype=torch.float32):
    options = dict(OPTION_FAMILIES[family])
    weights = options.pop("is_weights", False)
    per_token = options.pop("adv_per_token", False)
    batch = make_batch(3, 21, layout="holes", seed=1, dtype=dtype, device=DEVICE, adv_per_token=per_token, is_weights=weights)
    if packed:
        batch = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in batch.items()}
        if not per_token:
            batch["advantages"] = batch["advantages"][:, None]
        batch["cu_seqlens"] = torch.tensor([0, 21, 21, 63], dtype=torch.int32, device=DEVICE)
        if options.get("agg") == "seq-mean-token-sum-norm":
            pass
    return batch, options


def _step(backend, **options):
    def step(log_prob, old_log_prob, advantages, mask, is_weights=None, cu_seqlens=None):
        loss, metrics = kpo_kernels.kpo_loss(
            log_prob, old_log_prob, advantages, mask, is_weights=is_weights, cu_seqlens=cu_seqlens, backend=backend, **options
        )
        # Metrics used downstream, as a trainer logs them (one stacked tensor, no sync here).
        return loss, torch.stack([metrics[name] for name in kpo_kernels.METRIC_NAMES]) * 1.0

    return step


def _run(step, batch):
    log_prob = batch["log_prob"].detach().clone().requires_grad_()
    rest = {k: v for k, v in batch.items() if k != "log_prob"}
    loss, metrics = step(log_prob, **rest)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), metrics.detach(), grad


BACKENDS = ["torch", "triton"]


def _backend(name):
    return "torch" if name == "torch" else triton_backend(block_size=16)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", list(OPTION_FAMILIES))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_kpo_loss_step_has_no_graph_breaks_and_matches_eager(backend_name, family, packed):
    torch._dynamo.reset()
    batch, options = _inputs(family, packed)
    step = _step(_backend(backend_name), **options)
    rest = {k: v for k, v in batch.items() if k != "log_prob"}
    explained = torch._dynamo.explain(step)(batch["log_prob"].detach().clone().requires_grad_(), **rest)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = _run(step, batch)
    got = _run(compiled, batch)
    for name, a, b in zip(("loss", "metrics", "grad"), got, want):
        assert_close(name, a, b, rtol=1e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inductor_compiles_a_step_around_the_ops(backend_name):
    """The default compiler (inductor) around the opaque ops: same loss and gradient."""
    torch._dynamo.reset()
    batch, options = _inputs("default", packed=False)
    backend = _backend(backend_name)  # made outside the compiled region, as a trainer would

    def step(log_prob, old_log_prob, advantages, mask):
        loss, metrics = kpo_kernels.kpo_loss(log_prob, old_log_prob, advantages, mask, backend=backend)
        return loss * 2.0 + 0.5 * metrics["clipfrac"], metrics["ratio_mean"]

    compiled = torch.compile(step, fullgraph=True)
    want, got = _run(step, batch), _run(compiled, batch)
    for name, a, b in zip(("loss", "ratio_mean", "grad"), got, want):
        assert_close(name, a, b, rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_kalman_filter_compiles_without_graph_breaks(backend_name, packed):
    torch._dynamo.reset()
    batch, _ = _inputs("default", packed)
    backend = _backend(backend_name)

    def step(z, mask, cu_seqlens=None):
        return kpo_kernels.kalman_filter(z, mask, q=1e-2, cu_seqlens=cu_seqlens, backend=backend).sum(-1)

    z = batch["log_prob"] - batch["old_log_prob"]
    args = (z, batch["mask"], batch.get("cu_seqlens"))
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert_close("filter", torch.compile(step, fullgraph=True)(*args), step(*args), rtol=1e-6)


def test_the_ops_are_registered():
    for name in ("kalman_filter", "kpo_loss", "kpo_loss_backward", "kalman_chunk_maps"):
        assert hasattr(torch.ops.kpo_kernels, name)


def _op_samples(backend):
    key = kpo_kernels.dispatch.backend_key(backend)
    samples = []
    for packed in (False, True):
        for family in ("default", "dual-clip-weights", "token-mean-counts"):
            batch, options = _inputs(family, packed)
            checked = kpo_kernels.validation.check_token_batch(
                batch["log_prob"].detach().clone().requires_grad_(), batch["old_log_prob"], batch["advantages"], batch["mask"],
                batch.get("is_weights"), batch.get("cu_seqlens"),
            )
            loss_options = kpo_kernels.validation.check_loss_options(**{**_LOSS_DEFAULTS, **options})
            samples.append(ops.loss_arguments(checked, None, loss_options, key, True))
            if family == "default" and backend.name in STATEFUL:
                samples.append(ops.loss_arguments(checked, _state(checked.num_sequences), loss_options, key, True))
    return samples


STATEFUL = ("torch", "triton")  # backends whose ops take an entering state


def _state(sequences):
    """An entering state with every kind of entry (docs/math.md section 7)."""
    state = kpo_kernels.FilterState.start(sequences, device=DEVICE, dtype=torch.float32)
    count = torch.arange(sequences, device=DEVICE) * 7
    sign = torch.arange(sequences, device=DEVICE).remainder(10).to(torch.int8)
    return kpo_kernels.FilterState(torch.linspace(-0.2, 0.3, sequences, device=DEVICE), count, sign)


_LOSS_DEFAULTS = {
    "q": 1e-6, "r": 1.0, "p0": 0.0, "x0": 0.0, "mask_mode": "skip", "clip": True, "clip_low": 3e-4, "clip_high": 4e-4,
    "dual_clip": None, "log_ratio_cap": 10.0, "agg": "seq-mean-token-mean", "dp_size": 1, "batch_num_tokens": None,
    "global_batch_size": None, "loss_scale_factor": None,
}


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck_every_op(backend_name):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration and AOT
    dispatch with dynamic shapes of every op (the ops' autograd is the Function on top: the loss
    op is checked on inputs that do not require grad)."""
    backend = kpo_kernels.dispatch.resolve_backend(_backend(backend_name), DEVICE, torch.float32)
    key = kpo_kernels.dispatch.backend_key(backend)
    for args in _op_samples(backend):
        args = (args[0].detach(),) + args[1:]
        torch.library.opcheck(torch.ops.kpo_kernels.kpo_loss.default, args)
        _, _, grad, row_scale, plan = torch.ops.kpo_kernels.kpo_loss(*args)
        backward_args = (grad, row_scale, torch.tensor(1.5, device=DEVICE), args[5], plan, torch.float32, key)
        torch.library.opcheck(torch.ops.kpo_kernels.kpo_loss_backward.default, backward_args)
    for packed in (False, True):
        batch, _ = _inputs("default", packed)
        z = batch["log_prob"] - batch["old_log_prob"]
        cu_seqlens = batch.get("cu_seqlens")
        sequences = z.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        states = (None, _state(sequences)) if backend.name in STATEFUL else (None,)
        for mask_mode in ("skip", "position"):
            options = kpo_kernels.validation.check_filter_params(q=1e-2, r=1.0, p0=0.0, x0=0.0, mask_mode=mask_mode)
            for state in states:
                args = ops.filter_arguments(z, batch["mask"], cu_seqlens, state, options, key)
                torch.library.opcheck(torch.ops.kpo_kernels.kalman_filter.default, args)
            if backend.name in STATEFUL:
                count = torch.arange(sequences, device=DEVICE) * 3
                args = (batch["log_prob"], batch["old_log_prob"], batch["mask"], cu_seqlens, count, 1e-2, 1.0, 0.0, mask_mode == "skip", key)
                torch.library.opcheck(torch.ops.kpo_kernels.kalman_chunk_maps.default, args)
        # as a compiled step calls it: numbers checked inside the op, q given as a CPU tensor
        args = (z, batch["mask"], cu_seqlens, None, None, None, 0.0, 1.0, 0.0, 0.0, True, [torch.tensor(1e-2)], "q", True, key)
        torch.library.opcheck(torch.ops.kpo_kernels.kalman_filter.default, args)


def test_value_checks_run_inside_the_ops_under_compile():
    """cu_seqlens and mask values are data: they are checked inside the op, compiled or not."""
    torch._dynamo.reset()
    step = torch.compile(_step("torch"), fullgraph=True, backend="aot_eager")
    bad = torch.ones(2, 5)
    bad[0, 1] = 0.5
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        step(torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(2), bad)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        step(torch.zeros(6), torch.zeros(6), torch.ones(2, 1), None, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))


def test_a_custom_backend_object_crosses_the_op_boundary_by_key():
    calls = []

    class Counting(kpo_kernels.TorchBackend):
        def loss_forward(self, batch, options, need_grad):
            calls.append(batch.shape)
            return super().loss_forward(batch, options, need_grad)

    impl = Counting()
    batch, _ = _inputs("default", packed=False)
    loss, _ = kpo_kernels.kpo_loss(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], backend=impl)
    want, _ = kpo_kernels.kpo_loss(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], backend="torch")
    assert calls == [batch["log_prob"].shape] and torch.equal(loss, want)
    assert kpo_kernels.dispatch.backend_key(impl) != "torch"


def test_prepare_builds_the_tables_a_call_reads(monkeypatch):
    from kpo_kernels import tables

    cache = tables.TableCache()
    monkeypatch.setattr(tables, "cache", cache)
    pinned = kpo_kernels.prepare(300, q=3e-4, device="cpu", backend="torch")
    assert cache.entries() == 2 and pinned.nbytes == cache.nbytes()  # gains and variance ratios
    builds = cache.builds
    z = torch.randn(2, 300, dtype=torch.float64)
    kpo_kernels.kalman_filter(z, q=3e-4, backend="torch")
    kpo_kernels.kpo_loss(z, z - 0.01, torch.ones(2, dtype=torch.float64), q=3e-4, backend="torch")
    assert cache.builds == builds
    pinned.release()
    with pytest.raises(ValueError, match="length"):
        kpo_kernels.prepare(0, device="cpu")
