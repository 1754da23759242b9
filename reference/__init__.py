"""Sequential pure-PyTorch definition of KPO: the oracle of the tests and a benchmark baseline.

Shares no code with `kpo_kernels`; the mathematics is described in docs/math.md.
"""

from .diagnostics import diagnostics, innovation_log_likelihood, innovations, profile
from .filter import kalman_filter, kalman_gains
from .loss import AGG_MODES, aggregate, kpo_loss

__all__ = [
    "AGG_MODES",
    "aggregate",
    "diagnostics",
    "innovation_log_likelihood",
    "innovations",
    "kalman_filter",
    "kalman_gains",
    "kpo_loss",
    "profile",
]
