"""lit_rlhf: RLHF (SFT, reward modelling, PPO, critic-free policy gradients, DPO, online DPO) as PyTorch Lightning stages."""
