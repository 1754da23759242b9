"""Summaries of the runs: per method, over seeds; and the text table the command prints."""

import math
import statistics

SMOOTHING = 5  # generations in the moving average of the reward
FINAL_FRACTION = 0.1  # the last 10% of a run's generations (at least SMOOTHING) make its final reward

# Ratio statistics summarised over stale micro-batches (those generated under earlier weights).
STALE_KEYS = ("clipfrac", "raw_abs_log_mean", "sign_flip_raw", "sign_flip_filtered", "nis_mean", "ratio_max", "raw_ratio_max")


def reward_curve(run):
    """(steps, rewards) at the steps where the run generated."""
    rows = [row for row in run["steps"] if "reward" in row]
    return [row["step"] for row in rows], [row["reward"] for row in rows]


def moving_average(values, window=SMOOTHING):
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def summarize_run(run, threshold):
    steps, rewards = reward_curve(run)
    smooth = moving_average(rewards)
    final_count = max(SMOOTHING, math.ceil(FINAL_FRACTION * len(rewards)))
    reached = next((step for step, value in zip(steps, smooth) if value >= threshold), None)
    stale = [row for row in run["steps"] if row.get("stale") == 1.0]
    grad_norms = [row["grad_norm"] for row in run["steps"] if "grad_norm" in row]
    summary = {
        "final_reward": statistics.fmean(rewards[-final_count:]) if rewards else float("nan"),
        "peak_reward": max(smooth) if smooth else float("nan"),
        "steps_to_threshold": reached,
        "grad_norm_median": statistics.median(grad_norms) if grad_norms else float("nan"),
        "grad_norm_max": max(grad_norms) if grad_norms else float("nan"),
        "nonfinite_steps": run["nonfinite_steps"],
        "stale_fraction": len(stale) / max(1, len(run["steps"])),
    }
    summary["drop_from_peak"] = summary["peak_reward"] - summary["final_reward"]
    for key in STALE_KEYS:
        values = [row[key] for row in stale if key in row]
        summary[f"stale_{key}"] = statistics.fmean(values) if values else None
    return summary


def summarize(runs, threshold):
    """Per method: each summary value's mean and spread over seeds, and the seeds' own values."""
    by_method = {}
    for run in runs:
        run["summary"] = summarize_run(run, threshold)
        by_method.setdefault(run["method"], []).append(run)
    out = {}
    for method, group in by_method.items():
        entry = {"seeds": [run["seed"] for run in group], "seconds": [run["seconds"] for run in group]}
        for key in group[0]["summary"]:
            values = [run["summary"][key] for run in group]
            numbers = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            entry[key] = {
                "values": values,
                "mean": statistics.fmean(numbers) if numbers else None,
                "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0 if numbers else None,
            }
        reached = [v for v in entry["steps_to_threshold"]["values"] if v is not None]
        entry["steps_to_threshold"]["median"] = statistics.median(reached) if reached else None
        entry["steps_to_threshold"]["reached"] = f"{len(reached)}/{len(group)}"
        fits = [run["noise_fit"] for run in group if "noise_fit" in run]
        if fits:
            entry["noise_fit"] = fits
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
        ("non-finite", lambda e: str(sum(e["nonfinite_steps"]["values"]))),
        ("s / run", lambda e: f"{statistics.fmean(e['seconds']):.0f}"),
    ]
    lines = ["| method | " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for method, entry in summary.items():
        lines.append(f"| {method} | " + " | ".join(cell(entry) for _, cell in columns) + " |")
    for method, entry in summary.items():
        for fit in entry.get("noise_fit", []):
            lines.append(
                f"{method}: fit_noise on the first stale micro-batch ({fit['num_tokens']} tokens): Q/R = {fit['ratio']:.3g}, "
                f"R = {fit['r']:.3g}, Q = {fit['q']:.3g}, drift evidence {fit['drift_evidence']:.1f} nats"
                + (f", at the {fit['at_boundary']} end of the range" if fit["at_boundary"] else "")
            )
    return "\n".join(lines)
