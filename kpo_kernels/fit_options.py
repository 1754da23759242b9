"""Checks of the noise-fitting options (`NoiseTracker`, `estimate_noise`, the verl and TRL
configs): every error names the argument, at construction."""

import math

from .gains import MIN_RATIO
from .validation import _number, check_count

# "off": fixed Q and R (the default); "per_generation": fitted on the first stale micro-batch of
# each rollout batch, then fixed; "per_step": fitted on each micro-batch before its loss.
FIT_MODES = ("off", "per_generation", "per_step")


def check_fit_mode(name, value):
    """One of FIT_MODES; TypeError / ValueError naming `name` otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {FIT_MODES}, got {type(value).__name__} {value!r}")
    if value not in FIT_MODES:
        raise ValueError(f"{name} must be one of {FIT_MODES}, got {value!r}")
    return value


def check_fit_range(name, value):
    """(lowest, highest) ratios Q / R with MIN_RATIO <= lowest < highest < inf."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair (lowest, highest) of ratios Q / R, got {value!r}")
    low, high = (_number(name, item) for item in value)
    if not MIN_RATIO <= low < high:
        raise ValueError(f"{name} must satisfy {MIN_RATIO:.4g} <= lowest < highest, got {tuple(value)!r}")
    return low, high


def check_min_tokens(name, value):
    """An int >= 2 (fewer tokens say nothing about two variances)."""
    return check_count(name, value, minimum=2)


# The per-step fit's default budget: positions (rows x longest sequence) transformed per micro-batch.
# A larger micro-batch is fitted on every k-th sequence, k = ceil(positions / budget): at 64 x 4096
# every 8th sequence, whose likelihood stays within 4e-5 nats per token of the full fit's maximum
# (R within 1.2%); fit + loss is then about 1.7-1.8 plain losses on a CPU, and at most about 1.9
# when a step's ratio needs new tables (benchmarks/RESULTS.md; the goal is 2). Twice the budget
# improves only R (to within 0.5%), at about 2.0-2.1 plain losses.
PER_STEP_MAX_TOKENS = 32768


def check_max_tokens(name, value):
    """None (every sequence) or an int >= 2."""
    return None if value is None else check_count(name, value, minimum=2)


def check_fit_prior(name, p0_ratio, mode):
    """A fit keeps P0 / R fixed; the cheap estimator has a closed form only for 0 and inf."""
    if mode != "off" and p0_ratio not in (0.0, math.inf):
        raise ValueError(
            f"{name}: fitting Q and R (kalman_fit={mode!r}) needs a prior variance P0 of 0 or inf, got P0 / R = {p0_ratio}"
        )
