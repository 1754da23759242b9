"""Compile every kernel specialisation the launcher produces for an H100 (sm_90a).

Run as a script in a process *without* TRITON_INTERPRET (interpreted kernels cannot be compiled);
test_compile_sm90.py does that. It replaces the kernels by recorders, runs the launcher on small
batches to capture the exact arguments it passes (benchmarks/sm90.py), compiles each launch as
Triton's JIT does at launch time (its own specialisation of integers and pointer alignment) for
sm_90a with Triton's bundled ptxas (no GPU needed) and prints one JSON object: case -> result.
The launcher plans as on a GPU of one SM, so that small batches run whole rows per program; the
tiled variants come from explicit tile sizes.
"""

import json
import sys

import torch

import kpo_kernels
from benchmarks.sm90 import KERNELS, compile_launch, record, resources
from kpo_kernels.backends import triton_tables
from helpers import make_batch

LOSS_DEFAULTS = dict(
    q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=3e-4, clip_high=4e-4, dual_clip=None,
    log_ratio_cap=10.0, agg="seq-mean-token-mean", dp_size=1, batch_num_tokens=None, global_batch_size=None,
    loss_scale_factor=None,
)
LOSS_CONFIGS = {
    "fp32-holes": dict(dtype=torch.float32, layout="holes", options={}),
    "bf16-unmasked-position": dict(
        dtype=torch.bfloat16, layout="none", options={"clip": False, "log_ratio_cap": None, "mask_mode": "position"}
    ),
    "fp16-everything": dict(
        dtype=torch.float16, layout="right", adv_per_token=True, is_weights=True,
        options={"dual_clip": 3.0, "agg": "token-mean", "batch_num_tokens": 100},
    ),
    "fp64-left-norm": dict(dtype=torch.float64, layout="left", options={"agg": "seq-mean-token-sum-norm", "global_batch_size": 4}),
    "bf16-holes-basic": dict(dtype=torch.bfloat16, layout="holes", options={"metrics": "basic"}),  # no diagnostics
    # verl's bf16 with per-token advantages and weights: at 168 registers ptxas reloads a value each block
    "bf16-advantages-weights": dict(dtype=torch.bfloat16, layout="holes", adv_per_token=True, is_weights=True, options={}),
}
LENGTHS = (16, 700, 5000)
SPILLING_CONTROL = "control-spilling-block-4096"


def entering_state(sequences):
    """A FilterState with counts, signs and x that differ per sequence (the values do not matter
    to the compiler; the dtypes are those of state.FilterState)."""
    from kpo_kernels.state import FilterState

    return FilterState(
        torch.linspace(-0.1, 0.1, sequences, dtype=torch.float64),
        torch.arange(sequences, dtype=torch.int64) * 1000,
        torch.arange(sequences, dtype=torch.int64).remainder(10).to(torch.int8),
    )


def loss_run(batch, options, backend=None, state=False):
    def run():
        impl = backend or kpo_kernels.TritonBackend()
        checked = kpo_kernels.validation.check_token_batch(
            batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], batch.get("is_weights"),
            batch.get("cu_seqlens"),
        )
        result = impl.loss_forward(
            checked, kpo_kernels.validation.check_loss_options(**{**LOSS_DEFAULTS, **options}), True,
            entering_state(checked.num_sequences) if state else None,
        )
        impl.loss_backward(result.grad, result.row_scale, torch.ones(()), checked.cu_seqlens, batch["log_prob"].dtype,
                           result.plan)

    return run


def fit_noise_run(batch, backend=None):
    """One profile evaluation of fit_noise on the Triton backend (kpo_kernels.noise)."""
    from kpo_kernels.noise import metric_pass_options
    from kpo_kernels.options import FilterOptions

    def run():
        impl = backend or kpo_kernels.TritonBackend()
        checked = kpo_kernels.validation.check_token_batch(
            batch["log_prob"], torch.zeros_like(batch["log_prob"]), torch.zeros(3), batch["mask"], None
        )
        filt = FilterOptions(q=1e-3, r=1.0, p0=float("inf"), x0=0.0, mask_mode="skip")
        impl.loss_forward(checked, metric_pass_options(filt), need_grad=False)

    return run


def packed(batch):
    """The same tokens as a packed stream with cu_seqlens (rows become sequences)."""
    rows, length = batch["log_prob"].shape
    flat = {k: v.reshape(-1) for k, v in batch.items() if v is not None and v.dim() == 2}
    flat["advantages"] = batch["advantages"][:, None] if batch["advantages"].dim() == 1 else flat["advantages"]
    flat["mask"] = None if batch["mask"] is None else flat["mask"]
    flat["cu_seqlens"] = torch.arange(0, rows * length + 1, length, dtype=torch.int32)
    return flat


def filter_run(z, mask, mode, cu_seqlens=None, backend=None, state=False):
    """The backend's filter (with an entering state: the HAS_STATE variants) and, with a state,
    chunk_maps of the same chunk."""
    from kpo_kernels.options import FilterOptions

    def run():
        impl = backend or kpo_kernels.TritonBackend()
        options = FilterOptions(q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode=mode)
        sequences = cu_seqlens.numel() - 1 if cu_seqlens is not None else z.shape[0]
        entering = entering_state(sequences) if state else None
        impl.filter(z, mask, options, cu_seqlens, entering)
        if state:
            impl.chunk_maps(z, None, mask, options, cu_seqlens, entering.count)

    return run


# Launches with an entering state (docs/math.md section 7): the HAS_STATE variants, compared
# with their stateless twins by test_compile_sm90.py.
STATE_CASES = ("fp32-holes", "bf16-unmasked-position", "bf16-holes-basic")


def _one_process_group():
    """A gloo group of this process alone: the search's process-group variant (its
    log-determinants all-reduced) compiles like any other."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        path = tempfile.mkdtemp()
        dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=0, world_size=1)
    return dist.group.WORLD


def cases():
    for name, config in LOSS_CONFIGS.items():
        config = dict(config)
        options = config.pop("options")
        for length in LENGTHS:
            yield f"loss-{name}-T{length}", loss_run(make_batch(3, length, seed=1, **config), options)
        batch = make_batch(3, 700, seed=1, **config)
        tiled = kpo_kernels.TritonBackend(tile_size=256)
        yield f"loss-{name}-tiled", loss_run(batch, options, tiled)
        yield f"loss-{name}-packed", loss_run(packed(batch), options)
        yield f"loss-{name}-packed-tiled", loss_run(packed(batch), options, tiled)
        if name in STATE_CASES:
            yield f"state-loss-{name}-T700", loss_run(batch, options, state=True)
            yield f"state-loss-{name}-tiled", loss_run(batch, options, tiled, state=True)
            yield f"state-loss-{name}-packed-tiled", loss_run(packed(batch), options, tiled, state=True)
    # Rows cut into 64 tiles each (1024-token blocks, the wide blocks' finalize: 512 values a
    # step): the finalize sums 128 tiles a step (TILES = 128; a tile count divisible by 16 is
    # specialised: Triton 3.6 failed on such a variant on the H200).
    long_rows = make_batch(2, 65536, seed=1, dtype=torch.float32, layout="holes")
    many_tiles = kpo_kernels.TritonBackend(tile_size=1024)
    yield "loss-long-rows-many-tiles", loss_run(long_rows, {}, many_tiles)
    yield "loss-long-rows-many-tiles-packed", loss_run(packed(long_rows), {}, many_tiles)
    # Variants a held-out sweep found (2026-12-05) beyond the list above: rows of 257-512 tokens
    # (512-token blocks at 8 warps) without clip or cap, and with everything on; rows in exactly
    # two tiles, and one 16-token row, whose finalize spilled at 4 warps.
    rows_300 = make_batch(8, 300, seed=2, dtype=torch.float32, layout="holes")
    yield "loss-rows-300-basic-unclipped", loss_run(rows_300, {"clip": False, "log_ratio_cap": None, "metrics": "basic"})
    everything = make_batch(8, 300, seed=2, dtype=torch.float32, layout="holes", adv_per_token=True, is_weights=True)
    yield "loss-rows-300-everything", loss_run(everything, {"dual_clip": 3.0})
    yield "state-loss-rows-300-everything", loss_run(everything, {"dual_clip": 3.0}, state=True)
    two_tiles = make_batch(2, 1025, seed=2, dtype=torch.float32, layout="right")
    yield "loss-two-tiles-a-row", loss_run(two_tiles, {}, kpo_kernels.TritonBackend(tile_size=1024))
    one_row = make_batch(1, 16, seed=2, dtype=torch.float16, layout="none")
    yield "loss-one-row-16-position", loss_run(one_row, {"mask_mode": "position"})
    # Strided views of the token inputs (2026-12-06's held-out sweep: before the anchor took
    # them, these forwards spilled inside their loop), and warps chosen without a block.
    views = make_batch(6, 3000, seed=2, dtype=torch.float32, layout="holes", adv_per_token=True, is_weights=True)
    views = {k: v.t().contiguous().t() if torch.is_tensor(v) and v.dim() == 2 else v for k, v in views.items()}
    yield "loss-transposed-everything-tiled", loss_run(
        views, {"dual_clip": 3.0}, kpo_kernels.TritonBackend(tile_size=1024), state=True
    )
    halves = make_batch(4, 8191, seed=2, dtype=torch.bfloat16, layout="holes")
    halves = {k: v.repeat_interleave(2, dim=1)[:, ::2] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in halves.items()}
    halves["mask"] = halves["mask"].to(torch.int64)
    yield "loss-every-second-token-int64-mask-tiled", loss_run(
        halves, {}, kpo_kernels.TritonBackend(tile_size=2048), state=True
    )
    yield "loss-two-warps-chosen", loss_run(make_batch(2, 4096, seed=2), {}, kpo_kernels.TritonBackend(num_warps=2))
    # Masks other than bool: the forward checks their values as it reads them (CHECK_MASK), as
    # verl's int64 response masks and TRL's int32 completion masks arrive; float masks as bits.
    for label, mask_dtype, data_dtype, options in (
        ("int64", torch.int64, torch.float32, {}), ("int32-basic", torch.int32, torch.bfloat16, {"metrics": "basic"}),
        ("float32", torch.float32, torch.float32, {}), ("bfloat16", torch.bfloat16, torch.bfloat16, {}),
    ):
        batch = make_batch(3, 700, seed=3, dtype=data_dtype, layout="holes")
        batch["mask"] = batch["mask"].to(mask_dtype)
        yield f"loss-{label}-mask", loss_run(batch, options)
        yield f"loss-{label}-mask-packed-tiled", loss_run(packed(batch), options, kpo_kernels.TritonBackend(tile_size=256))
    # Rows of no tokens: no forward program, so the finalize runs on its own (the forward's
    # last program runs it otherwise).
    yield "loss-rows-of-no-tokens", loss_run(make_batch(3, 0, seed=2, layout="none"), {})
    # A control that must spill (4096-token blocks at 4 warps: thousands of bytes), so that the
    # spill check is seen to work (test_compile_sm90.py).
    yield SPILLING_CONTROL, loss_run(make_batch(2, 4096, seed=2), {}, kpo_kernels.TritonBackend(block_size=4096))
    # fit_noise(backend="triton"): the loss kernel for the metrics alone (no gradient, no clip).
    for label, backend in (("", None), ("-tiled", kpo_kernels.TritonBackend(tile_size=256))):
        batch = make_batch(3, 700, seed=1, layout="holes")
        yield f"fit-noise-evaluation{label}", fit_noise_run(batch, backend)
    # estimate_noise's layout, filters and profile: each prior, and packed sequences under a token
    # budget (every k-th sequence: a strided view of the lengths).
    z = make_batch(4, 700, seed=1, layout="holes")
    log_ratio, mask = z["log_prob"] - z["old_log_prob"], z["mask"]
    for p0 in (0.0, float("inf")):
        yield f"fit-search-p0-{p0}", (lambda p0=p0: kpo_kernels.estimate_noise(log_ratio, mask, p0=p0, backend="triton"))
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    yield "fit-search-position-bf16", (
        lambda: kpo_kernels.estimate_noise(log_ratio.to(torch.bfloat16), mask.float(), mask_mode="position", x0=0.1, backend="triton")
    )
    yield "fit-search-process-group", (lambda: kpo_kernels.estimate_noise(log_ratio, mask, backend="triton", group=_one_process_group()))
    yield "fit-search-packed-budget", (
        lambda: kpo_kernels.estimate_noise(log_ratio[mask], cu_seqlens=cu, max_tokens=700, backend="triton")
    )
    for mode in ("skip", "position"):
        for masked in (True, False):
            z = torch.zeros(2, 3000)
            mask = torch.ones(2, 3000, dtype=torch.bool) if masked else None
            label = f"filter-{mode}-{'masked' if masked else 'unmasked'}"
            yield label, (lambda z=z, mask=mask, mode=mode: kpo_kernels.kalman_filter(z, mask, mask_mode=mode, backend="triton"))
            tiled = kpo_kernels.TritonBackend(tile_size=512)
            cu = torch.tensor([0, 1000, 6000], dtype=torch.int64)
            yield label + "-packed-tiled", (
                lambda z=z, mask=mask, mode=mode: kpo_kernels.kalman_filter(
                    z.reshape(-1), None if mask is None else mask.reshape(-1), mask_mode=mode, cu_seqlens=cu, backend=tiled
                )
            )
            yield "state-" + label, filter_run(z, mask, mode, state=True)
            yield "state-" + label + "-packed-tiled", filter_run(
                z.reshape(-1), None if mask is None else mask.reshape(-1), mode, cu, tiled, state=True
            )


# The float32 tables of a new Q / R on a GPU (tables.KERNEL_DEVICES), all three in one launch, for
# each branch of the closed form (q > 0 or 0; p0 = 0, large, inf), launched from tables.py, not by
# the backend's launcher that `record` watches.
TABLE_SETTINGS = {"p0-0": (3e-7, 0.0), "p0-large": (3e-7, 3.0), "p0-inf": (3e-7, float("inf")),
                  "no-drift": (0.0, 0.0), "no-drift-p0-large": (0.0, 3.0), "no-drift-p0-inf": (0.0, float("inf"))}


def table_launches():
    for label, (q, p0) in TABLE_SETTINGS.items():
        parts, flags = triton_tables.table_launch(q, 1.0, p0)
        outputs = [torch.empty(4096) for _ in range(3)]
        yield f"table-{label}", triton_tables.table_kernel, (*outputs, 4096, *parts), flags


# Compiled once more with RUN = 1 (each lane its own statistics): what the per-thread sums save.
RUN_ABLATED = "loss-fp32-holes-T5000"


def launches():
    for case, run in cases():
        for kernel, _, args, kwargs in record(run, sm_count=1):
            yield case, kernel, args, kwargs
            if case == RUN_ABLATED and kernel.fn.__name__ == "kpo_loss_fwd_kernel":
                yield case + "-run-1", kernel, args, {**kwargs, "RUN": 1}
    yield from table_launches()


def main():
    results = {}
    for case, kernel, args, kwargs in launches():
        key = f"{case}:{kernel.fn.__name__}"
        try:
            compiled = compile_launch(kernel, args, kwargs)
            results[key] = {"ok": True, "num_warps": compiled.metadata.num_warps, **resources(compiled),
                            "ex2_ftz": "ex2.approx.ftz.f32" in compiled.asm["ptx"]}
        except Exception as error:  # noqa: BLE001 - reported to the test
            results[key] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
