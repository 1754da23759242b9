"""`estimate_noise`'s layout on the Triton backend (launched by triton_noise.py):
`fit_layout_kernel`, each sequence's log-ratios in order (fit_spectrum.sequences), which
triton_fit_search.py's filters read.
"""

import triton
import triton.language as tl


@triton.jit
def _layout_valid(x_row, x_stride, mask_row, mask_stride, n, p, HAS_MASK: tl.constexpr):
    """Which of positions p hold a token (inside the sequence, not masked)."""
    inside = p < n
    if HAS_MASK:
        return ((tl.load(mask_row + p * mask_stride, mask=inside, other=0) << 1) != 0) & inside
    return inside


@triton.jit
def fit_layout_kernel(x_ptr, x_row_stride, x_stride, mask_ptr, mask_row_stride, mask_stride, cu_ptr, cu_step, z_ptr,
                      lengths_ptr, width, x0, HAS_MASK: tl.constexpr, PACKED: tl.constexpr, POSITION: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Grid (sequences,): fit_spectrum.sequences, bitwise (a zero's sign aside). Sequence i is row i of a (B, T) batch,
    or the packed sequence cu_step * i of cu_ptr's offsets (every cu_step-th: a token budget).
    z: (S, width) float32, row i its log-ratios less x0 in order, then 0: in skip mode its valid
    tokens, in position mode its positions up to its last valid one with masked ones as the
    observation 0 (-x0). lengths: (S,) int64. Garbage under the mask is never read; masks as in
    triton_common._load_valid. Two passes over the row: skip mode writes the valid tokens, then
    the zeros after them; position mode finds the last valid token, then writes every position."""
    row = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_ptr + row * cu_step).to(tl.int64)
        n = tl.load(cu_ptr + row * cu_step + 1).to(tl.int64) - start
        x_row = x_ptr + start * x_stride
        mask_row = mask_ptr + start * mask_stride
    else:
        n = width
        x_row = x_ptr + row * x_row_stride
        mask_row = mask_ptr + row * mask_row_stride
    out = z_ptr + row * width
    length = tl.zeros([], dtype=tl.int64)
    for begin in range(0, width, BLOCK):
        p = begin + tl.arange(0, BLOCK).to(tl.int64)
        valid = _layout_valid(x_row, x_stride, mask_row, mask_stride, n, p, HAS_MASK)
        if POSITION:
            length = tl.maximum(length, tl.max(tl.where(valid, p + 1, 0), 0))
        else:
            x = tl.load(x_row + p * x_stride, mask=valid, other=0.0).to(tl.float32) - x0
            tl.store(out + length + tl.cumsum(valid.to(tl.int64), 0) - 1, x, mask=valid)
            length += tl.sum(valid.to(tl.int64), 0)
    for begin in range(0, width, BLOCK):
        p = begin + tl.arange(0, BLOCK).to(tl.int64)
        if POSITION:
            valid = _layout_valid(x_row, x_stride, mask_row, mask_stride, n, p, HAS_MASK)
            x = tl.load(x_row + p * x_stride, mask=valid, other=0.0).to(tl.float32) - x0
            tl.store(out + p, tl.where(valid, x, tl.where(p < length, -x0, 0.0)), mask=p < width)
        else:  # past the valid tokens: positions the first pass never wrote
            tl.store(out + p, tl.zeros([BLOCK], dtype=tl.float32), mask=(p >= length) & (p < width))
    tl.store(lengths_ptr + row, length)
