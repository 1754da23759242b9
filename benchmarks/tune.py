"""Block size, num_warps and tile size of the Triton backend: a sweep saved for later tuning.

    python -m benchmarks.tune [--shapes 512x8192,2x131072] [--blocks 256,512,1024,2048]
                              [--warps 4,8,16] [--tiles 4096,16384,65536] [--dtype fp32] [--json PATH]

For each shape: the defaults (`TritonBackend()`), every `TritonBackend(block_size, num_warps)` of
the grid, and `TritonBackend(tile_size=t)` for each tile size (tokens per program; rows longer
than a tile are split across programs). Each configuration's fused forward + backward of
`kpo_loss` is first checked against the float64 yardstick of `kpo_kernels/bench/correctness.py`
(loss and gradient, the same error columns as the main command), then timed as the main command
times on CUDA (events, L2 flushed before each call, and the kernels' device time from the
profiler). Configurations are ranked by `cost_ms`: the device time where measured (on a host
slower than the GPU, the eager events measure the host, the same for every configuration), else
the median. Rows are printed fastest first
and written as JSON. Only the public API is used: whatever the backend chooses inside (issue 3's
multi-tile path for few long rows, say) is what gets timed.

On a machine without CUDA it runs only as a dry run of this code path (TRITON_INTERPRET=1 set
before the start, tiny shapes, CPU timer); its timings mean nothing and are marked dry_run.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import kpo_kernels

from kpo_kernels.bench.cases import DTYPES, Case, fused_bytes
from kpo_kernels.bench.correctness import LOSS_TOL, errors_against, grad_tol, yardstick
from kpo_kernels.bench.data import rl_batch
from kpo_kernels.bench.environment import environment, resolve_device
from kpo_kernels.bench.implementations import DEFAULT
from kpo_kernels.bench.timing import CudaTimer, TimingPolicy, time_cpu


def _shape(text):
    rows, length = text.lower().split("x")
    return int(rows), int(length)


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def step(batch, backend, settings=DEFAULT):
    log_prob = batch["log_prob"].detach().requires_grad_()
    loss, metrics = kpo_kernels.kpo_loss(
        log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], q=settings.q,
        clip_low=settings.clip_low, clip_high=settings.clip_high, agg=settings.agg,
        log_ratio_cap=settings.log_ratio_cap, backend=backend,
    )
    loss.backward()
    return loss, metrics, log_prob.grad


def tune(device, shapes, blocks, warps, dtype=torch.float32, progress=print, policy=None, tiles=(), on_row=None):
    from kpo_kernels.backends.triton_backend import INTERPRETED

    dry_run = device.type != "cuda"
    if dry_run and not INTERPRETED:
        raise SystemExit("without CUDA the Triton backend runs only with TRITON_INTERPRET=1 set (a dry run)")
    policy = policy or (TimingPolicy(warmup=1, min_rounds=2, max_rounds=2, budget_s=0.0, warmup_s=0.0) if dry_run else TimingPolicy())
    timer = CudaTimer(device) if not dry_run else None
    configs = [(None, None, None)] + [(b, w, None) for b in blocks for w in warps] + [(None, None, t) for t in tiles]
    rows = []
    for shape_rows, length in shapes:
        case = Case(shape_rows, length, dtype)
        batch = rl_batch(shape_rows, length, dtype=dtype, device=device)
        yard = yardstick(batch)
        for block, num_warps, tile in configs:
            row = {
                "shape": f"{shape_rows}x{length}",
                "dtype": case.dtype_name,
                "rows": shape_rows,
                "length": length,
                "block_size": block,
                "num_warps": num_warps,
                "tile_size": tile,
                "bytes": fused_bytes(case),
                "dry_run": dry_run,
                "status": "ok",
            }
            try:
                backend = kpo_kernels.TritonBackend(block_size=block, num_warps=num_warps, tile_size=tile)
                t0 = time.perf_counter()
                loss, metrics, grad = step(batch, backend)
                row["first_call_s"] = time.perf_counter() - t0  # includes compilation
                row.update(errors_against(yard, loss, grad))
                ok = row["err_loss"] <= LOSS_TOL and row["err_grad"] <= grad_tol(dtype)
                row["check"] = "pass" if ok else "fail"  # NaN fails
                fn = lambda batch=batch, backend=backend: step(batch, backend)  # noqa: E731
                timing = timer(fn, policy) if timer else time_cpu(fn, policy)
                row.update(timing)
                row["cost_ms"] = timing.get("device_ms") or timing["median_ms"]
                row["gbps"] = row["bytes"] / (row["cost_ms"] * 1e-3) / 1e9
            except Exception as error:  # noqa: BLE001 - a configuration that fails is a row
                row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
            rows.append(row)
            progress(_line(row))
            if on_row is not None:  # partial results survive a timeout
                on_row(rows)
    return rows


def _config(row):
    return f"block={row['block_size']} warps={row['num_warps']} tile={row['tile_size']}"


def _line(row):
    config = _config(row)
    if row["status"] != "ok":
        return f"{row['shape']:>10} {row['dtype']} {config:33s} {row['status']}"
    return (
        f"{row['shape']:>10} {row['dtype']} {config:33s} {row['cost_ms']:9.3f} ms "
        f"(eager {row['median_ms']:.3f}, {row['p20_ms']:.3f}-{row['p80_ms']:.3f})  {row['gbps']:7.1f} GB/s  "
        f"err grad {row['err_grad']:.1e}  {row['check']}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--shapes", default="512x8192,2x131072", help="comma-separated BxT")
    parser.add_argument("--blocks", default="256,512,1024,2048")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--tiles", default="", help="comma-separated tile sizes, tried with the default block and warps")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    start = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - start:6.1f}s] {text}", flush=True)  # noqa: E731
    env = environment(device)

    def write(rows):
        if args.json:
            safe = [{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)) for k, v in r.items()}
                    for r in rows]
            args.json.write_text(json.dumps({"environment": env, "rows": safe}, indent=1) + "\n")

    rows = tune(device, [_shape(s) for s in args.shapes.split(",")], _ints(args.blocks), _ints(args.warps),
                DTYPES[args.dtype], progress=say, tiles=_ints(args.tiles), on_row=write)
    print()
    for shape in dict.fromkeys(r["shape"] for r in rows):
        timed = sorted((r for r in rows if r["shape"] == shape and r["status"] == "ok"), key=lambda r: r["cost_ms"])
        default = next((r for r in timed if r["block_size"] is None and r["tile_size"] is None
                        and r["num_warps"] is None), None)
        if timed:
            best = next((r for r in timed if r["check"] == "pass"), timed[0])
            vs = f", {default['cost_ms'] / best['cost_ms']:.2f}x faster than the default" if default else ""
            print(f"{shape}: best {_config(best)} {best['cost_ms']:.3f} ms{vs}"
                  + ("  (dry run: meaningless)" if best["dry_run"] else ""))
    defaults = [r for r in rows if r["block_size"] is None and r["tile_size"] is None and r["num_warps"] is None]
    return 0 if all(r["status"] == "ok" and r.get("check") == "pass" for r in defaults) else 1


if __name__ == "__main__":
    sys.exit(main())
