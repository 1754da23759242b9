"""The Triton backend's entering state and chunk maps (docs/math.md section 7), kernel by kernel.

A batch cut into consecutive chunks, each run from the state the earlier chunks leave
(`FilterState.start`, then `chunk_maps` and `state.advance` chunk after chunk), gives the
whole-sequence results to float32 rounding: the filter, the loss (token-sum: the chunks' losses
add up), the per-token derivative and the metrics' numerators, denominators and maxima. Cuts
leave chunks empty, of one token, fully masked, at block and tile boundaries +/- 1. Backend
methods are called directly, on NaN-poisoned buffers (a value a kernel forgot shows up as NaN).
"""

import math

import pytest
import torch

from conftest import DEVICE, triton_backend
from helpers import assert_close, grid, make_batch
from kpo_kernels import state as chunk_state
from kpo_kernels.options import METRIC_NAMES, FilterOptions, LossOptions, TokenBatch

BLOCK = 8
TILE = 16  # the multi-tile path: several tiles per sequence, cut into chunks across them
LENGTH = 37
ROWS = 3
# Chunk boundaries (positions in a sequence, clamped to its length): an empty chunk at the start
# and end, one token, a block boundary +/- 1, a tile boundary, a fully masked chunk (the mask of
# `hole` is 0 on [10, 20)).
CUTS = {
    "empty": (0, 0, 20, LENGTH),
    "one-token": (5, 6, 31),
    "block": (BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 1),
    "tile": (TILE - 1, TILE + 1, 2 * TILE),
    "masked": (10, 20),
}
MODES = ("skip", "position")
P0 = (0.0, math.inf)
LAYOUTS = ("padded", "packed")
TILES = (None, TILE)


def backend(tile_size):
    return triton_backend(block_size=BLOCK, tile_size=tile_size)


def filter_options(mode, p0, q=1e-2):
    return FilterOptions(q=q, r=0.5, p0=p0, x0=0.05, mask_mode=mode)


def loss_options(mode, p0):
    return LossOptions(
        filter=filter_options(mode, p0), clip=True, clip_low=0.02, clip_high=0.02, dual_clip=3.0, log_ratio_cap=0.08,
        agg="token-sum", dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
    )


def data(cuts, seed=0, masked=True):
    """A (B, T) batch with holes (and the hole [10, 20) of the 'masked' cuts in every row), NaN
    and inf under the mask; or without a mask."""
    batch = make_batch(ROWS, LENGTH, layout="holes" if masked else "none", seed=seed, noise=0.3)
    if masked and cuts == "masked":
        batch["mask"][:, 10:20] = False
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in batch.items()}


class Layout:
    """A batch as the kernels see it: padded (B, T), or packed (N,) with sequences of unequal
    lengths; `chunk(a, b)` cuts every sequence to its positions [a, b) (clamped to its length),
    `join` puts per-token results of the chunks back in place."""

    def __init__(self, name):
        self.packed = name == "packed"
        self.lengths = torch.tensor([LENGTH, LENGTH - 9, 0] if self.packed else [LENGTH] * ROWS)

    def cu(self, lengths):
        return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)

    def tokens(self, tensor, a=0, b=None):
        """Positions [a, b) of each sequence of a (B, T) tensor, in this layout."""
        if tensor is None or tensor.dim() < 2:
            return tensor
        b = tensor.shape[1] if b is None else b
        if not self.packed:
            return tensor[:, a:b].contiguous()
        return torch.cat([tensor[s, min(a, n) : min(b, n)] for s, n in enumerate(self.lengths.tolist())])

    def seqlens(self, a=0, b=None):
        if not self.packed:
            return None
        b = int(self.lengths.max()) if b is None else b
        return self.cu(self.lengths.clamp(max=b) - self.lengths.clamp(max=a))

    def join(self, pieces):
        return torch.cat(pieces, 1) if not self.packed else self._interleave(pieces)

    def _interleave(self, pieces):
        """Packed chunk results back in stream order: sequence by sequence, chunk by chunk."""
        parts = []
        splits = [torch.split(p, [int(n) for n in torch.diff(cu).tolist()]) for p, cu in pieces]
        for s in range(len(self.lengths)):
            parts += [split[s] for split in splits]
        return torch.cat(parts)


def bounds(cuts):
    edges = [0, *CUTS[cuts], LENGTH]
    return list(zip(edges[:-1], edges[1:]))


def run_chunks(impl, layout, batch, cuts, options, step):
    """step(chunk batch dict, cu_seqlens, state) for each chunk in order, from the start state;
    returns the list of its results."""
    filt = options.filter if isinstance(options, LossOptions) else options
    sequences = ROWS
    state = chunk_state.FilterState.start(sequences, filt.x0, device=DEVICE)
    results = []
    for a, b in bounds(cuts):
        chunk = {k: layout.tokens(v, a, b) for k, v in batch.items()}
        cu = layout.seqlens(a, b)
        results.append((step(chunk, cu, state), cu))
        maps = impl.chunk_maps(chunk["log_prob"], chunk["old_log_prob"], chunk["mask"], filt, cu, state.count)
        assert not any(t.isnan().any() for t in maps[:4]), "a map not written (NaN poison)"
        assert bool(((maps.raw_sign >= 0) & (maps.raw_sign <= 3)).all() and (maps.count >= 0).all()), maps
        state = chunk_state.advance(state, maps)
    return results


# ----------------------------------------------------------------------------- the filter


@pytest.mark.parametrize("layout_name, mode, p0, tile, cuts", grid(LAYOUTS, MODES, P0, TILES, tuple(CUTS)))
def test_filter_in_chunks_is_the_whole_filter(layout_name, mode, p0, tile, cuts):
    check_filter_in_chunks(layout_name, mode, p0, tile, cuts, masked=True)


@pytest.mark.parametrize("layout_name, mode, tile", grid(LAYOUTS, MODES, TILES))
def test_filter_in_chunks_without_mask(layout_name, mode, tile):
    check_filter_in_chunks(layout_name, mode, math.inf, tile, "block", masked=False)


def check_filter_in_chunks(layout_name, mode, p0, tile, cuts, masked):
    impl, options = backend(tile), filter_options(mode, p0)
    batch = data(cuts, masked=masked)
    layout = Layout(layout_name)
    z_all = batch["log_prob"] - batch["old_log_prob"]
    batch = {"log_prob": z_all, "old_log_prob": None, "mask": batch["mask"]}  # chunk_maps of z itself
    whole = impl.filter(layout.tokens(z_all), layout.tokens(batch["mask"]), options, layout.seqlens())
    results = run_chunks(
        impl, layout, batch, cuts, options, lambda chunk, cu, state: impl.filter(chunk["log_prob"], chunk["mask"], options, cu, state)
    )
    got = layout.join([r if not layout.packed else (r, cu) for r, cu in results])
    assert not got.isnan().any()
    assert_close("filter", got, whole, rtol=2e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_filter_state_start_is_bitwise_stateless(masked):
    """The state variant entered with FilterState.start computes exactly the stateless one."""
    batch = data("block", masked=masked)
    z = batch["log_prob"] - batch["old_log_prob"]
    for tile in TILES:
        for mode in MODES:
            impl, options = backend(tile), filter_options(mode, math.inf)
            start = chunk_state.FilterState.start(ROWS, options.x0, device=DEVICE)
            assert torch.equal(impl.filter(z, batch["mask"], options, state=start), impl.filter(z, batch["mask"], options))


def test_filter_entering_count_offsets_the_gains():
    """A state with count n and no valid token gives the gains from K_{n+1}: the tail of a
    longer sequence of zeros (position mode, x carried exactly), here against the float64
    recursion."""
    impl, options = backend(TILE), filter_options("position", 0.0, q=1e-1)
    z = torch.randn(2, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    count = torch.tensor([0, 1000], dtype=torch.int64)
    state = chunk_state.FilterState(torch.tensor([0.3, -0.2], dtype=torch.float64), count, torch.full((2,), 9, dtype=torch.int8))
    got = impl.filter(z.float().to(DEVICE), None, options, state=chunk_state.FilterState(*(t.to(DEVICE) for t in state)))
    q = options.q / options.r
    for row in range(2):
        p = options.p0 / options.r
        for _ in range(int(count[row])):
            p = (p + q) / (p + q + 1)
        x = float(state.x[row])
        want = []
        for t in range(20):
            k = (p + q) / (p + q + 1)
            x += k * (float(z[row, t]) - x)
            p = k
            want.append(x)
        assert_close(f"row {row}", got[row].cpu(), torch.tensor(want), rtol=2e-6)


# ----------------------------------------------------------------------------- chunk maps


@pytest.mark.parametrize("layout_name, mode, p0, tile", grid(LAYOUTS, MODES, P0, TILES))
def test_chunk_maps_compose_to_the_whole_sequence(layout_name, mode, p0, tile):
    impl, options = backend(tile), filter_options(mode, p0)
    batch = data("block")
    layout = Layout(layout_name)
    entering = torch.tensor([0, 5, 1000], dtype=torch.int64, device=DEVICE)  # maps at a nonzero count too
    args = lambda a, b: (layout.tokens(batch["log_prob"], a, b), layout.tokens(batch["old_log_prob"], a, b),
                         layout.tokens(batch["mask"], a, b), options, layout.seqlens(a, b))  # noqa: E731
    whole = impl.chunk_maps(*args(0, LENGTH), entering)
    composed, count = None, entering
    for a, b in bounds("one-token") + [(LENGTH, LENGTH)]:
        maps = impl.chunk_maps(*args(a, b), count)
        composed = maps if composed is None else chunk_state.compose(composed, maps)
        count = count + maps.count
    for name in ("c", "b", "c_last", "b_last"):
        assert not getattr(whole, name).isnan().any()
        assert_close(name, getattr(composed, name).float(), getattr(whole, name), rtol=2e-6)
    assert torch.equal(composed.raw_sign, whole.raw_sign) and whole.raw_sign.dtype == torch.int8
    assert torch.equal(composed.count, whole.count) and whole.count.dtype == torch.int64
    valid = batch["mask"] if mode == "skip" else torch.ones_like(batch["mask"])
    want = torch.tensor([int(valid[s, : int(n)].sum()) for s, n in enumerate(layout.lengths)])
    assert torch.equal(whole.count.cpu(), want)


def test_chunk_maps_of_a_chunk_without_tokens():
    impl, options = backend(None), filter_options("skip", 0.0)
    z = torch.zeros(3, 0, device=DEVICE)
    maps = impl.chunk_maps(z, None, None, options, None, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert all(torch.equal(t.cpu(), torch.zeros(3)) for t in maps[:4])
    assert maps.raw_sign.tolist() == [chunk_state.NO_RAW_SIGN] * 3 and maps.count.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- the loss

SUMMED = ("num_tokens", "innovation_tokens", "sign_flip_pairs")
PER_TOKEN = ("clipfrac", "clipfrac_lower", "ppo_kl", "ratio_mean", "raw_ratio_mean", "clipfrac_high", "clipfrac_low", "capfrac")
PER_INNOVATION = ("nis_mean", "log_likelihood")
PER_PAIR = ("sign_flip_raw", "sign_flip_filtered")
MAXIMA = ("ratio_max", "raw_ratio_max")


def totals(metrics):
    """Numerators (fraction times denominator), denominators and maxima of a metric vector."""
    m = dict(zip(METRIC_NAMES, metrics.double().cpu()))
    out = {name: m[name] for name in SUMMED + MAXIMA}
    out.update({name: m[name] * m["num_tokens"] for name in PER_TOKEN})
    out.update({name: m[name] * m["innovation_tokens"] for name in PER_INNOVATION})
    out.update({name: m[name] * m["sign_flip_pairs"] for name in PER_PAIR})
    return out


def token_batch(chunk, cu):
    return TokenBatch(chunk["log_prob"], chunk["old_log_prob"], chunk["advantages"], chunk["mask"], None, cu)


@pytest.mark.parametrize("layout_name, mode, p0, tile, cuts", grid(LAYOUTS, MODES, P0, TILES, tuple(CUTS)))
def test_loss_in_chunks_adds_up_to_the_whole_loss(layout_name, mode, p0, tile, cuts):
    impl, options = backend(tile), loss_options(mode, p0)
    batch = data(cuts, seed=1)
    layout = Layout(layout_name)
    whole = impl.loss_forward(token_batch({k: layout.tokens(v) for k, v in batch.items()}, layout.seqlens()), options, True)
    results = run_chunks(
        impl, layout, batch, cuts, options, lambda chunk, cu, state: impl.loss_forward(token_batch(chunk, cu), options, True, state)
    )
    parts = [r for r, _ in results]
    for r in parts:
        assert not r.metrics.isnan().any() and not r.loss.isnan() and not r.row_scale.isnan().any()
        assert torch.equal(r.row_scale, whole.row_scale)  # token-sum: dp_size for every sequence
    assert_close("loss", sum(r.loss.double() for r in parts), whole.loss, rtol=1e-5)
    grad = layout.join([r.grad if not layout.packed else (r.grad, cu) for r, cu in results])
    assert not grad.isnan().any()
    assert_close("grad", grad, whole.grad, rtol=1e-5)
    want = totals(whole.metrics)
    chunks = [totals(r.metrics) for r in parts]
    for name, value in want.items():
        got = max(c[name] for c in chunks) if name in MAXIMA else sum(c[name] for c in chunks)
        assert_close(name, got, value, rtol=1e-5)
    assert want["sign_flip_pairs"] > 0 and want["innovation_tokens"] > 0


def test_loss_state_start_is_bitwise_stateless():
    batch = data("tile", seed=2)
    for tile in TILES:
        impl, options = backend(tile), loss_options("skip", math.inf)
        start = chunk_state.FilterState.start(ROWS, options.filter.x0, device=DEVICE)
        tb = token_batch(batch, None)
        a, b = impl.loss_forward(tb, options, True), impl.loss_forward(tb, options, True, start)
        for name in ("loss", "metrics", "grad", "row_scale"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name

