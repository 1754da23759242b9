"""What users run today, as described in the KPO contract (docs/math.md section 6), for comparison.

- `grpo_eager`: GRPO/PPO token-ratio clipped loss in eager PyTorch, verl's `vanilla` policy
  loss (ratio exp(clamp(log_prob - old_log_prob, -20, 20)), clip, dual clip c = 3 for A < 0,
  the same metrics) with verl's `agg_loss` aggregation.
- `vectorized_cumsum`: the authors' vectorized KPO plug-in for verl, reimplemented from its
  description in docs/math.md (section 6), nothing more and nothing less: gains from the sinh closed
  form in float32 clamped to [1e-6, 1 - 1e-6], then "divide by the running product of (1 - K),
  cumulative sum, multiply back" with the running product's log floored at log(1e-30) and its
  inverse's exponent clipped at 80. Masked tokens are observations z = 0 at their absolute
  position (their `position` semantics); P0 = 0, x0 = 0. Everything in float32 (the plug-in gets
  float32 log-probs from verl). Its numerical failures are the point of including it.

Both are plain functions of a batch dict (log_prob, old_log_prob, advantages, mask).

- `float64_filter` / `float64_recursion` / `float64_gains`: the accuracy yardstick, a float64
  sequential recursion (numpy, vectorized over rows only), bitwise equal to `reference/`'s
  filter in float64 and independent of kpo_kernels.
"""


import math

import numpy as np
import torch


def _agg(token_loss, mask, agg):
    """verl's agg_loss without global-batch arguments."""
    mask = mask.to(token_loss.dtype)
    if agg == "token-mean":
        return (token_loss * mask).sum() / mask.sum()
    row_sum = (token_loss * mask).sum(-1)
    row_tokens = mask.sum(-1)
    nonempty = (row_tokens > 0).to(token_loss.dtype)
    if agg == "seq-mean-token-mean":
        return (row_sum / (row_tokens + 1e-8) * nonempty).sum() / nonempty.sum()
    if agg == "seq-mean-token-sum":
        return (row_sum * nonempty).sum() / nonempty.sum()
    if agg == "seq-mean-token-sum-norm":
        return (row_sum * nonempty).sum() / nonempty.sum() / mask.shape[-1]
    raise ValueError(agg)


def _broadcast(advantages, like):
    return advantages[:, None].expand_as(like) if advantages.dim() == 1 else advantages


def ppo_clip_loss(ratio, log_ratio, advantages, mask, agg, clip_low, clip_high, clip_ratio_c=3.0):
    """verl's vanilla clipped surrogate for a given (differentiable) ratio; returns (loss, metrics)."""
    adv = _broadcast(advantages, ratio)
    valid = mask.to(ratio.dtype)
    tokens = valid.sum()
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * clip_ratio_c
    lower = torch.min(loss3, clipped)
    token_loss = torch.where(adv < 0, lower, clipped)
    metrics = {
        "clipfrac": (torch.gt(loss2, loss1).to(ratio.dtype) * valid).sum() / tokens,
        "ppo_kl": (-log_ratio.detach() * valid).sum() / tokens,
        "clipfrac_lower": (torch.gt(clipped, loss3) * (adv < 0) * valid).sum() / tokens,
    }
    return _agg(token_loss, mask, agg), metrics


def grpo_eager(batch, agg="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4):
    """GRPO's token-ratio PPO-clip loss, verl `vanilla` (the loss KPO replaces)."""
    log_ratio = torch.clamp(batch["log_prob"] - batch["old_log_prob"], min=-20.0, max=20.0)
    return ppo_clip_loss(torch.exp(log_ratio), log_ratio, batch["advantages"], batch["mask"], agg, clip_low, clip_high)


AUTHORS_GAIN_MIN, AUTHORS_GAIN_MAX = 1e-6, 1 - 1e-6
AUTHORS_LOG_FLOOR = math.log(1e-30)  # logA clamped below at log(1e-30)
AUTHORS_EXP_CLIP = 80.0  # invA = exp(min(-logA, 80))


def sinh_gains(length, q, device="cpu"):
    """The authors' gains for absolute positions 0..length-1, in float32 (docs/math.md section 6).

    q = Q/R, p0 = P0/R = 0 (the plug-in always starts from P0 = 0). s = 1 + q/2,
    eta = log(s + sqrt(max(s^2 - 1, 0))) (arccosh s), U_k = sinh((k + 1) eta) / max(sinh(eta), 1e-20)
    (U_k = k + 1 when q < 1e-12), U_prev = U shifted right with 0 in front,
    x = ((U - U_prev) p0 + U q) / (U p0 + U (q + 1) - U_prev), K = clamp(x, 1e-6, 1 - 1e-6).
    Position t holds K_{t+1} of the recursion. In float32, s rounds to 1 for q <= 1e-7
    (eta = 0, U = 0, gains 0/0 = NaN), and sinh overflows once (k + 1) eta > 89 (inf / inf = NaN
    from about position 89 / sqrt(q)); the clamp keeps NaN.
    """
    q32 = torch.tensor(q, dtype=torch.float32, device=device)
    p0 = torch.zeros((), dtype=torch.float32, device=device)
    k = torch.arange(length, dtype=torch.float32, device=device)
    if q < 1e-12:
        u = k + 1
    else:
        s = 1 + q32 / 2
        eta = torch.log(s + torch.sqrt(torch.clamp_min(s * s - 1, 0.0)))
        u = torch.sinh((k + 1) * eta) / torch.clamp_min(torch.sinh(eta), 1e-20)
    u_prev = torch.cat([torch.zeros(1, dtype=torch.float32, device=device), u[:-1]])
    x = ((u - u_prev) * p0 + u * q32) / (u * p0 + u * (q32 + 1) - u_prev)
    return torch.clamp(x, AUTHORS_GAIN_MIN, AUTHORS_GAIN_MAX)


def vectorized_cumsum_filter(log_ratio, mask, q):
    """The authors' float32 vectorized filter (docs/math.md section 6), x0 = 0:

    z = z * mask (masked tokens are observations 0 at their absolute position: garbage under
    the mask, NaN or inf, is not removed, as in theirs); a = max(1 - K, 1e-12);
    logA = max(cumsum(log a), log(1e-30)); A = exp(logA); invA = exp(min(-logA, 80));
    x_hat = A * (cumsum(z * K * invA) + x0) * mask. Gains and running products are per position,
    shared by every row. Once the true running product falls below 1e-30 (the floor), A stops
    decaying and x_hat no longer follows the recursion; the gains' NaN propagates through cumsum.
    """
    valid = mask.to(torch.float32)
    z = log_ratio.to(torch.float32) * valid
    gains = sinh_gains(z.shape[-1], q, z.device)
    log_a = torch.cumsum(torch.log(torch.clamp_min(1 - gains, 1e-12)), dim=0)
    log_a = torch.clamp_min(log_a, AUTHORS_LOG_FLOOR)
    running = torch.exp(log_a)
    inverse = torch.exp(torch.clamp_max(-log_a, AUTHORS_EXP_CLIP))
    x0 = 0.0
    return running * (torch.cumsum(z * gains * inverse, dim=-1) + x0) * valid


def vectorized_cumsum(batch, agg="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4, q=1e-6, log_ratio_cap=10.0,
                      is_weights=None):
    """KPO as the authors' plug-in computes it (docs/math.md section 6): their filter, the stop-gradient
    ratio capped at log_ratio_cap, the clipped surrogate without dual clip, times the rollout
    importance weights, verl's agg_loss. Metrics as theirs, each read to the host with one
    `.item()` (a synchronisation each on a GPU, timed with the step): `pg_clipfrac`,
    `pg_clipfrac_lower` (always 0), `sequence_ratio_mean` (the mean ratio over every position,
    padding included). Returns (loss, metrics as Python floats)."""
    new, old, mask = batch["log_prob"], batch["old_log_prob"], batch["mask"]
    xhat = vectorized_cumsum_filter((new.float() - old.float()).detach(), mask, q)
    ratio = torch.exp(torch.clamp(new - new.detach() + xhat, max=log_ratio_cap))
    adv = _broadcast(batch["advantages"], ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    token_loss = torch.maximum(loss1, loss2)
    if is_weights is not None:
        token_loss = token_loss * is_weights
    valid = mask.to(ratio.dtype)
    metrics = {
        "pg_clipfrac": ((loss2 > loss1).to(ratio.dtype) * valid).sum() / valid.sum(),
        "pg_clipfrac_lower": torch.zeros((), dtype=ratio.dtype, device=ratio.device),
        "sequence_ratio_mean": ratio.detach().mean(),
    }
    return _agg(token_loss, mask, agg), {name: value.item() for name, value in metrics.items()}


def float64_gains(length, q, r=1.0, p0=0.0):
    """K_1..K_length by iterating the variance recursion in float64 (Python floats).

    P- = P + Q, K = P- / (P- + R), P = P- R / (P- + R): the textbook recursion, written as in
    `reference/` and independent of kpo_kernels' closed form. Cached per (length, q, r, p0).
    """
    key = (float(q), float(r), float(p0))
    cached = _GAINS.get(key)
    if cached is None or cached.size < length:
        gains = np.empty(length)
        p, q, r = float(p0), float(q), float(r)
        for n in range(length):
            p_pred = p + q
            if p_pred == math.inf:
                gains[n], p = 1.0, r
            else:
                gains[n], p = p_pred / (p_pred + r), p_pred * r / (p_pred + r)
        _GAINS[key] = cached = gains
    return cached[:length]


_GAINS = {}


def float64_recursion(z, gains, x0=0.0):
    """x_t = x_{t-1} + K_t (z_t - x_{t-1}) for every row, in float64, one step per token.

    z and gains: (B, T) numpy float64 arrays (gain 0 where a token is not observed). Sequential
    over tokens and vectorized over rows only: the accuracy yardstick, affordable for T = 131072
    (numpy, about 3 microseconds a step) and sharing nothing with kpo_kernels.
    """
    steps_z, steps_k = np.ascontiguousarray(z.T), np.ascontiguousarray(gains.T)
    out = np.empty_like(steps_z)
    x = np.full(z.shape[0], float(x0))
    tmp = np.empty_like(x)
    for t in range(steps_z.shape[0]):
        np.subtract(steps_z[t], x, out=tmp)
        tmp *= steps_k[t]
        x += tmp
        out[t] = x
    return out.T


def float64_filter(log_ratio, mask, q, r=1.0, p0=0.0, x0=0.0, mask_mode="skip"):
    """The KPO filter (docs/math.md section 2) by the float64 sequential recursion: (B, T) float64 CPU
    tensor, 0 where the mask is 0. mask None means every token is valid."""
    z = log_ratio.detach().to("cpu", torch.float64)
    valid = torch.ones(z.shape, dtype=torch.bool) if mask is None else mask.detach().to("cpu").bool()
    z = torch.where(valid, z, 0.0).numpy()
    valid_np = valid.numpy()
    table = float64_gains(z.shape[-1], q, r, p0)
    if mask_mode == "skip":
        index = np.maximum(np.cumsum(valid_np, axis=-1) - 1, 0)
        gains = table[index] * valid_np
    else:  # position: masked tokens are observations z = 0 at their position
        gains = np.broadcast_to(table, z.shape)
    out = float64_recursion(z, gains, x0)
    return torch.from_numpy(np.where(valid_np, out, 0.0))


def _float64_gains(length, q):
    return torch.from_numpy(float64_gains(length, q).copy())


def gain_error_onset(q, length, tol=1e-3):
    """First 1-based n where the float32 sinh gains are NaN or off by > tol relative, or None."""
    got = sinh_gains(length, q).double()
    want = _float64_gains(length, q)
    bad = ~torch.isfinite(got) | ((got - want).abs() > tol * want)
    return int(bad.nonzero()[0]) + 1 if bool(bad.any()) else None


__all__ = [
    "float64_filter",
    "float64_gains",
    "float64_recursion",
    "gain_error_onset",
    "grpo_eager",
    "ppo_clip_loss",
    "sinh_gains",
    "vectorized_cumsum",
    "vectorized_cumsum_filter",
]
