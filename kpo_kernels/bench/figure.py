"""The two-panel PNG of benchmark rows (`--plot`): accuracy against float64 by length, and time
by tokens. Rows as in `report`."""

import math
from collections import OrderedDict

from .cases import LONG_ROWS
from .report import COLORS, ORDER, accuracy_rows, timing_rows


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
