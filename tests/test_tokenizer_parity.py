"""Parity with the official tokenizer's float32 outputs (fixtures/tokenizer/reference.npz): each
stage from its own reference input, then end to end, in padded batches of both clips."""

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizer_support import (
    assert_codes_match,
    clip_codes,
    fixture_model,
    padded,
    reference,
    tokenizer,
)


def _mels():
    ref = reference()
    return [ref["mel_0"], ref["mel_1"]]


def test_log_mel_batched():
    config, model = fixture_model()
    ref = reference()
    wav, lengths = padded([ref["wav_0"], ref["wav_1"]])
    mel, mel_lengths = model.mel(jnp.asarray(wav), jnp.asarray(lengths))
    mel = np.asarray(mel)
    for i, want in enumerate(_mels()):
        assert mel_lengths[i] == len(want)
        got = mel[i, : len(want)]
        np.testing.assert_allclose(
            np.exp(got), np.exp(want), rtol=0, atol=1e-5 * np.exp(want).max()
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-3)
        assert not mel[i, len(want) :].any()


def test_encoder_hidden_from_reference_mel():
    _, model = fixture_model()
    want = reference()["encoder_hidden"]
    mel, lengths = padded(_mels())
    hidden, code_lengths = model.encode_hidden(jnp.asarray(mel), jnp.asarray(lengths))
    np.testing.assert_array_equal(code_lengths, reference()["code_lens"])
    np.testing.assert_allclose(np.asarray(hidden), want, rtol=1e-4, atol=1e-4)


def test_codes_from_reference_mel():
    config, model = fixture_model()
    mel, lengths = padded(_mels())
    codes, code_lengths = model.encode_mel(jnp.asarray(mel), jnp.asarray(lengths))
    codes = np.asarray(codes)
    assert codes.shape[2] == config.num_quantizers
    for i in range(2):
        assert_codes_match(codes[i, : code_lengths[i]], i)


@pytest.mark.parametrize("books", [8, 20])
def test_decode_from_reference_codes(books):
    config, model = fixture_model()
    want = reference()[f"decoded_{books}"]
    codes = clip_codes(0)[None, :, :books]
    wav, lengths = model.decode(jnp.asarray(codes), jnp.asarray([codes.shape[1]]))
    assert int(lengths[0]) == codes.shape[1] * config.samples_per_code == len(want)
    np.testing.assert_allclose(np.asarray(wav)[0], want, rtol=0, atol=1e-4)


def test_end_to_end_waveform_to_codes_to_waveform():
    ref = reference()
    tok = tokenizer()
    codes = tok.encode([ref["wav_0"], ref["wav_1"]], num_codebooks=20)
    for i in range(2):
        assert_codes_match(codes[i], i)
    wavs = tok.decode([codes[0][:, :8], codes[0]])
    np.testing.assert_allclose(wavs[0], ref["decoded_8"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(wavs[1], ref["decoded_20"], rtol=0, atol=1e-4)
