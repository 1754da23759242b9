"""The Kalman filter of KPO, written out step by step (docs/math.md section 2).

Readable, sequential and slow on purpose: one loop iteration per token, the textbook
predict/update equations, no closed forms and no scans. Every backend of `kpo_kernels` is
tested against this file. Run it in float64 to use it as an oracle.
"""

import torch


def _predict_update(p, q, r):
    """One predict/update of the error variance: returns (gain, posterior variance).

    P- = P + Q, K = P- / (P- + R), P = (1 - K) P-. The posterior is computed as P- R / (P- + R),
    the same value without the cancellation of 1 - K when K is close to 1. An infinite prior
    variance (a diffuse prior, p0 = inf) gives K = 1 and P = R, the limit of the same formulas.
    """
    p_pred = p + q
    if isinstance(p_pred, torch.Tensor):
        diffuse = torch.isinf(p_pred)
        gain = torch.where(diffuse, torch.ones_like(p_pred), p_pred / (p_pred + r))
        p_post = torch.where(diffuse, torch.full_like(p_pred, r), p_pred * r / (p_pred + r))
        return gain, p_post
    if p_pred == float("inf"):
        return 1.0, float(r)
    return p_pred / (p_pred + r), p_pred * r / (p_pred + r)


def kalman_gains(n, *, q=1e-6, r=1.0, p0=0.0):
    """Gains K_1..K_n by iterating the variance recursion in float64."""
    gains = []
    p = float(p0)
    for _ in range(n):
        k, p = _predict_update(p, float(q), float(r))
        gains.append(k)
    return torch.tensor(gains, dtype=torch.float64)


def kalman_filter(log_ratio, mask=None, *, q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip"):
    """Filtered log-ratio xhat_t for every token of a (B, T) batch; 0 where the mask is 0.

    mask_mode "skip": a masked token is invisible, the state and its variance carry over.
    mask_mode "position": a masked token is an observation z = 0 at its position.
    Values of `log_ratio` under the mask are never read.
    """
    if mask_mode not in ("skip", "position"):
        raise ValueError(f"mask_mode must be 'skip' or 'position', got {mask_mode!r}")
    z = log_ratio if log_ratio.dtype in (torch.float32, torch.float64) else log_ratio.float()
    batch, length = z.shape
    valid = torch.ones_like(z, dtype=torch.bool) if mask is None else mask.bool()

    xhat = torch.full((batch,), float(x0), dtype=z.dtype, device=z.device)
    p = torch.full((batch,), float(p0), dtype=torch.float64, device=z.device)
    out = torch.zeros_like(z)
    for t in range(length):
        observed = valid[:, t] if mask_mode == "skip" else torch.ones_like(valid[:, t])
        z_t = torch.where(valid[:, t], z[:, t], torch.zeros_like(z[:, t]))
        gain, p_post = _predict_update(p, float(q), float(r))
        gain = gain.to(z.dtype)
        xhat = torch.where(observed, xhat + gain * (z_t - xhat), xhat)
        p = torch.where(observed, p_post, p)
        out[:, t] = torch.where(valid[:, t], xhat, torch.zeros_like(xhat))
    return out
