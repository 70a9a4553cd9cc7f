"""The stages, one LightningModule each: SFT, reward model, PPO and the critic-free policy gradients, DPO, online DPO."""
