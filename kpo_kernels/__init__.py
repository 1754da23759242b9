"""Exact, fused Kalman Policy Optimization (KPO) losses for RL training of language models."""

from .api import KPOLoss, kalman_filter, kalman_gains, kpo_loss, prepare
from .backends import Backend, TorchBackend, TritonBackend
from .noise import NoiseFit, fit_noise
from .options import AGG_MODES, MASK_MODES, METRIC_NAMES
from .tables import PinnedTables, release_tables

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "Backend",
    "KPOLoss",
    "MASK_MODES",
    "METRIC_NAMES",
    "NoiseFit",
    "PinnedTables",
    "TorchBackend",
    "TritonBackend",
    "fit_noise",
    "kalman_filter",
    "kalman_gains",
    "kpo_loss",
    "prepare",
    "release_tables",
]
