"""The KPO loss on sequences split across context-parallel ranks (docs/context-parallel.md).

Each rank holds some chunks ("pieces") of every sequence of the micro-batch and computes the
loss of its own tokens only. The filter is causal over a whole sequence, so a piece needs the
state its sequence is in when the piece starts; docs/math.md section 7 shows that this state
follows from a few numbers per piece. Three collectives per call, all `all_gather`:

1. per piece: its sequence, its place in the sequence, its valid tokens and its length
   (4 int64): each piece's gain index (observations before it) and the per-sequence totals
   the aggregation needs;
2. per piece: its map at that index (4 float64 and the sign of its last valid token): composed
   in sequence order, each piece's entering state;
3. the metric vector (17 numbers): the metrics of the whole batch.

No token data moves: 72 bytes per piece and 17 numbers per rank, sent to every rank of the
group. The loss of each rank is its share: the shares sum to the unsharded loss, and the
gradient at a rank's tokens is the unsharded gradient there.
"""

import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import ops  # noqa: F401 (registers torch.ops.kpo_kernels.*, which this module calls)
from .api import _LOSS_DEFAULTS, _TENSOR_OR_BACKEND, kpo_loss
from .backends.aggregation import row_weights
from .dispatch import backend_key, resolve_backend
from .options import METRIC_NAMES
from .state import NO_RAW_SIGN, ChunkMaps, FilterState, advance, compose, require
from .validation import check_loss_options, check_mask, check_tokens

LAYOUTS = ("zigzag", "contiguous")


class Pieces(NamedTuple):
    """The pieces of a rank's packed token stream, in the stream's order ((P,) int64 tensors).

    Piece p has `lengths[p]` tokens of sequence `sequence[p]` (0..num_sequences - 1), and is
    chunk `order[p]` of it: a sequence's tokens are its chunks, over all ranks, in increasing
    order. Empty pieces are allowed. Every rank passes the same P and num_sequences.
    """

    lengths: torch.Tensor
    sequence: torch.Tensor
    order: torch.Tensor
    num_sequences: int


def layout_pieces(layout, seq_lengths, rank, world):
    """The Pieces of `rank` for sequences of `seq_lengths` ((S,) int64) cut by a named layout.

    zigzag: 2 * world chunks of ceil(L / (2 world)) tokens (the last ones shorter, or empty);
    rank r holds chunks r and 2 world - 1 - r, in that order (Megatron / slime context
    parallelism). contiguous: world chunks of ceil(L / world) tokens; rank r holds chunk r.
    """
    chunks = 2 * world if layout == "zigzag" else world
    mine = (rank, chunks - 1 - rank) if layout == "zigzag" else (rank,)
    size = (seq_lengths + chunks - 1) // chunks
    sequences = seq_lengths.numel()
    lengths = torch.stack([(seq_lengths - c * size).clamp(min=0).minimum(size) for c in mine], dim=1)
    order = torch.tensor(mine, dtype=torch.int64, device=seq_lengths.device).expand(sequences, len(mine))
    sequence = torch.arange(sequences, device=seq_lengths.device)[:, None].expand(sequences, len(mine))
    return Pieces(lengths.reshape(-1), sequence.reshape(-1), order.reshape(-1), sequences)


def context_parallel_kpo_loss(
    log_prob, old_log_prob, advantages, mask=None, *, group=None, layout="zigzag", cu_seqlens=None, is_weights=None,
    backend="auto", **options
):
    """This rank's share of the KPO loss of sequences split across the ranks of `group`.

    Args:
        log_prob, old_log_prob, mask, is_weights: this rank's tokens, in one of three forms:
            - layout "zigzag" or "contiguous", padded: (B, W), each row the rank's chunks of one
              sequence side by side (zigzag: W = 2 C, chunks r and 2 cp - 1 - r of C tokens;
              contiguous: the rank's chunk of W tokens), every sequence padded to the same width;
            - the same layouts, packed: (N,) with `cu_seqlens` the (S + 1,) offsets of the whole,
              unsharded sequences (the same on every rank); the rank's tokens are, sequence by
              sequence, its chunks of it (`layout_pieces`);
            - layout a `Pieces`: (N,) tokens that are the rank's pieces in order.
        advantages: one per sequence ((B,) / (B, 1) padded, (S, 1) packed), or one per token of
            this rank, the shape of log_prob.
        group: the context-parallel process group (None: the default group).
        backend, **options: as in `kpo_loss` (q, r, p0, x0, mask_mode, clip, agg, dp_size,
            global counts, ...). `initial_state` and `return_state` are not accepted.

    Returns:
        (loss, metrics): loss this rank's share (summed over the group it is the unsharded loss,
        and its gradient is the unsharded gradient at this rank's tokens); metrics those of the
        unsharded call, the same on every rank.
    """
    for name in ("initial_state", "return_state"):
        if name in options:
            raise TypeError(f"context_parallel_kpo_loss does not take {name}")
    checked = check_loss_options(**{**_DEFAULTS, **options})
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    stream = _stream(log_prob, old_log_prob, advantages, mask, is_weights, layout, cu_seqlens, rank, world)
    device = stream.log_prob.device
    impl = resolve_backend(backend, device, log_prob.dtype)

    # 1. What each piece is: sequence, place, valid tokens, length.
    valid = stream.valid_counts()
    described = torch.stack([stream.pieces.sequence, stream.pieces.order, valid, stream.pieces.lengths], dim=1)
    sequence, order, valid_all, lengths_all = _gather(described, group, world).unbind(1)
    observations = valid_all if checked.filter.skip else lengths_all
    sequences = stream.pieces.num_sequences
    perm, before = _prefix_counts(sequence, order, observations, sequences)
    mine = slice(rank * stream.num_pieces, (rank + 1) * stream.num_pieces)

    # 2. Each piece's map at its gain index; composed in sequence order: the entering states.
    count_in = torch.empty_like(before).scatter_(0, perm, before)[mine]
    filt = checked.filter
    maps = torch.ops.kpo_kernels.kalman_chunk_maps(
        stream.log_prob.detach(), stream.old_log_prob, stream.mask, stream.cu_seqlens, count_in,
        float(filt.q), float(filt.r), float(filt.p0), filt.skip, backend_key(impl),
    )
    local = torch.stack([m.to(torch.float64) for m in maps[:5]], dim=1)
    gathered = _gather(local, group, world)[perm]
    ordered = ChunkMaps(*gathered.unbind(1)[:4], gathered[:, 4].to(torch.int8), observations[perm])
    entering = _entering_states(ordered, sequence[perm], filt.x0)
    state = FilterState(*(torch.empty_like(t).scatter_(0, perm, t)[mine] for t in entering))

    # The aggregation weight of each sequence, from its totals over the group.
    seq_valid = torch.zeros(sequences, dtype=torch.float64, device=device).index_add_(0, sequence, valid_all.double())
    seq_length = torch.zeros(sequences, dtype=torch.int64, device=device).index_add_(0, sequence, lengths_all)
    horizon = seq_length.max() if sequences else 0
    weights = row_weights(seq_valid, checked, horizon)[stream.pieces.sequence]
    weight_dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    token_weights = torch.repeat_interleave(weights.to(weight_dtype), stream.pieces.lengths, output_size=stream.log_prob.shape[0])
    if stream.is_weights is not None:
        token_weights = token_weights * stream.is_weights

    local_options = {**options, "agg": "token-sum", "dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                     "loss_scale_factor": None}
    loss, metrics = kpo_loss(
        stream.log_prob, stream.old_log_prob, stream.advantages, stream.mask, is_weights=token_weights,
        cu_seqlens=stream.cu_seqlens, initial_state=state, backend=impl, **local_options,
    )
    # 3. The metrics of the whole batch (metrics="basic": the diagnostics' places hold 0 and stay out).
    vector = torch.stack([metrics.get(name, loss.new_zeros(())) for name in METRIC_NAMES])
    combined = _combine_metrics(_gather(vector[None], group, world)).unbind()
    return loss, {name: value for name, value in zip(METRIC_NAMES, combined) if name in metrics}


# kpo_loss's option defaults (the numbers and modes check_loss_options takes).
_DEFAULTS = {name: value for name, value in _LOSS_DEFAULTS.items() if name not in _TENSOR_OR_BACKEND}


def _gather(tensor, group, world):
    """The rows of `tensor` of every rank, rank by rank (one all_gather)."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _prefix_counts(sequence, order, observations, sequences):
    """(perm, before): perm sorts the pieces of the group by (sequence, order); before[i] is
    the observations of the sorted piece i's sequence before it (an exclusive sum)."""
    key = sequence * (order.max() + 1 if order.numel() else 1) + order
    perm = torch.argsort(key, stable=True)
    ordered = key[perm]
    require(ordered[1:] != ordered[:-1], "two pieces of the group have the same (sequence, order)")
    counts = observations[perm]
    totals = torch.zeros(sequences, dtype=counts.dtype, device=counts.device).index_add_(0, sequence, observations)
    offsets = torch.cumsum(totals, 0) - totals
    return perm, torch.cumsum(counts, 0) - counts - offsets[sequence[perm]]


def _entering_states(maps, sequence, x0):
    """The FilterState entering each of the sorted pieces: their maps composed in order within
    each sequence (a segmented inclusive scan, log2(pieces) steps), shifted by one piece."""
    pieces = sequence.numel()
    inclusive = maps
    step = 1
    while step < pieces:
        earlier = ChunkMaps(*(t[:-step] for t in inclusive))
        later = ChunkMaps(*(t[step:] for t in inclusive))
        same = sequence[:-step] == sequence[step:]
        combined = compose(earlier, later)
        inclusive = ChunkMaps(*(
            torch.cat([t[:step], torch.where(same, c.to(t.dtype), t[step:])]) for t, c in zip(inclusive, combined)
        ))
        step *= 2
    identity = ChunkMaps(*(torch.zeros(1, dtype=t.dtype, device=t.device) for t in maps[:4]),
                         torch.full((1,), NO_RAW_SIGN, dtype=torch.int8, device=sequence.device),
                         torch.zeros(1, dtype=torch.int64, device=sequence.device))
    first = torch.ones_like(sequence, dtype=torch.bool)
    first[1:] = sequence[1:] != sequence[:-1]
    exclusive = ChunkMaps(*(
        torch.where(first, i, torch.cat([i[:1], t[:-1]])) for t, i in zip(inclusive, identity)
    ))
    return advance(FilterState.start(pieces, x0, device=sequence.device), exclusive)


def _combine_metrics(rows):
    """The metric vector of the union of the ranks' tokens from each rank's vector (rows)."""
    index = {name: i for i, name in enumerate(METRIC_NAMES)}
    denominators = {
        "num_tokens": ("clipfrac", "clipfrac_lower", "ppo_kl", "ratio_mean", "raw_ratio_mean", "clipfrac_high",
                       "clipfrac_low", "capfrac"),
        "innovation_tokens": ("nis_mean", "log_likelihood"),
        "sign_flip_pairs": ("sign_flip_raw", "sign_flip_filtered"),
    }
    wide = rows.to(torch.float64)
    out = wide.sum(0)
    for denominator, names in denominators.items():
        counts = wide[:, index[denominator]]
        total = counts.sum()
        for name in names:
            numerator = (wide[:, index[name]] * counts).sum()
            out[index[name]] = torch.where(total > 0, numerator / torch.where(total > 0, total, 1.0), 0.0)
    for name in ("ratio_max", "raw_ratio_max"):
        out[index[name]] = wide[:, index[name]].max()
    return out.to(rows.dtype)


class _Stream(NamedTuple):
    """A rank's tokens as one packed stream of its pieces."""

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    is_weights: torch.Tensor
    cu_seqlens: torch.Tensor
    pieces: Pieces

    @property
    def num_pieces(self):
        return self.pieces.lengths.numel()

    def valid_counts(self):
        """Valid tokens of each piece (int64)."""
        if self.mask is None:
            return self.pieces.lengths.clone()
        flags = (self.mask != 0).to(torch.int64)
        piece = torch.repeat_interleave(torch.arange(self.num_pieces, device=flags.device), self.pieces.lengths,
                                        output_size=flags.numel())
        return torch.zeros(self.num_pieces, dtype=torch.int64, device=flags.device).index_add_(0, piece, flags)


def _stream(log_prob, old_log_prob, advantages, mask, is_weights, layout, cu_seqlens, rank, world):
    """The rank's tokens as a `_Stream` (checks the layout and the shapes, naming them)."""
    if isinstance(layout, Pieces):
        if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 1:
            raise ValueError("log_prob must be 1-D (tokens,): the rank's pieces, packed, when layout is a Pieces")
        pieces = layout
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or a Pieces, got {layout!r}")
    elif cu_seqlens is None:
        check_tokens("log_prob", log_prob)
        rows, width = log_prob.shape
        if layout == "zigzag" and width % 2:
            raise ValueError(f"log_prob has {width} tokens a row: zigzag rows hold two chunks of equal width")
        per_row = 2 if layout == "zigzag" else 1
        pieces = Pieces(
            torch.full((rows * per_row,), width // per_row, dtype=torch.int64, device=log_prob.device),
            torch.arange(rows, device=log_prob.device).repeat_interleave(per_row),
            torch.tensor((rank, 2 * world - 1 - rank) if per_row == 2 else (rank,), device=log_prob.device).repeat(rows),
            rows,
        )
    else:
        check_tokens("log_prob", log_prob, cu_seqlens)
        offsets = cu_seqlens.to(torch.int64)
        pieces = layout_pieces(layout, offsets[1:] - offsets[:-1], rank, world)
    return _as_stream(log_prob, old_log_prob, advantages, mask, is_weights, pieces)


def _checked_pieces(pieces, device):
    """The Pieces as int64 tensors on `device`; shapes checked here, values where they are
    data (`state.require`: on the host for CPU tensors, asynchronously on an accelerator)."""
    sequences = pieces.num_sequences
    if isinstance(sequences, bool) or not isinstance(sequences, numbers.Integral) or sequences < 0:
        raise ValueError(f"Pieces.num_sequences must be an int >= 0, got {sequences!r}")
    fields = []
    for name in ("lengths", "sequence", "order"):
        value = getattr(pieces, name)
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"Pieces.{name} must be a 1-D integer tensor")
        if value.shape != pieces.lengths.shape:
            raise ValueError(f"Pieces.{name} has {value.numel()} entries, Pieces.lengths {pieces.lengths.numel()}")
        fields.append(value.to(device=device, dtype=torch.int64))
    lengths, sequence, order = fields
    require(lengths >= 0, "Pieces.lengths must be >= 0")
    require((sequence >= 0) & (sequence < sequences), f"Pieces.sequence must be in 0..{sequences - 1}")
    require(order >= 0, "Pieces.order must be >= 0")
    return Pieces(lengths, sequence, order, int(sequences))


def _as_stream(log_prob, old_log_prob, advantages, mask, is_weights, pieces):
    shape = log_prob.shape
    flat = [None if t is None else t.reshape(-1) for t in (log_prob, old_log_prob, mask, is_weights)]
    for name, tensor in zip(("old_log_prob", "mask", "is_weights"), (old_log_prob, mask, is_weights)):
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} (that of log_prob)")
    check_mask(mask, shape, log_prob.device)
    device = log_prob.device
    pieces = _checked_pieces(pieces, device)
    lengths = pieces.lengths
    tokens = flat[0].numel()
    if device.type == "cpu" and int(lengths.sum()) != tokens:
        raise ValueError(f"the pieces hold {int(lengths.sum())} tokens, log_prob {tokens}")
    cu_seqlens = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    sequences = pieces.num_sequences
    # One per sequence: (S, 1), or (B,) for padded rows. A 1-D stream refuses (S,), as kpo_loss
    # does for a packed batch: on a rank whose token count happens to be S it would read as
    # one per token, so that its meaning would depend on the rank's share of the tokens.
    per_sequence = ((sequences, 1),) if len(shape) == 1 else ((sequences,), (sequences, 1))
    if advantages.shape == shape:  # the shape alone decides, as in kpo_loss
        advantages = advantages.reshape(-1)
    elif advantages.shape in per_sequence:
        advantages = advantages.reshape(-1)[pieces.sequence][:, None]
    else:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}: expected one per token {tuple(shape)} or one per "
            f"sequence {' / '.join(str(s) for s in per_sequence)}"
            + (f"; for one advantage per sequence pass advantages[:, None], of shape ({sequences}, 1)"
               if len(shape) == 1 and advantages.shape == (sequences,) else "")
        )
    return _Stream(flat[0], flat[1], advantages, flat[2], flat[3], cu_seqlens, pieces)


__all__ = ["LAYOUTS", "Pieces", "context_parallel_kpo_loss", "layout_pieces"]
