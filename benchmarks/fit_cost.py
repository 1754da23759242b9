"""Cost of the per-step noise fit beside the plain loss (issue 17): side by side, in one run.

    python benchmarks/fit_cost.py [--repeats N] [--threads T] [--rows B] [--length T] [--max-tokens N] [--fit-noise]

On the synthetic RL batch of kpo_kernels.bench.data (64 x 4096 by default, float32, CPU torch
backend), alternates within each repeat:
  (a) "loss": `kpo_loss` forward + backward at fixed Q and R (those the fit finds);
  (b) "fit+loss": what `NoiseTracker("per_step")` adds before it, with its default budget
      (`PER_STEP_MAX_TOKENS` positions: every k-th sequence of a larger micro-batch), i.e. the
      log-ratios, `estimate_noise`, its host read, then the same forward + backward at a Q new to
      the process (the fitted one times 1 + 1e-9 n at the n-th call: in training each step's fit
      differs, so its gain tables are built anew, where (a) finds its own cached);
  (c) "exact fit+loss": the same with `max_tokens=None` (every sequence);
  (d) "fit" and "exact fit": (b) and (c) without the loss;
  (e) with --max-tokens N, "capped fit+loss" at that budget;
  (f) with --fit-noise, `fit_noise` (44 filter passes) for reference. It is off by default: its
      large allocations between the steps leave the next step's caches cold.
Prints one JSON line: medians and quartiles (seconds) and the ratios of medians to (a), whose
bound for (b) is 2 (the fit costs at most one plain loss).
"""

import argparse
import itertools
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
    parser.add_argument("--fit-noise", action="store_true", help="also time fit_noise once per repeat")
    args = parser.parse_args()
    import torch

    import kpo_kernels
    from kpo_kernels.bench.data import rl_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    batch = rl_batch(args.rows, args.length)
    trackers = {"": kpo_kernels.NoiseTracker("per_step"), "exact ": kpo_kernels.NoiseTracker("per_step", max_tokens=None)}
    if args.max_tokens:
        trackers["capped "] = kpo_kernels.NoiseTracker("per_step", max_tokens=args.max_tokens)

    def loss_step(options):
        log_prob = batch["log_prob"].clone().requires_grad_()
        loss, _ = kpo_kernels.kpo_loss(
            log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], backend="torch", **options
        )
        loss.backward()

    def fit(tracker):
        return tracker(batch["log_prob"] - batch["old_log_prob"], batch["mask"])

    calls = itertools.count(1)

    def fit_and_loss(tracker):
        options = dict(fit(tracker))
        options["q"] *= 1.0 + 1e-9 * next(calls)
        loss_step(options)

    steps = [("loss", lambda: loss_step(fixed))]
    for name, tracker in trackers.items():
        steps.append((f"{name}fit+loss", lambda tracker=tracker: fit_and_loss(tracker)))
        if name != "capped ":
            steps.append((f"{name}fit", lambda tracker=tracker: fit(tracker)))
    if args.fit_noise:
        steps.append(("fit_noise", lambda: kpo_kernels.fit_noise(batch["log_prob"] - batch["old_log_prob"], batch["mask"])))
    fixed = dict(fit(trackers[""]))  # the plain loss runs at the fitted Q and R (the same gain tables)
    for _, run in steps:  # warm-up
        run()
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
    loss = summary["loss"]["median"]
    summary["ratios"] = {name: summary[name]["median"] / loss for name in times if name != "loss"}
    summary["fit+loss per repeat"] = sorted(b / a for a, b in zip(times["loss"], times["fit+loss"]))
    summary["shape"] = [args.rows, args.length]
    summary["threads"] = torch.get_num_threads()
    summary["fitted"] = {name: {k: tracker.metrics[k] for k in ("kalman_q", "kalman_r", "fit_status", "at_boundary")}
                         for name, tracker in trackers.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
