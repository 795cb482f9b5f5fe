"""Shared building blocks: parameters with logical axes, dense layers, norms, RoPE, attention, MLPs,
and the scanned transformer stack."""
