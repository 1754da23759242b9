"""Exact, fused Kalman Policy Optimization (KPO) losses for RL training of language models."""

from .api import KPOLoss, kalman_filter, kalman_gains, kpo_loss, prepare
from .backends import Backend, TorchBackend, TritonBackend
from .context_parallel import Pieces, context_parallel_kpo_loss
from .fit_options import FIT_MODES
from .fitting import NoiseEstimate, estimate_noise
from .noise import NoiseFit, fit_noise
from .options import AGG_MODES, DIAGNOSTIC_METRICS, MASK_MODES, METRIC_NAMES, METRIC_SETS
from .state import FilterState
from .tables import PinnedTables, release_tables
from .tracker import NoiseTracker

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "Backend",
    "DIAGNOSTIC_METRICS",
    "FIT_MODES",
    "FilterState",
    "KPOLoss",
    "MASK_MODES",
    "METRIC_NAMES",
    "METRIC_SETS",
    "NoiseEstimate",
    "NoiseFit",
    "NoiseTracker",
    "PinnedTables",
    "Pieces",
    "TorchBackend",
    "TritonBackend",
    "context_parallel_kpo_loss",
    "estimate_noise",
    "fit_noise",
    "kalman_filter",
    "kalman_gains",
    "kpo_loss",
    "prepare",
    "release_tables",
]
