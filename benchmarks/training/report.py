"""Summaries of the runs: per method, over seeds; and the text table the command prints."""

import math
import statistics

# Windows in optimizer steps, so that runs that generate at different rates (on-policy: every
# step; the default off-policy schedule: every 8th) are smoothed over the same training time.
SMOOTHING_STEPS = 40  # the moving average of the reward: generations in the last 40 steps
FINAL_FRACTION = 0.1  # final reward: generations in the last 10% of the steps (at least SMOOTHING_STEPS)

# Ratio statistics summarised over stale micro-batches (those generated under earlier weights).
STALE_KEYS = (
    "clipfrac",
    "raw_abs_log_mean",
    "sign_flip_raw",
    "sign_flip_filtered",
    "nis_mean",
    "ratio_max",
    "raw_ratio_max",
)


# Logged as NaN until the run's first fit (NoiseTracker.metrics), so not counted as non-finite.
NAN_BEFORE_FIT = ("drift_evidence",)


def nonfinite_steps(rows):
    """Steps with a non-finite logged value (a NaN or infinite loss, gradient norm, ...)."""
    return sum(
        any(not math.isfinite(value) for name, value in row.items() if name != "step" and name not in NAN_BEFORE_FIT)
        for row in rows
    )


def reward_curve(run):
    """(steps, rewards) at the steps where the run generated."""
    rows = [row for row in run["steps"] if "reward" in row]
    return [row["step"] for row in rows], [row["reward"] for row in rows]


def moving_average(steps, values, window):
    """At each step, the mean of the values at steps in (step - window, step]."""
    out = []
    start = 0
    for i, step in enumerate(steps):
        while steps[start] <= step - window:
            start += 1
        part = values[start : i + 1]
        out.append(sum(part) / len(part))
    return out


def smoothed_reward(run):
    steps, rewards = reward_curve(run)
    return steps, moving_average(steps, rewards, SMOOTHING_STEPS)


def summarize_run(run, threshold):
    steps, rewards = reward_curve(run)
    smooth = moving_average(steps, rewards, SMOOTHING_STEPS)
    last = run["steps"][-1]["step"] if run["steps"] else 0
    final_from = last - max(SMOOTHING_STEPS, FINAL_FRACTION * last)
    final = [reward for step, reward in zip(steps, rewards) if step > final_from]
    reached = next((step for step, value in zip(steps, smooth) if value >= threshold), None)
    stale = [row for row in run["steps"] if row.get("stale") == 1.0]
    grad_norms = [row["grad_norm"] for row in run["steps"] if "grad_norm" in row]
    summary = {
        "final_reward": statistics.fmean(final) if final else float("nan"),
        "peak_reward": max(smooth) if smooth else float("nan"),
        "steps_to_threshold": reached,
        "grad_norm_median": statistics.median(grad_norms) if grad_norms else float("nan"),
        "grad_norm_max": max(grad_norms) if grad_norms else float("nan"),
        "nonfinite_steps": nonfinite_steps(run["steps"]),
        "stale_fraction": len(stale) / max(1, len(run["steps"])),
    }
    summary["drop_from_peak"] = summary["peak_reward"] - summary["final_reward"]
    summary.update(_fit_summary(run["steps"]))
    for key in STALE_KEYS:
        values = [row[key] for row in stale if key in row]
        summary[f"stale_{key}"] = statistics.fmean(values) if values else None
    return summary


def _fit_summary(rows):
    """The tracker's fits (KPOGRPOTrainer's kalman_fit: steps with kpo/refit = 1) and the time
    around its calls, per optimizer step; {} for a run without a tracker."""
    if not any("fit_seconds" in row for row in rows):
        return {}
    fits = [row for row in rows if row.get("refit") == 1.0]
    fit_seconds = sum(row.get("fit_seconds", 0.0) for row in rows)
    loss_seconds = sum(row.get("loss_seconds", 0.0) for row in rows)
    out = {
        "fits": len(fits),
        "fit_ms_per_step": 1e3 * fit_seconds / len(rows),
        "fit_ms_per_fit": 1e3 * fit_seconds / len(fits) if fits else None,
        "fit_share_of_loss": fit_seconds / loss_seconds if loss_seconds else None,
    }
    if fits:
        ratios = sorted(row["kalman_q"] / row["kalman_r"] for row in fits)
        evidence = sorted(row["drift_evidence"] for row in fits)
        out.update(
            fit_ratio_min=ratios[0], fit_ratio_median=statistics.median(ratios), fit_ratio_max=ratios[-1],
            fit_r_min=min(row["kalman_r"] for row in fits), fit_r_max=max(row["kalman_r"] for row in fits),
            fit_r_last=fits[-1]["kalman_r"], fit_evidence_median=statistics.median(evidence),
            fit_at_lower=sum(row.get("at_boundary") == -1.0 for row in fits) / len(fits),
            fit_at_upper=sum(row.get("at_boundary") == 1.0 for row in fits) / len(fits),
        )
    return out


def summarize(runs, threshold):
    """Per method: each summary value's mean and spread over seeds, and the seeds' own values."""
    by_method = {}
    for run in runs:
        run["summary"] = summarize_run(run, threshold)
        by_method.setdefault(run["method"], []).append(run)
    out = {}
    for method, group in by_method.items():
        group.sort(key=lambda run: run["seed"])  # merged --json files may list seeds in any order
        entry = {"seeds": [run["seed"] for run in group], "seconds": [run["seconds"] for run in group]}
        for key in dict.fromkeys(key for run in group for key in run["summary"]):
            values = [run["summary"].get(key) for run in group]
            numbers = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            entry[key] = {
                "values": values,
                "mean": statistics.fmean(numbers) if numbers else None,
                "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0 if numbers else None,
            }
        reached = [v for v in entry["steps_to_threshold"]["values"] if v is not None]
        entry["steps_to_threshold"]["median"] = statistics.median(reached) if reached else None
        entry["steps_to_threshold"]["reached"] = f"{len(reached)}/{len(group)}"
        fits = {run["seed"]: run["noise_fits"] for run in group if run.get("noise_fits")}
        if fits:
            entry["noise_fits"] = fits
        out[method] = entry
    return out


def _value(entry, key, digits=3):
    item = entry[key]
    if item["mean"] is None:
        return "-"
    if len(item["values"]) > 1:
        return f"{item['mean']:.{digits}f} ± {item['std']:.{digits}f}"
    return f"{item['mean']:.{digits}f}"


def _steps_to_threshold(entry):
    """Median over the seeds that reached the threshold, and how many did."""
    median = entry["steps_to_threshold"]["median"]
    return f"{'-' if median is None else round(median)} ({entry['steps_to_threshold']['reached']})"


def table(summary, threshold):
    """The summary as a Markdown table (one row per method), and the noise fits."""
    columns = [
        ("final reward", lambda e: _value(e, "final_reward")),
        ("peak", lambda e: _value(e, "peak_reward")),
        ("drop from peak", lambda e: _value(e, "drop_from_peak")),
        (f"steps to {threshold:g}", _steps_to_threshold),
        ("grad norm med / max", lambda e: f"{e['grad_norm_median']['mean']:.2f} / {max(e['grad_norm_max']['values']):.1f}"),
        ("clip frac", lambda e: _value(e, "stale_clipfrac")),
        ("mean abs z", lambda e: _value(e, "stale_raw_abs_log_mean", 4)),
        ("sign flips raw", lambda e: _value(e, "stale_sign_flip_raw")),
        ("sign flips filtered", lambda e: _value(e, "stale_sign_flip_filtered")),
        ("NIS", lambda e: _value(e, "stale_nis_mean", 2)),
        ("fit ms / step", lambda e: _value(e, "fit_ms_per_step", 2) if "fit_ms_per_step" in e else "-"),
        ("non-finite", lambda e: str(sum(e["nonfinite_steps"]["values"]))),
        ("s / run", lambda e: f"{statistics.fmean(e['seconds']):.0f}"),
    ]
    lines = ["| method | " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for method, entry in summary.items():
        lines.append(f"| {method} | " + " | ".join(cell(entry) for _, cell in columns) + " |")
    for method, entry in summary.items():
        for seed, fits in entry.get("noise_fits", {}).items():
            first = fits[0]
            line = (
                f"{method} seed {seed}: fit_noise at step {first['step']} ({first['num_tokens']} tokens): "
                f"Q/R = {first['ratio']:.3g}, R = {first['r']:.3g}, Q = {first['q']:.3g}, "
                f"drift evidence {first['drift_evidence']:.1f} nats"
                + (f", at the {first['at_boundary']} end of the range" if first["at_boundary"] else "")
            )
            if len(fits) > 1:
                ratios, rs = [fit["ratio"] for fit in fits], [fit["r"] for fit in fits]
                line += (
                    f"; {len(fits)} fits in all: Q/R {min(ratios):.3g} to {max(ratios):.3g}, R {min(rs):.3g} to {max(rs):.3g}, "
                    f"last Q/R = {ratios[-1]:.3g}, R = {rs[-1]:.3g}"
                )
            lines.append(line)
    for method, entry in summary.items():
        if entry.get("fit_ratio_median", {}).get("mean") is not None:
            lines.append(_tracker_line(method, entry))
    return "\n".join(lines)


def _tracker_line(method, entry):
    """The tracker's fits of a method over its seeds, and their cost."""

    def span(key):
        values = [v for v in entry[key]["values"] if v is not None]
        return f"{min(values):.3g} to {max(values):.3g}"

    cost = f"time in the tracker {entry['fit_ms_per_step']['mean']:.2f} ms per optimizer step"
    if entry["fit_ms_per_fit"]["mean"] is not None:
        cost += f", {entry['fit_ms_per_fit']['mean']:.2f} ms per fit"
    if entry["fit_share_of_loss"]["mean"] is not None:
        cost += f", {100 * entry['fit_share_of_loss']['mean']:.1f}% of the loss call's time"
    return (
        f"{method}: {span('fits')} fits per run; Q/R {span('fit_ratio_min')} (lowest) to {span('fit_ratio_max')} "
        f"(highest), medians {span('fit_ratio_median')}; R {span('fit_r_min')} (lowest), last {span('fit_r_last')}; "
        f"drift evidence median {span('fit_evidence_median')} nats; at the lower / upper end of the range in "
        f"{100 * entry['fit_at_lower']['mean']:.0f}% / {100 * entry['fit_at_upper']['mean']:.0f}% of fits; {cost}"
    )


def seed_table(summary):
    """Final reward and largest gradient norm of each seed, per method (Markdown)."""
    lines = ["| method | seeds | final reward by seed | largest gradient norm by seed |", "|---|---|---|---|"]
    for method, entry in summary.items():
        rewards = ", ".join(f"{value:.2f}" for value in entry["final_reward"]["values"])
        norms = ", ".join(_short(value) for value in entry["grad_norm_max"]["values"])
        lines.append(f"| {method} | {', '.join(map(str, entry['seeds']))} | {rewards} | {norms} |")
    return "\n".join(lines)


def _short(value):
    """A gradient norm in two or three significant digits (1.4, 93, 2.3e5)."""
    if value >= 1e4:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"
