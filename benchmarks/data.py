"""A synthetic batch that looks like one off-policy GRPO micro-batch.

- Groups of 8 responses per prompt; binary rewards; advantages normalised within the group
  (GRPO), one per response.
- Response lengths between T/8 and T (one of them exactly T), right-padded with zeros.
- old_log_prob: sampled-token log-probabilities, mostly near 0 with an exponential tail.
- log_prob - old_log_prob: a per-response drift N(0, 0.02^2) (the policy moved since the
  rollout), per-token noise N(0, 0.05^2), and on 1% of tokens a spike N(0, 1.5^2) (low-probability
  tokens whose probability moved a lot): the noisy token-level ratios KPO filters.
"""

import torch


def rl_batch(rows=64, length=4096, *, dtype=torch.float32, device="cpu", seed=0, group=8):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 8), length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]

    old = -torch.empty(rows, length).exponential_(1 / 0.7, generator=gen)
    drift = torch.randn(rows, 1, generator=gen) * 0.02
    noise = torch.randn(rows, length, generator=gen) * 0.05
    spikes = (torch.rand(rows, length, generator=gen) < 0.01) * torch.randn(rows, length, generator=gen) * 1.5
    new = old + drift + noise + spikes

    rewards = (torch.rand(rows, generator=gen) < 0.5).float()
    grouped = rewards[: rows - rows % group].view(-1, group) if rows >= group else rewards[None]
    advantages = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-6)).flatten()
    advantages = torch.cat([advantages, torch.zeros(rows - advantages.numel())])

    new, old = new * mask, old * mask
    return {
        "log_prob": new.to(dtype).to(device),
        "old_log_prob": old.to(dtype).to(device),
        "advantages": advantages.to(dtype).to(device),
        "mask": mask.to(device),
    }
