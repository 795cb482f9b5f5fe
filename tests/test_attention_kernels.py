"""The attention kernels behind `attend`: splash (Pallas, run in its interpreter on the CPU) and the
arguments of the cuDNN call against the xla kernel, the choice of kernel per backend, and the
experiment config key `model.attention`. libtpu (the test extra) compiles a splash step for a TPU
topology on this CPU host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from tokenizer_support import CHECKPOINT

from experiments import aot_lib, train_tokenizer
from experiments.configs import demo, tokenizer_stage1
from mimo_jax.inference.generation_loop import _left_pad_layout
from mimo_jax.lm.config import small_config
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn import attention
from mimo_jax.nn.attention import (
    MaskSpec,
    attend,
    attention_mask,
    choose_kernel,
    cudnn_arguments,
    splash_attention,
)
from mimo_jax.nn.partitioning import use_rules
from mimo_jax.tokenizer.a2t import A2TConfig, AudioToTextLM
from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer
from sharding.rules import PRESETS

BATCH, HEADS, HEAD_DIM = 2, 8, 16


def _qkv(time: int, kv_heads: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (BATCH, time, HEADS, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (BATCH, time, kv_heads, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (BATCH, time, kv_heads, HEAD_DIM), jnp.float32)
    return q, k, v


def _packed(time: int, cuts: tuple[int, ...], pad: int):
    """Row 0: documents split at `cuts`, then `pad` padding tokens (segment 0); row 1: one
    document. Positions restart at 0 in each document."""
    seg = np.zeros((BATCH, time), np.int32)
    pos = np.zeros((BATCH, time), np.int32)
    bounds = (0, *cuts, time - pad)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[0, a:b], pos[0, a:b] = i + 1, np.arange(b - a)
    pos[0, time - pad :] = np.arange(pad)
    seg[1], pos[1] = 1, np.arange(time)
    return jnp.asarray(pos), jnp.asarray(seg)


def _spec(time, *, causal, window=(-1, -1), packed=True):
    pos, seg = _packed(time, (time // 3, time // 2), pad=time // 8)
    if not packed:
        pos, seg = jnp.broadcast_to(jnp.arange(time), (BATCH, time)), None
    return MaskSpec(pos, pos, seg, seg, causal=causal, window=window), seg


def _loss(implementation, spec, valid):
    """A loss over the real queries only: the outputs of padding queries are unspecified."""

    def loss(q, k, v):
        out = attend(q, k, v, spec, implementation=implementation, interpret=True)
        weights = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return jnp.sum(out * weights * valid[:, :, None, None])

    return loss


@pytest.mark.parametrize(
    "time, kv_heads, causal, window, packed",
    [
        (256, 1, True, (-1, -1), True),  # GQA 8:1 (one kv head: splash's MQA kernel)
        (256, 2, False, (-1, -1), True),  # bidirectional, 4:1
        (256, 8, True, (40, -1), True),  # causal sliding window
        (200, 4, False, (24, 16), False),  # bidirectional window, a length padded to 256
        (136, 4, True, (-1, -1), True),  # packed and padded to 256
    ],
)
def test_splash_equals_xla_forward_and_gradients(time, kv_heads, causal, window, packed):
    q, k, v = _qkv(time, kv_heads)
    spec, seg = _spec(time, causal=causal, window=window, packed=packed)
    valid = jnp.ones((BATCH, time)) if seg is None else (seg != 0).astype(jnp.float32)
    outs, grads = {}, {}
    for name in ("xla", "splash"):
        loss = _loss(name, spec, valid)
        outs[name] = attend(q, k, v, spec, implementation=name, interpret=True)
        grads[name] = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    real = valid[:, :, None, None] > 0
    np.testing.assert_allclose(
        jnp.where(real, outs["splash"], 0), jnp.where(real, outs["xla"], 0), atol=1e-5
    )
    for g_splash, g_xla in zip(grads["splash"], grads["xla"]):
        np.testing.assert_allclose(g_splash, g_xla, atol=1e-5)


@pytest.mark.parametrize(
    "causal, window, packed, native",
    [
        (True, (-1, -1), False, True),
        (False, (-1, -1), False, True),
        (True, (8, -1), False, True),  # cuDNN's left window
        (False, (8, 4), False, False),  # a window cuDNN cannot take: the dense mask
        (True, (-1, -1), True, False),  # segment ids: the dense mask
    ],
)
def test_cudnn_arguments_give_the_xla_kernel(causal, window, packed, native):
    """The cuDNN call's arguments (layout, grouped heads, mask or window, scale), given to the same
    function with implementation="xla" on the CPU, equal our kernel."""
    time = 64
    q, k, v = _qkv(time, 2)
    spec, seg = _spec(time, causal=causal, window=window, packed=packed)
    ours = attend(q, k, v, spec)
    theirs = jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, spec), implementation="xla")
    real = (jnp.ones((BATCH, time)) if seg is None else seg != 0)[:, :, None, None] > 0
    np.testing.assert_allclose(jnp.where(real, theirs, 0), jnp.where(real, ours, 0), atol=1e-5)
    assert ("mask" not in cudnn_arguments(q, k, v, spec)) == native


def test_kernel_choice_on_the_cpu():
    q, k, _ = _qkv(256, 2)
    spec, _ = _spec(256, causal=True)
    assert choose_kernel("auto", q, k, spec, dropout=False) == "xla"
    assert choose_kernel("splash", q, k, spec, dropout=False, interpret=True) == "splash"
    assert choose_kernel("splash", q, k, spec.dense(), dropout=False) == "xla"  # a dense mask
    with pytest.raises(ValueError, match=r"^attention 'splash' needs a TPU; this backend is cpu"):
        choose_kernel("splash", q, k, spec, dropout=False)
    with pytest.raises(ValueError, match=r"^attention 'cudnn' needs a GPU; this backend is cpu"):
        choose_kernel("cudnn", q, k, spec, dropout=False)
    with pytest.raises(ValueError, match=r"^attention 'flash': expected one of auto, xla"):
        choose_kernel("flash", q, k, spec, dropout=False)
    with pytest.raises(ValueError, match="splash takes float32 or bfloat16, not float16"):
        choose_kernel("splash", q.astype(jnp.float16), k, spec, dropout=False, interpret=True)
    with pytest.raises(ValueError, match="it has no attention dropout"):
        choose_kernel("splash", q, k, spec, dropout=True, interpret=True)


# The choice in the models -------------------------------------------------------------------------
def _lm_hidden(attention: str, groups: int = 128):
    config = small_config(attention=attention)
    model = MiMoAudioLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(0, 500, (2, groups)), jnp.int32)
    codes = jnp.asarray(rng.integers(0, 128, (2, groups, 4, 8)), jnp.int32)
    pos, seg = _packed(groups, (groups // 3,), pad=groups // 8)
    return model(text, codes, pos, seg), seg


def _splash_interpreted_as_on_a_tpu(monkeypatch) -> list:
    """The backend taken for a TPU, its splash kernel run in Pallas's interpreter; returns the
    list of the query shapes of its calls."""
    calls = []

    def interpreted(q, k, v, spec, interpret=False):
        calls.append(q.shape)
        return splash_attention(q, k, v, spec, interpret=True)

    monkeypatch.setattr(attention, "_platform", lambda: "tpu")
    monkeypatch.setattr(attention, "splash_attention", interpreted)
    return calls


def test_the_lm_backbone_runs_on_splash(monkeypatch):
    """model.attention=splash reaches the backbone: with the TPU kernel run in Pallas's interpreter
    here, packed rows give the xla hidden states (real tokens) at 1e-5."""
    calls = _splash_interpreted_as_on_a_tpu(monkeypatch)
    ours, seg = _lm_hidden("splash")
    monkeypatch.undo()
    reference, _ = _lm_hidden("xla")
    assert calls == [(2, 128, 4, 16)]  # the backbone, traced once by its scan
    real = (seg != 0)[:, :, None]
    np.testing.assert_allclose(jnp.where(real, ours, 0), jnp.where(real, reference, 0), atol=1e-5)


def test_auto_on_the_cpu_is_todays_kernel_and_cudnn_is_refused():
    auto, _ = _lm_hidden("auto", groups=16)
    xla, _ = _lm_hidden("xla", groups=16)
    np.testing.assert_array_equal(auto, xla)
    with pytest.raises(ValueError, match=r"^attention 'cudnn' needs a GPU; this backend is cpu"):
        _lm_hidden("cudnn", groups=16)
    with pytest.raises(ValueError, match="attention 'flash' is not one of auto, xla, splash"):
        small_config(attention="flash")


def test_the_tokenizer_config_key_is_checked():
    config = tokenizer_stage1.get_config("demo")
    config.model.attention = "flash"
    with pytest.raises(ValueError) as e:
        train_tokenizer.check(config)
    assert (
        "model.attention='flash': expected one of auto, xla, splash, cudnn"
        in str(e.value).splitlines()
    )


def test_a_tiny_lm_step_on_splash_compiles_for_v5p(capsys, monkeypatch):
    """The train step as experiments.aot compiles it, with the backbone on splash: the kernel is
    traced for the TPU target on this CPU host (batch 4 over fsdp=4) and libtpu compiles it."""
    calls = []
    monkeypatch.setattr(
        attention,
        "splash_attention",
        lambda *a, **k: calls.append(a[0].shape) or splash_attention(*a, **k),
    )
    config = demo.get_config("smoke=True,channels=2")
    config.model.attention = "splash"
    target = aot_lib.tpu_target("v5p:2x2x1")
    assert aot_lib.run(config, target, "fsdp=4", "fsdp", batch_per_device=1) == 0
    out = capsys.readouterr().out
    assert "rules fsdp, remat none, attention splash, dtype float32/float32" in out
    assert "HBM per device" in out and ": fits" in out.splitlines()[-1]
    assert calls == [(4, 128, 4, 8)]


@pytest.mark.parametrize(
    "rules, time, packed", [("fsdp", 136, True), ("fsdp_tensor", 136, True), ("fsdp", 128, False)]
)
def test_splash_under_shard_map_equals_xla(rules, time, packed):
    """On a mesh of 4 CPU devices: batch split over fsdp, and heads over tensor (fsdp_tensor),
    each shard running the kernel on its rows and whole query groups; packed rows, or whole rows
    (no segment ids at all)."""
    mesh = jax.make_mesh(
        (2, 2) if rules == "fsdp_tensor" else (4, 1),
        ("fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 2,
        devices=jax.devices()[:4],
    )
    q, k, v = _qkv(time, 2)
    q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # batch 4
    pos, seg = _packed(time, (40,), pad=16)
    pos, seg = jnp.concatenate([pos, pos]), jnp.concatenate([seg, seg])
    if not packed:
        pos, seg = jnp.broadcast_to(jnp.arange(time), (4, time)), jnp.ones((4, time))
    spec = MaskSpec(pos, pos, seg, seg, causal=True) if packed else MaskSpec(pos, pos)
    reference = attend(q, k, v, spec)
    with jax.set_mesh(mesh), use_rules(PRESETS[rules]):
        out = jax.jit(
            lambda q, k, v, s: attend(q, k, v, s, implementation="splash", interpret=True)
        )(q, k, v, spec)
    real = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, reference, 0), atol=1e-5)


def test_the_tokenizer_runs_on_splash(monkeypatch):
    """set_attention("splash") reaches the encoder (bidirectional), decoder (causal) and vocoder
    (window 40 left, 10 right) of the fixture tokenizer: with the kernel interpreted, a padded
    batch gives xla's hidden states and waveforms (within each length) at 1e-5."""
    _, model = load_tokenizer(CHECKPOINT)  # a copy of its own: the shared one stays on auto
    mel = jax.random.normal(jax.random.key(0), (2, 120, 128))
    lengths = jnp.asarray([120, 90])

    def run():
        hidden, code_lengths = model.encode_hidden(mel, lengths)
        wav, wav_lengths = model.decode_hidden(hidden, code_lengths)
        return hidden, code_lengths, wav, wav_lengths

    hidden, code_lengths, wav, wav_lengths = run()
    calls = []

    def interpreted(q, k, v, spec, interpret=False):
        calls.append((spec.causal, spec.window))
        return splash_attention(q, k, v, spec, interpret=True)

    monkeypatch.setattr(attention, "_platform", lambda: "tpu")
    monkeypatch.setattr(attention, "splash_attention", interpreted)
    model.set_attention("splash")
    ours = run()
    # The encoder runs in two parts (around its skip layer), then the decoder and the vocoder.
    assert calls == [(False, (-1, -1))] * 2 + [(True, (-1, -1)), (False, (40, 10))]
    in_code = (jnp.arange(hidden.shape[1])[None] < code_lengths[:, None])[..., None]
    np.testing.assert_allclose(jnp.where(in_code, ours[0], 0), hidden, atol=1e-5)
    in_wav = jnp.arange(wav.shape[1])[None] < wav_lengths[:, None]
    np.testing.assert_allclose(jnp.where(in_wav, ours[2], 0), jnp.where(in_wav, wav, 0), atol=1e-5)


def test_kernel_choice_on_accelerators(monkeypatch, caplog):
    """auto takes the backend's kernel where it can, else xla with one log line; an explicit
    kernel the call cannot take is refused."""
    q, k, _ = _qkv(256, 2)
    spec, _ = _spec(256, causal=True)
    bf16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    monkeypatch.setattr(attention, "_platform", lambda: "tpu")
    assert choose_kernel("auto", q, k, spec, dropout=False) == "splash"
    assert choose_kernel("auto", q, k, spec, dropout=True) == "xla"
    with pytest.raises(ValueError, match=r"^attention 'cudnn' needs a GPU; this backend is tpu"):
        choose_kernel("cudnn", *bf16, spec, dropout=False)
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    assert choose_kernel("auto", *bf16, spec, dropout=False) == "cudnn"
    attention._log_once.cache_clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mimo_jax.nn.attention"):
        for _ in range(2):
            assert choose_kernel("auto", q, k, spec, dropout=False) == "xla"  # float32
    assert [r.getMessage() for r in caplog.records] == [
        "attention auto: xla instead of cudnn: cudnn takes bfloat16 or float16, not float32"
    ]
    with pytest.raises(ValueError, match="^attention 'cudnn' cannot run this call: cudnn takes"):
        choose_kernel("cudnn", q, k, spec, dropout=False)
    wide = jnp.zeros((2, 256, 2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dim <= 128 and a multiple of 8, not 256"):
        choose_kernel("cudnn", wide, wide, spec, dropout=False)
    with pytest.raises(ValueError, match=r"^attention 'splash' needs a TPU; this backend is gpu"):
        choose_kernel("splash", q, k, spec, dropout=False)


def test_the_prefill_runs_on_splash_and_decoding_keeps_xla(monkeypatch):
    """A prefill of left-padded prompts (cache index 0) runs the prompt's self-attention on
    splash (interpreted): the real groups' hidden states and cache entries equal xla's at 1e-5;
    a decoding step against the cache stays on xla."""
    model = MiMoAudioLM(small_config(attention="splash"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    width, total = 40, 48
    text = jnp.asarray(rng.integers(0, 500, (2, width)), jnp.int32)
    codes = jnp.asarray(rng.integers(0, 128, (2, width, 4, 8)), jnp.int32)
    seg, pos = _left_pad_layout(jnp.asarray([width, 25]), width)
    cache_seg = jnp.zeros((2, total), jnp.int32).at[:, :width].set(seg)
    cache_pos = jnp.zeros((2, total), jnp.int32).at[:, :width].set(pos)

    def prefill():
        cache = model.model.init_cache(2, total)
        embeds = model.embed_inputs(text, codes)
        return model.backbone_cached(embeds, pos, seg, cache, cache_pos, cache_seg, 0)

    calls = _splash_interpreted_as_on_a_tpu(monkeypatch)
    hidden, cache = prefill()
    assert calls == [(2, width, 4, 16)]
    # One decoding step (the group after the prompt, at a traced cache index, as generation runs).
    step_seg = cache_seg.at[:, width].set(1)
    step_pos = cache_pos.at[:, width].set(pos[:, -1] + 1)
    model.backbone_cached(
        hidden[:, -1:], pos[:, -1:] + 1, seg[:, -1:], cache, step_pos, step_seg, jnp.int32(width)
    )
    assert len(calls) == 1  # the decoding step ran on xla
    monkeypatch.undo()
    model.model.layers.self_attn.attention = "xla"
    ref_hidden, ref_cache = prefill()
    # On xla, the prefill is the dense-mask call it has always been, bit for bit.
    dense = attention_mask(pos, cache_pos, seg, cache_seg, causal=True)
    embeds, cache0 = model.embed_inputs(text, codes), model.model.init_cache(2, total)
    np.testing.assert_array_equal(model.model(embeds, pos, dense, cache0, 0)[0], ref_hidden)
    real = (seg != 0)[:, :, None]
    np.testing.assert_allclose(
        jnp.where(real, hidden, 0), jnp.where(real, ref_hidden, 0), atol=1e-5
    )
    in_cache = (cache_seg != 0)[None, :, :, None, None]
    for name in ("k", "v"):
        np.testing.assert_allclose(
            jnp.where(in_cache, cache[name], 0), jnp.where(in_cache, ref_cache[name], 0), atol=1e-5
        )


def test_the_a2t_lm_runs_on_splash(monkeypatch):
    """The tokenizer trainer's audio-to-text LM takes `attention` to its stack: interpreted
    splash gives xla's logits at the real transcript slots (padded audio and tokens around) at
    1e-5."""
    config = A2TConfig(vocab_size=13, hidden=32, layers=2, heads=2, kv_heads=1, ffn=64)
    rng = np.random.default_rng(0)
    audio = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.float32)
    text = jnp.asarray(rng.integers(0, 13, (2, 5)))
    audio_len, text_len = jnp.asarray([7, 4]), jnp.asarray([5, 3])

    def logits(kernel):
        lm = AudioToTextLM(config, audio_dim=6, attention=kernel, rngs=nnx.Rngs(0))
        return lm(audio, audio_len, text, text_len)

    reference = logits("xla")
    calls = _splash_interpreted_as_on_a_tpu(monkeypatch)
    ours = logits("splash")
    assert calls == [(2, 12, 2, 16)]  # one stack, traced once by its scan
    real = (jnp.arange(5)[None] < text_len[:, None])[..., None]
    np.testing.assert_allclose(jnp.where(real, ours, 0), jnp.where(real, reference, 0), atol=1e-5)
