"""Triton kernels: the KPO filter as an associative scan, fused with the loss and its gradient.

Work is split into *tiles*: contiguous token ranges inside one sequence (a row of a padded
batch, or a `cu_seqlens` segment of a packed one). A program walks its tile in blocks of BLOCK
tokens; inside a block the filter is `tl.associative_scan` over affine maps (c, b), and across
blocks the program carries the filtered state and the number of observations consumed (the
gain index in skip mode).

A sequence that fits in one tile needs one pass. Long sequences are cut into several tiles that
run in parallel (so that a few long rows still fill the GPU), in three passes:
  1. `tile_count_kernel`: valid tokens per tile (skip mode with a mask only: the gain index of
     a tile's first token is the number of valid tokens before it);
  2. `tile_aggregate_kernel`: each tile's composed affine map (its effect on the state);
  3. the main kernel: each tile folds the maps of the tiles before it into its starting state
     (a tree reduction), then filters its tokens and computes everything else.

A sequence may enter with a state (FilterState, docs/math.md section 7): the HAS_STATE variants
start it from its x and offset its gain index by its count, including in pass 2, whose tile maps
depend on the gain index. `chunk_maps_kernel` composes a chunk's tile maps (passes 1 and 2 over
every tile) into its maps per sequence.

The main loss kernel stores per tile the statistics of aggregation.STAT_NAMES and d loss /
d log_prob without the aggregation weight; its last program to finish (a count of finished
programs, triton_launch.FinishCounters) runs the finalize (triton_finalize.finalize), which turns
the statistics into per-sequence weights, the loss and the metrics: no launch of its own
(`kpo_loss_finalize_kernel` runs it alone for a batch without tiles); backward multiplies the
stored derivative by grad_output and the sequence's weight.

The filter and the loss compute in float32 whatever the input dtype (the noise fit's sums and
search are float64). NaN propagates through every `where` on purpose (tl.minimum/maximum would
drop it on GPUs).

The kernels live in six modules by job: `triton_common` (constants, the scan, diagnostics and
layout helpers), `triton_tiles` (passes 1 and 2, the tile table, the filter), `triton_loss` (the
fused forward and backward), `triton_finalize`, and the noise fit's `triton_fit_layout` and
`triton_fit_search`. This module is the one namespace the launcher (triton_backend.py) and the
tools that record its launches use.
"""

from .triton_common import AGG_CODES
from .triton_finalize import kpo_loss_finalize_kernel
from .triton_fit_layout import fit_layout_kernel
from .triton_fit_search import noise_filter_kernel, noise_profile_kernel
from .triton_loss import kpo_loss_bwd_kernel, kpo_loss_fwd_kernel
from .triton_tiles import (
    chunk_maps_kernel,
    kalman_filter_kernel,
    tile_aggregate_kernel,
    tile_count_kernel,
    tile_offsets_kernel,
)

__all__ = [
    "AGG_CODES",
    "chunk_maps_kernel",
    "fit_layout_kernel",
    "kalman_filter_kernel",
    "kpo_loss_bwd_kernel",
    "kpo_loss_finalize_kernel",
    "kpo_loss_fwd_kernel",
    "noise_filter_kernel",
    "noise_profile_kernel",
    "tile_aggregate_kernel",
    "tile_count_kernel",
    "tile_offsets_kernel",
]
