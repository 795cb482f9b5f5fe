"""The RVQ's training step against the official quantizer in training mode (the rvq_train/
fixture: codes identical, the rest at 1e-5), and the properties the fixture cannot show: padding
counts for nothing, data-parallel shards make the whole batch's update, and dead codes follow
the same rule as the others (the official replacement is overwritten within the step)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.tokenizer.rvq_training import CodebookState, EmaConfig, ema_update, train_step

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def rvq(fixtures_root):
    root = fixtures_root / "rvq_train"
    return json.loads((root / "config.json").read_text()), dict(np.load(root / "reference.npz"))


def _states(ref, prefix: str, layers: int) -> list[CodebookState]:
    return [
        CodebookState(*(jnp.asarray(ref[f"{prefix}_{k}_{q}"]) for k in CodebookState._fields))
        for q in range(layers)
    ]


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
    return CodebookState(avg / smoothed[:, None], size, avg)


def _random_state(key, k, dim, dead=()):
    a, b = jax.random.split(key)
    size = jax.random.uniform(a, (k,), minval=3.0, maxval=9.0).at[jnp.asarray(dead, int)].set(0.5)
    avg = jax.random.normal(b, (k, dim)) * size[:, None]
    return CodebookState(avg / size[:, None], size, avg)


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
