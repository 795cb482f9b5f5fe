"""The RVQ's training step against the official quantizer in training mode (the rvq_train/
fixture: codes identical, the rest at 1e-5), and the properties the fixture cannot show: padding
counts for nothing, data-parallel shards make the whole batch's update, and dead codes follow
the same rule as the others (the official replacement is overwritten within the step)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.common import tokenizer_config
from mimo_jax.tokenizer.rvq_training import (
    CodebookState,
    EmaConfig,
    ema_update,
    initialise,
    states_of,
    store,
    train_step,
)
from mimo_jax.tokenizer.stage1 import Stage1Config

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def rvq(fixtures_root):
    root = fixtures_root / "rvq_train"
    return json.loads((root / "config.json").read_text()), dict(np.load(root / "reference.npz"))


EMA = ("embed", "cluster_size", "embed_avg")  # the buffers the fixture holds (all initialised)


def _states(ref, prefix: str, layers: int) -> list[CodebookState]:
    return [
        CodebookState(*(jnp.asarray(ref[f"{prefix}_{k}_{q}"]) for k in EMA), jnp.ones((1,)))
        for q in range(layers)
    ]


def test_defaults_are_the_official_quantizers(rvq):
    # What a user gets without asking: EmaConfig's defaults, stage 1's and the stage-1 experiment
    # configs' (released size and demo) are the settings the official quantizer trains with.
    cfg, _ = rvq
    official = EmaConfig(decay=cfg["decay"], epsilon=cfg["epsilon"])
    assert EmaConfig() == official and Stage1Config().ema == official
    assert Stage1Config().commit_weight == cfg["commitment_weight"]
    for demo in (False, True):
        config = tokenizer_config("stage1", demo, "data")
        assert EmaConfig(config.ema.decay, config.ema.epsilon) == official, demo
        assert config.loss.commit == cfg["commitment_weight"], demo


def test_steps_match_the_official_quantizer(rvq):
    cfg, ref = rvq
    layers = len(cfg["codebooks"])
    ema = EmaConfig(decay=cfg["decay"], epsilon=cfg["epsilon"])
    states = _states(ref, "init", layers)
    for step in range(cfg["steps"]):
        x = jnp.asarray(ref[f"step{step}_x"])
        out, new = train_step(states, x, ema)
        np.testing.assert_array_equal(np.asarray(out.codes).T, ref[f"step{step}_codes"])
        np.testing.assert_allclose(out.quantized, ref[f"step{step}_quantized"], **TOL)
        np.testing.assert_allclose(out.commit_losses, ref[f"step{step}_commit_loss"], **TOL)

        def objective(x):
            forward, _ = train_step(states, x, ema)
            return jnp.sum(jnp.square(forward.quantized)) + jnp.sum(forward.commit_losses)

        np.testing.assert_allclose(jax.grad(objective)(x), ref[f"step{step}_grad_x"], **TOL)
        for got, want in zip(new, _states(ref, f"step{step}", layers), strict=True):
            for name, a, b in zip(CodebookState._fields, got, want, strict=True):
                np.testing.assert_allclose(a, b, err_msg=f"step {step} {name}", **TOL)
        states = new  # the next step starts from ours


def _numpy_rule(state: CodebookState, x, codes, decay, eps) -> CodebookState:
    """SPEC §3.5's update, written out in numpy."""
    k = state.embed.shape[0]
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    sums = np.zeros(state.embed.shape)
    np.add.at(sums, codes, x)
    size = decay * np.asarray(state.cluster_size, np.float64) + (1 - decay) * counts
    avg = decay * np.asarray(state.embed_avg, np.float64) + (1 - decay) * sums
    smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
    return CodebookState(avg / smoothed[:, None], size, avg, state.inited)


def _random_state(key, k, dim, dead=()):
    a, b = jax.random.split(key)
    size = jax.random.uniform(a, (k,), minval=3.0, maxval=9.0).at[jnp.asarray(dead, int)].set(0.5)
    avg = jax.random.normal(b, (k, dim)) * size[:, None]
    return CodebookState(avg / size[:, None], size, avg, jnp.ones((1,)))


def test_dead_codes_padding_and_shards():
    k, dim, n = 8, 4, 24
    keys = jax.random.split(jax.random.key(0), 3)
    state = _random_state(keys[0], k, dim, dead=(2, 5))  # below the threshold of 2
    x = jax.random.normal(keys[1], (n, dim))
    codes = jax.random.randint(keys[2], (n,), 0, k).at[:3].set(2)  # a dead code gets vectors too
    cfg = EmaConfig(decay=0.9, epsilon=1e-3)
    got = ema_update(state, x, codes, cfg)
    for name, a, b in zip(CodebookState._fields, got, _numpy_rule(state, x, codes, 0.9, 1e-3)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)

    # Padding: rows masked out change nothing.
    padded = jnp.concatenate([x, 100.0 * jnp.ones((5, dim))])
    mask = jnp.arange(n + 5) < n
    with_padding = ema_update(state, padded, jnp.concatenate([codes, jnp.zeros(5, int)]), cfg, mask)
    for a, b in zip(with_padding, got):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    # Data parallel: four shards, summed over the axis, make the whole batch's update on each.
    def shard_update(xs, cs):
        return ema_update(state, xs, cs, cfg, axis_name="data")

    shards = jax.vmap(shard_update, axis_name="data")(x.reshape(4, -1, dim), codes.reshape(4, -1))
    for a, b in zip(shards, got):
        for i in range(4):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"decay=1.0: expected a number in \[0, 1\)"):
        EmaConfig(decay=1.0)
    with pytest.raises(ValueError, match="epsilon=0.0: expected a number > 0"):
        EmaConfig(epsilon=0.0)


def _fresh(k, dim):
    return CodebookState(jnp.zeros((k, dim)), jnp.zeros((k,)), jnp.zeros((k, dim)), jnp.zeros(1))


def _lloyd_fixed_point(entries, counts, frames):
    """Every entry with frames is their mean, and the counts are the nearest-entry counts (numpy,
    squared L2, first index on ties)."""
    d = ((frames[:, None, :] - entries[None]) ** 2).sum(-1)
    nearest = d.argmin(1)
    np.testing.assert_array_equal(counts, np.bincount(nearest, minlength=len(entries)))
    for j in np.unique(nearest):
        np.testing.assert_allclose(entries[j], frames[nearest == j].mean(0), rtol=1e-5, atol=1e-5)


def test_kmeans_initialises_each_codebook_on_its_residual_and_skips_padding():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (4, 3))
    frames = (centres[rng.integers(0, 4, 60)] + rng.normal(0, 0.3, (60, 3))).astype(np.float32)
    x = np.concatenate([frames, np.full((7, 3), 1e3, np.float32)])  # 7 padded frames
    mask = np.arange(67) < 60
    embed = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    done = CodebookState(embed, jnp.full((4,), 3.0), embed, jnp.ones(1))
    states = [_fresh(4, 3), _fresh(5, 3), done]
    out = jax.jit(lambda s, x, m: initialise(s, x, jax.random.key(1), mask=m))(
        states, jnp.asarray(x), jnp.asarray(mask)
    )
    residual = frames
    for q in range(2):
        embed, size, avg, inited = map(np.asarray, out[q])
        assert inited.tolist() == [1.0] and size.sum() == 60
        np.testing.assert_array_equal(avg, embed)
        assert np.abs(embed).max() < 100  # no centroid drawn from or pulled by padding
        _lloyd_fixed_point(embed, size, residual)  # codebook 1 sees codebook 0's residual
        residual = residual - embed[((residual[:, None] - embed[None]) ** 2).sum(-1).argmin(1)]
    for a, b in zip(out[2], done):  # initialised already: unchanged
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kmeans_with_fewer_frames_than_entries_draws_them_again():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
    (state,) = initialise([_fresh(8, 2)], x, jax.random.key(0), iters=5)
    embed = np.asarray(state.embed)
    assert np.isfinite(embed).all() and np.asarray(state.cluster_size).sum() == 3
    # Each entry is a frame (a drawn one that kept no frames, or the one frame it kept).
    assert all(np.isclose(np.asarray(x), e).all(1).any() for e in embed)


def test_the_quantizer_holds_the_official_buffers(fixtures_root):
    """The tokenizer fixture's buffers reach the model under their official names, and states
    written back are what the model then holds."""
    from safetensors.numpy import load_file

    from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer

    _, model = load_tokenizer(fixtures_root / "tokenizer")
    official = load_file(fixtures_root / "tokenizer" / "model.safetensors")
    states = states_of(model.encoder.quantizer)
    for q, state in enumerate(states):
        for name, value in zip(CodebookState._fields, state):
            want = official[f"encoder.quantizer.vq.layers.{q}._codebook.{name}"]
            np.testing.assert_array_equal(np.asarray(value), want, err_msg=f"{q} {name}")
    changed = [s._replace(cluster_size=s.cluster_size + 1.0) for s in states]
    store(model.encoder.quantizer, changed)
    for got, want in zip(states_of(model.encoder.quantizer), changed):
        np.testing.assert_array_equal(np.asarray(got.cluster_size), np.asarray(want.cluster_size))
