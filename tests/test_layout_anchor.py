"""The layout anchor (triton_launch.needs_layout_anchor): zero bytes the fused forward and the
tile pass load so that a thread's tokens form one run; when it is asked for, and that anchored
kernels give the loss, metrics and gradient of the torch backend."""

import pytest
import torch

import kpo_kernels
import kpo_kernels.backends.triton_launch as launch
from conftest import DEVICE, triton_backend
from helpers import assert_close, make_batch, run_loss


def tensor(dtype):
    return torch.zeros(4, dtype=dtype)


@pytest.mark.parametrize("block, warps, dtypes, wanted", [
    (1024, 4, (torch.float32, torch.float32, None), True),  # packed fp32: 4 tokens a vector, 8 a thread
    (1024, 4, (torch.float32, torch.float32, torch.int64), True),  # verl's int64 masks: 2 a vector
    (1024, 4, (torch.float32, torch.float32, torch.int32), True),
    (1024, 4, (torch.float32, torch.float32, torch.uint8), False),  # bool masks arrive as bytes: 16 a vector
    (1024, 4, (torch.bfloat16, torch.bfloat16, torch.int64), False),  # bf16 inputs: 8 a vector
    (2048, 4, (torch.bfloat16, torch.bfloat16, None), True),  # 16 a thread
    (512, 8, (torch.float32, torch.float32, None), False),  # 2 a thread
    (16, 1, (torch.float64, torch.float64, torch.int64), False),  # a block smaller than a warp
])
def test_the_anchor_is_asked_for_where_no_load_holds_a_threads_tokens(block, warps, dtypes, wanted):
    tensors = tuple(None if d is None else tensor(d) for d in dtypes)
    assert launch.needs_layout_anchor(block, warps, tensors) is wanted


def test_the_anchor_is_one_buffer_of_zeros_per_device():
    anchors = launch.LayoutAnchors()
    first = anchors.get(torch.device("cpu"), 16)
    assert first.dtype == torch.uint8 and first.numel() >= launch.MAX_BLOCK and not first.any()
    assert anchors.get(torch.device("cpu"), 1024) is first  # kept, not made again
    wider = anchors.get(torch.device("cpu"), 4 * launch.MAX_BLOCK)
    assert wider.numel() == 4 * launch.MAX_BLOCK and not wider.any()
    assert launch.layout_anchor(torch.device("cpu"), 1024, 4, (tensor(torch.float32),))["ANCHOR"]


@pytest.fixture
def anchored(monkeypatch):
    """Records each launch's ANCHOR."""
    seen = []
    real = launch.needs_layout_anchor

    def spy(block, warps, tensors):
        seen.append(real(block, warps, tensors))
        return seen[-1]

    monkeypatch.setattr(launch, "needs_layout_anchor", spy)
    return seen


@pytest.mark.parametrize("layout, tile", [("packed", None), ("packed", 512), ("int64", None), ("int64", 512)])
def test_anchored_kernels_match_the_torch_backend(anchored, layout, tile):
    """256-token blocks at 1 warp (8 tokens a thread, as the wide blocks): float32 packed
    batches without a mask and padded ones with an int64 mask take the anchor, in the fused
    forward and (tiles of 512 tokens) the tile pass, with holes and every metric."""
    batch = make_batch(4, 700, layout="holes" if layout == "int64" else "right", seed=3, device=DEVICE)
    if layout == "packed":
        mask = batch.pop("mask").cpu()
        lengths = mask.sum(1)
        batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
        for name in ("log_prob", "old_log_prob"):
            batch[name] = batch[name][mask.to(DEVICE)]
        batch["advantages"] = batch["advantages"][:, None]
    else:
        batch["mask"] = batch["mask"].to(torch.int64)
    triton_backend()  # skips where Triton does not import
    impl = kpo_kernels.TritonBackend(block_size=256, num_warps=1, tile_size=tile, poison=True)
    options = dict(q=1e-3, dual_clip=3.0, clip_low=0.2, clip_high=0.28)
    loss, metrics, grad = run_loss(impl, batch, **options)
    assert anchored and all(anchored), anchored  # every anchored launch: the forward, and the tile pass with tiles
    assert len(anchored) == (2 if tile else 1)
    want_loss, want_metrics, want_grad = run_loss(kpo_kernels.TorchBackend(), batch, **options)
    assert_close("loss", loss, want_loss, rtol=1e-5, atol=1e-7)
    assert_close("grad", grad, want_grad, rtol=1e-5, atol=1e-9)
    for name in kpo_kernels.METRIC_NAMES:
        assert_close(name, metrics[name], want_metrics[name], rtol=1e-5, atol=1e-6)
