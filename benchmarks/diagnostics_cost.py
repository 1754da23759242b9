"""CPU cost of the diagnostic metrics and of fit_noise (issue 10), one process per checkout.

    python benchmarks/diagnostics_cost.py [--checkout PATH] [--repeats N] [--fit]

Times forward + backward of `kpo_loss` (torch backend, float32, the synthetic 64 x 4096 batch of
benchmarks/data.py) with the package of PATH (default: this checkout), so that the parent
commit (without the metrics) can be timed by pointing PATH at a checkout of it; with --fit also
`fit_noise` on the same batch's log-ratios. Prints one JSON line of medians and quartiles.
Run the two checkouts alternately, several times, on a quiet machine.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--fit", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout))
    here = str(Path(__file__).resolve().parents[1])
    import torch

    import kpo_kernels

    sys.path.insert(0, here)
    from kpo_kernels.bench.data import rl_batch

    torch.set_num_threads(1)
    batch = rl_batch(64, 4096)

    def step():
        log_prob = batch["log_prob"].clone().requires_grad_()
        loss, metrics = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], backend="torch")
        loss.backward()
        return metrics

    step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    out = {"package": kpo_kernels.__file__, "metrics": len(kpo_kernels.METRIC_NAMES), "step_s": _summary(times)}
    if args.fit:
        z = (batch["log_prob"] - batch["old_log_prob"])
        fits = []
        for _ in range(3):
            start = time.perf_counter()
            fit = kpo_kernels.fit_noise(z, batch["mask"])
            fits.append(time.perf_counter() - start)
        out["fit_s"] = _summary(fits)
        out["fit_evaluations"] = fit.evaluations
    print(json.dumps(out))


def _summary(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


if __name__ == "__main__":
    main()
