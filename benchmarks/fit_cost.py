"""Cost of the per-step noise fit beside the plain loss (issue 17): side by side, in one run.

    python benchmarks/fit_cost.py [--repeats N] [--threads T] [--rows B] [--length T] [--max-tokens N]

On the synthetic RL batch of kpo_kernels.bench.data (64 x 4096 by default, float32, CPU torch
backend), alternates within each repeat: (a) `kpo_loss` forward + backward at fixed Q and R (those the fit finds), and
(b) what `NoiseTracker("per_step")` adds before it, `estimate_noise` on the detached log-ratios
and its host read, followed by the same forward + backward at the fitted Q and R, and (c) the fit
alone (the tracker call), and with --max-tokens (d) the same as (b) with `NoiseTracker(max_tokens=N)`
(every k-th sequence fitted). Also times `fit_noise` once per repeat for reference. Prints one
JSON line: medians and quartiles (seconds), the ratio (b) / (a), whose bound is 2 (the fit costs
at most one plain loss), (c) / (a), and (d) / (a).
"""

import argparse
import json
import statistics
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=0, help="also time NoiseTracker(max_tokens=N) (0: not)")
    args = parser.parse_args()
    import torch

    import kpo_kernels
    from kpo_kernels.bench.data import rl_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    batch = rl_batch(args.rows, args.length)
    tracker = kpo_kernels.NoiseTracker("per_step")
    capped = kpo_kernels.NoiseTracker("per_step", max_tokens=args.max_tokens or None)

    def loss_step(options):
        log_prob = batch["log_prob"].clone().requires_grad_()
        loss, _ = kpo_kernels.kpo_loss(
            log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], backend="torch", **options
        )
        loss.backward()

    def fitted_step():
        z = batch["log_prob"] - batch["old_log_prob"]
        loss_step(tracker(z, batch["mask"]))

    def capped_step():
        z = batch["log_prob"] - batch["old_log_prob"]
        loss_step(capped(z, batch["mask"]))

    def fit_noise():
        kpo_kernels.fit_noise(batch["log_prob"] - batch["old_log_prob"], batch["mask"])

    fitted_step()  # warm-up; the plain loss then runs at the fitted Q and R (the same gain tables)
    fixed = dict(tracker.options)
    loss_step(fixed)
    def fit():
        tracker(batch["log_prob"] - batch["old_log_prob"], batch["mask"])

    steps = [("loss", lambda: loss_step(fixed)), ("fit+loss", fitted_step), ("fit", fit), ("fit_noise", fit_noise)]
    if args.max_tokens:
        capped_step()
        steps.insert(2, ("capped fit+loss", capped_step))
    times = {name: [] for name, _ in steps}
    for _ in range(args.repeats):
        for name, run in steps:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    summary = {
        name: {"median": statistics.median(values), "quartiles": statistics.quantiles(values, n=4)[::2]}
        for name, values in times.items()
    }
    summary["ratio_median"] = summary["fit+loss"]["median"] / summary["loss"]["median"]
    summary["ratios_per_repeat"] = sorted(b / a for a, b in zip(times["loss"], times["fit+loss"]))
    summary["fit_over_loss_median"] = summary["fit"]["median"] / summary["loss"]["median"]
    if args.max_tokens:
        summary["capped_ratio_median"] = summary["capped fit+loss"]["median"] / summary["loss"]["median"]
        summary["capped_ratios_per_repeat"] = sorted(b / a for a, b in zip(times["loss"], times["capped fit+loss"]))
        summary["capped_fitted"] = {k: capped.metrics[k] for k in ("kalman_q", "kalman_r")}
    summary["shape"] = [args.rows, args.length]
    summary["threads"] = torch.get_num_threads()
    summary["fitted"] = {k: tracker.metrics[k] for k in ("kalman_q", "kalman_r", "fit_status", "at_boundary")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
