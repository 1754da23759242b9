"""Passes 1 and 2 of a multi-tile sequence (tile counts and composed maps), the tile table of a
packed batch, and the filter kernel (triton_kernels.py describes the passes)."""

import triton
import triton.language as tl

from .triton_common import (
    _compose,
    _block_maps,
    _last,
    _sign,
    _locate,
    _seq_base,
    _load_valid,
    _load_log_ratio,
    _anchored,
    _first_block_start,
    _tile_seen,
    _tile_state,
    _entering_state,
    _fold_tiles,
)

# ----------------------------------------------------------------------------- passes 1 and 2


@triton.jit
def tile_count_kernel(
    mask_ptr,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    num_seqs,
    T,
    tile_size,
    search_steps,
    stride_mask_row,
    stride_mask_tok,
    IS_VARLEN: tl.constexpr,
    BLOCK: tl.constexpr,
    EVERY_TILE: tl.constexpr = False,
    FLAT: tl.constexpr = False,
):
    """Pass 1: valid tokens in each tile (but the last of a sequence, which no tile after it
    reads, unless EVERY_TILE: chunk_maps counts the whole sequence). FLAT: the tiles as
    _locate places them for kpo_loss_fwd_kernel's FLAT."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN, FLAT
    )
    if not EVERY_TILE:
        tile_end = tl.where(tile_end == length, tile_start, tile_end)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(tile_start, tile_end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        total += _load_valid(mask_row, stride_mask_tok, pos, pos < tile_end, True).to(tl.int32)
    tl.store(counts_ptr + slot, tl.sum(total, 0))


@triton.jit
def tile_aggregate_kernel(
    new_ptr,
    old_ptr,
    mask_ptr,
    gains_ptr,
    gains_last,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    state_count_ptr,
    num_seqs,
    num_slots,
    T,
    tile_size,
    search_steps,
    stride_new_row,
    stride_new_tok,
    stride_old_row,
    stride_old_tok,
    stride_mask_row,
    stride_mask_tok,
    anchor_ptr,
    HAS_OLD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
    STORE_LATEST: tl.constexpr = False,
    HAS_STATE: tl.constexpr = False,
    EVERY_TILE: tl.constexpr = False,
    FLAT: tl.constexpr = False,
    ANCHOR: tl.constexpr = False,
):
    """Pass 2: the composed affine map of each tile, stored as agg[0, slot] = C, agg[1, slot] = B
    (but for the last tile of a sequence, which no tile after it reads, unless EVERY_TILE).
    STORE_LATEST (the loss's sign flips, chunk_maps) also stores the map from the tile's entry
    to the state after its last valid token (agg[2], agg[3]) and that token's sign(z) + 1
    (agg[4]; 3 when the tile has none). HAS_STATE: each sequence consumed state_count[seq]
    observations before its first token (the gain index starts there; docs/math.md section 7).
    FLAT: tiles and blocks aligned to the flat token index, as in kpo_loss_fwd_kernel. ANCHOR:
    the blocks' layout from zero bytes at anchor_ptr, as kpo_loss_fwd_kernel's."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN, FLAT
    )
    if not EVERY_TILE:
        tile_end = tl.where(tile_end == length, tile_start, tile_end)
    new_row = _seq_base(new_ptr, seq, seq_start, stride_new_row, stride_new_tok, IS_VARLEN)
    old_row = _seq_base(old_ptr, seq, seq_start, stride_old_row, stride_old_tok, IS_VARLEN)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    seen = _tile_seen(counts_ptr, first, tile, tile_start, SKIP and HAS_MASK, PREFIX)
    if HAS_STATE:
        offset = tl.minimum(tl.load(state_count_ptr + seq).to(tl.int64), gains_last).to(tl.int32)
        seen += offset
    c_tile = tile_start.to(tl.float32) * 0.0
    b_tile = tile_start.to(tl.float32) * 0.0
    cl_tile = c_tile
    bl_tile = b_tile
    k_tile = c_tile + 3.0
    lanes = tl.arange(0, BLOCK)
    for start in range(_first_block_start(seq_start, tile_start, tile_end, FLAT), tile_end, BLOCK):
        pos = start + lanes
        in_bounds = (pos >= tile_start) & (pos < tile_end) if FLAT else pos < tile_end
        if FLAT:
            at = tl.multiple_of(seq_start + start, 16)
            new_block, old_block = new_ptr + at * stride_new_tok, old_ptr + at * stride_old_tok
            mask_block = mask_ptr + at * stride_mask_tok
        else:
            new_block, old_block = new_row + start * stride_new_tok, old_row + start * stride_old_tok
            mask_block = mask_row + start * stride_mask_tok
        valid = _anchored(_load_valid(mask_block, stride_mask_tok, lanes, in_bounds, HAS_MASK), anchor_ptr, lanes, ANCHOR)
        z = _load_log_ratio(new_block, old_block, stride_new_tok, stride_old_tok, lanes, valid, HAS_OLD)
        index = pos + offset if HAS_STATE else pos  # the gain index in position mode
        c, b, seen = _block_maps(z, valid, in_bounds, index, gains_ptr, gains_last, seen, SKIP)
        if STORE_LATEST:
            latest = tl.max(tl.where(valid, lanes, -1), 0)  # a max: any lane order gives the same
            pick = lanes == latest
            cl, bl = _compose(c_tile, b_tile, tl.sum(tl.where(pick, c, 0.0), 0), tl.sum(tl.where(pick, b, 0.0), 0))
            k = tl.sum(tl.where(pick, _sign(z) + 1, 0), 0).to(tl.float32)
            cl_tile = tl.where(latest >= 0, cl, cl_tile)
            bl_tile = tl.where(latest >= 0, bl, bl_tile)
            k_tile = tl.where(latest >= 0, k, k_tile)
        c_tile, b_tile = _compose(c_tile, b_tile, _last(c, BLOCK), _last(b, BLOCK))
    tl.store(agg_ptr + slot, c_tile)
    tl.store(agg_ptr + num_slots + slot, b_tile)
    if STORE_LATEST:
        tl.store(agg_ptr + 2 * num_slots + slot, cl_tile)
        tl.store(agg_ptr + 3 * num_slots + slot, bl_tile)
        tl.store(agg_ptr + 4 * num_slots + slot, k_tile)


# ----------------------------------------------------------------------------- the filter


@triton.jit
def kalman_filter_kernel(
    z_ptr,
    mask_ptr,
    gains_ptr,
    gains_last,
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    out_ptr,
    state_x_ptr,
    state_count_ptr,
    state_sign_ptr,
    num_seqs,
    num_slots,
    T,
    tile_size,
    search_steps,
    stride_z_row,
    stride_z_tok,
    stride_mask_row,
    stride_mask_tok,
    x0,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_STATE: tl.constexpr = False,
):
    """Filtered log-ratio of every token (0 where masked), written contiguously. HAS_STATE: each
    sequence enters with the FilterState (state_x, state_count) instead of (x0, 0)."""
    seq, tile, first, slot, seq_start, tile_start, tile_end, length = _locate(
        cu_seqlens_ptr, tile_offsets_ptr, num_seqs, T, tile_size, search_steps, IS_VARLEN
    )
    z_row = _seq_base(z_ptr, seq, seq_start, stride_z_row, stride_z_tok, IS_VARLEN)
    mask_row = _seq_base(mask_ptr, seq, seq_start, stride_mask_row, stride_mask_tok, IS_VARLEN)
    out_row = out_ptr + seq_start
    seen = _tile_seen(counts_ptr, first, tile, tile_start, SKIP and HAS_MASK, PREFIX)
    if HAS_STATE:
        x_in, offset, _ = _entering_state(state_x_ptr, state_count_ptr, state_sign_ptr, seq, gains_last)
        seen += offset
        state = _tile_state(agg_ptr, num_slots, first, tile, x_in, PREFIX)
    else:
        state = _tile_state(agg_ptr, num_slots, first, tile, x0, PREFIX)
    for start in range(tile_start, tile_end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_bounds = pos < tile_end
        valid = _load_valid(mask_row, stride_mask_tok, pos, in_bounds, HAS_MASK)
        z = _load_log_ratio(z_row, z_row, stride_z_tok, stride_z_tok, pos, valid, False)
        index = pos + offset if HAS_STATE else pos  # the gain index in position mode
        c, b, seen = _block_maps(z, valid, in_bounds, index, gains_ptr, gains_last, seen, SKIP)
        x = state - c * state + b
        state = _last(x, BLOCK)
        tl.store(out_row + pos, tl.where(valid, x, 0.0), mask=in_bounds)


@triton.jit
def chunk_maps_kernel(
    cu_seqlens_ptr,
    tile_offsets_ptr,
    counts_ptr,
    agg_ptr,
    maps_ptr,
    raw_sign_ptr,
    count_ptr,
    num_seqs,
    num_slots,
    T,
    tiles_per_seq,
    USE_COUNTS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREFIX: tl.constexpr,
):
    """A chunk's maps per sequence (state.ChunkMaps, docs/math.md section 7), one program per
    sequence: the in-order composition of its tiles' (M, L, k) summaries (passes 1 and 2 with
    EVERY_TILE), stored as maps[0..3, seq] = (c, b, c_last, b_last), raw_sign[seq] and the
    observations consumed, count[seq]: its valid tokens (USE_COUNTS: skip mode with a mask)
    or its length."""
    seq = tl.program_id(0)
    if IS_VARLEN:
        first = tl.load(tile_offsets_ptr + seq)
        tiles = tl.load(tile_offsets_ptr + seq + 1) - first
        length = tl.load(cu_seqlens_ptr + seq + 1) - tl.load(cu_seqlens_ptr + seq)
    else:
        first = seq * tiles_per_seq
        tiles = seq * 0 + tiles_per_seq
        length = seq * 0 + T
    c, b, cl, bl, k = _fold_tiles(agg_ptr, num_slots, first, tiles, seq.to(tl.float32) * 0.0, PREFIX)
    tl.store(maps_ptr + seq, c)
    tl.store(maps_ptr + num_seqs + seq, b)
    tl.store(maps_ptr + 2 * num_seqs + seq, cl)
    tl.store(maps_ptr + 3 * num_seqs + seq, bl)
    tl.store(raw_sign_ptr + seq, k.to(tl.int8))
    count = _tile_seen(counts_ptr, first, tiles, length, USE_COUNTS, PREFIX)
    tl.store(count_ptr + seq, count.to(tl.int64))


@triton.jit
def tile_offsets_kernel(cu_seqlens_ptr, tile_offsets_ptr, valid_ptr, num_seqs, num_tokens, tile_size,
                        BLOCK_S: tl.constexpr):
    """tile_offsets[s] = number of tiles of the sequences before s (num_seqs + 1 entries), and
    valid_ptr[0] = 1 if the offsets start at 0, never decrease and end at num_tokens, else 0
    (what tensor_checks.check_cu_seqlens_values asks, read on the way: TritonBackend asserts it
    before any kernel that follows reads the tiles)."""
    carry = tl.program_id(0) * 0
    decreasing = carry
    tl.store(tile_offsets_ptr, carry)
    for start in range(0, num_seqs, BLOCK_S):
        seqs = start + tl.arange(0, BLOCK_S)
        in_bounds = seqs < num_seqs
        lengths = tl.load(cu_seqlens_ptr + seqs + 1, mask=in_bounds, other=0) - tl.load(
            cu_seqlens_ptr + seqs, mask=in_bounds, other=0
        )
        decreasing += tl.sum((lengths < 0).to(tl.int32), 0)
        tiles = ((tl.maximum(lengths, 0) + tile_size - 1) // tile_size).to(tl.int32)
        ends = carry + tl.cumsum(tiles, 0)
        tl.store(tile_offsets_ptr + seqs + 1, ends, mask=in_bounds)
        carry += tl.sum(tiles, 0)
    first, last = tl.load(cu_seqlens_ptr), tl.load(cu_seqlens_ptr + num_seqs)
    tl.store(valid_ptr, ((first == 0) & (last == num_tokens) & (decreasing == 0)).to(tl.int32))
