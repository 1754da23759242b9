"""One training run (a method and a seed) through TRL, and the per-step curves it logs."""

import math
import os
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils import logging as transformers_logging

from kpo_kernels.integrations.trl import KPOGRPOConfig

from . import report, task
from .trainers import METHODS

# Logged keys kept in the curves, by the name they get there (a tuple: the first one logged).
CURVE_KEYS = {
    "loss": "loss",
    "grad_norm": "grad_norm",
    "entropy": "entropy",
    "reward": "reward",
    "reward_std": "reward_std",
    "clipfrac": "clip_ratio/region_mean",
    "raw_abs_log_mean": "ratio/abs_log_mean",
    "raw_abs_log_max": "ratio/abs_log_max",
    "raw_ratio_mean": "ratio/raw_mean",
    "raw_ratio_max": "ratio/raw_max",
    "sign_flip_raw": "ratio/sign_flip_raw",
    "stale": "ratio/stale",
    "ratio_mean": "kpo/ratio_mean",
    "ratio_max": "kpo/ratio_max",
    "sign_flip_filtered": "kpo/sign_flip_filtered",
    "nis_mean": "kpo/nis_mean",
    "kpo_sign_flip_raw": "kpo/sign_flip_raw",  # the same as sign_flip_raw (a test checks it)
    "kpo_raw_ratio_max": "kpo/raw_ratio_max",
    # above 1 + epsilon_high with A > 0 / below 1 - epsilon with A < 0 (KPO: the filtered ratio)
    "clipfrac_high": ("kpo/clipfrac_high", "clip_ratio/high_mean"),
    "clipfrac_low": ("kpo/clipfrac_low", "clip_ratio/low_mean"),
    # KPOGRPOTrainer's noise tracker (kalman_fit), and the benchmark's timers (trainers.py)
    "kalman_q": "kpo/kalman_q",
    "kalman_r": "kpo/kalman_r",
    "drift_evidence": "kpo/drift_evidence",
    "at_boundary": "kpo/at_boundary",
    "fit_status": "kpo/fit_status",
    "refit": "kpo/refit",
    "fit_seconds": "bench/fit_seconds",
    "loss_seconds": "bench/loss_seconds",
}


@dataclass(frozen=True)
class Schedule:
    """What every run of a comparison shares. `steps_per_generation` micro-batches of
    `batch_size` completions are generated at once and each is used `num_iterations` times, so a
    generation serves steps_per_generation * num_iterations optimizer steps (gradient
    accumulation 1) and all but the first of them see stale log-ratios."""

    steps: int = 600
    learning_rate: float = 3e-4
    length: int = 64
    batch_size: int = 16
    num_generations: int = 8
    steps_per_generation: int = 4
    num_iterations: int = 2
    strides: tuple = (1,)
    max_grad_norm: float = 1.0
    kpo_clip: tuple = None  # (epsilon, epsilon_high) of the KPO methods; None: the paper's
    delta: float = None  # TRL's two-sided clip bound (KPO: the dual clip), for every method; None: off
    threads: int = 0  # torch threads per run; 0: torch's default

    def __post_init__(self):
        if self.num_iterations < 2 or self.steps_per_generation < 2:
            raise ValueError("the comparison is off-policy: num_iterations and steps_per_generation must be >= 2")
        if self.batch_size % self.num_generations:
            raise ValueError("batch_size must be a multiple of num_generations")


class CurveRecorder(TrainerCallback):
    """Keeps the logged values of every optimizer step (logging_steps=1 and no gradient
    accumulation: each log is one micro-batch, so `stale` is 0 or 1). A metric that TRL logs as
    None (all its values NaN) is kept as NaN."""

    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        row = {"step": state.global_step}
        for name, keys in CURVE_KEYS.items():
            key = next((key for key in ((keys,) if isinstance(keys, str) else keys) if key in logs), None)
            if key is not None:
                row[name] = math.nan if logs[key] is None else float(logs[key])
        self.steps.append(row)


def train(method_name, seed, schedule, output_dir):
    """Trains one policy from scratch; returns the run record (method, seed, curves, timing)."""
    method = METHODS[method_name]
    if schedule.threads:
        torch.set_num_threads(schedule.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers_logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    options = dict(method.options)
    if schedule.kpo_clip is not None and issubclass(method.config, KPOGRPOConfig) and not method.own_clip:
        options["epsilon"], options["epsilon_high"] = schedule.kpo_clip
    if schedule.delta is not None:
        options["delta"] = schedule.delta
    spg, iterations = (1, 1) if method.on_policy else (schedule.steps_per_generation, schedule.num_iterations)
    args = method.config(
        output_dir=output_dir,
        per_device_train_batch_size=schedule.batch_size,
        num_generations=schedule.num_generations,
        max_completion_length=schedule.length,
        steps_per_generation=spg,
        num_iterations=iterations,
        gradient_accumulation_steps=1,
        learning_rate=schedule.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=schedule.max_grad_norm,
        max_steps=schedule.steps,
        loss_type="grpo",
        beta=0.0,
        # Every completion is `length` digits: special tokens are never sampled.
        generation_kwargs={"suppress_tokens": task.special_token_ids()},
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN or infinite loss is logged as it is
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=False,
        seed=seed,
        data_seed=seed,
        **options,
    )
    recorder = CurveRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = method.trainer(
            model=task.policy(seed),
            reward_funcs=task.stride_reward(schedule.length),
            args=args,
            train_dataset=task.prompts(schedule.steps * schedule.batch_size, steps=schedule.strides, seed=seed),
            processing_class=task.tokenizer(),
            callbacks=[recorder],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    record = {
        "method": method_name,
        "seed": seed,
        "seconds": seconds,
        "device": "cuda" if cuda else "cpu",
        "steps": recorder.steps,
        "nonfinite_steps": report.nonfinite_steps(recorder.steps),
    }
    fits = getattr(trainer, "noise_fits", [])
    if fits:
        record["noise_fits"] = [
            {
                "step": step,
                "q": fit.q,
                "r": fit.r,
                "ratio": fit.ratio,
                "at_boundary": fit.at_boundary,
                "drift_evidence": fit.drift_evidence,
                "num_tokens": fit.num_tokens,
            }
            for step, fit in fits
        ]
    return record


def train_job(job):
    """`train(*job)`, for a process pool (the job is picklable)."""
    return train(*job)


def schedule_dict(schedule):
    values = asdict(schedule)
    values["strides"] = list(schedule.strides)
    values["kpo_clip"] = None if schedule.kpo_clip is None else list(schedule.kpo_clip)
    return values


def checkout_commit():
    """The commit of the checkout the benchmark runs from, with '+' if it has changes; None
    outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+" if dirty.strip() else "")
