"""The CPU fast path's scratch buffers (torch_workspace.py): kept between calls and per thread,
never behind anything a call returns or saves for backward."""

import threading

import pytest
import torch

import kpo_kernels
from kpo_kernels.backends import torch_rows, torch_workspace

ROWS, LENGTH = 5, 41


def _inputs(seed, length=LENGTH, holes=True, per_token=True, weights=True):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(ROWS, length, generator=gen)
    new = old + 0.2 * torch.randn(ROWS, length, generator=gen)
    mask = torch.arange(length) < torch.randint(1, length + 1, (ROWS,), generator=gen)[:, None]
    if holes:
        mask &= torch.rand(ROWS, length, generator=gen) > 0.3
    advantages = torch.randn(ROWS, generator=gen)
    if per_token:
        advantages = advantages[:, None].expand(ROWS, length).contiguous()
    is_weights = torch.rand(ROWS, length, generator=gen) if weights else None
    return new, old, advantages, mask, is_weights


def _step(inputs, backward=True, **options):
    new, old, advantages, mask, is_weights = inputs
    log_prob = new.clone().requires_grad_()
    loss, metrics = kpo_kernels.kpo_loss(log_prob, old, advantages, mask, q=1e-2, clip_low=0.2, clip_high=0.2,
                                         is_weights=is_weights, backend="torch", **options)
    if backward:
        loss.backward()
    return loss.detach(), metrics, log_prob.grad


def _same(got, want):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        return all(_same(got[k], want[k]) for k in want)
    return torch.equal(got, want)


@pytest.fixture(autouse=True)
def _fresh_buffers():
    torch_workspace.release()
    yield
    torch_workspace.release()


def test_scratch_is_reused_and_grows():
    first = torch_workspace.scratch("a", (3, 4), torch.float64)
    again = torch_workspace.scratch("a", (2, 5), torch.float32)
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 5) and again.dtype == torch.float32
    other = torch_workspace.scratch("b", (3, 4), torch.float64)
    assert other.data_ptr() != first.data_ptr()
    bigger = torch_workspace.scratch("a", (100,), torch.float64)
    assert bigger.shape == (100,) and bigger.is_contiguous()
    assert torch_workspace.scratch("empty", (0, 7), torch.bool).shape == (0, 7)


def test_scratch_over_the_limit_is_fresh(monkeypatch):
    monkeypatch.setattr(torch_workspace, "MAX_BYTES", 64)
    kept = torch_workspace.scratch("small", (8,), torch.float32)  # 32 bytes: kept
    assert torch_workspace.scratch("small", (8,), torch.float32).data_ptr() == kept.data_ptr()
    large = torch_workspace.scratch("large", (8,), torch.float64)  # 32 + 64 > 64: not kept
    assert large.shape == (8,) and large.dtype == torch.float64
    assert "large" not in torch_workspace._buffers()
    # the loss is the same with nothing kept
    want = _step(_inputs(0))
    torch_workspace.release()
    monkeypatch.setattr(torch_workspace, "MAX_BYTES", 0)
    got = _step(_inputs(0))
    for a, b in zip(got, want):
        assert _same(a, b)
    assert not torch_workspace._buffers()


@pytest.mark.parametrize("holes", [False, True])
def test_results_survive_later_calls(holes):
    """A call's loss, metrics and gradient, and the gradient saved for a backward that runs after
    later forwards, are not overwritten by those calls (they own no scratch memory)."""
    inputs = [_inputs(seed, holes=holes) for seed in range(3)]
    want = [_step(x) for x in inputs]
    torch_workspace.release()
    # forwards first, backwards later and in reverse (gradient accumulation, pipelines)
    pending = []
    for x in inputs:
        new, old, advantages, mask, is_weights = x
        log_prob = new.clone().requires_grad_()
        loss, metrics = kpo_kernels.kpo_loss(log_prob, old, advantages, mask, q=1e-2, clip_low=0.2, clip_high=0.2,
                                             is_weights=is_weights, backend="torch")
        pending.append((log_prob, loss, {k: v.clone() for k, v in metrics.items()}))
        _step(_inputs(99, length=LENGTH + 7, holes=not holes))  # another shape in between
    for (log_prob, loss, metrics), (want_loss, want_metrics, want_grad) in reversed(list(zip(pending, want))):
        loss.backward()
        assert torch.equal(loss.detach(), want_loss)
        assert _same(metrics, want_metrics)
        assert torch.equal(log_prob.grad, want_grad)


def test_fast_path_outputs_own_their_memory():
    """Nothing rows_loss returns shares storage with a scratch buffer."""
    from kpo_kernels.options import TokenBatch
    from kpo_kernels.validation import check_loss_options

    new, old, advantages, mask, is_weights = _inputs(1)
    batch = TokenBatch(new, old, advantages, mask, is_weights, None, True)
    options = check_loss_options(q=1e-2, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=0.2,
                                 clip_high=0.2, dual_clip=None, log_ratio_cap=10.0, agg="token-mean", dp_size=1,
                                 batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
    for holes_mask in (mask, torch.arange(LENGTH) < torch.tensor([3, 41, 0, 17, 40])[:, None]):
        result = torch_rows.rows_loss(TokenBatch(new, old, advantages, holes_mask, is_weights, None, True), options, True)
        assert result is not None
        kept = [b.untyped_storage().data_ptr() for b in torch_workspace._buffers().values()]
        for tensor in (result.loss, result.metrics, result.grad, result.row_scale):
            assert tensor.untyped_storage().data_ptr() not in kept


def test_threads_do_not_share_buffers():
    inputs = [_inputs(seed) for seed in range(4)]
    want = [_step(x) for x in inputs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(15):
                got[i] = _step(inputs[i])
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i, expected in enumerate(want):
        for a, b in zip(got[i], expected):
            assert _same(a, b)


def test_inference_mode_then_training():
    """Buffers first made under inference mode still serve calls outside it (in-place updates of
    an inference tensor outside inference mode would raise)."""
    with torch.inference_mode():
        loss, _, _ = _step(_inputs(2), backward=False)
    got = _step(_inputs(2))
    torch.testing.assert_close(got[0], loss, rtol=0, atol=0)
    assert got[2] is not None
