"""Streaming decode: chunk by chunk with left/right context, joined into the one-shot waveform."""
import numpy as np
import pytest

from mimo_jax.tokenizer.streaming import StreamingDecoder
from tokenizer_support import clip_codes, reference, tokenizer


def _stream(decoder, clips, chunk):
    pieces = [[] for _ in clips]
    for start in range(0, max(len(c) for c in clips), chunk):
        for i, wav in enumerate(decoder.push([c[start:start + chunk] for c in clips])):
            pieces[i].append(wav)
    for i, wav in enumerate(decoder.finish()):
        pieces[i].append(wav)
    return [np.concatenate(p) for p in pieces]


@pytest.mark.parametrize("chunk", [25, 32, 47, 64])
def test_stream_matches_one_shot_decode(chunk):
    # The LM generates 8 codebooks; both fixture clips stream together as two streams.
    tok = tokenizer()
    clips = [clip_codes(0)[:, :8], clip_codes(1)[:, :8]]
    one_shot = tok.decode(clips)
    streamed = _stream(StreamingDecoder(tok, num_streams=2), clips, chunk)
    for got, want in zip(streamed, one_shot):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    np.testing.assert_allclose(one_shot[0], reference()["decoded_8"], rtol=0, atol=1e-4)


def test_stream_emits_before_the_end_and_keeps_only_its_context():
    tok = tokenizer()
    spc = tok.config.samples_per_code
    codes = np.concatenate([clip_codes(0), clip_codes(1)])[:, :8]
    n = len(codes)
    right = max(1, (n - 1) // 7)  # pushes of 2, 3 and n - 5 right contexts; n > 6 * right
    decoder = StreamingDecoder(tok, left_context=3 * right, right_context=right)
    first = decoder.push([codes[:2 * right]])[0]
    assert len(first) == right * spc  # the last `right` frames wait for right context
    second = decoder.push([codes[2 * right:5 * right]])[0]
    assert len(second) == 3 * right * spc
    assert len(decoder.windows[0]) == 3 * right  # only the left context is kept
    third = decoder.push([codes[5 * right:]])[0]
    rest = decoder.finish()[0]
    assert len(third) == (n - 5 * right) * spc and len(rest) == right * spc
    assert len(first) + len(second) + len(third) + len(rest) == n * spc
    assert decoder.windows == [None]


def test_stream_rejects_bad_chunks():
    tok = tokenizer()
    size = tok.config.codebook_sizes[0]
    decoder = StreamingDecoder(tok)
    with pytest.raises(ValueError, match=rf"stream 0 chunk: codebook 0 has 5 codes outside "
                                         rf"\[0, {size}\)"):
        decoder.push([np.full((5, 8), size)])
    decoder.push([clip_codes(0)[:10, :8]])
    with pytest.raises(ValueError, match="stream 0: chunk has 4 codebooks, earlier chunks had 8"):
        decoder.push([clip_codes(0)[10:20, :4]])
