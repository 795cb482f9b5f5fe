"""Experiments: configs, entry points and launchers. Nothing in mimo_jax/ imports this package."""
