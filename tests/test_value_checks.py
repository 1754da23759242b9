"""Values the op checks before the backend runs, which the Triton loss on CUDA checks on the way.

- A mask's values must be 0 or 1. The torch backend, and every backend on the CPU, checks them
  before any kernel runs (tensor_checks.check_mask_values: four passes over the mask on a GPU, a
  third of the step for an int64 mask at 512 x 8192 in the static model). On CUDA the Triton
  forward checks a mask other than bool as it reads it: one flag, which its last program clears,
  and one asynchronous assertion (TritonBackend.checks_mask_values).
- Packed offsets must start at 0, never decrease and end at the number of tokens: on CUDA the
  tile-offsets kernel reads them anyway and the loss asserts its flag before any other kernel
  reads the tiles (eight kernels fewer than tensor_checks.check_cu_seqlens_values).

Here the kernels' own checks run on the CPU under the interpreter, called below the op (which
would refuse first): every dtype a mask comes in, values just off 0 and 1, -0.0 (a 0), and
offsets off in each way."""

import math

import pytest
import torch

import kpo_kernels
from conftest import DEVICE, triton_backend
from helpers import make_batch
from kpo_kernels.validation import check_loss_options, check_token_batch

OPTIONS = dict(
    q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=3e-4, clip_high=4e-4, dual_clip=None,
    log_ratio_cap=10.0, agg="seq-mean-token-mean", dp_size=1, batch_num_tokens=None, global_batch_size=None,
    loss_scale_factor=None,
)
# values other than 0 and 1 per dtype: large, negative, the sign bit alone, the smallest, NaN
NOT_BINARY = {
    torch.int64: [2, -1, -(2**63), 3], torch.int32: [2, -1, -(2**31)], torch.int8: [-128, -1, 2],
    torch.uint8: [255, 2, 128], torch.float64: [2.0, 0.5, -1.0, math.nan, 5e-324],
    torch.float32: [2.0, 0.5, -1.0, math.nan, math.inf, 1e-45], torch.bfloat16: [2.0, 0.5, -1.0, math.nan],
    torch.float16: [2.0, -1.0, math.nan, 6e-8],
}


def _forward(backend, batch, mask, packed=False):
    """The backend's loss_forward alone (no op, so no check before it)."""
    log_prob, old = batch["log_prob"].to(DEVICE), batch["old_log_prob"].to(DEVICE)
    advantages, cu_seqlens = batch["advantages"].to(DEVICE), None
    if packed:
        rows, width = log_prob.shape
        log_prob, old, mask = log_prob.reshape(-1), old.reshape(-1), mask.reshape(-1)
        advantages = advantages[:, None]
        cu_seqlens = torch.arange(0, rows * width + 1, width, dtype=torch.int32, device=DEVICE)
    checked = check_token_batch(log_prob, old, advantages, mask.to(DEVICE), None, cu_seqlens)
    return backend.loss_forward(checked, check_loss_options(**OPTIONS), True)


@pytest.mark.parametrize("dtype", list(NOT_BINARY))
def test_the_forward_refuses_values_other_than_0_and_1(dtype):
    """Each value off 0 and 1 at one token, whole rows and rows cut into tiles, padded and
    packed, and in blocks of 8 tokens a thread (the flag summed per thread first, as in the
    wide blocks): ValueError from the forward's flag; the same mask with its 0s and 1s (and
    -0.0 for its 0s) passes right after, so the flag went back to 0."""
    batch = make_batch(2, 48, seed=1, layout="holes", garbage=False)
    good = batch["mask"].to(dtype)
    if dtype.is_floating_point:
        good = torch.where(good == 0, torch.tensor(-0.0, dtype=dtype), good)
    eight_a_thread = triton_backend(block_size=256, num_warps=1)
    for backend, packed in ((triton_backend(), False), (triton_backend(tile_size=32), True), (eight_a_thread, False)):
        for value in NOT_BINARY[dtype]:
            bad = good.clone()
            bad[1, 37] = value
            with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
                _forward(backend, batch, bad, packed)
            result = _forward(backend, batch, good, packed)
            assert torch.isfinite(result.loss)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bfloat16])
def test_masks_of_every_dtype_give_the_bool_masks_results(dtype):
    batch = make_batch(3, 60, seed=2, layout="holes", garbage=False)
    results = []
    for mask in (batch["mask"], batch["mask"].to(dtype)):
        log_prob = batch["log_prob"].to(DEVICE).requires_grad_()
        loss, metrics = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"].to(DEVICE), batch["advantages"].to(DEVICE),
                                             mask.to(DEVICE), backend=triton_backend(tile_size=32))
        loss.backward()
        results.append((loss, metrics, log_prob.grad))
    (loss, metrics, grad), (want_loss, want_metrics, want_grad) = results[1], results[0]
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert all(torch.equal(metrics[k].nan_to_num(), want_metrics[k].nan_to_num()) for k in want_metrics)


def test_where_the_mask_is_checked():
    """The op checks masks before any kernel runs except where the Triton forward checks them:
    a mask other than bool on CUDA."""
    backend = kpo_kernels.TritonBackend()
    assert not backend.checks_mask_values(None)
    assert not backend.checks_mask_values(torch.ones(2, 3, dtype=torch.bool))
    assert not backend.checks_mask_values(torch.ones(2, 3, dtype=torch.int64))  # the CPU: before, in the op
    assert not kpo_kernels.TorchBackend().checks_mask_values(torch.ones(2, 3, dtype=torch.int64))
    meta = torch.ones(2, 3, dtype=torch.int64, device="meta")
    assert not backend.checks_mask_values(meta)


@pytest.mark.parametrize("offsets, valid", [
    ([0, 40, 80, 120], True), ([0, 0, 120, 120], True),  # an empty sequence is fine
    ([0, 40, 80, 121], False), ([0, 40, 80, 119], False), ([1, 40, 80, 120], False), ([0, 50, 40, 120], False),
])
def test_the_tile_offsets_kernel_checks_packed_offsets(offsets, valid):
    batch = make_batch(3, 40, seed=1, layout="none", garbage=False)
    log_prob, old = batch["log_prob"].reshape(-1).to(DEVICE), batch["old_log_prob"].reshape(-1).to(DEVICE)
    advantages = batch["advantages"][:, None].to(DEVICE)
    for dtype in (torch.int32, torch.int64):
        cu_seqlens = torch.tensor(offsets, dtype=dtype, device=DEVICE)
        checked = check_token_batch(log_prob, old, advantages, None, None, cu_seqlens)
        forward = lambda: triton_backend(tile_size=32).loss_forward(checked, check_loss_options(**OPTIONS), True)  # noqa: E731
        if valid:
            assert torch.isfinite(forward().loss)
        else:
            with pytest.raises(ValueError, match="cu_seqlens must start at 0, never decrease and end at the number"):
                forward()


def test_where_the_offsets_are_checked():
    backend = kpo_kernels.TritonBackend()
    assert not backend.checks_cu_seqlens_values(None)
    assert not backend.checks_cu_seqlens_values(torch.tensor([0, 3]))  # the CPU: before, in the op
    assert not kpo_kernels.TorchBackend().checks_cu_seqlens_values(torch.tensor([0, 3]))
