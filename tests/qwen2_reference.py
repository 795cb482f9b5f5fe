"""A plain NumPy Qwen2 stack (transformers 4.49 semantics) read from official tensor names, with an
explicit mask: the independent reference for configurations the fixtures do not cover."""

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    """x [batch, time, heads, head_dim], rotate-half RoPE of HF Qwen2."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[..., None].astype(np.float64) * inv  # [batch, time, d/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def qwen2_stack(
    tensors: dict,
    prefix: str,
    x,
    positions,
    mask,
    *,
    heads: int,
    kv_heads: int,
    theta: float,
    eps: float,
):
    """x [batch, time, hidden]; mask [batch, time, time] bool (True = visible). float64 math."""
    x = np.asarray(x, np.float64)
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items() if k.startswith(prefix)}
    layers = len({k.split(".")[2] for k in t if k.startswith(f"{prefix}.layers.")})
    b, n, _ = x.shape
    for i in range(layers):
        p = f"{prefix}.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = (
            h @ t[p + f"self_attn.{n}.weight"].T + t[p + f"self_attn.{n}.bias"]
            for n in ("q_proj", "k_proj", "v_proj")
        )
        head_dim = q.shape[-1] // heads
        q = _rope(q.reshape(b, n, heads, head_dim), positions, theta)
        k = _rope(k.reshape(b, n, kv_heads, head_dim), positions, theta)
        v = v.reshape(b, n, kv_heads, head_dim)
        k, v = (np.repeat(a, heads // kv_heads, axis=2) for a in (k, v))
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        logits = np.where(mask[:, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, heads * head_dim)
        x = x + out @ t[p + "self_attn.o_proj.weight"].T
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        gate = h @ t[p + "mlp.gate_proj.weight"].T
        up = h @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    return _rms(x, t[f"{prefix}.norm.weight"], eps)
