"""Synthetic data that looks like one off-policy GRPO micro-batch.

`rl_batch(rows, length)` (the batches every benchmark times):

- Groups of 8 responses per prompt (the last group takes the rows left over); binary rewards,
  every group with mixed rewards (as DAPO's dynamic sampling keeps them: a group drawn all equal
  has its first reward flipped); advantages normalised within the group (GRPO), one per
  response, so the aggregated loss is close to 0 (advantages sum to 0 per group). A group of
  one row gets +-1 (its reward against a baseline of 1/2). No advantage is 0.
- Response lengths uniform between T/8 and T (row 0 exactly T), right-padded with zeros; the
  mask is True on the response tokens.
- old_log_prob: sampled-token log-probabilities, mostly near 0 with an exponential tail
  (mean -0.7).
- log_prob - old_log_prob: a per-response drift N(0, 0.02^2) (the policy moved since the
  rollout), per-token noise N(0, 0.05^2), and on 1% of tokens a spike N(0, 1.5^2) (low-probability
  tokens whose probability moved a lot): the noisy token-level ratios KPO filters.

The values are drawn in float32 on the CPU from a seeded generator (the same batch on every
machine and device) and then cast to `dtype` and moved to `device`.

`log_ratio_stream(rows, length)`: the same log-ratio model (drift, noise, spikes) for full-length
rows without padding, for the accuracy sweep (a causal filter's output on a prefix of length T
is its output on the first T tokens).
"""

import torch

DRIFT, NOISE, SPIKE_RATE, SPIKE = 0.02, 0.05, 0.01, 1.5


def _log_ratio(rows, length, gen):
    drift = torch.randn(rows, 1, generator=gen) * DRIFT
    noise = torch.randn(rows, length, generator=gen) * NOISE
    spikes = (torch.rand(rows, length, generator=gen) < SPIKE_RATE) * torch.randn(rows, length, generator=gen) * SPIKE
    return drift + noise + spikes


def rl_batch(rows=64, length=4096, *, dtype=torch.float32, device="cpu", seed=0, group=8):
    """A dict with log_prob, old_log_prob (rows, length), advantages (rows,), mask (rows, length) bool."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 8), length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]

    old = -torch.empty(rows, length).exponential_(1 / 0.7, generator=gen)
    new = old + _log_ratio(rows, length, gen)

    rewards = (torch.rand(rows, generator=gen) < 0.5).float()
    advantages = torch.empty(rows)
    for start in range(0, rows, group):
        r = rewards[start : start + group]
        if r.numel() == 1:  # no group to compare with: the reward against a baseline of 1/2
            advantages[start] = r[0] * 2 - 1
            continue
        if bool((r == r[0]).all()):  # dynamic sampling: only groups with mixed rewards are kept
            r[0] = 1 - r[0]
        advantages[start : start + group] = (r - r.mean()) / (r.std() + 1e-6)

    new, old = new * mask, old * mask
    return {
        "log_prob": new.to(dtype).to(device),
        "old_log_prob": old.to(dtype).to(device),
        "advantages": advantages.to(dtype).to(device),
        "mask": mask.to(device),
    }


def log_ratio_stream(rows=4, length=131072, *, seed=1):
    """(rows, length) float32 log-ratios of the model above, every token valid."""
    return _log_ratio(rows, length, torch.Generator().manual_seed(seed))


def noise_generator():
    """The log-ratio model above in `fit_noise`'s terms (a random walk plus white noise): no
    process noise (Q = 0: the drift is constant within a response, a prior variance P0 =
    DRIFT^2), and white noise of variance NOISE^2 + SPIKE_RATE SPIKE^2 (heavy-tailed)."""
    from kpo_kernels.noise_report import Generator

    return Generator(
        f"per-response drift N(0, {DRIFT}^2), token noise N(0, {NOISE}^2), {SPIKE_RATE:.0%} spikes N(0, {SPIKE}^2)",
        q=0.0,
        r=NOISE**2 + SPIKE_RATE * SPIKE**2,
        p0=DRIFT**2,
    )


__all__ = ["log_ratio_stream", "noise_generator", "rl_batch"]
