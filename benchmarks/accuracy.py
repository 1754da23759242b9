"""Accuracy sweep: where the authors' float32 vectorized filter breaks, and where kpo stays exact.

    python -m benchmarks.accuracy [--device cpu|cuda] [--json PATH] [--markdown PATH] [--plot PATH]

For q = Q/R in 1e-9, 1e-8, ..., 1e2 and T in 256, 512, ..., 131072: ROWS rows of float32
log-ratios from the model of `kpo_kernels/bench/data.py` (drift + noise + 1% spikes, every token valid), filtered by
each implementation on the first T tokens and compared with the float64 yardstick:

    error = max |x - x64| / max |x64| over those T tokens and rows.

The yardstick is a float64 sequential recursion (`baselines.float64_recursion`: gains from the
variance recursion iterated in Python floats, then x += K (z - x) one token at a time, vectorized
over rows and q). It shares nothing with kpo_kernels and is bitwise equal to `reference/` in
float64. The filter is causal, so the recursion runs once, at the longest T, and its first T
outputs are its outputs on the length-T input; the implementations run at every T separately.

Classes: "NaN" (a NaN or inf in the output), "broken" (error > 1e-3), "exact" (error <= 1e-5),
"between" otherwise. Also reported: the first token at which the float32 sinh gains of
`vectorized-cumsum` are NaN or off by more than 1e-3 relative (`baselines.gain_error_onset`).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kpo_kernels

from kpo_kernels.bench import baselines
from kpo_kernels.bench.data import log_ratio_stream

Q_VALUES = tuple(10.0**e for e in range(-9, 3))
LENGTHS = tuple(2**k for k in range(8, 18))
BROKEN, EXACT = 1e-3, 1e-5


ALL = {
    "kpo": lambda z, q: kpo_kernels.kalman_filter(z, None, q=q),
    "kpo-torch": lambda z, q: kpo_kernels.kalman_filter(z, None, q=q, backend="torch"),
    "kpo-triton": lambda z, q: kpo_kernels.kalman_filter(z, None, q=q, backend="triton"),
    "vectorized-cumsum": lambda z, q: baselines.vectorized_cumsum_filter(
        z, torch.ones(z.shape, dtype=torch.bool, device=z.device), q
    ),
}


def implementations(device, names=None):
    """name -> filter(z (B, T) on device, q). Default: kpo (auto backend), on CUDA also
    kpo-torch, and vectorized-cumsum. kpo-triton on a CPU needs TRITON_INTERPRET=1 (slow: the
    interpreter runs the kernel's float32 arithmetic in numpy; an accuracy check, never a timing)."""
    if names is None:
        names = ["kpo"] + (["kpo-torch"] if device.type == "cuda" else []) + ["vectorized-cumsum"]
    return {name: ALL[name] for name in names}


def classify(err):
    if not math.isfinite(err):
        return "NaN"
    if err > BROKEN:
        return "broken"
    if err <= EXACT:
        return "exact"
    return "between"


def yardstick(z, q_values):
    """float64 filtered log-ratios, (len(q_values), B, T), for every q at once."""
    rows, length = z.shape
    z64 = z.double().numpy()
    gains = np.concatenate([np.broadcast_to(baselines.float64_gains(length, q), (rows, length)) for q in q_values])
    out = baselines.float64_recursion(np.tile(z64, (len(q_values), 1)), gains)
    return out.reshape(len(q_values), rows, length)


def sweep(device, *, rows=4, q_values=Q_VALUES, lengths=LENGTHS, seed=1, progress=None, names=None):
    """Rows (dicts): impl, backend, q, length, rows, err, status, device."""
    say = progress or (lambda text: None)
    z = log_ratio_stream(rows, max(lengths), seed=seed)
    start = time.perf_counter()
    x64 = yardstick(z, q_values)
    say(f"float64 recursion: {len(q_values)} q x {rows} rows x {max(lengths)} tokens in {time.perf_counter() - start:.1f} s")
    z_device = z.to(device)
    impls = implementations(device, names)
    backend = "triton" if device.type == "cuda" else "torch"
    backends = {"kpo": backend, "kpo-torch": "torch", "kpo-triton": "triton"}
    results = []
    for qi, q in enumerate(q_values):
        for length in lengths:
            ref = torch.from_numpy(np.ascontiguousarray(x64[qi, :, :length]))
            scale = float(ref.abs().max())
            for name, filt in impls.items():
                x = filt(z_device[:, :length].contiguous(), q).to("cpu", torch.float64)
                err = float((x - ref).abs().max()) / scale if scale > 0 else float((x - ref).abs().max())
                if not bool(torch.isfinite(x).all()):
                    err = math.nan
                results.append({
                    "impl": name,
                    "backend": backends.get(name),
                    "device": device.type,
                    "q": q,
                    "length": length,
                    "rows": rows,
                    "err": err,
                    "status": classify(err),
                })
        say(f"q={q:.0e} done")
    return results


def gain_onsets(q_values, length):
    """q -> (first n where the float32 sinh gains are off by > 1e-3 or NaN, first n where NaN)."""
    onsets = {}
    for q in q_values:
        bad = ~torch.isfinite(baselines.sinh_gains(length, q))
        onsets[q] = (baselines.gain_error_onset(q, length), int(bad.nonzero()[0]) + 1 if bool(bad.any()) else None)
    return onsets


def _cell(err):
    if not math.isfinite(err):
        return "**NaN**"
    text = f"{err:.0e}" if err < 1 else f"{err:.2g}"
    return f"**{text}**" if err > BROKEN else text


def summary(results, onsets):
    """Plain-text findings: where vectorized-cumsum breaks, where kpo stays within 1e-5."""
    lines = []
    q_values = sorted({r["q"] for r in results})
    for name in dict.fromkeys(r["impl"] for r in results):
        mine = [r for r in results if r["impl"] == name]
        worst = max(mine, key=lambda r: math.inf if math.isnan(r["err"]) else r["err"])
        exact = [r for r in mine if r["status"] == "exact"]
        lines.append(
            f"{name}: {len(exact)}/{len(mine)} cells within {EXACT:g}; worst {_plain(worst['err'])} "
            f"(q={worst['q']:.0e}, T={worst['length']})"
        )
        for q in q_values:
            row = sorted((r for r in mine if r["q"] == q), key=lambda r: r["length"])
            first_bad = next((r for r in row if r["status"] in ("NaN", "broken")), None)
            first_nan = next((r for r in row if r["status"] == "NaN"), None)
            not_exact = [r for r in row if r["status"] != "exact"]
            if first_bad is not None:
                text = f"  q={q:.0e}: error > {BROKEN:g} from T={first_bad['length']} ({_plain(first_bad['err'])})"
                if first_nan is not None:
                    text += f", NaN from T={first_nan['length']}"
                lines.append(text)
            elif not_exact:
                lines.append(f"  q={q:.0e}: above {EXACT:g} from T={not_exact[0]['length']} (max {_plain(max(r['err'] for r in row))})")
    if any(r["impl"] == "vectorized-cumsum" for r in results):
        lines.append("vectorized-cumsum's float32 sinh gains: first token n where off by > 1e-3 (or NaN), and first NaN")
        lines.append("(None: not up to the largest T):")
        lines += [f"  q={q:.0e}: off from n={off}, NaN from n={nan}" for q, (off, nan) in onsets.items()]
    return "\n".join(lines)


def _plain(err):
    return "NaN" if not math.isfinite(err) else f"{err:.1e}"


def markdown(results, onsets, env_line=""):
    q_values = sorted({r["q"] for r in results})
    lengths = sorted({r["length"] for r in results})
    out = ["# Accuracy sweep: filtered log-ratio against a float64 recursion", ""]
    if env_line:
        out += [env_line, ""]
    out += [
        "max |x - x64| / max |x64| over the first T tokens of "
        f"{results[0]['rows']} rows (kpo_kernels/bench/data.py log-ratio model, float32 inputs). "
        f"Bold: above {BROKEN:g} or NaN.",
        "",
    ]
    for name in dict.fromkeys(r["impl"] for r in results):
        backend = next((r["backend"] for r in results if r["impl"] == name and r["backend"]), None)
        out += [f"## {name}" + (f" ({backend} backend)" if backend else ""), ""]
        out.append("| q \\ T | " + " | ".join(str(t) for t in lengths) + " |")
        out.append("|---|" + "---:|" * len(lengths))
        for q in q_values:
            cells = {r["length"]: _cell(r["err"]) for r in results if r["impl"] == name and r["q"] == q}
            out.append(f"| {q:.0e} | " + " | ".join(cells.get(t, "") for t in lengths) + " |")
        out.append("")
    out += ["## Findings", "", "```", summary(results, onsets), "```", ""]
    return "\n".join(out)


def plot(results, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["impl"] for r in results))
    q_values = sorted({r["q"] for r in results})
    lengths = sorted({r["length"] for r in results})
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), squeeze=False)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("black")
    for ax, name in zip(axes[0], names):
        grid = np.full((len(q_values), len(lengths)), np.nan)
        for r in results:
            if r["impl"] == name:
                err = r["err"]
                grid[q_values.index(r["q"]), lengths.index(r["length"])] = (
                    np.log10(max(err, 1e-12)) if math.isfinite(err) else np.nan
                )
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=-9, vmax=1)
        for i in range(len(q_values)):
            for j in range(len(lengths)):
                value = grid[i, j]
                text = "NaN" if np.isnan(value) else ("x" if value > math.log10(BROKEN) else "")
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if text == "NaN" else "black")
        ax.set_xticks(range(len(lengths)), [f"{t // 1024}k" if t >= 1024 else str(t) for t in lengths], fontsize=7)
        ax.set_yticks(range(len(q_values)), [f"{q:.0e}" for q in q_values], fontsize=7)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("q = Q / R")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, label="log10 relative error (black: NaN)")
    fig.suptitle(f"filtered log-ratio vs float64 recursion (x: error > {BROKEN:g})\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(results):
    return [{**r, "err": r["err"] if math.isfinite(r["err"]) else "NaN"} for r in results]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=max(LENGTHS), help="largest T (a power of two >= 256)")
    parser.add_argument("--q", help="comma-separated q values (default 1e-9 ... 1e2)")
    parser.add_argument("--impls", help=f"comma-separated, from {sorted(ALL)} (default: kpo, vectorized-cumsum, "
                        "and kpo-torch on CUDA)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from kpo_kernels.bench.environment import environment, resolve_device
    from kpo_kernels.bench.report import environment_line

    device = resolve_device(args.device)
    lengths = tuple(t for t in LENGTHS if t <= args.max_length) or (args.max_length,)
    q_values = tuple(float(q) for q in args.q.split(",")) if args.q else Q_VALUES
    start = time.perf_counter()
    say = (lambda text: None) if args.quiet else (
        lambda text: print(f"[{time.perf_counter() - start:6.1f}s] {text}", file=sys.stderr, flush=True)
    )
    names = args.impls.split(",") if args.impls else None
    results = sweep(device, rows=args.rows, q_values=q_values, lengths=lengths, progress=say, names=names)
    onsets = gain_onsets(q_values, max(lengths))
    env = environment(device)
    text = markdown(results, onsets, environment_line(env))
    print(text)
    if args.json:
        args.json.write_text(json.dumps([{**r, **env} for r in _json_safe(results)], indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.plot:
        plot(results, args.plot, env["device_name"])
    say(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
