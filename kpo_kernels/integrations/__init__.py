"""Integrations of the KPO loss with RL trainers.

- `kpo_kernels.integrations.verl`: importing it registers `loss_mode=kpo` in verl's policy-loss
  registry and defines `KPOPolicyLossConfig` (verl 0.9.x).
- `kpo_kernels.integrations.trl`: `KPOGRPOConfig` and `KPOGRPOTrainer`, TRL's GRPOTrainer with the
  KPO policy loss (TRL 1.16.x).
- `kpo_kernels.integrations.openrlhf`: `KPOPolicyLoss`, a drop-in for OpenRLHF's `PolicyLoss`,
  `enable()`, and the launcher `python -m kpo_kernels.integrations.openrlhf` (OpenRLHF 0.11.x).
- `kpo_kernels.integrations.areal`: `kpo_grpo_loss_fn`, AReaL's `grpo_loss_fn` with the KPO
  filter, and `enable()` / `disable()`, which put it in place of AReaL's own (AReaL 1.0.x).
- `kpo_kernels.integrations.slime`: `kpo_policy_loss`, for slime's `--custom-loss-function-path`,
  with context parallelism (slime 0.3.x, Megatron backend).

None is imported here: `import kpo_kernels` (and this package) never imports verl, TRL, OpenRLHF, AReaL or slime.
"""
