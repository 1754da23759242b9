"""The figure of `--plot`: six panels over optimizer steps, one colour per method.

Reward: the mean over seeds of each seed's moving average (the generations of the last 40
steps), with the band from the lowest to the highest seed. The other panels: the median over seeds, smoothed over 20
steps; the ratio panels use only stale micro-batches (generated under earlier weights).
"""

import statistics

from .report import SMOOTHING_STEPS, moving_average, smoothed_reward

COLOURS = {
    "grpo": "tab:blue",
    "kpo-paper": "tab:orange",
    "kpo-fit": "tab:green",
    "kpo-refit": "tab:red",
    "grpo-onpolicy": "tab:gray",
    "kpo-per-generation": "tab:purple",
    "kpo-per-step": "tab:brown",
    "grpo-paper-clip": "tab:cyan",
    "kpo-per-step-wide-clip": "tab:olive",
}
STEP_WINDOW = 20


def _by_method(runs):
    groups = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    return groups


def _median_curve(group, key, stale_only):
    """(steps, smoothed median over seeds) of a per-step value."""
    per_step = {}
    for run in group:
        for row in run["steps"]:
            if key in row and (not stale_only or row.get("stale") == 1.0):
                per_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(per_step)
    return steps, moving_average(steps, [statistics.median(per_step[s]) for s in steps], STEP_WINDOW)


def plot(runs, path, *, title, threshold):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_method(runs)
    figure, axes = plt.subplots(2, 3, figsize=(16, 9))
    (reward_ax, grad_ax, clip_ax), (z_ax, flip_ax, nis_ax) = axes
    for method, group in groups.items():
        colour = COLOURS.get(method)
        curves = [smoothed_reward(run) for run in group]
        steps = curves[0][0]
        smooth = [rewards for _, rewards in curves]
        length = min(len(s) for s in smooth)
        steps, smooth = steps[:length], [s[:length] for s in smooth]
        mean = [statistics.fmean(values) for values in zip(*smooth)]
        reward_ax.plot(steps, mean, color=colour, label=f"{method} ({len(group)} seed{'s' if len(group) > 1 else ''})")
        if len(group) > 1:
            reward_ax.fill_between(steps, [min(v) for v in zip(*smooth)], [max(v) for v in zip(*smooth)], color=colour, alpha=0.2)
        panels = [
            (grad_ax, "grad_norm", False, method, "-"),
            (clip_ax, "clipfrac", True, method, "-"),
            (z_ax, "raw_abs_log_mean", True, method, "-"),
            (flip_ax, "sign_flip_raw", True, f"{method} raw", "-"),
            (flip_ax, "sign_flip_filtered", True, f"{method} filtered", "--"),
            (nis_ax, "nis_mean", True, method, "-"),
        ]
        for ax, key, stale_only, label, style in panels:
            steps, values = _median_curve(group, key, stale_only)
            if steps:  # an on-policy run has no stale micro-batch; GRPO no filtered values
                ax.plot(steps, values, color=colour, linestyle=style, label=label)
    reward_ax.axhline(threshold, color="black", linewidth=0.5, linestyle=":")
    reward_ax.set(title=f"reward (moving average over {SMOOTHING_STEPS} steps; band: seed range)", ylabel="reward")
    grad_ax.set(title="gradient norm before clipping (median over seeds)", yscale="log")
    clip_ax.set(title="clipped fraction of tokens (stale micro-batches)")
    z_ax.set(title="mean |log ratio| of raw token ratios (stale)", yscale="log")
    flip_ax.set(title="sign flips of consecutive log ratios (stale)", ylim=(0, 1))
    nis_ax.set(title="KPO normalised innovation squared (stale; 1 = Q, R fit)", yscale="log")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
