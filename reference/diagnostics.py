"""What the filter sees (docs/math.md sections 5b and 5c), written out token by token in float64.

The oracle of `kpo_kernels.fit_noise` and of the diagnostic metrics of `kpo_kernels.kpo_loss`.
Sequential on purpose: one loop iteration per token, the textbook predict/update equations and
the innovation e = z - xhat_before with its predicted variance S = P_before + Q + R, nothing
derived from a closed form. Shares no code with `kpo_kernels`.

Conventions (the package documents the same):
- A valid token is *scored* (enters nis and the log-likelihood) when its S is finite. S is
  infinite only for the first observation under a diffuse prior (p0 = inf): the standard
  diffuse likelihood leaves that observation out.
- Sign flips: over pairs (previous valid token of the same sequence, valid token), the fraction
  with strictly opposite signs (z_prev > 0 > z or z_prev < 0 < z; a zero flips nothing); the
  filtered one compares the filter's output xhat (before the log-ratio cap).
"""

import math

import torch


def innovations(log_ratio, mask=None, *, q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip"):
    """Per-token (e, S, scored, xhat) of a (B, T) batch, float64, by the sequential recursion.

    e and S are those of each valid token (0 and inf elsewhere); scored is valid & finite S;
    xhat is the filtered log-ratio after each token (the state, also at masked tokens).
    """
    if mask_mode not in ("skip", "position"):
        raise ValueError(f"mask_mode must be 'skip' or 'position', got {mask_mode!r}")
    z = log_ratio.detach().to(torch.float64).cpu()
    batch, length = z.shape
    valid = torch.ones(z.shape, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    q, r = float(q), float(r)
    e_out = [[0.0] * length for _ in range(batch)]
    s_out = [[math.inf] * length for _ in range(batch)]
    x_out = [[0.0] * length for _ in range(batch)]
    z_rows, valid_rows = z.tolist(), valid.tolist()
    for row in range(batch):
        x, p = float(x0), float(p0)
        for t in range(length):
            is_valid = valid_rows[row][t]
            if not is_valid and mask_mode == "skip":
                x_out[row][t] = x
                continue
            z_t = z_rows[row][t] if is_valid else 0.0
            p_pred = p + q
            s = p_pred + r
            e = z_t - x
            if math.isinf(p_pred):  # diffuse prior: K = 1, the state becomes the observation
                gain, p = 1.0, r
            else:
                gain, p = p_pred / s, p_pred * r / s
            x = x + gain * e
            x_out[row][t] = x
            if is_valid:
                e_out[row][t], s_out[row][t] = e, s
    e_out, s_out, x_out = (torch.tensor(v, dtype=torch.float64).view(batch, length) for v in (e_out, s_out, x_out))
    scored = valid & torch.isfinite(s_out)
    return e_out, s_out, scored, x_out


def innovation_log_likelihood(log_ratio, mask=None, *, q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip"):
    """(sum over scored tokens of -0.5 (log(2 pi S) + e^2 / S), number of scored tokens)."""
    e, s, scored, _ = innovations(log_ratio, mask, q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
    total = 0.0
    for e_t, s_t in zip(e[scored].tolist(), s[scored].tolist()):
        total += -0.5 * (math.log(2.0 * math.pi * s_t) + e_t * e_t / s_t)
    return total, int(scored.sum())


def profile(log_ratio, mask=None, *, ratio, p0_ratio=0.0, x0=0.0, mask_mode="skip"):
    """(R_hat, profile log-likelihood per scored token) at the noise ratio q/r = `ratio` (docs/math.md section 5c).

    The filter runs with unit R (Q = ratio, P0 = p0_ratio): R_hat = mean(e^2 / S); the profile
    is the log-likelihood per scored token with R = R_hat, recomputed from its definition.
    """
    e, s, scored, _ = innovations(log_ratio, mask, q=ratio, r=1.0, p0=p0_ratio, x0=x0, mask_mode=mask_mode)
    n = int(scored.sum())
    r_hat = sum(e_t * e_t / s_t for e_t, s_t in zip(e[scored].tolist(), s[scored].tolist())) / n
    total, count = innovation_log_likelihood(
        log_ratio, mask, q=ratio * r_hat, r=r_hat, p0=p0_ratio * r_hat, x0=x0, mask_mode=mask_mode
    )
    return r_hat, total / count


def diagnostics(
    log_prob,
    old_log_prob,
    advantages,
    mask=None,
    *,
    q=1e-6,
    r=1.0,
    p0=0.0,
    x0=0.0,
    mask_mode="skip",
    clip=True,
    clip_low=3e-4,
    clip_high=4e-4,
    log_ratio_cap=10.0,
):
    """The diagnostic metrics of docs/math.md section 5b for a (B, T) batch, as float64 0-dim tensors.

    nis_mean, log_likelihood: means over scored tokens (0 when there is none). sign_flip_raw,
    sign_flip_filtered: fractions of consecutive valid pairs (0 when there is none).
    clipfrac_high / clipfrac_low: fractions of valid tokens whose clipped branch wins with the
    filtered ratio above / below 1; capfrac: of valid tokens with xhat > log_ratio_cap.
    innovation_tokens and sign_flip_pairs are the two denominators.
    """
    valid = torch.ones(log_prob.shape, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    new = torch.where(valid, log_prob.detach().cpu().double(), 0.0)
    old = torch.where(valid, old_log_prob.detach().cpu().double(), 0.0)
    z = new - old
    e, s, scored, x = innovations(z, valid, q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)

    nis_sum, ll_sum = 0.0, 0.0
    for e_t, s_t in zip(e[scored].tolist(), s[scored].tolist()):
        nis_sum += e_t * e_t / s_t
        ll_sum += -0.5 * (math.log(2.0 * math.pi * s_t) + e_t * e_t / s_t)
    n_scored = int(scored.sum())

    pairs = flips_raw = flips_filtered = 0
    z_rows, x_rows, valid_rows = z.tolist(), x.tolist(), valid.tolist()
    for row in range(z.shape[0]):
        previous = None
        for t in range(z.shape[1]):
            if not valid_rows[row][t]:
                continue
            current = (z_rows[row][t], x_rows[row][t])
            if previous is not None:
                pairs += 1
                flips_raw += _opposite(previous[0], current[0])
                flips_filtered += _opposite(previous[1], current[1])
            previous = current

    adv = advantages.detach().cpu().double()
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(z.shape)
    x_valid = torch.where(valid, x, 0.0)
    log_rt = x_valid if log_ratio_cap is None else torch.clamp(x_valid, max=log_ratio_cap)
    rt = torch.exp(log_rt)
    high = torch.zeros_like(valid)
    low = torch.zeros_like(valid)
    if clip:
        unclipped = -adv * rt
        clipped = -adv * torch.clamp(rt, 1 - clip_low, 1 + clip_high)
        wins = valid & (clipped > unclipped)
        high, low = wins & (rt > 1), wins & (rt < 1)
    capped = torch.zeros_like(valid) if log_ratio_cap is None else valid & (x > log_ratio_cap)
    tokens = int(valid.sum())

    def ratio(num, den):
        return torch.tensor(num / den if den else 0.0, dtype=torch.float64)

    return {
        "nis_mean": ratio(nis_sum, n_scored),
        "log_likelihood": ratio(ll_sum, n_scored),
        "sign_flip_raw": ratio(flips_raw, pairs),
        "sign_flip_filtered": ratio(flips_filtered, pairs),
        "clipfrac_high": ratio(int(high.sum()), tokens),
        "clipfrac_low": ratio(int(low.sum()), tokens),
        "capfrac": ratio(int(capped.sum()), tokens),
        "innovation_tokens": torch.tensor(float(n_scored), dtype=torch.float64),
        "sign_flip_pairs": torch.tensor(float(pairs), dtype=torch.float64),
    }


def _opposite(a, b):
    return int((a > 0 and b < 0) or (a < 0 and b > 0))
