"""Training task adapters (and the full fine-tuning / LoRA baselines) on the frozen backbone."""
