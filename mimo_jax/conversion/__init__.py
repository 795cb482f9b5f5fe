"""Checkpoint conversion between official PyTorch/safetensors checkpoints and Orbax checkpoints."""
