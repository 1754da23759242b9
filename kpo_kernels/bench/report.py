"""Tables (terminal and markdown) and JSON of benchmark rows; the PNG is `figure.plot`.

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
        from .figure import plot  # matplotlib only when asked for

        plot(rows, args.plot)
    return 0


def _load(value):
    return float(value) if value in ("NaN", "inf", "-inf") else value


if __name__ == "__main__":
    sys.exit(main())
