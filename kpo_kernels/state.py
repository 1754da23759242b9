"""The filter's state between chunks of a sequence, and the maps that carry it (docs/math.md section 7).

A chunk is a run of consecutive tokens of one sequence (a shard on a context-parallel rank, or a
piece of a long response processed in turns). Everything a chunk needs from the tokens before it
is a `FilterState` per sequence; everything it contributes to the tokens after it is a
`ChunkMaps` per sequence, whose values depend on the observations consumed before the chunk
(the gain index) but not on the state entering it. Maps compose in sequence order, so ranks that
hold different chunks of the same sequences exchange a few numbers per chunk, never tokens.
"""

from typing import NamedTuple

import torch

# Sign code of "no valid token yet" (the Triton kernels use the same value, triton_common.NO_TOKEN).
NO_TOKEN = 9
# ChunkMaps.raw_sign of a chunk without a valid token.
NO_RAW_SIGN = 3


class FilterState(NamedTuple):
    """The state of S sequences after some of their tokens, as (S,) tensors on the data's device.

    x: the filtered log-ratio after the last observation consumed (x0 before any), floating point.
    count: int64, observations consumed: valid tokens in `skip` mode, positions in `position`
        mode. The next observation uses the gain K_{count + 1}.
    last_sign: int8, the signs of the raw and filtered log-ratio of the last valid token, coded
        3 (sign(z) + 1) + sign(x) + 1 in 0..8, or NO_TOKEN (9) when no valid token came yet: the
        sign-flip diagnostics pair a chunk's first valid token with it (docs/math.md 5b).
    """

    x: torch.Tensor
    count: torch.Tensor
    last_sign: torch.Tensor

    @classmethod
    def start(cls, num_sequences, x0=0.0, *, device="cpu", dtype=torch.float64):
        """The state before the first token: x0, no observation, no valid token."""
        return cls(
            torch.full((num_sequences,), float(x0), dtype=dtype, device=device),
            torch.zeros(num_sequences, dtype=torch.int64, device=device),
            torch.full((num_sequences,), NO_TOKEN, dtype=torch.int8, device=device),
        )

    def to(self, device):
        return FilterState(*(t.to(device) for t in self))


class ChunkMaps(NamedTuple):
    """What a chunk of each of S sequences does to the state, as (S,) tensors.

    c, b: the state after the chunk is (1 - c) x_in + b (c = 1 - A is carried instead of A, so
        that tiny gains keep their digits; docs/math.md section 2).
    c_last, b_last: the same up to the chunk's last valid token (0, 0 when it has none).
    raw_sign: int8, sign(z) + 1 of that token, NO_RAW_SIGN (3) when the chunk has no valid token.
    count: int64, observations the chunk consumed.
    """

    c: torch.Tensor
    b: torch.Tensor
    c_last: torch.Tensor
    b_last: torch.Tensor
    raw_sign: torch.Tensor
    count: torch.Tensor


def _apply(c, b, x):
    return x - c * x + b


def advance(state, maps):
    """The FilterState after the chunk of `maps`, entered in `state` (float64 arithmetic)."""
    x = state.x.to(torch.float64)
    x_out = _apply(maps.c.to(torch.float64), maps.b.to(torch.float64), x)
    x_last = _apply(maps.c_last.to(torch.float64), maps.b_last.to(torch.float64), x)
    has_valid = maps.raw_sign.to(torch.int64) != NO_RAW_SIGN
    code = 3 * maps.raw_sign.to(torch.int64) + torch.sign(x_last).nan_to_num(0.0).to(torch.int64) + 1
    last_sign = torch.where(has_valid, code, state.last_sign.to(torch.int64)).to(torch.int8)
    return FilterState(x_out.to(state.x.dtype), state.count + maps.count, last_sign)


def compose(first, second):
    """The ChunkMaps of `first`'s chunk followed by `second`'s (float64)."""
    c1, b1, cl1, bl1 = (t.to(torch.float64) for t in first[:4])
    c2, b2, cl2, bl2 = (t.to(torch.float64) for t in second[:4])
    later = second.raw_sign.to(torch.int64) != NO_RAW_SIGN
    c = c1 + c2 * (1.0 - c1)
    b = b1 - c2 * b1 + b2
    c_last = torch.where(later, c1 + cl2 * (1.0 - c1), cl1)
    b_last = torch.where(later, b1 - cl2 * b1 + bl2, bl1)
    raw_sign = torch.where(later, second.raw_sign, first.raw_sign)
    return ChunkMaps(c, b, c_last, b_last, raw_sign, first.count + second.count)


def check_state(state, num_sequences, device, name="initial_state"):
    """A FilterState of (S,) tensors on `device` (values: `check_state_values`, inside the ops),
    returned with count as int64 and last_sign as int8."""
    if state is None:
        return None
    if not isinstance(state, FilterState):
        raise TypeError(f"{name} must be a kpo_kernels.FilterState, got {type(state).__name__}")
    for field, value in zip(FilterState._fields, state):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != (num_sequences,):
            raise ValueError(f"{name}.{field} has shape {tuple(value.shape)}, expected ({num_sequences},): one per sequence")
        if value.device != device:
            raise ValueError(f"{name}.{field} is on {value.device}, expected {device} (the device of the log-probs)")
    if not state.x.dtype.is_floating_point:
        raise TypeError(f"{name}.x must be floating point, got {state.x.dtype}")
    for field in ("count", "last_sign"):
        value = getattr(state, field)
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name}.{field} must be an integer tensor, got {value.dtype}")
    last_sign = state.last_sign
    if last_sign.dtype not in (torch.int8, torch.uint8, torch.bool):
        # Narrowing to int8 wraps (265 and -247 would read as 9): a code out of range becomes
        # -1 first, which check_state_values refuses (on the device, without a sync).
        last_sign = torch.where((last_sign < 0) | (last_sign > NO_TOKEN), -1, last_sign)
    return FilterState(state.x, state.count.to(torch.int64), last_sign.to(torch.int8))


def check_state_values(state, name="initial_state"):
    """count >= 0 and last_sign a code in 0..9 (see `require`)."""
    if state is None:
        return
    check_count_values(state.count, f"{name}.count")
    in_range = (state.last_sign >= 0) & (state.last_sign <= NO_TOKEN)
    require(in_range, f"{name}.last_sign must be a sign code in 0..{NO_TOKEN}")


def check_count_values(count, name="count"):
    """Every observation count >= 0 (see `require`)."""
    require(count >= 0, f"{name} must be >= 0")


def require(flags, message):
    """All flags true: checked on the host for CPU tensors, asynchronously on an accelerator
    (torch._assert_async: no host synchronisation; a violation fails the next synchronising call)."""
    if not flags.numel():
        return
    if flags.device.type == "cpu":
        if not bool(flags.all()):
            raise ValueError(message)
    else:
        torch._assert_async(flags.all(), message)


def largest_count(state):
    """The largest count of a state (0 for none): the gain tables must reach count + length.
    One host read on an accelerator."""
    if state is None or not state.count.numel():
        return 0
    return int(state.count.max())
