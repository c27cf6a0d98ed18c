"""Training: optimizer, the pure accumulated train step, checkpoints, metrics and the SFT loop."""
