"""Padding and batching never change a clip's result; long audio is split into segments that are
each encoded alone; building blocks against their textbook definitions."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizer_support import (
    assert_codes_match,
    clip_codes,
    fixture_model,
    reference,
    tokenizer,
)

from mimo_jax.nn.conv import ConvTranspose1d
from mimo_jax.tokenizer.frontend import periodic_hann
from mimo_jax.tokenizer.vocoder import istft_same


def _long_clip():
    ref = reference()
    return np.concatenate([ref["wav_1"], ref["wav_0"][::-1], ref["wav_1"] * 0.5])


def test_batch_of_clips_gives_each_its_fixture_codes():
    ref = reference()
    # A longer clip pads the fixture clips; reversed order and singleton batches too.
    batch = tokenizer().encode([_long_clip(), ref["wav_1"], ref["wav_0"]], num_codebooks=20)
    assert_codes_match(batch[2], 0)
    assert_codes_match(batch[1], 1)
    alone = tokenizer(batch_frames=1).encode([ref["wav_0"], ref["wav_1"]], num_codebooks=20)
    np.testing.assert_array_equal(alone[0], batch[2])
    np.testing.assert_array_equal(alone[1], batch[1])


def test_decode_batch_padding_does_not_change_waveforms():
    ref = reference()
    tok = tokenizer()
    long = np.concatenate([clip_codes(1), clip_codes(0)])[:, :8]
    wavs = tok.decode([long, clip_codes(0)[:, :8], clip_codes(1)[:, :8]])
    np.testing.assert_allclose(wavs[1], ref["decoded_8"], rtol=0, atol=1e-4)
    alone = tok.decode([clip_codes(1)[:, :8]])[0]
    np.testing.assert_allclose(wavs[2], alone, rtol=0, atol=1e-6)
    assert len(wavs[0]) == len(long) * tok.config.samples_per_code


def test_segments_are_encoded_alone_and_concatenated():
    config, model = fixture_model()
    wav = _long_clip()
    segment = 25 * config.mel_frames_per_code  # mel frames; the official code uses 6000
    got = tokenizer(segment_frames=segment).encode([wav], num_codebooks=8)[0]
    mel, _ = model.mel(jnp.asarray(wav)[None], jnp.asarray([wav.size]))
    mel = np.asarray(mel)[0]
    want = []
    for start in range(0, mel.shape[0], segment):
        piece = mel[start : start + segment]
        codes, n = model.encode_mel(jnp.asarray(piece)[None], jnp.asarray([len(piece)]), 8)
        want.append(np.asarray(codes)[0, : int(n[0])])
    np.testing.assert_array_equal(got, np.concatenate(want))
    assert len(want) > 1
    assert got.shape[0] == sum(
        config.code_frames(min(segment, mel.shape[0] - s)) for s in range(0, mel.shape[0], segment)
    )


def test_conv_transpose_matches_the_definition():
    rng = np.random.default_rng(0)
    for k, s in [(2, 2), (3, 2), (5, 3)]:
        conv = ConvTranspose1d(3, 4, k, stride=s, rngs=nnx.Rngs(0))
        conv.bias[...] = jnp.asarray(rng.normal(size=4).astype(np.float32))
        x = rng.normal(size=(2, 7, 3)).astype(np.float32)
        w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
        want = np.zeros((2, 6 * s + k, 4), np.float32) + b
        for t in range(7):
            for j in range(k):
                want[:, s * t + j] += x[:, t] @ w[j]
        np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), want, atol=1e-5)


def test_istft_window_is_the_stored_periodic_hann():
    _, model = fixture_model()
    window = np.asarray(model.decoder.vocoder.head.istft.window[...])
    # Stored as torch computes it in float32: equal to the exact window within 2 ulp of 1.0.
    np.testing.assert_allclose(
        window, periodic_hann(window.size), rtol=0, atol=2 * np.finfo(np.float32).eps
    )
    assert np.abs(window - np.hanning(window.size)).max() > 1e-4  # symmetric Hann differs


def test_istft_inverts_an_stft_and_ignores_frames_past_the_length():
    n, hop, frames = 64, 16, 20
    window = periodic_hann(n)
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(frames - 1) * hop + n).astype(np.float32)
    starts = np.arange(frames) * hop
    spec = np.fft.rfft(np.stack([signal[s : s + n] for s in starts]) * window, axis=-1)
    full = np.asarray(
        istft_same(jnp.asarray(spec)[None], jnp.asarray([frames]), jnp.asarray(window), hop)
    )[0]
    pad = (n - hop) // 2
    np.testing.assert_allclose(full, signal[pad : pad + frames * hop], atol=1e-5)
    noisy = spec.copy()
    noisy[12:] = rng.normal(size=noisy[12:].shape)
    short = np.asarray(
        istft_same(jnp.asarray(noisy)[None], jnp.asarray([12]), jnp.asarray(window), hop)
    )[0]
    alone = np.asarray(
        istft_same(jnp.asarray(spec[:12])[None], jnp.asarray([12]), jnp.asarray(window), hop)
    )[0]
    np.testing.assert_allclose(short[: 12 * hop], alone, atol=1e-6)
    assert not short[12 * hop :].any()


def test_bfloat16_compute_tracks_float32():
    config, model = fixture_model()
    from mimo_jax.tokenizer.model import MiMoAudioTokenizer

    bf16 = nnx.merge(
        *nnx.split(MiMoAudioTokenizer(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[:1],
        nnx.state(model),
    )
    codes = jnp.asarray(clip_codes(0)[None, :, :8])
    lengths = jnp.asarray([codes.shape[1]])
    wav16 = np.asarray(jax.jit(lambda c, n: bf16.decode(c, n)[0])(codes, lengths))[0]
    want = reference()["decoded_8"]
    assert wav16.dtype == np.float32
    snr = 10 * np.log10(np.sum(want**2) / np.sum((wav16 - want) ** 2))
    assert snr > 15, f"bfloat16 decode SNR {snr:.1f} dB"
