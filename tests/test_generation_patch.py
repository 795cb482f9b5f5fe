"""The patch decoder runs its heads and sampler only where the delay schedule emits a frame; its
codes and logits equal those of the dense loop that samples every (step, channel) pair, greedy
and sampled with the same key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.inference.sampling import GREEDY, SamplerConfig, forbid_one, sample
from mimo_jax.lm.model import delay_schedule
from mimo_jax.nn.attention import attention_mask


def _dense_decode_patch(model, local_hidden, sample_fn, rng):
    """The patch decoder as a scan over every step, sampling every channel at every step and
    keeping the active ones (its form before the static delay schedule was unrolled)."""
    c = model.config
    n = local_hidden.shape[0]
    steps, gs = c.patch_steps, c.group_size
    active = jnp.asarray(delay_schedule(c.delay_pattern, gs))
    cache = model.local_transformer.init_cache(n, steps)
    key_pos = jnp.broadcast_to(jnp.arange(steps), (n, steps))

    def step(carry, t):
        x, cache, codes, rng = carry
        q_pos = jnp.full((n, 1), t)
        out, cache = model.local_transformer(
            x, q_pos, attention_mask(q_pos, key_pos, causal=True), cache, t
        )
        nxt = jnp.zeros((n, 1, model.speech_embeddings[0].embedding.shape[1]), model.dtype)
        step_logits = []
        for ch, (head, table) in enumerate(
            zip(model.local_transformer_lm_heads, model.speech_embeddings)
        ):
            rng, sub = jax.random.split(rng)
            step_logits.append(head(out[:, 0]))
            tok = sample_fn(step_logits[-1], c.speech_empty_ids[ch], sub)
            frame = jnp.clip(t - c.delay_pattern[ch], 0, gs - 1)
            on = active[t, ch]
            codes = codes.at[:, frame, ch].set(jnp.where(on, tok, codes[:, frame, ch]))
            nxt = nxt + jnp.where(on, table(tok)[:, None].astype(model.dtype), 0.0)
        return (model._to_local(nxt), cache, codes, rng), step_logits

    codes = jnp.zeros((n, gs, len(c.speech_vocab_sizes)), jnp.int32)
    x0 = local_hidden[:, None].astype(model.dtype)
    (_, _, codes, _), logits = jax.lax.scan(step, (x0, cache, codes, rng), jnp.arange(steps))
    return codes, [jnp.moveaxis(lg[d : d + gs], 0, 1) for d, lg in zip(c.delay_pattern, logits)]


@pytest.mark.parametrize(
    "sampler", [GREEDY, SamplerConfig(True, 0.9, 50, 0.95)], ids=["greedy", "sampled"]
)
def test_unrolled_patch_decoder_equals_the_dense_loop(lm, sampler):
    config, model = lm
    rows = 5
    hidden = 3.0 * jax.random.normal(jax.random.key(0), (rows, config.local_dim))

    def sample_fn(logits, forbidden_id, key):
        return sample(logits, sampler, key, forbid_one(logits.shape[-1], forbidden_id))

    rng = jax.random.key(7)
    codes, logits = jax.jit(lambda h, k: model.decode_patch(h, sample_fn, k, True))(hidden, rng)
    want_codes, want_logits = jax.jit(lambda h, k: _dense_decode_patch(model, h, sample_fn, k))(
        hidden, rng
    )
    assert codes.shape == (rows, config.group_size, config.audio_channels)
    np.testing.assert_array_equal(codes, want_codes)
    if sampler.do_sample:  # the draws differ between rows: not one greedy path
        assert len({tuple(np.asarray(r).ravel()) for r in codes}) == rows
    for got, want in zip(logits, want_logits):
        np.testing.assert_array_equal(got, want)
