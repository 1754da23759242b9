"""The layout anchor (triton_layout.needs_layout_anchor): zero bytes the fused forward and the
tile pass load so that a thread's tokens form one run; when it is asked for, and that anchored
kernels give the loss, metrics and gradient of the torch backend."""

import pytest
import torch

import kpo_kernels
import kpo_kernels.backends.triton_layout as layout
from conftest import DEVICE, triton_backend
from helpers import assert_close, make_batch, run_loss


def tensor(dtype, stride=1):
    return torch.zeros(4 * stride, dtype=dtype)[::stride]


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
    assert layout.needs_layout_anchor(block, warps, tensors, flat=True) is wanted


@pytest.mark.parametrize("strides, wanted", [
    ((1, 1, 1), False),  # bf16 inputs and a bool mask: 8 and 16 tokens a vector
    ((2, 2, 2), True),  # every second token of each: one token a load
    ((1, 2, 2), False),  # log_prob alone still holds a thread's 8 tokens a vector
    ((2, 2, 1), False),  # so does the mask
])
def test_a_strided_input_loads_one_token_a_vector(strides, wanted):
    """Strided token inputs load a token at a time. Left to their one-token-a-lane layout, the
    forward of a transposed float32 batch or of every second token (bf16, int64 mask and a
    state) spilled up to 180 bytes a thread inside its loop on sm_90a; anchored, none."""
    tensors = tuple(tensor(d, k) for d, k in zip((torch.bfloat16, torch.bfloat16, torch.bool), strides))
    assert layout.needs_layout_anchor(1024, 4, tensors, flat=True) is wanted


@pytest.mark.parametrize("row_stride, offset, flat, wanted", [
    (1024, 0, False, False),  # rows of 1024 tokens: every row starts 16-byte aligned
    (700, 0, False, True),  # rows addressed by row, 700 apart: the compiler cannot know their alignment
    (700, 0, True, False),  # FLAT blocks start at multiples of 16 tokens
    (1024, 1, False, True),  # a view one element in: its pointer is not 16-byte aligned
    (1024, 1, True, True),
])
def test_blocks_the_compiler_cannot_know_aligned_load_one_token_a_vector(row_stride, offset, flat, wanted):
    """Unaligned row starts or data pointers also give one token a load (in the held-out sweep a
    bf16 view one element in spilled inside the loop, and rows 703 apart outside it)."""
    rows = torch.zeros(4 * row_stride + offset, dtype=torch.bfloat16)[offset:].view(4, row_stride)
    tensors = (rows, rows, torch.zeros(4, row_stride, dtype=torch.bool) if offset == 0 and row_stride == 1024 else None)
    assert layout.needs_layout_anchor(1024, 4, tensors, flat) is wanted


@pytest.mark.parametrize("warps, length, block", [(None, 5000, 1024), (4, 5000, 1024), (2, 5000, 512), (1, 5000, 256),
                                                  (8, 5000, 1024), (2, 100, 128)])
def test_chosen_warps_keep_at_most_eight_tokens_a_thread(warps, length, block):
    """With num_warps chosen and no block_size the default block holds at most 8 tokens a
    thread, as the wide blocks do: 16 (1024 tokens at 2 warps) spilled 288 bytes a thread."""
    plan = kpo_kernels.TritonBackend(num_warps=warps)
    assert plan._block(length) == block


def test_the_anchor_is_one_buffer_of_zeros_per_device():
    anchors = layout.LayoutAnchors()
    first = anchors.get(torch.device("cpu"), 16)
    assert first.dtype == torch.uint8 and first.numel() >= layout.MAX_BLOCK and not first.any()
    assert anchors.get(torch.device("cpu"), 1024) is first  # kept, not made again
    wider = anchors.get(torch.device("cpu"), 4 * layout.MAX_BLOCK)
    assert wider.numel() == 4 * layout.MAX_BLOCK and not wider.any()
    assert layout.layout_anchor(torch.device("cpu"), 1024, 4, (tensor(torch.float32),), flat=True)["ANCHOR"]


@pytest.fixture
def anchored(monkeypatch):
    """Records each launch's ANCHOR."""
    seen = []
    real = layout.needs_layout_anchor

    def spy(block, warps, tensors, flat):
        seen.append(real(block, warps, tensors, flat))
        return seen[-1]

    monkeypatch.setattr(layout, "needs_layout_anchor", spy)
    return seen


@pytest.mark.parametrize("layout, tile", [("packed", None), ("packed", 512), ("int64", None), ("int64", 512),
                                          ("strided", None), ("strided", 512), ("rows", None), ("rows", 512)])
def test_anchored_kernels_match_the_torch_backend(anchored, layout, tile):
    """256-token blocks at 1 warp (8 tokens a thread, as the wide blocks): float32 packed
    batches without a mask, padded ones with an int64 mask, strided views and rows addressed by
    row at a stride that is not a multiple of 16 take the anchor, in the fused forward and (tiles
    of 512 tokens) the tile pass, with holes and every metric."""
    batch = make_batch(4, 700, layout="right" if layout == "packed" else "holes", seed=3, device=DEVICE)
    if layout == "packed":
        mask = batch.pop("mask").cpu()
        lengths = mask.sum(1)
        batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
        for name in ("log_prob", "old_log_prob"):
            batch[name] = batch[name][mask.to(DEVICE)]
        batch["advantages"] = batch["advantages"][:, None]
    elif layout == "rows":  # rows 703 apart: neither FLAT (row stride != width) nor 16-byte aligned
        for name in ("log_prob", "old_log_prob", "mask"):
            wide = torch.zeros(4, 703, dtype=batch[name].dtype, device=DEVICE)
            wide[:, :700] = batch[name]
            batch[name] = wide[:, :700]
    elif layout == "strided":  # every second token of wider tensors, as a view
        for name in ("log_prob", "old_log_prob", "mask"):
            wide = batch[name].repeat_interleave(2, dim=1)
            batch[name] = wide[:, ::2]
            wide[:, 1::2] = float("nan") if wide.dtype.is_floating_point else True  # never read
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
