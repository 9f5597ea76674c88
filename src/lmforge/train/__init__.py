"""The one training loop, shared by every stage (pretrain, SFT, reward, DPO, PPO, GRPO, distillation)."""
