"""Sampling and KV-cached generation."""
