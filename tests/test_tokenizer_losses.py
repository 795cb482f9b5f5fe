"""The stage-1 tokenizer losses: the multi-scale mel loss (the report's scales, the spectrogram and
the loss written out in numpy) and the audio-to-text LM's next-token loss (by hand from its
logits; padding and the future invisible)."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from flax import nnx

from mimo_jax.tokenizer.a2t import A2TConfig, AudioToTextLM
from mimo_jax.tokenizer.mel_loss import MelScale, mel_spectrogram, multiscale_mel_loss, scales

SR = 24000


def test_scales_are_the_reports():
    assert scales() == (MelScale(32, 240, 120), MelScale(64, 480, 240), MelScale(128, 960, 480))


def _numpy_mel(wav: np.ndarray, s: MelScale) -> np.ndarray:
    """torchaudio's MelSpectrogram(n_fft=win, hop, n_mels, power=1, normalized=True), as numpy."""
    half = s.window // 2
    padded = np.pad(wav.astype(np.float64), (half, half), mode="reflect")
    n = np.arange(s.window)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / s.window)
    frames = [padded[t : t + s.window] for t in range(0, len(padded) - s.window + 1, s.hop)]
    magnitude = np.abs(np.fft.rfft(np.stack(frames) * window, axis=-1))
    magnitude /= np.sqrt(np.sum(window**2))
    fb = librosa.filters.mel(sr=SR, n_fft=s.window, n_mels=s.bins, htk=True, norm=None)
    return magnitude @ fb.T


def test_mel_spectrogram_and_loss_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (2, 2400)).astype(np.float32)
    y = (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    for s in scales():
        got = np.asarray(mel_spectrogram(jnp.asarray(x), s, SR))
        assert got.shape == (2, 2400 // s.hop + 1, s.bins)
        np.testing.assert_allclose(got[1], _numpy_mel(x[1], s), rtol=1e-4, atol=1e-5)
    want = sum(
        np.mean(np.abs(np.stack([_numpy_mel(x[b], s) - _numpy_mel(y[b], s) for b in range(2)])))
        for s in scales()
    )
    got = float(multiscale_mel_loss(jnp.asarray(x), jnp.asarray(y), SR))
    assert got == pytest.approx(want, rel=1e-4)
    # With lengths: the second clip's frames past its 1000 samples do not count.
    lengths = np.array([2400, 1000])
    want = 0.0
    for s in scales():
        diffs = [np.abs(_numpy_mel(x[b], s) - _numpy_mel(y[b], s)) for b in range(2)]
        kept = [d[np.arange(len(d)) * s.hop < n] for d, n in zip(diffs, lengths)]
        want += np.concatenate(kept).mean()
    got = multiscale_mel_loss(jnp.asarray(x), jnp.asarray(y), SR, jnp.asarray(lengths))
    assert float(got) == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="too short for the mel scale of window 960"):
        mel_spectrogram(jnp.zeros((1, 400)), MelScale.of(7), SR)


def _a2t():
    return AudioToTextLM(
        A2TConfig(vocab_size=11, hidden=16, layers=2, heads=2, kv_heads=1, ffn=32),
        audio_dim=6,
        rngs=nnx.Rngs(0),
    )


def test_a2t_loss_by_hand_padding_and_causality():
    lm = _a2t()
    rng = np.random.default_rng(1)
    audio = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    text = jnp.asarray(rng.integers(0, 11, (2, 4)))
    audio_len, text_len = jnp.asarray([5, 3]), jnp.asarray([4, 2])
    logits = np.asarray(lm(audio, audio_len, text, text_len), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t = np.asarray(text)
    nll = [-log_p[b, j, t[b, j]] for b in range(2) for j in range(int(text_len[b]))]
    loss, count = lm.loss(audio, audio_len, text, text_len)
    assert int(count) == 6 and float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
    # Padding (audio frames past a length, tokens past a length) changes nothing that counts.
    noisy_audio = audio.at[1, 3:].set(100.0)
    noisy_text = text.at[1, 2:].set((text[1, 2:] + 1) % 11)
    again = np.asarray(lm(noisy_audio, audio_len, noisy_text, text_len))
    np.testing.assert_allclose(again[0], logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again[1, :2], logits[1, :2], rtol=1e-5, atol=1e-5)
    # Slot j sees the tokens before j only.
    later = np.asarray(lm(audio, audio_len, text.at[0, 2].set((text[0, 2] + 1) % 11), text_len))
    np.testing.assert_allclose(later[0, :3], logits[0, :3], rtol=1e-5, atol=1e-5)
    assert np.abs(later[0, 3] - logits[0, 3]).max() > 1e-4
    # The loss reaches the audio (the quantised frames, through which the encoder learns).
    grad = jax.grad(lambda a: lm.loss(a, audio_len, text, text_len)[0])(audio)
    assert float(jnp.abs(grad[0]).max()) > 0 and float(jnp.abs(grad[1, 3:]).max()) == 0


def test_a2t_config_is_checked():
    with pytest.raises(ValueError, match="a2t.layers=0: expected an integer >= 1"):
        A2TConfig(vocab_size=10, layers=0)
    with pytest.raises(ValueError, match="expected heads dividing hidden"):
        A2TConfig(vocab_size=10, hidden=30, heads=4)
