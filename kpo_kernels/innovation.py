"""The predicted variance of each observation, as a table beside the gain table (docs/math.md sections 5b, 5c).

The n-th observation of a sequence has innovation e = z - xhat_before and predicted variance
S_n = P_{n-1} + Q + R. In normalised units (p = P / R, q = Q / R), S_n / R = 1 + q + p_{n-1}
= 1 / (1 - K_n), where p_0 = p0 / R and p_{n-1} = K_{n-1}. The tables here hold

    w_n = R / S_n = 1 - K_n = 1 / (1 + q + K_{n-1}),   K_0 = p0 / R,

indexed like the gain table (entry n - 1 for the n-th observation, or the position in position
mode). Written as a reciprocal of a sum of non-negative terms it keeps full relative precision
where 1 - K_n would cancel (K_n close to 1, e.g. q = 1e8), and it is exactly 0 for the first
observation under a diffuse prior (p0 = inf: S infinite), which the likelihood leaves out.

With w the weight of a token, e^2 / S = w e^2 / R and log S = log R - log w: the normalised
innovation squared and the Gaussian log-likelihood need no state beyond the filter's own.
"""

import torch


def variance_ratio_schedule(gains, q, p0):
    """w_1..w_n (float64) from the float64 gains K_1..K_n, normalised q = Q / R and p0 = P0 / R."""
    before = torch.cat([gains.new_full((1,), p0), gains[:-1]])  # p_{n-1}
    return before.add_(1.0 + q).reciprocal_()  # 1 / inf = 0: the diffuse first observation

