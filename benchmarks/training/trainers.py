"""The trainers compared, each TRL's own trainer with an observer of its importance ratios.

- `grpo`: TRL's `GRPOTrainer` with TRL's `grpo` loss (token ratio exp(z), clip 0.2).
- `kpo-paper`: `KPOGRPOTrainer` with the paper's filter and clip range (q = 1e-6, R = 1,
  3e-4 / 4e-4).
- `kpo-fit`: `KPOGRPOTrainer` whose Q and R are `fit_noise` of the run's first stale log-ratios
  (the first micro-batch after the first optimizer step), with the paper's clip range. Before the
  fit every micro-batch is on-policy, z = 0, and the filter's output is 0 whatever Q and R are, so
  this is the run that would have used the fitted values from the start.
- `kpo-refit`: as `kpo-fit`, refitted on the first stale micro-batch of every generation (the
  fit's cost: a few dozen filter passes over one micro-batch, once per generation).
- `kpo-per-generation`, `kpo-per-step`: `KPOGRPOTrainer` with the product's own fit,
  `KPOGRPOConfig(kalman_fit="per_generation" | "per_step")` as a TRL user sets it, and the
  paper's clip range (q = 1e-6, R = 1 until the first fit).
- `grpo-onpolicy`: TRL's `GRPOTrainer` with one optimizer step per generation (no stale ratios),
  the reference for what the off-policy schedule costs.

Controls:
- `grpo-paper-clip`: TRL's `GRPOTrainer` and `grpo` loss with the paper's clip range
  (epsilon 3e-4, epsilon_high 4e-4) and no filter: what the clip range does without the filter.
- `kpo-per-step-wide-clip`: `kpo-per-step` with TRL's default clip range (0.2 / 0.2): what the
  filter does without the paper's clip range.

The observer does not change any loss: it keeps the per-token log-probs that the trainer computes
for its loss and logs statistics of z = log_prob - old_log_prob under `ratio/`, from the same
code for every method; `ratio/stale` is 1 on micro-batches generated under earlier weights.
KPO's filtered statistics and the fit's values are KPOGRPOTrainer's own `kpo/` metrics. The fit's
cost is timed around KPOGRPOTrainer's `noise_tracker` call (`bench/fit_seconds`, 0 on steps
without a fit), beside the time of the whole loss call (`bench/loss_seconds`: the policy's
forward pass, the fit and the loss).
"""

import time
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from kpo_kernels import fit_noise
from kpo_kernels.integrations.trl import KPOGRPOConfig, KPOGRPOTrainer

PAPER_CLIP = {"epsilon": 3e-4, "epsilon_high": 4e-4}
PAPER = {"kalman_q": 1e-6, "kalman_r": 1.0, **PAPER_CLIP}
TRL_CLIP = {"epsilon": 0.2, "epsilon_high": 0.2}  # GRPOConfig's defaults


@dataclass(frozen=True)
class Method:
    trainer: type
    config: type
    options: dict = field(default_factory=dict)
    on_policy: bool = False  # one optimizer step per generation, whatever the schedule
    own_clip: bool = False  # the clip range is part of the method: --kpo-clip leaves it alone


class RatioObserver:
    """Mixin for a GRPOTrainer: logs statistics of the log-ratios its loss sees (see module)."""

    _observing = False
    _observed = None
    _generated_at = -1

    def _generate_and_score_completions(self, inputs):
        self._generated_at = self.state.global_step
        return super()._generate_and_score_completions(inputs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._observing:
            self._observed = result[0].detach()
            self._before_loss(self._observed)
        return result

    def _compute_loss(self, model, inputs):
        self._observing, self._inputs = True, inputs
        start = time.perf_counter()
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._observing = False
        seconds = time.perf_counter() - start
        z, mask = self._log_ratio(self._observed)
        self._observed, self._inputs = None, None
        mode = "train" if self.model.training else "eval"
        for name, value in ratio_statistics(z, mask).items():
            self._metrics[mode][f"ratio/{name}"].append(value)
        self._metrics[mode]["ratio/stale"].append(float(self._stale))
        self._metrics[mode]["bench/loss_seconds"].append(seconds)
        tracker = getattr(self, "noise_tracker", None)
        if isinstance(tracker, TimedTracker):
            self._metrics[mode]["bench/fit_seconds"].append(tracker.take())
        return loss

    def _before_loss(self, log_prob):
        """Called with the detached log-probs of a loss micro-batch before the loss is computed."""

    @property
    def _stale(self):
        """Whether the micro-batch in flight was generated under earlier weights."""
        return self.state.global_step != self._generated_at

    def _log_ratio(self, log_prob):
        """z = log_prob - old_log_prob and the loss's mask (tool output masked, as the loss
        masks it) of the micro-batch in flight; z = 0 where TRL left the old log-probs out."""
        old = self._inputs.get("old_per_token_logps")
        mask = self._inputs["completion_mask"]
        if "tool_mask" in self._inputs:
            mask = mask * self._inputs["tool_mask"]
        return log_prob - (log_prob if old is None else old), mask


def ratio_statistics(z, mask):
    """Per-token statistics of the log-ratios z over the valid tokens (mask 1), as floats: the
    mean |z|, the largest |z|, the mean and max of exp(z), and the fraction of consecutive valid
    pairs of a sequence whose z change sign (KPO's `sign_flip_raw`)."""
    valid = mask.bool()
    values = z[valid].double()
    if values.numel() == 0:
        return {}
    # The previous valid token of each valid token, per row: a cumulative max of the valid indices.
    positions = torch.arange(z.shape[-1], device=z.device).expand_as(z)
    last = torch.where(valid, positions, -1).cummax(-1).values
    previous = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=-1)
    paired = valid & (previous >= 0)
    z_previous = z.gather(-1, previous.clamp(min=0))
    flips = (z_previous * z < 0) & paired
    stats = {
        "abs_log_mean": values.abs().mean(),
        "abs_log_max": values.abs().max(),
        "raw_mean": values.exp().mean(),
        "raw_max": values.exp().max(),
        "sign_flip_raw": flips.sum().double() / paired.sum().clamp(min=1),
    }
    return {name: float(value) for name, value in stats.items()}


class ObservedGRPOTrainer(RatioObserver, GRPOTrainer):
    """TRL's GRPOTrainer, unchanged but for the ratio observer."""


class TimedTracker:
    """A NoiseTracker with a wall-clock timer around each call (CPU: the fit's host read makes
    it synchronous on a GPU too); `take()` returns the seconds since the last `take()`."""

    def __init__(self, tracker):
        self._tracker, self._seconds = tracker, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._tracker(*args, **kwargs)
        finally:
            self._seconds += time.perf_counter() - start

    def take(self):
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def __getattr__(self, name):
        return getattr(self._tracker, name)


class ObservedKPOGRPOTrainer(RatioObserver, KPOGRPOTrainer):
    """KPOGRPOTrainer with the ratio observer, and a timer around its noise tracker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.noise_tracker is not None:
            self.noise_tracker = TimedTracker(self.noise_tracker)


class FittedKPOGRPOTrainer(ObservedKPOGRPOTrainer):
    """KPOGRPOTrainer whose Q and R are fitted (`fit_noise`) to the first stale micro-batch, and
    refitted on the first stale micro-batch of every generation when `refit`. The fit reaches
    the loss of the micro-batch it was fitted on."""

    refit = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_fits = []  # (optimizer step, NoiseFit)
        self._fitted_generation = None

    def _before_loss(self, log_prob):
        fitted_this_generation = self._fitted_generation == self._generated_at
        if not self._stale or fitted_this_generation or (self.noise_fits and not self.refit):
            return
        z, mask = self._log_ratio(log_prob)
        args = self.args
        fit = fit_noise(z, mask, mask_mode=args.mask_mode, p0=args.kalman_p0 / args.kalman_r, x0=args.kalman_x0)
        self.noise_fits.append((self.state.global_step, fit))
        self._fitted_generation = self._generated_at
        self._kpo_options.update(q=fit.q, r=fit.r, p0=fit.p0)


class RefittedKPOGRPOTrainer(FittedKPOGRPOTrainer):
    refit = True


METHODS = {
    "grpo": Method(ObservedGRPOTrainer, GRPOConfig),
    "kpo-paper": Method(ObservedKPOGRPOTrainer, KPOGRPOConfig, PAPER),
    "kpo-fit": Method(FittedKPOGRPOTrainer, KPOGRPOConfig, PAPER),
    "kpo-refit": Method(RefittedKPOGRPOTrainer, KPOGRPOConfig, PAPER),
    "kpo-per-generation": Method(ObservedKPOGRPOTrainer, KPOGRPOConfig, {**PAPER, "kalman_fit": "per_generation"}),
    "kpo-per-step": Method(ObservedKPOGRPOTrainer, KPOGRPOConfig, {**PAPER, "kalman_fit": "per_step"}),
    "grpo-onpolicy": Method(ObservedGRPOTrainer, GRPOConfig, on_policy=True),
    # Controls: the paper's clip range without the filter; the per-step fit without that clip range.
    "grpo-paper-clip": Method(ObservedGRPOTrainer, GRPOConfig, PAPER_CLIP, own_clip=True),
    "kpo-per-step-wide-clip": Method(
        ObservedKPOGRPOTrainer, KPOGRPOConfig, {**PAPER, **TRL_CLIP, "kalman_fit": "per_step"}, own_clip=True
    ),
}
