"""Cost of the per-step noise fit beside the plain loss (issue 17): side by side, in one run.

    python benchmarks/fit_cost.py [--steps N] [--warmup N] [--threads T] [--rows B] [--length T]
                                  [--max-tokens N] [--vary-length] [--fit-noise]

A stream of fresh micro-batches, as training sees them: step i draws its own synthetic RL batch
(kpo_kernels.bench.data.rl_batch, seed 1000 + i; 64 x 4096 float32 by default, untimed), whose
log-ratios differ from step to step, so each step's fit finds its own Q and R (with --vary-length
its width too, drawn from 0.9 T..T: the CPU scan plans are per width). On each batch, in
turn (CPU torch backend):
  (a) "loss": `kpo_loss` forward + backward at a fixed Q and R (the first fit's: its tables cached);
  (b) "fit+loss": what `NoiseTracker("per_step")` adds before it, with its default budget
      (`PER_STEP_MAX_TOKENS` positions: every k-th sequence of a larger micro-batch): the log-ratios,
      `estimate_noise`, its host read, then the same forward + backward at the tracker's Q and R.
      The tracker rounds Q / R to a grid (tracker.round_fitted), so a step's loss builds new tables
      only for a ratio no earlier step met: `new ratios` counts them over the timed steps;
  (c) "fit+loss, new tables": the same fit, then the loss at a ratio new to the process (the
      tracker's Q times 1 + 1e-9 n at the n-th call): the worst case, tables built at every step;
  (d) "exact fit+loss": (b) with `max_tokens=None` (every sequence);
  (e) "fit": the fit alone (the tracker of (b) on a copy);
  (f) with --max-tokens N, "capped fit+loss" at that budget;
  (g) with --fit-noise, `fit_noise` (44 filter passes) for reference.
The first `--warmup` steps run everything untimed (the caches a long run has). Prints one JSON
line: medians and quartiles (seconds), the ratios of medians to (a), whose bound for (b) is 2
(the fit costs at most one plain loss), and each step's (b) / (a).
"""

import argparse
import itertools
import json
import statistics
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="timed steps, each on a fresh batch")
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps first, each on a fresh batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=0, help="also time NoiseTracker(max_tokens=N) (0: not)")
    parser.add_argument("--vary-length", action="store_true",
                        help="each step's batch padded to its own width, drawn from 0.9 T..T (as trainers pad to the longest)")
    parser.add_argument("--fit-noise", action="store_true", help="also time fit_noise at each step")
    args = parser.parse_args()
    import torch

    import kpo_kernels
    from kpo_kernels import tables
    from kpo_kernels.bench.data import rl_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    trackers = {"": kpo_kernels.NoiseTracker("per_step"), "exact ": kpo_kernels.NoiseTracker("per_step", max_tokens=None)}
    if args.max_tokens:
        trackers["capped "] = kpo_kernels.NoiseTracker("per_step", max_tokens=args.max_tokens)
    alone = kpo_kernels.NoiseTracker("per_step")
    worst = kpo_kernels.NoiseTracker("per_step")
    batch = rl_batch(args.rows, args.length, seed=999)

    def loss_step(options):
        log_prob = batch["log_prob"].clone().requires_grad_()
        loss, _ = kpo_kernels.kpo_loss(
            log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], backend="torch", **options
        )
        loss.backward()

    def fit(tracker):
        return tracker(batch["log_prob"] - batch["old_log_prob"], batch["mask"])

    calls = itertools.count(1)

    def fit_and_new_tables():
        options = dict(fit(worst))
        options["q"] *= 1.0 + 1e-9 * next(calls)
        loss_step(options)

    fixed = dict(fit(trackers[""]))
    steps = [("loss", lambda: loss_step(fixed))]
    for name, tracker in trackers.items():
        steps.append((f"{name}fit+loss", lambda tracker=tracker: loss_step(fit(tracker))))
    steps.append(("fit+loss, new tables", fit_and_new_tables))
    steps.append(("fit", lambda: fit(alone)))
    if args.fit_noise:
        steps.append(("fit_noise", lambda: kpo_kernels.fit_noise(batch["log_prob"] - batch["old_log_prob"], batch["mask"])))
    times = {name: [] for name, _ in steps}
    new_ratios = 0
    widths = torch.Generator().manual_seed(7)
    for step in range(args.warmup + args.steps):
        length = args.length
        if args.vary_length:
            length = int(torch.randint(int(0.9 * args.length), args.length + 1, (), generator=widths))
        batch = rl_batch(args.rows, length, seed=1000 + step)
        timed = step >= args.warmup
        for name, run in steps:
            before = tables.cache.builds
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if timed:
                times[name].append(elapsed)
                new_ratios += name == "fit+loss" and tables.cache.builds > before
    summary = {
        name: {"median": statistics.median(values), "quartiles": statistics.quantiles(values, n=4)[::2]}
        for name, values in times.items()
    }
    loss = summary["loss"]["median"]
    summary["ratios"] = {name: summary[name]["median"] / loss for name in times if name != "loss"}
    summary["fit+loss per step"] = sorted(b / a for a, b in zip(times["loss"], times["fit+loss"]))
    summary["new ratios"] = f"{new_ratios} of {args.steps} timed fitted steps built tables"
    summary["shape"] = [args.rows, args.length] + (["0.9 T..T"] if args.vary_length else [])
    summary["threads"] = torch.get_num_threads()
    summary["fitted"] = {name: {k: tracker.metrics[k] for k in ("kalman_q", "kalman_r", "fit_status", "at_boundary")}
                         for name, tracker in trackers.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
