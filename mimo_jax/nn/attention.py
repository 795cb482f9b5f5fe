"""Attention masks and the attention kernel shared by every transformer in the project.

Masks are built from per-token positions and segment ids, so one mechanism covers causal decoding,
bidirectional patches, packed rows (several documents in one row: segment ids differ across their
boundary), sliding windows, and KV caches (cache slots carry the position and segment of the token
they hold; empty slots have segment 0). `attend` is the one entry: given a MaskSpec, long query
sequences run block by block (over the keys a window can reach, or over all keys).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

# Finite, so that a fully masked row (a padding query) yields zeros rather than NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    *,
    causal: bool,
    window: tuple[int, int] = (-1, -1),
) -> jax.Array:
    """Boolean mask [batch, q_len, k_len]: key j is visible to query i.

    Positions [batch, len] are per-document token indices. Segment ids [batch, len] (0 = padding)
    keep documents of a packed row apart. `window` = (left, right) limits attention to keys with
    q - left <= k <= q + right (a negative bound is unlimited).
    """
    qp = q_positions[:, :, None]
    kp = k_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= kp <= qp
    left, right = window
    if left >= 0:
        mask &= kp >= qp - left
    if right >= 0:
        mask &= kp <= qp + right
    if q_segments is not None or k_segments is not None:
        if q_segments is None or k_segments is None:
            raise ValueError("segment ids must be given for both queries and keys")
        mask &= (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention with grouped-query heads.

    q [batch, q_len, heads, head_dim]; k, v [batch, k_len, kv_heads, head_dim] with kv_heads
    dividing heads (query head h reads kv head h // (heads // kv_heads));
    mask [batch, q_len, k_len]. Logits and softmax in float32; scale head_dim^-0.5.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads")
    # Heads first, so that both products are batched over contiguous [time, head_dim] blocks.
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkrtd,bksd->bkrts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (head_dim**-0.5)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkrts,bksd->bkrtd", probs.astype(v.dtype), v)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


@struct.dataclass
class MaskSpec:
    """A mask given by its ingredients instead of a [batch, q_len, k_len] array, so that long
    sequences can build it one block of queries at a time."""

    q_positions: jax.Array
    k_positions: jax.Array
    q_segments: jax.Array | None = None
    k_segments: jax.Array | None = None
    causal: bool = struct.field(pytree_node=False, default=True)
    window: tuple[int, int] = struct.field(pytree_node=False, default=(-1, -1))

    def dense(self) -> jax.Array:
        return attention_mask(
            self.q_positions,
            self.k_positions,
            self.q_segments,
            self.k_segments,
            causal=self.causal,
            window=self.window,
        )

    def rows(self, q_positions, q_segments) -> "MaskSpec":
        return dataclasses.replace(self, q_positions=q_positions, q_segments=q_segments)


def blocked_attention(q, k, v, mask: MaskSpec, block: int) -> jax.Array:
    """Attention over all keys for one block of queries at a time, each block rematerialised in
    the backward pass: memory grows with block * k_len instead of q_len * k_len."""
    batch, time = q.shape[:2]
    blocks = -(-time // block)
    pad = blocks * block - time

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, blocks, block, *x.shape[2:]), 1, 0)

    q_segments = (
        mask.q_segments if mask.q_segments is not None else jnp.ones((batch, time), jnp.int32)
    )
    k_segments = (
        mask.k_segments if mask.k_segments is not None else jnp.ones(k.shape[:2], jnp.int32)
    )
    full = dataclasses.replace(mask, q_segments=q_segments, k_segments=k_segments)

    @jax.checkpoint
    def one(args):
        qb, qp, qs = args
        return dot_product_attention(qb, k, v, full.rows(qp, qs).dense())

    out = jax.lax.map(one, (split(q), split(mask.q_positions), split(q_segments)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, blocks * block, *q.shape[2:])[:, :time]


def windowed_attention(q, k, v, mask: MaskSpec, block: int) -> jax.Array:
    """Sliding-window self-attention per query block over the keys its window can reach: memory
    grows with time * (block + left + right) instead of time^2. Key j must hold the token of query
    j (q and k of one sequence), and `mask.window` must bound both sides."""
    batch, time = q.shape[:2]
    left, right = mask.window
    blocks = -(-time // block)
    pad_t = blocks * block - time
    width = block + left + right
    ones = jnp.ones((batch, time), jnp.int32)
    q_segments = mask.q_segments if mask.q_segments is not None else ones
    k_segments = mask.k_segments if mask.k_segments is not None else ones

    def pad(x, before, after):
        return jnp.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))

    qb = pad(q, 0, pad_t).reshape(batch * blocks, block, *q.shape[2:])
    q_pos = pad(mask.q_positions, 0, pad_t).reshape(batch * blocks, block)
    q_seg = pad(q_segments, 0, pad_t).reshape(batch * blocks, block)
    gather = jnp.arange(blocks)[:, None] * block + jnp.arange(width)[None, :]  # [blocks, width]

    def windows(x):
        x = pad(x, left, right + pad_t)[:, gather]  # [batch, blocks, width, ...]
        return x.reshape(batch * blocks, width, *x.shape[3:])

    dense = attention_mask(
        q_pos,
        windows(mask.k_positions),
        q_seg,
        windows(k_segments),
        causal=mask.causal,
        window=mask.window,
    )
    out = dot_product_attention(qb, windows(k), windows(v), dense)
    return out.reshape(batch, blocks * block, *q.shape[2:])[:, :time]


# Query lengths above these run block by block: over all keys, or (a window bounded on both sides,
# self-attention) over the keys the window reaches.
ATTENTION_BLOCK = 512
WINDOW_BLOCK = 128


def attend(
    q,
    k,
    v,
    mask: MaskSpec | jax.Array | None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    block: int = ATTENTION_BLOCK,
    window_block: int = WINDOW_BLOCK,
) -> jax.Array:
    """Attention with a dense mask, or a MaskSpec that long query sequences apply block by block
    (without dropout): windowed when the window is bounded and keys align with queries."""
    if isinstance(mask, MaskSpec):
        dropout = dropout_rate > 0 and dropout_rng is not None
        left, right = mask.window
        time = q.shape[1]
        if not dropout and left >= 0 and right >= 0 and time > window_block and k.shape[1] == time:
            return windowed_attention(q, k, v, mask, window_block)
        if time > block and not dropout:
            return blocked_attention(q, k, v, mask, block)
        mask = mask.dense()
    return dot_product_attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
