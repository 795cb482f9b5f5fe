"""Attention masks and the attention kernels shared by every transformer in the project.

Masks are built from per-token positions and segment ids, so one mechanism covers causal decoding,
bidirectional patches, packed rows (several documents in one row: segment ids differ across their
boundary), sliding windows, and KV caches (cache slots carry the position and segment of the token
they hold; empty slots have segment 0). `attend` is the one entry: given a MaskSpec, long query
sequences run block by block (over the keys a window can reach, or over all keys).

Kernels (`implementation`, the experiment config's `model.attention`):
- `xla`: the einsum + softmax below, the reference, on every backend.
- `splash` (TPU): the Pallas splash-attention kernel, under `shard_map` so that batch and heads stay
  sharded as the activation rules say.
- `cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, bf16/fp16; packed rows
  (and windows cuDNN cannot express) go to it as a dense [batch, 1, q_len, k_len] mask.
- `auto`: splash on TPU, cudnn on GPU where its limits allow, xla otherwise (logged once).
Only self-attention given as a MaskSpec runs on splash or cudnn: training and whole-row passes of
the LM backbone, its prefill (the prompt attends to itself, `nn.transformer`), and the tokenizer's
encoder, decoder and vocoder. A dense mask keeps xla: that is KV-cached decoding (keys are cache
slots whose positions and segments are data, which the accelerated kernels' static masks cannot
express; one query per step leaves a flash kernel nothing to tile) and the patch transformers,
whose rows of 4 or 11 tokens a 128-token kernel block would pad tenfold. Splash and cudnn read a
MaskSpec's positions as each token's index within its segment (segments contiguous, positions
advancing by one), which is how packed rows and left-padded prompts are built; the outputs of
padding queries (segment 0) are unspecified there, as every caller discards them.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from mimo_jax.nn import partitioning

log = logging.getLogger(__name__)

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


IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
_KERNEL_ON = {"tpu": "splash", "gpu": "cudnn"}  # the accelerated kernel of each backend
# Splash tiles: sequences are padded to a multiple of the smallest, tiled by the largest dividing.
_SPLASH_BLOCKS = (512, 256, 128)


def kernels_on(platform: str) -> tuple[str, ...]:
    """The kernels a backend runs: xla everywhere, and its accelerated one."""
    return ("xla",) + ((_KERNEL_ON[platform],) if platform in _KERNEL_ON else ())


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    return name


def _platform() -> str:
    """The backend being compiled for: the active mesh's devices (an ahead-of-time TPU target on a
    CPU host included), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _supports(name: str, q: jax.Array, spec: MaskSpec) -> str | None:
    """Why kernel `name` cannot run these queries [batch, time, heads, head_dim], or None."""
    head_dim, dtype = q.shape[-1], jnp.dtype(q.dtype)
    if name == "cudnn" and q.shape[1] % 2 and not _cudnn_masks_natively(spec):
        return f"cudnn takes a dense mask over an even length only, not {q.shape[1]}"
    if name == "splash" and dtype not in (jnp.float32, jnp.bfloat16):
        return f"splash takes float32 or bfloat16, not {dtype}"
    if name == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        return f"cudnn takes bfloat16 or float16, not {dtype}"
    if name == "cudnn" and (head_dim % 8 or head_dim > 128):
        return f"cudnn takes a head dim <= 128 and a multiple of 8, not {head_dim}"
    return None


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)


def choose_kernel(implementation: str, q, k, mask, dropout: bool, interpret: bool = False) -> str:
    """The kernel that runs this call: `xla`, `splash` or `cudnn`. An explicit choice the backend,
    dtype or head dim cannot take is refused; `auto` then falls back to xla (logged once)."""
    check_implementation(implementation)
    if not isinstance(mask, MaskSpec) or k.shape[1] != q.shape[1] or implementation == "xla":
        return "xla"  # dense masks (KV caches, patch transformers) and cross-attention: see above
    platform = _platform()
    if implementation == "auto":
        name = _KERNEL_ON.get(platform)
        if name is None:
            return "xla"
        why = "attention dropout" if dropout else _supports(name, q, mask)
        if why:
            _log_once(f"attention auto: xla instead of {name}: {why}")
        return "xla" if why else name
    needs = next(p for p, kernel in _KERNEL_ON.items() if kernel == implementation)
    if platform != needs and not (implementation == "splash" and interpret):
        supported = " and ".join(kernels_on(platform))
        raise ValueError(
            f"attention {implementation!r} needs a {needs.upper()}; this backend is {platform}, "
            f"which supports {supported} (or auto)"
        )
    why = _supports(implementation, q, mask) or ("it has no attention dropout" if dropout else None)
    if why:
        raise ValueError(f"attention {implementation!r} cannot run this call: {why}")
    return implementation


# Splash (TPU) -----------------------------------------------------------------------------------
def _splash_mask(spec: MaskSpec, time: int, heads: int) -> splash.MultiHeadMask:
    """The MaskSpec's causal flag and window as splash's lazy mask over token indices."""
    left, right = (None if bound < 0 else bound for bound in spec.window)
    if spec.causal:
        right = 0  # a right bound >= 0 adds nothing to causality
    shape = (time, time)
    one: splash.Mask
    if left is None and right is None:
        one = splash.FullMask(shape)
    elif left is None and right == 0:
        one = splash.CausalMask(shape)
    else:
        one = splash.LocalMask(shape, window_size=(left, right), offset=0)
    return splash.MultiHeadMask([one] * heads)


def _splash_local(q, k, v, q_seg, k_seg, spec: MaskSpec, interpret: bool):
    """Splash on one shard: q [batch, heads, time, head_dim], k, v [batch, kv_heads, time,
    head_dim], segment ids [batch, time] or None. Time is a multiple of a splash block."""
    heads, time = q.shape[1], q.shape[2]
    block = next(b for b in _SPLASH_BLOCKS if time % b == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mqa = k.shape[1] == 1
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    kernel = make(
        _splash_mask(spec, time, heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    if mqa:
        k, v = k[:, 0], v[:, 0]
    if q_seg is None:
        return jax.vmap(kernel)(q, k, v)
    segments = splash.SegmentIds(q=q_seg, kv=k_seg)
    return jax.vmap(kernel)(q, k, v, segment_ids=segments)


def _shard_specs(q, k) -> tuple[PartitionSpec, PartitionSpec]:
    """shard_map specs of q, k, v [batch, heads, time, head_dim] and of segment ids [batch, time]
    under the activation rules: batch over the data axes, heads over `tensor` where the kv heads
    divide by it (each shard then holds whole query groups), time whole (splash cannot split the
    keys)."""
    rules, mesh = partitioning.active_rules(), jax.sharding.get_abstract_mesh()
    batch, heads = partitioning.partition_spec(
        (q.shape[0], k.shape[1]), ("activation_batch", "activation_heads"), rules, mesh
    )
    return PartitionSpec(batch, heads, None, None), PartitionSpec(batch, None)


def splash_attention(q, k, v, spec: MaskSpec, *, interpret: bool = False) -> jax.Array:
    """`attend` on the splash kernel: q [batch, time, heads, head_dim], k, v [batch, time,
    kv_heads, head_dim]. Time is padded to a multiple of 128 (padding keys in segment 0, which no
    real query reads); head_dim^-0.5 scales q, as splash does not scale."""
    batch, time, _, head_dim = q.shape
    padded = -(-time // _SPLASH_BLOCKS[-1]) * _SPLASH_BLOCKS[-1]
    q_seg, k_seg = spec.q_segments, spec.k_segments
    if padded != time and q_seg is None:
        q_seg = k_seg = jnp.ones((batch, time), jnp.int32)

    def prepare(x):  # [batch, time, heads, head_dim] -> [batch, heads, padded, head_dim]
        return jnp.pad(x, [(0, 0), (0, padded - time), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    def pad_ids(s):
        return None if s is None else jnp.pad(s.astype(jnp.int32), [(0, 0), (0, padded - time)])

    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).astype(q.dtype)
    args = (prepare(q), prepare(k), prepare(v), pad_ids(q_seg), pad_ids(k_seg))
    local = functools.partial(_splash_local, spec=spec, interpret=interpret)
    if not jax.sharding.get_abstract_mesh().empty:
        qkv, ids = _shard_specs(args[0], args[1])
        ids_spec = None if q_seg is None else ids
        local = jax.shard_map(
            local,
            in_specs=(qkv, qkv, qkv, ids_spec, ids_spec),
            out_specs=qkv,
            check_vma=False,
        )
    out = local(*args)
    return out.transpose(0, 2, 1, 3)[:, :time]


# cuDNN (GPU) ------------------------------------------------------------------------------------
def _cudnn_masks_natively(spec: MaskSpec) -> bool:
    """cuDNN's own masks: causal with an optional left window, or none; no segment ids."""
    left, right = spec.window
    unsegmented = spec.q_segments is None and spec.k_segments is None
    return unsegmented and (spec.causal or (left < 0 and right < 0))


def cudnn_arguments(q, k, v, spec: MaskSpec) -> dict:
    """The arguments of `jax.nn.dot_product_attention` for `attend` (layout [batch, time, heads,
    head_dim] as ours, grouped kv heads as ours): cuDNN's own causal mask and left window where
    they express the MaskSpec, else the dense mask [batch, 1, q_len, k_len]."""
    args = dict(query=q, key=k, value=v, scale=q.shape[-1] ** -0.5)
    if not _cudnn_masks_natively(spec):
        args["mask"] = spec.dense()[:, None]
        return args
    args["is_causal"] = spec.causal
    if spec.window[0] >= 0:
        args["local_window_size"] = (spec.window[0], 0)
    return args


def cudnn_attention(q, k, v, spec: MaskSpec) -> jax.Array:
    return jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, spec), implementation="cudnn")


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
    implementation: str = "xla",
    interpret: bool = False,
) -> jax.Array:
    """Attention with a dense mask, or a MaskSpec that long query sequences apply block by block
    (without dropout): windowed when the window is bounded and keys align with queries.

    `implementation` picks the kernel (module docstring); `interpret` runs splash in Pallas's
    interpreter, on any backend (tests)."""
    dropout = dropout_rate > 0 and dropout_rng is not None
    kernel = choose_kernel(implementation, q, k, mask, dropout, interpret)
    if kernel == "splash":
        assert isinstance(mask, MaskSpec)
        return splash_attention(q, k, v, mask, interpret=interpret)
    if kernel == "cudnn":
        assert isinstance(mask, MaskSpec)
        return cudnn_attention(q, k, v, mask)
    if isinstance(mask, MaskSpec):
        left, right = mask.window
        time = q.shape[1]
        if not dropout and left >= 0 and right >= 0 and time > window_block and k.shape[1] == time:
            return windowed_attention(q, k, v, mask, window_block)
        # Keys of a cache (a prefill on xla) take the dense mask, as every cached call does.
        if time > block and not dropout and k.shape[1] == time:
            return blocked_attention(q, k, v, mask, block)
        mask = mask.dense()
    return dot_product_attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
