"""Streaming decode: chunk by chunk with left/right context, joined into the one-shot waveform."""

import numpy as np
import pytest
from tokenizer_support import clip_codes, reference, tokenizer

from mimo_jax.tokenizer.streaming import StreamingDecoder


def _stream(decoder, clips, chunk):
    """Streams the clips together; per clip its waveform and the sample indices of its joins."""
    pieces = [[] for _ in clips]
    for start in range(0, max(len(c) for c in clips), chunk):
        for i, wav in enumerate(decoder.push([c[start : start + chunk] for c in clips])):
            pieces[i].append(wav)
    for i, wav in enumerate(decoder.finish()):
        pieces[i].append(wav)
    joins = [np.cumsum([len(p) for p in ps if len(p)])[:-1] for ps in pieces]
    return [np.concatenate(p) for p in pieces], joins


# What a listener needs from a stream (the official decoder normalises over the whole sequence, so
# a stream cannot equal the one-shot decode exactly): a signal-to-error ratio against the one-shot
# decode of at least 40 dB, and no click at a join (no step between a piece's last sample and the
# next piece's first larger than the largest sample-to-sample step of the one-shot waveform).
MIN_SER_DB = 40.0
CHUNKS = range(1, 61)  # code frames per push


def stream_quality(got, want, joins):
    """(SER of a joined stream `got` against the one-shot `want` in dB, its largest step at a
    join (sample indices `joins`) over the largest sample-to-sample step of `want`)."""
    ser = 10 * np.log10(np.sum(want**2) / max(np.sum((got - want) ** 2), 1e-30))
    steps = np.abs(got[joins] - got[np.asarray(joins) - 1]) / np.abs(np.diff(want)).max()
    return ser, steps.max(initial=0)


def test_stream_is_transparent_for_every_chunk_size():
    # The LM generates 8 codebooks; every fixture clip streams, all together as parallel streams.
    tok = tokenizer()
    n_clips = len(reference()["code_lens"])
    clips = [clip_codes(i)[:, :8] for i in range(n_clips)]
    one_shot = tok.decode(clips)
    np.testing.assert_allclose(one_shot[0], reference()["decoded_8"], rtol=0, atol=1e-4)
    worst_ser, worst_join = np.inf, 0.0
    for chunk in CHUNKS:
        streamed, joins = _stream(StreamingDecoder(tok, num_streams=n_clips), clips, chunk)
        for i, (got, want) in enumerate(zip(streamed, one_shot)):
            assert got.shape == want.shape, (chunk, i)
            ser, join = stream_quality(got, want, joins[i])
            worst_ser, worst_join = min(worst_ser, ser), max(worst_join, join)
            assert ser >= MIN_SER_DB, f"chunk {chunk}, clip {i}: SER {ser:.1f} dB"
            assert join <= 1.0, f"chunk {chunk}, clip {i}: join step {join:.2f}"
    print(
        f"streaming: worst SER {worst_ser:.1f} dB, worst join {worst_join:.3f} of the largest "
        f"one-shot step"
    )


def test_stream_emits_before_the_end_and_keeps_only_its_context():
    tok = tokenizer()
    spc = tok.config.samples_per_code
    codes = np.concatenate([clip_codes(0), clip_codes(1)])[:, :8]
    n = len(codes)
    right = max(1, (n - 1) // 7)  # pushes of 2, 3 and n - 5 right contexts; n > 6 * right
    decoder = StreamingDecoder(tok, left_context=3 * right, right_context=right)
    first = decoder.push([codes[: 2 * right]])[0]
    assert len(first) == right * spc  # the last `right` frames wait for right context
    second = decoder.push([codes[2 * right : 5 * right]])[0]
    assert len(second) == 3 * right * spc
    assert len(decoder.windows[0]) == 3 * right  # only the left context is kept
    third = decoder.push([codes[5 * right :]])[0]
    rest = decoder.finish()[0]
    assert len(third) == (n - 5 * right) * spc and len(rest) == right * spc
    assert len(first) + len(second) + len(third) + len(rest) == n * spc
    assert decoder.windows == [None]


def test_stream_rejects_bad_chunks():
    tok = tokenizer()
    size = tok.config.codebook_sizes[0]
    decoder = StreamingDecoder(tok)
    with pytest.raises(
        ValueError,
        match=rf"stream 0 chunk: codebook 0 has 5 codes outside "
        rf"\[0, {size}\)",
    ):
        decoder.push([np.full((5, 8), size)])
    decoder.push([clip_codes(0)[:10, :8]])
    with pytest.raises(ValueError, match="stream 0: chunk has 4 codebooks, earlier chunks had 8"):
        decoder.push([clip_codes(0)[10:20, :4]])
