"""The "noise" section of `python -m kpo_kernels`: fit Q and R on a batch whose generator is
known, and show the filter's diagnostics at the paper's noise and at the fitted one.

`noise_section(batch, generator=...)` takes the batch (log_prob, old_log_prob, advantages, mask)
and a one-line description of what generated it, with the generator's Q, R and P0 in the
random-walk-plus-white-noise terms of `fit_noise`; it prints the section and returns its
numbers. It depends on nothing outside the package.
"""

import math
import sys
import time
from dataclasses import dataclass

import torch

from .api import kpo_loss
from .noise import fit_noise

PAPER = {"q": 1e-6, "r": 1.0}  # the paper's Q and R
ROWS = (
    ("nis_mean", "mean e^2 / S (1 when Q, R fit)"),
    ("log_likelihood", "innovation log-likelihood / token"),
    ("sign_flip_raw", "raw log-ratio sign flips / pair"),
    ("sign_flip_filtered", "filtered log-ratio sign flips / pair"),
    ("clipfrac_high", "clipped above 1 + clip_high"),
    ("clipfrac_low", "clipped below 1 - clip_low"),
    ("capfrac", "filtered log-ratio above the cap"),
)


@dataclass(frozen=True)
class Generator:
    """What generated a batch, in the model's terms: x_t = x_{t-1} + N(0, q), z_t = x_t + N(0, r),
    x_0 ~ N(0, p0)."""

    description: str
    q: float
    r: float
    p0: float = 0.0


def noise_section(batch, generator, *, out=None):
    """Print the section for `batch` (a dict of kpo_loss's tensors, (B, T)); returns a dict with
    the fits ("fit_p0_0", "fit_diffuse": NoiseFit), the seconds of the first fit, and the
    diagnostics ("paper", "fitted": metric name -> float)."""
    out = out or sys.stdout
    mask = batch["mask"]
    z = (batch["log_prob"].detach().double() - batch["old_log_prob"].detach().double())

    start = time.perf_counter()
    fit = fit_noise(z, mask)
    seconds = time.perf_counter() - start
    diffuse = fit_noise(z, mask, p0=math.inf)

    def diagnostics(q, r, p0=0.0):
        _, metrics = kpo_loss(batch["log_prob"], batch["old_log_prob"], batch["advantages"], mask, q=q, r=r, p0=p0)
        return {name: float(metrics[name]) for name, _ in ROWS}

    paper = diagnostics(**PAPER)
    fitted = diagnostics(fit.q, fit.r)
    tokens = int(mask.sum()) if mask is not None else z.numel()

    def ratio_text(value, fit_result):
        if fit_result.at_boundary is not None:
            return f"{value:.3g} (the {fit_result.at_boundary} end of q_range)"
        return f"{value:.3g}"

    print(f"Noise: fit_noise on the synthetic batch ({tuple(z.shape)[0]} x {tuple(z.shape)[1]}, {tokens} valid tokens)", file=out)
    print(f"  generator: {generator.description}", file=out)
    print(f"             as random walk + white noise: Q = {generator.q:.3g}, R = {generator.r:.3g}, P0 = {generator.p0:.3g}", file=out)
    for label, result in (("p0 = 0 (the paper's prior)", fit), ("p0 = inf (diffuse prior)", diffuse)):
        print(
            f"  fit, {label}: Q/R = {ratio_text(result.ratio, result)}, Q = {result.q:.3g}, R = {result.r:.4g} "
            f"({result.r / generator.r - 1:+.1%} vs the generator's), drift evidence {result.drift_evidence:.3g} nats, "
            f"{result.evaluations} filter passes",
            file=out,
        )
    print(f"  (first fit in {seconds:.2f} s on {z.device.type}. R is the sample variance of the white part: heavy-tailed "
          "spikes make it vary by several % between batches,\n   and P0 > 0 with Q = 0 reads as a small Q under p0 = 0, as no "
          "drift under a diffuse prior.)", file=out)
    print(f"  {'diagnostic':21s} {'paper q=1e-6, r=1':>18s} {'fitted (p0 = 0)':>16s}   meaning", file=out)
    for name, meaning in ROWS:
        print(f"  {name:21s} {paper[name]:18.4g} {fitted[name]:16.4g}   {meaning}", file=out)
    print(file=out, flush=True)
    return {"fit_p0_0": fit, "fit_diffuse": diffuse, "seconds": seconds, "paper": paper, "fitted": fitted}


__all__ = ["Generator", "noise_section"]
