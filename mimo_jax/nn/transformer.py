"""The Qwen2 decoder block and a stack of them (backbone, patch encoder, patch decoder).

The stack is built and scanned by `nn.stack`. A KV cache is a dict of arrays `k`, `v`
[layers, batch, cache_len, kv_heads, head_dim] updated at `cache_index`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mimo_jax.nn.attention import MaskSpec, attend, choose_kernel
from mimo_jax.nn.layers import Dense, Embed, RMSNorm
from mimo_jax.nn.partitioning import constrain
from mimo_jax.nn.rope import apply_rope, inv_frequencies, rope_tables
from mimo_jax.nn.stack import StackConfig, scan_layers, stacked

KVCache = dict[str, jax.Array]
_ACTIVATION_AXES = ("activation_batch", "activation_length", None)


def _project(
    layer: Callable[..., jax.Array], x: jax.Array, rng: jax.Array | None, index: int
) -> jax.Array:
    """layer(x). A layer that drops its input in training (a LoRA adapter, `lm.lora`) is also
    given a dropout key of its own (`index` tells the block's projections apart)."""
    if rng is None or not getattr(layer, "takes_dropout_rng", False):
        return layer(x)
    return layer(x, dropout_rng=jax.random.fold_in(rng, index))


def _prefill_mask(mask, cache_index) -> MaskSpec | None:
    """A prefill (a MaskSpec over a cache written from slot 0): its groups attend to each other
    alone, as the slots past them hold nothing yet, so an accelerated kernel can run it as
    self-attention. None for any other cached call."""
    if not isinstance(mask, MaskSpec) or not isinstance(cache_index, int) or cache_index != 0:
        return None
    pos, seg = mask.q_positions, mask.q_segments
    return MaskSpec(pos, pos, seg, seg, causal=mask.causal, window=mask.window)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: StackConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, k, d = cfg.heads, cfg.kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(cfg.hidden, h * d, axes=("embed", "q_heads"), use_bias=True, **kw)
        self.k_proj = Dense(cfg.hidden, k * d, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Dense(cfg.hidden, k * d, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Dense(h * d, cfg.hidden, axes=("q_heads", "embed"), **kw)
        self.heads, self.kv_heads, self.head_dim = h, k, d
        self.dropout = cfg.attn_dropout
        self.attention = cfg.attention

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, cache_index, dropout_rng=None):
        b, t, _ = x.shape
        proj = lambda layer, h, i: _project(layer, h, dropout_rng, i)
        q = checkpoint_name(proj(self.q_proj, x, 0), "query_proj").reshape(
            b, t, self.heads, self.head_dim
        )
        k = checkpoint_name(proj(self.k_proj, x, 1), "key_proj").reshape(
            b, t, self.kv_heads, self.head_dim
        )
        v = checkpoint_name(proj(self.v_proj, x, 2), "value_proj").reshape(
            b, t, self.kv_heads, self.head_dim
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rate = self.dropout if dropout_rng is not None else 0.0
        if cache is not None:
            new_k, new_v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], new_k, start)
            v = jax.lax.dynamic_update_slice(cache["v"], new_v, start)
            cache = {"k": k, "v": v}
            own = _prefill_mask(mask, cache_index)
            if own is not None and choose_kernel(self.attention, q, new_k, own, rate > 0) != "xla":
                k, v, mask = new_k, new_v, own
        out = attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            implementation=self.attention,
        )
        out = proj(self.o_proj, out.reshape(b, t, self.heads * self.head_dim), 3)
        return checkpoint_name(out, "out_proj"), cache


class SwiGLU(nnx.Module):
    def __init__(self, hidden: int, ffn: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(hidden, ffn, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(hidden, ffn, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(ffn, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x, dropout_rng=None):
        h = jax.nn.silu(checkpoint_name(_project(self.gate_proj, x, dropout_rng, 4), "mlpwi_0"))
        h = h * checkpoint_name(_project(self.up_proj, x, dropout_rng, 5), "mlpwi_1")
        return checkpoint_name(_project(self.down_proj, h, dropout_rng, 6), "mlpwo")


class Qwen2Layer(nnx.Module):
    def __init__(self, cfg: StackConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(
            cfg.hidden, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.self_attn = Qwen2Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.mlp = SwiGLU(cfg.hidden, cfg.ffn, **kw)

    def __call__(self, x, cos, sin, mask, cache, cache_index, dropout_rng=None):
        h, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, cache_index, dropout_rng
        )
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), dropout_rng)
        return x, cache


class Qwen2Stack(nnx.Module):
    """`layers` Qwen2 blocks (stacked, scanned) and the final RMSNorm; optional token embedding."""

    def __init__(
        self,
        cfg: StackConfig,
        *,
        vocab_size: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat_policy: str = "none",
        rngs: nnx.Rngs,
    ):
        self.embed_tokens = (
            Embed(
                vocab_size,
                cfg.hidden,
                axes=("vocab", "embed"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if vocab_size is not None
            else None
        )
        # Stacked (one scanned module), or a list of layers once unstacked for decoding.
        self.layers: Qwen2Layer | nnx.List = stacked(
            lambda r: Qwen2Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.layers,
            rngs,
        )
        self.norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        c = self.cfg
        shape = (c.layers, batch, length, c.kv_heads, c.head_dim)
        return {
            "k": jnp.zeros(shape, dtype or self.dtype),
            "v": jnp.zeros(shape, dtype or self.dtype),
        }

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | MaskSpec,
        cache: KVCache | None = None,
        cache_index: Any = 0,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x [batch, time, hidden]; positions [batch, time] (RoPE); mask [batch, time, keys] or a
        MaskSpec (long sequences then attend block by block).

        An input narrower than the compute dtype (the official bf16 speech embeddings in an fp32
        model) enters the first layer as it is, as in PyTorch, where that layer's input norm rounds
        to the input's dtype; every later layer runs in the compute dtype.
        """
        cos, sin = rope_tables(
            positions, inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta), self.dtype
        )
        layer_rngs = (
            jax.random.split(dropout_rng, self.cfg.layers) if dropout_rng is not None else None
        )

        def step(layer, h, xs):
            layer_cache, rng = xs
            h, layer_cache = layer(h, cos, sin, mask, layer_cache, cache_index, rng)
            return constrain(h.astype(self.dtype), _ACTIVATION_AXES), layer_cache

        narrow = jnp.finfo(x.dtype).bits < jnp.finfo(self.dtype).bits
        x, cache = scan_layers(
            self.layers,
            step,
            x if narrow else x.astype(self.dtype),
            (cache, layer_rngs),
            remat_policy=self.remat_policy,
            first_apart=narrow,
        )
        return self.norm(x), cache
