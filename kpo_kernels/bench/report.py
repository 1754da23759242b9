"""Tables (terminal and markdown), JSON and the two-panel PNG of benchmark rows.

Rows are the dicts of `run.run` (`kind` "timing") and `run.run_accuracy` (`kind` "accuracy").
`python -m kpo_kernels.bench.report results.json [--markdown PATH] [--plot PATH]` re-renders
them (e.g. after a run that was stopped part-way).
"""

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

from .cases import LONG_ROWS

ORDER = ("kpo", "kpo-torch", "kpo-triton", "sequential-reference", "vectorized-cumsum", "grpo-eager", "copy")
COLORS = {
    "kpo": "tab:blue",
    "kpo-torch": "tab:cyan",
    "kpo-triton": "tab:purple",
    "sequential-reference": "tab:gray",
    "vectorized-cumsum": "tab:red",
    "grpo-eager": "tab:orange",
    "copy": "black",
}


def _ms(value):
    if value is None or not math.isfinite(value):
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _err(value):
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf"
    return f"{value:.1e}"


def _num(value, fmt):
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _gbps(value):
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def _ratio(value):
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def shape(row):
    return f"{row['rows']}x{row['length']} {row['dtype']}"


def timing_rows(rows):
    """The timed rows (rows written before the accuracy sweep existed have no `kind`)."""
    return [r for r in rows if r.get("kind", "timing") == "timing"]


def accuracy_rows(rows):
    return [r for r in rows if r.get("kind") == "accuracy"]


def cases(rows):
    """Timed rows grouped by case (in first-seen order), each group in ORDER."""
    groups = OrderedDict()
    for row in timing_rows(rows):
        groups.setdefault((row["rows"], row["length"], row["dtype"]), []).append(row)
    rank = {name: i for i, name in enumerate(ORDER)}
    return [sorted(group, key=lambda r: rank.get(r["impl"], len(ORDER))) for group in groups.values()]


def _cells(row, gpu, markdown):
    ok = row["status"] == "ok"
    spread = f"{_ms(row.get('p20_ms'))}-{_ms(row.get('p80_ms'))}" if ok else ""
    cells = OrderedDict()
    cells["impl"] = row["impl"] + (f" ({row['backend']})" if markdown and row.get("backend") else "")
    cells["shape"] = shape(row)
    if not ok:
        cells["median ms"] = row["status"]
        return cells
    cells["median ms"] = _ms(row.get("median_ms"))
    cells["p20-p80"] = spread
    if markdown and gpu:
        cells["wall ms"] = _ms(row.get("wall_ms"))
    if gpu:
        cells["device ms"] = _ms(row.get("device_ms"))
    cells["t/kpo"] = _ratio(row.get("time_vs_kpo"))
    cells["peak MB"] = _num(row.get("peak_mb"), ".1f")
    cells["err filter"] = _err(row.get("err_filter"))
    if markdown:
        cells["err loss"] = _err(row.get("err_loss"))
    cells["err grad"] = _err(row.get("err_grad"))
    if markdown:
        cells["err metrics"] = _err(row.get("err_metrics"))
    if gpu:
        cells["GB/s"] = _gbps(row.get("gbps"))
    if markdown:
        cells["rounds"] = str(row.get("rounds", ""))
    cells["check"] = {"pass": "ok", "fail": "FAIL"}.get(row.get("check"), "")
    return cells


RIGHT = {"median ms", "p20-p80", "wall ms", "device ms", "t/kpo", "peak MB", "err filter", "err loss", "err grad", "err metrics", "GB/s", "rounds"}


def table(rows):
    """The terminal table of the timed rows (at most about 115 columns)."""
    rows = timing_rows(rows)
    gpu = any(r.get("device") == "cuda" for r in rows)
    blocks = [[_cells(r, gpu, markdown=False) for r in group] for group in cases(rows)]
    header = list(_cells(next(r for r in rows if r["status"] == "ok"), gpu, False)) if any(
        r["status"] == "ok" for r in rows
    ) else ["impl", "shape", "median ms"]
    width = {h: len(h) for h in header}
    for block in blocks:
        for cells in block:
            for h in header:
                if h in cells and not (h == "median ms" and len(cells) == 3):
                    width[h] = max(width[h], len(cells[h]))

    def line(cells):
        parts = []
        for h in header:
            text = cells.get(h, "")
            if h == "median ms" and len(cells) == 3:  # an error row: the status runs on
                parts.append(text)
                break
            parts.append(text.rjust(width[h]) if h in RIGHT else text.ljust(width[h]))
        return "  ".join(parts).rstrip()

    out = [line({h: h for h in header}), "  ".join("-" * width[h] for h in header)]
    for i, block in enumerate(blocks):
        if i:
            out.append("")
        out.extend(line(cells) for cells in block)
    return "\n".join(out)


def markdown_table(rows):
    rows = timing_rows(rows)
    gpu = any(r.get("device") == "cuda" for r in rows)
    all_cells = [_cells(r, gpu, markdown=True) for group in cases(rows) for r in group]
    header = []
    for cells in all_cells:
        for h in cells:
            if h not in header:
                header.append(h)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h in RIGHT else "---" for h in header) + "|"]
    for cells in all_cells:
        out.append("| " + " | ".join(cells.get(h, "") for h in header) + " |")
    return "\n".join(out)


def environment_line(row):
    parts = [
        f"device: {row.get('device_name')} ({row.get('device')})",
        f"torch {row.get('torch')}",
        f"triton {row.get('triton')}",
    ]
    if row.get("cuda"):
        parts.append(f"CUDA {row['cuda']}")
    parts += [f"kpo_kernels {row.get('kpo_kernels')}", f"commit {row.get('commit')}", f"date {row.get('date')}"]
    return " | ".join(parts)


LEGEND = """\
t/kpo: median time / kpo's median time on the same case (above 1: kpo is faster).
err filter: max |x - x64| / max |x64| of the filtered log-ratio over valid tokens; err grad: max
|g - g64| / max |g64| of d loss / d log_prob (tokens tied with a clip bound in float64 excluded;
for sequential-reference and vectorized-cumsum, which clip the ratio exp(x) in float32, also
tokens within 4.8e-7 of a clip bound, where float32 cannot order the two PPO terms and
torch.maximum gives each half the gradient); x64, g64 from a float64 recursion and reference/'s
loss in float64 (reference/ in float64 is the yardstick itself). NaN: the output has NaN.
check: this package within 1e-5 (filter, loss, metrics) and 1e-5 or one rounding unit of the
input dtype (gradient). peak MB: allocated during one step above the inputs (n/a: not measured).
grpo-eager is a different loss (no filter): no errors. GB/s: bytes a fused step must move
(read log_prob, old_log_prob, mask, advantages; write the gradient) / median time.
device ms (GPU): the kernels' own time per step (profiler); median ms is the eager step as the
stream sees it, which on a host slower than the GPU is the host's launch time."""


def accuracy_table(rows, markdown=False):
    """Errors against float64 by T (rows of the accuracy sweep): one line per length, a filter and
    a gradient column per implementation."""
    rows = accuracy_rows(rows)
    names = [n for n in ORDER if any(r["impl"] == n for r in rows)]
    header = ["T"] + [f"{n} {what}" for n in names for what in ("filter", "grad")]
    lines = []
    for length in sorted({r["length"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["length"] == length}
        cells = [str(length)]
        for name in names:
            row = by.get(name)
            if row is None or row["status"] != "ok":
                cells += [row["status"] if row else "not run", ""]
            else:
                cells += [_err(row.get("err_filter")), _err(row.get("err_grad"))]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])
    width = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, width)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in width)] + [fmt(c) for c in lines])


def write_markdown(rows, path, skipped=(), title="kpo_kernels benchmarks"):
    lines = [f"# {title}", ""]
    if rows:
        lines += [environment_line(rows[0]), ""]
    lines += [markdown_table(rows), "", LEGEND, ""]
    accuracy = accuracy_rows(rows)
    if accuracy:
        lines += [f"## Accuracy against float64 as T grows ({accuracy[0]['rows']} rows per length, fp32, "
                  f"q={accuracy[0]['q']:g}; errors only)", "", accuracy_table(accuracy, markdown=True), ""]
    if any(r.get("device") == "cuda" for r in rows):
        lines += ["## GPU goals (issue 4), measured", "", *(f"- {line}" for line in goals(rows)), ""]
    for case, name, reason in skipped:
        lines.append(f"- not run: `{name}` on {case.label}: {reason}")
    Path(path).write_text("\n".join(lines) + "\n")


def write_json(rows, path):
    Path(path).write_text(json.dumps(_clean(rows), indent=1, default=_json_default, allow_nan=False) + "\n")


def _json_default(value):
    return str(value)


def _clean(rows):
    """Strict JSON has no NaN/inf: they are written as the strings "NaN", "inf", "-inf"."""
    return [{k: _sanitize(v) for k, v in row.items()} for row in rows]


def _sanitize(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _tokens_label(n):
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _plotted_impls(rows):
    """Implementations of the time panel, in ORDER; `kpo-torch` / `kpo-triton` are left out where
    they are the backend `kpo` resolves to (the same code: their points would cover kpo's)."""
    auto = {r.get("backend") for r in rows if r["impl"] == "kpo"}
    return [n for n in ORDER if any(r["impl"] == n for r in rows) and not (n.startswith("kpo-") and auto == {n[4:]})]


def _accuracy_panel(ax, rows):
    from matplotlib.lines import Line2D

    rows = [r for r in accuracy_rows(rows) if r["status"] == "ok"]
    names = [n for n in ORDER if any(r["impl"] == n for r in rows)]
    values = [r[k] for r in rows for k in ("err_filter", "err_grad") if isinstance(r.get(k), float)]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    low = 10.0 ** math.floor(math.log10(min(finite + [1e-8])))
    high = 10.0 ** math.ceil(math.log10(max(finite + [1.0])))
    nan_y, zero_y = high * 10 ** 1.5, low / 10  # drawn in bands above and below the axis range
    series = {"err_filter": ("-", "o", "filtered log-ratio"), "err_grad": (":", "s", "gradient")}
    for i, name in enumerate(names):
        mine = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["length"])
        for j, (key, (style, marker, _)) in enumerate(series.items()):
            # Side by side around T (equal errors, and the NaN band, hide no point)
            dodge = 1.04 ** (2 * i + j - (2 * len(names) - 1) / 2)
            xs, ys, band_x, band_y = [], [], [], []
            for r in mine:
                value = r.get(key)
                if not isinstance(value, float):
                    continue
                if math.isnan(value) or math.isinf(value):
                    band_x.append(r["length"] * dodge)
                    band_y.append(nan_y)
                else:
                    xs.append(r["length"] * dodge)
                    ys.append(value if value > 0 else zero_y)
            color = COLORS.get(name)
            ax.plot(xs, ys, style, marker=marker, color=color, markersize=5, linewidth=1.4,
                    markerfacecolor=color if key == "err_filter" else "white")
            ax.plot(band_x, band_y, linestyle="none", marker="X", color=color, markersize=8)
    ax.axhspan(high * 10 ** 0.75, high * 10 ** 2.25, color="0.92", zorder=0)
    ax.axhline(1e-5, color="tab:green", linewidth=1, linestyle="--", zorder=1)
    ax.text(0.02, 1e-5 * 1.6, "kpo's check: 1e-5", transform=ax.get_yaxis_transform(), fontsize=7, color="tab:green")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(zero_y / 10 ** 0.5 if any(v == 0 for v in values) else low / 3, high * 10 ** 2.25)
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [_tokens_label(t) for t in lengths], fontsize=8)
    ax.minorticks_off()
    decades = [10.0**e for e in range(int(math.log10(low)), int(math.log10(high)) + 1, 2 if high / low > 1e8 else 1)]
    ticks = decades + [nan_y] + ([zero_y] if any(v == 0 for v in values) else [])
    ax.set_yticks(ticks, [f"1e{int(round(math.log10(t)))}" for t in decades] + ["NaN"] + (["0"] if len(ticks) > len(decades) + 1 else []),
                  fontsize=8)
    ax.set_xlabel("T, tokens per response (row 0 exactly T; the others T/8..T)")
    ax.set_ylabel("max error / max |float64 value|")
    q = rows[0]["q"] if rows else None
    ax.set_title(f"accuracy against float64 ({rows[0]['rows'] if rows else '?'} rows per T, fp32, q={q:g})"
                 if rows else "accuracy: not measured", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=COLORS.get(n), linewidth=3, label=n) for n in names]
    handles += [Line2D([], [], color="k", linestyle=style, marker=marker, markerfacecolor="k" if k == "err_filter" else "white",
                       label=label) for k, (style, marker, label) in series.items()]
    handles.append(Line2D([], [], color="k", linestyle="none", marker="X", markersize=8, label="output has NaN"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)


def _time_panel(ax, rows):
    from matplotlib.lines import Line2D

    timed = [r for r in timing_rows(rows) if r["status"] == "ok" and r.get("median_ms")]
    # On a GPU, the kernels' device time (the eager events measure a slow host's launches there).
    on_device = bool(timed) and all(r.get("device_ms") for r in timed)
    key = "device_ms" if on_device else "median_ms"
    names = _plotted_impls(timed)
    dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in timed))
    regimes = (("short rows", "o"), ("long rows", "^"))
    slots = [(n, regime, dtype) for n in names for regime, _ in regimes for dtype in dtypes
             if any(r["impl"] == n and r["regime"] == regime and r["dtype"] == dtype for r in timed)]
    step = 1.045 if len(slots) <= 12 else 1.025
    for name in names:
        color = COLORS.get(name)
        for regime, marker in regimes:
            for d, dtype in enumerate(dtypes):
                points = sorted((r for r in timed if r["impl"] == name and r["regime"] == regime and r["dtype"] == dtype),
                                key=lambda r: r["tokens"])
                if not points:
                    continue
                # Side by side around the token count: rows with the same B x T (64x4096 and
                # 2x131072), dtypes and implementations with the same time stay visible.
                dodge = step ** (slots.index((name, regime, dtype)) - (len(slots) - 1) / 2)
                xs = [r["tokens"] * dodge for r in points]
                ys = [r[key] for r in points]
                spread = [[0.0 if on_device else max(y - r.get("p20_ms", y), 0) for y, r in zip(ys, points)],
                          [0.0 if on_device else max(r.get("p80_ms", y) - y, 0) for y, r in zip(ys, points)]]
                ax.errorbar(xs, ys, yerr=spread, linestyle=("-", "--", ":")[d % 3], marker=marker, color=color,
                            markersize=6, linewidth=1.2, elinewidth=0.8, capsize=2,
                            markerfacecolor=color if d == 0 else "white")
    ax.set_xscale("log")
    ax.set_yscale("log")
    tokens = sorted({r["tokens"] for r in timed})
    if len(tokens) <= 5:
        shapes = {t: sorted({f"{r['rows']}x{r['length']}" for r in timed if r["tokens"] == t}, key=lambda s: -int(s.split("x")[1]))
                  for t in tokens}
        ax.set_xticks(tokens, [_tokens_label(t) + "\n" + "\n".join(shapes[t]) for t in tokens], fontsize=8)
    else:
        ax.set_xticks(tokens, [_tokens_label(t) for t in tokens], fontsize=8, rotation=45)
    ax.minorticks_off()
    if timed:
        low = min(r[key] for r in timed)
        high = max(r[key] if on_device else r.get("p80_ms", r["median_ms"]) for r in timed)
        decades = [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
        ax.set_yticks(decades, [f"{d:g}" for d in decades], fontsize=8)
        ax.set_ylim(decades[0] * 0.8, decades[-1] * 1.25)
        ax.set_xlim(tokens[0] / 1.6, tokens[-1] * 1.6)
    ax.set_xlabel("tokens per batch, B x T (padding included)")
    ax.set_ylabel("forward + backward, device (kernel) ms" if on_device else "forward + backward, median ms (bars: p20-p80)")
    ax.set_title("time of one step (loss, metrics, gradient)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    auto = next((r.get("backend") for r in timed if r["impl"] == "kpo"), None)
    handles = [Line2D([], [], color=COLORS.get(n), linewidth=3, label=n + (f" ({auto} backend)" if n == "kpo" and auto else ""))
               for n in names]
    present = {r["regime"] for r in timed}
    handles += [Line2D([], [], color="k", linestyle="none", marker=m, label=f"{regime} (T {'<=' if m == 'o' else '>'} {LONG_ROWS})")
                for regime, m in regimes if regime in present]
    if len(dtypes) > 1:
        handles += [Line2D([], [], color="k", linestyle=("-", "--", ":")[d % 3], marker="o",
                           markerfacecolor="k" if d == 0 else "white", label=dtype) for d, dtype in enumerate(dtypes)]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2 if len(tokens) <= 5 else -0.15),
              ncol=3, frameon=False)



def plot(rows, path):
    """The PNG of `--plot`: left, the accuracy sweep (errors of the filtered log-ratio and of the
    gradient against float64 vs T, NaN drawn in a band above); right, median time vs tokens."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def figure(rows):
    """The matplotlib figure of `plot` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.4), gridspec_kw={"width_ratios": [1, 1.1]})
    _accuracy_panel(left, rows)
    _time_panel(right, rows)
    first = rows[0] if rows else {}
    fig.suptitle(f"kpo_kernels {first.get('kpo_kernels', '')}: exact where the authors' float32 filter drifts and turns NaN; "
                 f"the time it takes\n{first.get('device_name', '')} | torch {first.get('torch')} | "
                 f"commit {first.get('commit')} | {first.get('date')}", fontsize=9)
    fig.tight_layout()
    return fig


GOAL_SHAPE = (512, 8192)
GOAL_TOKENS = 4 * 2**20


def _cost_ms(row):
    """What the goals compare: the kernels' device time where measured (see bench/timing.py: on a
    host slower than the GPU, the eager events measure the host), else the eager median."""
    return row.get("device_ms") or row["median_ms"]


def goals(rows):
    """Issue 4's GPU goals against measured rows: lines of text ('met' / 'MISSED' / 'not measured').
    Times are device (kernel) times where the rows have them, with the eager step's ratio beside."""
    rows = timing_rows(rows)
    timed = {(r["impl"], r["rows"], r["length"], r["dtype"]): r for r in rows if r["status"] == "ok" and r.get("median_ms")}
    lines = []

    def verdict(ok):
        return "met" if ok else "MISSED"

    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        kpo = timed.get(("kpo", *GOAL_SHAPE, dtype))
        for other, factor in (("vectorized-cumsum", 10), ("grpo-eager", 2)):
            base = timed.get((other, *GOAL_SHAPE, dtype))
            if kpo is None or base is None:
                lines.append(f"B=512 T=8192 {dtype}: kpo >= {factor}x faster than {other}: not measured")
                continue
            speedup = _cost_ms(base) / _cost_ms(kpo)
            basis = "device time" if kpo.get("device_ms") and base.get("device_ms") else "eager time"
            eager = f"; eager step {base['median_ms'] / kpo['median_ms']:.1f}x" if basis == "device time" else ""
            lines.append(f"B=512 T=8192 {dtype}: kpo {speedup:.1f}x faster than {other} in {basis} "
                         f"(goal {factor}x{eager}): {verdict(speedup >= factor)}")
    big = [r for r in timed.values() if r["impl"] == "kpo" and r["tokens"] >= GOAL_TOKENS]
    for kpo in sorted(big, key=lambda r: (r["dtype"], r["tokens"], r["rows"])):
        copy = timed.get(("copy", kpo["rows"], kpo["length"], kpo["dtype"]))
        if copy is None:
            lines.append(f"{shape(kpo)}: kpo / copy bandwidth: copy not measured")
            continue
        kpo_gbps, copy_gbps = (r["gbps"] * r["median_ms"] / _cost_ms(r) for r in (kpo, copy))
        basis = "device time" if kpo.get("device_ms") else "eager time"
        lines.append(f"{shape(kpo)}: kpo {kpo_gbps:.0f} GB/s = {kpo_gbps / copy_gbps:.0%} of copy's {copy_gbps:.0f} GB/s "
                     f"in {basis} (goal 60%): {verdict(kpo_gbps / copy_gbps >= 0.6)}")
    if not big:
        lines.append("kpo at >= 4M tokens: not measured")
    return lines


def brief(rows):
    """One line per case: kpo's time and bandwidth, copy's, and the baselines' time over kpo's."""
    lines = []
    for group in cases(rows):
        by = {r["impl"]: r for r in group if r["status"] == "ok" and r.get("median_ms")}
        kpo = by.get("kpo")
        if kpo is None:
            lines.append(f"{shape(group[0]):18s} kpo: {next((r['status'] for r in group if r['impl'] == 'kpo'), 'not run')}")
            continue
        text = f"{shape(kpo):18s} kpo {_ms(kpo['median_ms']):>7} ms {_gbps(kpo['gbps']):>6} GB/s"
        if "copy" in by:
            text += f" ({kpo['gbps'] / by['copy']['gbps']:4.0%} of copy)"
        for other, label in (("vectorized-cumsum", "cumsum"), ("grpo-eager", "grpo"), ("kpo-torch", "torch")):
            if other in by:
                text += f"  {label} {by[other]['median_ms'] / kpo['median_ms']:.1f}x"
        if kpo.get("device_ms"):  # the kernels alone, and the same ratios on them
            text += f" | device {kpo['device_ms'] * 1e3:.0f} us"
            if by.get("copy", {}).get("device_ms"):
                text += f" ({by['copy']['device_ms'] / kpo['device_ms']:4.0%} of copy)"
            for other, label in (("vectorized-cumsum", "cumsum"), ("grpo-eager", "grpo")):
                if by.get(other, {}).get("device_ms"):
                    text += f"  {label} {by[other]['device_ms'] / kpo['device_ms']:.1f}x"
        text += f"  err {_err(kpo.get('err_filter'))}/{_err(kpo.get('err_grad'))} {kpo.get('check')}"
        lines.append(text)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-render benchmark rows written by --json.")
    parser.add_argument("json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--goals", action="store_true", help="also print issue 4's GPU goals, measured")
    parser.add_argument("--brief", action="store_true", help="one line per case instead of the table")
    args = parser.parse_args(argv)
    rows = [{k: _load(v) for k, v in row.items()} for row in json.loads(args.json.read_text())]
    print("\n".join(brief(rows)) if args.brief else table(rows))
    if args.goals:
        print("\nGPU goals (issue 4), measured:")
        print("\n".join("  " + line for line in goals(rows)))
    if args.markdown:
        write_markdown(rows, args.markdown)
    if args.plot:
        plot(rows, args.plot)
    return 0


def _load(value):
    return float(value) if value in ("NaN", "inf", "-inf") else value


if __name__ == "__main__":
    sys.exit(main())
