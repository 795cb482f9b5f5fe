"""The loss on a hand-computed case; optimizer groups, learning rates and frozen groups; stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_support import TWO_CHANNELS, random_batch

from mimo_jax.lm.config import small_config
from mimo_jax.lm.groups import group_of
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.train.losses import LossConfig, mimo_loss
from mimo_jax.train.optimizer import OptimizerConfig
from mimo_jax.train.step import Trainer


class FixedLogits:
    """A stand-in model whose text and patch logits are given arrays (the loss's arithmetic
    only)."""

    def __init__(self, text_logits, patch_logits):
        self._text, self._patch = text_logits, patch_logits

    def embed_inputs(self, text, codes, rng=None):
        return jnp.zeros(text.shape + (1,))

    def backbone(self, embeds, positions, segments, rng=None):
        return embeds

    def text_logits(self, hidden):  # hidden: the loss's one chunk of all (flattened) positions
        return self._text.reshape(-1, self._text.shape[-1])[: hidden.shape[0]]

    def local_hidden(self, hidden):
        return hidden

    def patch_logits(self, local, targets, rng=None):
        return self._patch


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )


def test_loss_by_hand():
    rng = np.random.default_rng(0)
    text_logits = rng.normal(size=(1, 3, 5)).astype(np.float32)
    patch = [rng.normal(size=(3, 2, 4)).astype(np.float32) for _ in range(2)]  # 2 codebooks, gs 2
    batch = dict(
        text=jnp.zeros((1, 3), jnp.int32),
        codes=jnp.zeros((1, 3, 2, 2), jnp.int32),
        positions=jnp.arange(3)[None],
        segment_ids=jnp.ones((1, 3), jnp.int32),
        text_targets=jnp.array([[1, 4, 2]]),
        text_weights=jnp.array([[1.0, 0.5, 0.0]]),
        code_targets=jnp.array([[[[0, 1], [2, 3]], [[3, 3], [1, 0]], [[0, 0], [0, 0]]]]),
        code_weights=jnp.array([[[12.0, 8.0], [12.0, 8.0], [0.0, 0.0]]]),
    )
    cfg = LossConfig(100.0, (12.0, 8.0))
    loss, m = mimo_loss(
        FixedLogits(jnp.asarray(text_logits), [jnp.asarray(p) for p in patch]), batch, cfg
    )
    lt = _log_softmax(text_logits)[0]
    text = -(1.0 * lt[0, 1] + 0.5 * lt[1, 4]) / 1.5
    targets = np.asarray(batch["code_targets"])[0]
    cb = []
    for c in range(2):
        lp = _log_softmax(patch[c])
        per_patch = [-np.mean([lp[n, f, targets[n, f, c]] for f in range(2)]) for n in range(2)]
        cb.append(np.mean(per_patch))  # patches 0 and 1 have equal weight; patch 2 weight 0
    want = (100 * text + 12 * cb[0] + 8 * cb[1]) / 120
    np.testing.assert_allclose(m["text_loss"], text, rtol=1e-5)
    np.testing.assert_allclose(m["codebook0_loss"], cb[0], rtol=1e-5)
    np.testing.assert_allclose(m["codebook1_loss"], cb[1], rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # Stage 1 weights: the text loss alone, and no patch decoder is called.
    loss1, m1 = mimo_loss(
        FixedLogits(jnp.asarray(text_logits), None), batch, LossConfig(1.0, (0.0, 0.0))
    )
    np.testing.assert_allclose(loss1, text, rtol=1e-5)
    assert "codebook0_loss" not in m1


def test_loss_by_hand_with_per_position_per_channel_weights():
    # Weights that differ between positions and between channels (constant ones would cancel in
    # each codebook's normalisation and hide a swapped or misaligned weight).
    rng = np.random.default_rng(1)
    g, gs, channels, vocab = 4, 3, 3, 6
    text_logits = rng.normal(size=(1, g, 7)).astype(np.float32)
    patch = [rng.normal(size=(g, gs, vocab)).astype(np.float32) for _ in range(channels)]
    weights = np.array([[3.0, 0.5, 1.0], [1.0, 2.0, 0.0], [0.25, 4.0, 2.0], [2.0, 1.0, 3.0]])
    targets = rng.integers(0, vocab, (g, gs, channels))
    text_targets, text_weights = rng.integers(0, 7, g), np.array([2.0, 0.0, 1.0, 0.5])
    batch = {
        k: jnp.asarray(v)
        for k, v in dict(
            text=np.zeros((1, g), np.int32),
            codes=np.zeros((1, g, gs, channels), np.int32),
            positions=np.arange(g)[None],
            segment_ids=np.ones((1, g), np.int32),
            text_targets=text_targets[None],
            text_weights=text_weights[None],
            code_targets=targets[None],
            code_weights=weights[None],
        ).items()
    }
    cfg = LossConfig(5.0, (4.0, 2.0, 1.0))
    loss, m = mimo_loss(
        FixedLogits(jnp.asarray(text_logits), [jnp.asarray(p) for p in patch]), batch, cfg
    )
    lt = _log_softmax(text_logits)[0]
    text = -sum(text_weights[n] * lt[n, text_targets[n]] for n in range(g)) / text_weights.sum()
    cb, acc = [], []
    for c in range(channels):
        lp = _log_softmax(patch[c])
        per_patch = [-np.mean([lp[n, f, targets[n, f, c]] for f in range(gs)]) for n in range(g)]
        cb.append(sum(weights[n, c] * per_patch[n] for n in range(g)) / weights[:, c].sum())
        hits = [
            np.mean(patch[c][n].argmax(-1) == targets[n, :, c])
            for n in range(g)
            if weights[n, c] > 0
        ]
        acc.append(np.mean(hits))
    want = (5 * text + 4 * cb[0] + 2 * cb[1] + 1 * cb[2]) / 12
    np.testing.assert_allclose(m["text_loss"], text, rtol=1e-5)
    for c in range(channels):
        np.testing.assert_allclose(m[f"codebook{c}_loss"], cb[c], rtol=1e-5)
        np.testing.assert_allclose(m[f"codebook{c}_accuracy"], acc[c], rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def _config(**overrides):
    return small_config(**TWO_CHANNELS, **overrides)


# The stage-2 weights of a two-channel LM and an optimizer that freezes the LLM: the groups test's
# second case and the non-finite step compile the same train step.
STAGE2, FROZEN_LLM = "100-12-8", ("llm",)
LEARNING_RATES = {"patch_encoder": 1e-3, "llm": 1e-4, "patch_decoder": 3e-3}


def _optimizer(frozen) -> OptimizerConfig:
    return OptimizerConfig(
        LEARNING_RATES,
        total_steps=10,
        schedule="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        clip_norm=0.0,
        frozen=frozen,
    )


def _changed_groups(before, after):
    changed = {}
    for (path, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        g = group_of(tuple(str(p) for p in path))
        delta = float(jnp.max(jnp.abs(a.get_value() - b.get_value())))
        changed[g] = max(changed.get(g, 0.0), delta)
    return changed


@pytest.mark.parametrize("weights,frozen", [("1-0-0", ("patch_decoder",)), (STAGE2, FROZEN_LLM)])
def test_groups_get_their_learning_rates_and_frozen_groups_stay(weights, frozen):
    config = _config()
    model = MiMoAudioLM(config, rngs=nnx.Rngs(0))
    before = nnx.state(model, nnx.Param)
    lrs = LEARNING_RATES
    trainer, state = Trainer.create(model, LossConfig.from_string(weights), _optimizer(frozen))
    state, metrics = jax.jit(trainer.train_step)(state, random_batch(config), jax.random.key(0))
    after = nnx.state(trainer.model(state), nnx.Param)
    changed = _changed_groups(before, after)
    for group, lr in lrs.items():
        if group in frozen:
            assert changed[group] == 0.0, group
        else:
            # Adam's first step moves each parameter by at most lr (exactly lr where it moves).
            np.testing.assert_allclose(changed[group], lr, rtol=1e-3, err_msg=group)
            assert float(metrics[f"lr/{group}"]) == pytest.approx(lr)
    trainable = {
        group_of(tuple(str(p) for p in path)) for path, _ in nnx.to_flat_state(state.params)
    }
    assert trainable == set(lrs) - set(frozen)


def test_the_trainer_wants_one_loss_weight_per_codebook():
    model = MiMoAudioLM(_config(), rngs=nnx.Rngs(0))  # two audio channels
    with pytest.raises(ValueError, match=r"loss weights: 4 numbers, expected 3 \(text, then one"):
        Trainer.create(model, LossConfig.from_string("1-1-1-1"), _optimizer(()))


def test_weight_decay_spares_norms_and_biases():
    config = _config()
    model = MiMoAudioLM(config, rngs=nnx.Rngs(0))
    opt = OptimizerConfig(
        {"patch_encoder": 1.0, "llm": 1.0, "patch_decoder": 1.0},
        total_steps=2,
        schedule="constant",
        warmup_ratio=0.0,
        weight_decay=0.5,
        clip_norm=0.0,
    )
    trainer, state = Trainer.create(model, LossConfig.from_string("1-0-0"), opt)
    zero = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = jax.jit(trainer.tx.update)(zero, state.opt_state, state.params)
    for (path, u), (_, p) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(state.params)):
        leaf = str(path[-1])
        want = 0.0 if leaf in ("bias", "scale") else -0.5
        np.testing.assert_allclose(
            u.get_value(), want * p.get_value(), atol=1e-7, err_msg=str(path)
        )


def test_schedules_and_invalid_values():
    opt = OptimizerConfig(
        {"patch_encoder": 1.0, "llm": 2.0, "patch_decoder": 1.0},
        total_steps=100,
        schedule="cosine",
        warmup_ratio=0.1,
    )
    sched = opt.schedule_of("llm")
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(2.0)
    assert float(sched(55)) == pytest.approx(1.0, rel=1e-3) and float(sched(100)) == pytest.approx(
        0
    )
    with pytest.raises(ValueError, match="unknown module groups"):
        OptimizerConfig({"encoder": 1.0}, total_steps=1)
    with pytest.raises(ValueError, match="no learning rate for"):
        OptimizerConfig({"llm": 1.0}, total_steps=1)
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(
            {g: 1.0 for g in ("patch_encoder", "llm", "patch_decoder")},
            total_steps=1,
            schedule="linear",
        )


def test_non_finite_step_keeps_the_state():
    config = _config()
    model = MiMoAudioLM(config, rngs=nnx.Rngs(0))
    trainer, state = Trainer.create(model, LossConfig.from_string(STAGE2), _optimizer(FROZEN_LLM))
    batch = random_batch(config)
    batch["text_weights"] = batch["text_weights"].at[0, 0].set(jnp.nan)
    new, metrics = jax.jit(trainer.train_step)(state, batch, jax.random.key(0))
    assert float(metrics["update_skipped"]) == 1.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_matches_the_full_batch():
    config = _config(local_attn_dropout=0.0)  # dropout masks differ per micro-batch
    opt = OptimizerConfig(
        {"patch_encoder": 1e-3, "llm": 1e-3, "patch_decoder": 1e-3}, total_steps=5, clip_norm=0.0
    )
    loss = LossConfig.from_string(STAGE2)
    batch = random_batch(config, b=4)
    out = []
    for accum in (1, 2):
        trainer, state = Trainer.create(MiMoAudioLM(config, rngs=nnx.Rngs(0)), loss, opt, accum)
        out.append(jax.jit(trainer._grads)(state, batch, jax.random.key(0)))
    # Every micro-batch here has the same token weights, so the mean of the micro-batch losses and
    # gradients is the full batch's.
    np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
