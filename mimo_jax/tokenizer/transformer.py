"""The tokenizer's transformer layer (Whisper-style pre-norm, RoPE, exact GELU) and its stacks.

Activations are padded batches [batch, time, dim] with per-sequence lengths: positions restart at 0
for every sequence and attention never reads a padded frame, so a sequence gets the same result in
any batch. Stacks are built and scanned by `nn.stack`, attention runs through `nn.attention.attend`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.attention import MaskSpec, attend
from mimo_jax.nn.layers import Dense, LayerNorm
from mimo_jax.nn.rope import apply_rope, inv_frequencies, rope_tables
from mimo_jax.nn.stack import StackConfig, scan_layers, stacked


class SelfAttention(nnx.Module):
    def __init__(self, cfg: StackConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden
        self.q_proj = Dense(d, d, axes=("embed", "q_heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(
            d, d, axes=("embed", "kv_heads"), use_bias=False, dtype=dtype, rngs=rngs
        )
        self.v_proj = Dense(d, d, axes=("embed", "kv_heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Dense(
            d, d, axes=("q_heads", "embed"), use_bias=True, dtype=dtype, rngs=rngs
        )
        self.heads = cfg.heads
        self.causal = cfg.causal
        self.window = tuple(cfg.window)

    def __call__(self, x, cos, sin, positions, segments, attention="auto"):
        batch, time, dim = x.shape
        split = lambda t: t.reshape(batch, time, self.heads, dim // self.heads)
        q = apply_rope(split(self.q_proj(x)), cos, sin)
        k = apply_rope(split(self.k_proj(x)), cos, sin)
        v = split(self.v_proj(x))
        mask = MaskSpec(
            positions, positions, segments, segments, causal=self.causal, window=self.window
        )
        out = attend(q, k, v, mask, implementation=attention)
        return self.out_proj(out.reshape(batch, time, dim).astype(x.dtype))


class TransformerLayer(nnx.Module):
    """x += attn(LN(x)); x += fc2(gelu(fc1(LN(x)))). In half precision, a tensor holding an
    infinity or NaN is clamped to +-(max - 1000) as the official layer does."""

    def __init__(self, cfg: StackConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps, rngs=rngs)
        self.fc1 = Dense(
            cfg.hidden, cfg.ffn, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs
        )
        self.fc2 = Dense(
            cfg.ffn, cfg.hidden, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs
        )
        self.final_layer_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps, rngs=rngs)

    def __call__(self, x, cos, sin, positions, segments, attention="auto"):
        x = x + self.self_attn(
            self.self_attn_layer_norm(x), cos, sin, positions, segments, attention
        )
        h = jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=False)
        x = x + self.fc2(h)
        if x.dtype in (jnp.float16, jnp.bfloat16):
            big = jnp.finfo(x.dtype).max - 1000
            x = jnp.where(jnp.all(jnp.isfinite(x)), x, jnp.clip(x, -big, big))
        return x


def make_stack(cfg: StackConfig, *, dtype, rngs: nnx.Rngs) -> TransformerLayer:
    """`cfg.layers` layers as one module whose parameters have a leading `layers` axis."""
    return stacked(lambda r: TransformerLayer(cfg, dtype=dtype, rngs=r), cfg.layers, rngs)


def run_stack(
    stack: TransformerLayer,
    cfg: StackConfig,
    x,
    lengths,
    *,
    inv_freq_dtype=None,
    start: int = 0,
    stop: int | None = None,
    remat_policy: str = "none",
    attention: str = "auto",
):
    """Apply layers [start, stop) of a stack to x [batch, time, dim] with per-sequence lengths
    (rematerialised in the backward pass by `remat_policy`, `mimo_jax.nn.remat`; attention on the
    kernel `attention` names, `mimo_jax.nn.attention`)."""
    batch, time, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(time), (batch, time))
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta)
    if inv_freq_dtype is not None:  # the reference pipeline rounds inv_freq with the model
        inv_freq = inv_freq.astype(inv_freq_dtype)
    cos, sin = rope_tables(positions, inv_freq, x.dtype)

    def step(layer, h, _):
        return layer(h, cos, sin, positions, segments, attention), None

    x, _ = scan_layers(stack, step, x, start=start, stop=stop, remat_policy=remat_policy)
    return x


def time_mask(lengths: jax.Array, time: int) -> jax.Array:
    """[batch, time, 1] True inside each sequence."""
    return (jnp.arange(time)[None, :] < lengths[:, None])[..., None]
