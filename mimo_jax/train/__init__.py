"""Training: losses, optimizer with per-module learning rates, the train step, checkpointing."""
