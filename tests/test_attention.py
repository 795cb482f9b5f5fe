"""The one attention entry (`nn.attention.attend`): its block-by-block paths (all keys, or the keys
a sliding window reaches) give the dense mask's result and never form [time, time] logits; a
bounded window reads only the keys it reaches."""

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.nn.attention import (
    MaskSpec,
    attend,
    attention_mask,
    blocked_attention,
    dot_product_attention,
    windowed_attention,
)

TIME = 45
CASES = [(False, (5, 2)), (True, (-1, -1)), (False, (-1, -1)), (True, (7, 0))]


def _inputs():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, TIME, 3, 8)).astype(np.float32)) for _ in range(3))
    positions = jnp.broadcast_to(jnp.arange(TIME), (2, TIME))
    segments = (positions < jnp.asarray([[TIME], [30]])).astype(jnp.int32)
    return q, k, v, positions, segments


def test_blocked_attention_paths_equal_the_full_mask():
    q, k, v, positions, segments = _inputs()
    valid = np.asarray(segments, bool)
    for causal, window in CASES:
        mask = attention_mask(
            positions, positions, segments, segments, causal=causal, window=window
        )
        want = np.asarray(dot_product_attention(q, k, v, mask))
        spec = MaskSpec(positions, positions, segments, segments, causal=causal, window=window)
        blocked = blocked_attention(q, k, v, spec, 16)
        np.testing.assert_allclose(np.asarray(blocked), want, atol=1e-6)
        got = attend(q, k, v, spec, block=16, window_block=16)
        np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-6)
        if window[0] >= 0 and window[1] >= 0:
            windowed = windowed_attention(q, k, v, spec, 16)
            np.testing.assert_allclose(np.asarray(windowed)[valid], want[valid], atol=1e-6)


def test_long_queries_never_form_time_by_time_logits():
    q, k, v, positions, segments = _inputs()
    square = f"{TIME},{TIME}]"
    for causal, window in CASES:
        spec = MaskSpec(positions, positions, segments, segments, causal=causal, window=window)
        short = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, spec))(q, k, v)
        assert square in str(short)  # below the block sizes: one dense [time, time] mask
        long = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, spec, block=16, window_block=16))(
            q, k, v
        )
        assert square not in str(long), (causal, window)
        left, right = window
        # Windowed: each block of 16 queries reads 16 + left + right keys, not all of them.
        reads_all = f"16,{TIME}]" in str(long)
        assert reads_all == (left < 0), (causal, window)
        if left >= 0:
            assert f"16,{16 + left + right}]" in str(long), (causal, window)
