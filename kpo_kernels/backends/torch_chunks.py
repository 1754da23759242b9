"""The torch backend's chunk maps: what each sequence of a packed batch does to the filter's
state, given the observations its sequences consumed before (docs/math.md section 7)."""

import torch

from .. import tables
from ..state import NO_RAW_SIGN, ChunkMaps, FilterState
from .torch_layouts import _Packed, _sign, _valid
from .torch_scan import COMPUTE, affine_scan, ieee_nonfinite, nonfinite


def packed_chunk_maps(log_prob, old_log_prob, mask, options, cu_seqlens, count):
    """ChunkMaps (float64) of the S sequences of a packed (N,) batch (module docstring)."""
    num_tokens, device = log_prob.shape[0], log_prob.device
    sequences = cu_seqlens.numel() - 1
    # Only the count matters here: the maps never depend on the state entering the chunk.
    entering = FilterState(torch.zeros(sequences, dtype=COMPUTE, device=device), count, count.new_zeros(sequences, dtype=torch.int8))
    layout = _Packed(cu_seqlens, num_tokens, entering)
    valid = _valid(mask, log_prob.shape, device)
    z = log_prob.to(COMPUTE) if old_log_prob is None else log_prob.to(COMPUTE) - old_log_prob.to(COMPUTE)
    z = z.masked_fill_(~valid, 0.0)
    gains = tables.gain_table(layout.longest, options.q, options.r, options.p0, device, COMPUTE)
    c = layout.per_observation(gains, valid, options.skip)
    if options.skip:
        c = c.mul_(valid)
    bad = nonfinite(z)
    first = layout.pos == 0
    # Two scans sharing the coefficients a = 1 - c (0 at each sequence's first token: a reset):
    # the state from x_in = 0 (B), and the one from x_in = 1 less B (A, pushed in at the start).
    a = torch.sub(1.0, c).masked_fill_(first, 0.0)
    pushed = torch.where(first, 1.0 - c, 0.0)
    b = c * (z if bad is None else z.masked_fill(bad, 0.0))
    _, scanned = affine_scan(a, torch.stack([b, pushed]), need_a=False)
    from_zero, through = scanned[0], scanned[1]
    if bad is not None:  # the recursion's inf and NaN (see ieee_nonfinite)
        from_zero = ieee_nonfinite(from_zero, z, c, bad, layout._running)

    offsets = cu_seqlens.long()
    lengths = offsets[1:] - offsets[:-1]
    nonempty = lengths > 0
    end = (offsets[1:] - 1).clamp_(min=0)
    tokens = torch.arange(num_tokens, device=device)
    last_valid = torch.full((sequences,), -1, dtype=torch.int64, device=device)
    last_valid.scatter_reduce_(0, layout.seq, torch.where(valid, tokens, -1), "amax")
    has_valid = last_valid >= 0
    at_last = last_valid.clamp(min=0)

    def at(values, index, where):
        if num_tokens == 0:
            return torch.zeros(sequences, dtype=COMPUTE, device=device)
        return torch.where(where, values[index], 0.0)

    consumed = layout.count(valid) if options.skip else lengths
    return ChunkMaps(
        c=at(1.0 - through, end, nonempty),
        b=at(from_zero, end, nonempty),
        c_last=at(1.0 - through, at_last, has_valid),
        b_last=at(from_zero, at_last, has_valid),
        raw_sign=torch.where(has_valid, _sign(at(z, at_last, has_valid)) + 1, NO_RAW_SIGN).to(torch.int8),
        count=consumed.to(torch.int64),
    )
