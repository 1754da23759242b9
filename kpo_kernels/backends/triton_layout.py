"""How the Triton launches lay a block's tokens out in registers: blocks aligned to the flat
token index (FLAT), the zero-byte layout anchor (ANCHOR), and the runs of tokens each thread
sums before its statistics (RUN): of kpo_loss_fwd_kernel and the tile passes."""

import threading

import torch

from .. import tables
from .triton_launch import MAX_BLOCK, WIDE_BLOCK_WARPS, _cdiv


def tokens_per_thread(block, warps):
    """The tokens of a block each thread holds in the layout the launches ask for: consecutive
    ones, 8 in the wide blocks (1024 tokens, 4 warps)."""
    return max(1, block // (32 * warps))


def statistic_run(block, warps):
    """RUN of kpo_loss_fwd_kernel: the tokens a thread sums before adding them to its statistics,
    its run of consecutive tokens where it holds 4 or more (8 in the wide blocks: about 50 fewer
    registers a thread on sm_90a, and no spills in strided layouts); else 1: at 2 a thread (the
    blocks up to 512 tokens) a register a statistic saved, and ptxas spilled inside the loop of
    a 128-token block to fit fewer."""
    run = tokens_per_thread(block, warps)
    return run if run >= 4 else 1


def _tokens_a_load(tensor, flat):
    """Tokens of `tensor` one 16-byte load reads in the kernels' blocks: 1 where its tokens are
    strided, or where the compiler cannot know that a block starts 16-byte aligned (Triton
    specialises pointers and integer arguments divisible by 16: the data pointer, and the row
    stride of padded rows addressed by row; FLAT blocks start at multiples of 16 tokens, and
    packed sequences not FLAT at any token: a 1-D tensor there loads one token a vector)."""
    if tensor.stride(-1) != 1 or tensor.data_ptr() % 16 != 0:
        return 1
    if not flat and (tensor.dim() < 2 or tensor.stride(0) % 16 != 0):
        return 1
    return 16 // tensor.element_size()


def needs_layout_anchor(block, warps, tensors, flat):
    """Whether the fused forward loads zero bytes to set its blocks' register layout
    (kpo_loss_fwd_kernel's ANCHOR). Triton gives a block the layout of its widest vector
    load (16 bytes): float32 inputs without a 1-byte mask (packed batches, masks of 4 or 8
    bytes) hold 4 or 2 tokens a vector, and strided or unaligned ones 1, fewer than a thread's
    share of the wide blocks (8). Each thread's tokens then come in runs that every scan of the
    block shuffles for (about 170 instructions a warp a block more, sm_90a, 1024-token blocks of
    4 warps), and the per-thread sums of the statistics (RUN) need the lanes of other threads:
    strided views spilled registers inside the forward's loop. flat: the launch's FLAT."""
    widest = max((_tokens_a_load(t, flat) for t in tensors if t is not None), default=1)
    return tokens_per_thread(block, warps) > widest


class LayoutAnchors:
    """The zero bytes of needs_layout_anchor: one buffer per device, never written. While a CUDA
    graph is captured, a buffer of that capture (its zeroing is a node of the graph)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers = {}

    def get(self, device, block):
        if tables.capturing(device):
            return torch.zeros(block, dtype=torch.uint8, device=device)
        with self._lock:
            buffer = self._buffers.get(device)
            if buffer is None or buffer.numel() < block:
                buffer = self._buffers[device] = torch.zeros(max(block, MAX_BLOCK), dtype=torch.uint8, device=device)
            return buffer


LAYOUT_ANCHORS = LayoutAnchors()


def layout_anchor(device, block, warps, tensors, flat):
    """The anchor_ptr and ANCHOR of kpo_loss_fwd_kernel and tile_aggregate_kernel, as keywords."""
    return {"anchor_ptr": LAYOUT_ANCHORS.get(device, block), "ANCHOR": needs_layout_anchor(block, warps, tensors, flat)}


def flat_layout(varlen, width, block, tensors, tile=None, warps=None):
    """Whether the fused loss aligns its tiles and blocks to the flat token index
    (kpo_loss_fwd_kernel's FLAT): blocks of a multiple of 16 tokens, and every token input holding
    sequence s's token t at flat index s * width + t (in token strides; packed ones always, by
    cu_seqlens). Padded rows of a multiple of 16 tokens are aligned already and keep their own
    addressing. Where a row's last block would take one step more for the reach-back (up to
    15 tokens), FLAT still pays when the tile (`tile` tokens, the whole row when None) takes
    enough steps for one more to cost less than the unaligned layout (_reach_back_steps); a
    packed sequence's last tile takes one step more only when its last block's tokens and its
    reach-back together pass a block."""
    if block % 16 != 0:
        return False
    if varlen:
        return True
    if width % 16 == 0:
        return False
    if width % block + 15 > block:
        steps = _cdiv(min(width, tile or width), block)  # a tile's block steps without the reach-back
        if steps < _reach_back_steps(block, warps):
            return False
    return all(t is None or t.stride(0) == width * t.stride(1) for t in tensors)


def _reach_back_steps(block, warps):
    """The fewest block steps a tile needs for FLAT's extra step (at most 1 / steps more) to
    cost less than the unaligned layout. At the launcher's wide blocks (1024 tokens, 4 warps)
    the unaligned rows take the layout anchor (needs_layout_anchor): the fused forward compiled
    for sm_90a (512 rows of 8191 tokens, every metric) runs 5.29 warp-instructions a token
    unaligned against FLAT's 5.02 in fp32 (break-even at 18.6 steps), 5.48 against 5.00 in bf16
    (10.4): 16 steps. (Without the anchor the unaligned layout cost 1.62x FLAT.) Other layouts
    are chosen by the user and were measured without the anchor, 1.11-1.88x FLAT (64-2048
    tokens, 1-8 warps, break-even at up to 9.2 steps): 10 steps."""
    return 16 if block == MAX_BLOCK and warps == WIDE_BLOCK_WARPS else 10
