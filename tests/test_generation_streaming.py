"""Streaming: the generation loop handed back in chunks equals the one-shot loop token for token
(greedy and sampled, a left-padded batch whose rows stop at different groups); speech streamed
through the streaming decoder as it is generated meets the streaming criterion against the one-shot
decode of the same codes, and its first audio comes while groups remain; `--stream` writes WAVs
that are valid at every point and whole at the end."""

import io
import json

import jax
import numpy as np
import pytest
import soundfile as sf
from test_tokenizer_streaming import MIN_SER_DB, stream_quality

from mimo_jax import generate as cli
from mimo_jax.inference.generation_loop import GenerationConfig, generate, generate_chunks
from mimo_jax.inference.sampling import GREEDY, SamplerConfig
from mimo_jax.lm.layout import empty_patch, from_official

SAMPLED = SamplerConfig(True, 0.9, 50, 0.95)
NEW = 10  # generated groups per row at most


@pytest.fixture(scope="module")
def batch(lm, fixtures_root):
    """Three rows of the LM fixture's inputs, the last left-padded to the others' width."""
    config, _ = lm
    ref = np.load(fixtures_root / "lm" / "reference.npz")
    text, codes = from_official(ref["input_ids"], config.group_size)
    short = text.shape[1] // 2
    pad = text.shape[1] - short
    pad_text = np.concatenate([np.full((1, pad), config.empty_idx), text[1:, :short]], 1)
    pad_codes = np.concatenate(
        [
            np.broadcast_to(
                empty_patch(config.speech_empty_ids, config.group_size), (1, pad) + codes.shape[2:]
            ),
            codes[1:, :short],
        ],
        1,
    )
    lengths = [text.shape[1]] * len(text) + [short]
    return (
        np.concatenate([text, pad_text]),
        np.concatenate([codes, pad_codes]),
        np.asarray(lengths),
    )


def _joined(chunks, gp):
    """The chunks' groups joined, checked to follow one another."""
    assert chunks[0].start == gp and chunks[-1].last and not any(c.last for c in chunks[:-1])
    for a, b in zip(chunks, chunks[1:]):
        assert b.start == a.start + a.text.shape[1]
    return np.concatenate([c.text for c in chunks], 1), np.concatenate([c.codes for c in chunks], 1)


@pytest.mark.parametrize("sampler", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_chunked_generation_equals_one_shot(lm, batch, sampler):
    config, model = lm
    text, codes, lengths = batch
    gp = text.shape[1]
    # Stop at every odd text id but `<|empty|>`: the rows stop at different groups (checked).
    stops = tuple(t for t in range(1, config.vocab_size, 2) if t != config.empty_idx)
    gen = GenerationConfig(
        max_length=gp + NEW,
        min_length=gp + 1,
        stop_ids=stops,
        text_sampler=sampler,
        patch_sampler=sampler,
    )
    kw = dict(prompt_lengths=lengths, rng=jax.random.key(11))
    one = generate(model, text, codes, gen, **kw)
    assert len(set(one.lengths.tolist())) > 1 and one.lengths.min() < gp + NEW, one.lengths
    for size in (1, 3, NEW + 5):
        chunks = list(generate_chunks(model, text, codes, gen, chunk_groups=size, **kw))
        assert len(chunks) == -(-(one.lengths.max() - gp) // size)
        got_text, got_codes = _joined(chunks, gp)
        end = gp + got_text.shape[1]
        assert end == one.lengths.max()
        np.testing.assert_array_equal(got_text, one.text[:, gp:end], err_msg=f"chunk {size}")
        np.testing.assert_array_equal(got_codes, one.codes[:, gp:end], err_msg=f"chunk {size}")
        np.testing.assert_array_equal(chunks[-1].lengths, one.lengths)
        for c in chunks:  # a row is done from the chunk that holds its stop group on
            np.testing.assert_array_equal(c.done, one.lengths <= c.start + c.text.shape[1])


def test_chunk_size_must_be_positive(lm, batch):
    _, model = lm
    text, codes, _ = batch
    with pytest.raises(ValueError, match="chunk_groups 0: expected at least 1"):
        next(generate_chunks(model, text, codes, GenerationConfig(max_length=20), chunk_groups=0))


# Speech continuation of two clips of different lengths (one left-padded batch), sampled: its
# speech starts with the first generated group, and <|eosp|> is held back long enough for the
# speech to outlast the decoder's right context.
CHUNK_GROUPS = 4
LEFT, RIGHT = 250, 40  # the official streaming scheme's context, in code frames


def _requests(fx):
    return [
        {
            "task": "continue",
            "input": fx.wavs[w],
            "seed": 5,
            "min_new_groups": 32,
            "max_new_groups": 40,
        }
        for w in ("q1", "q2")
    ]


@pytest.fixture(scope="module")
def streamed(fx, mimo):
    """(the chunks of each request in order, the one-shot results)."""
    reqs = _requests(fx)
    chunks = [[] for _ in reqs]
    for chunk in mimo.stream(
        reqs, chunk_groups=CHUNK_GROUPS, left_context=LEFT, right_context=RIGHT
    ):
        assert not chunks[chunk.index] or chunks[chunk.index][-1].result is None
        chunks[chunk.index].append(chunk)
    return chunks, mimo.run(reqs)


def test_streamed_requests_equal_run(streamed):
    chunks, results = streamed
    assert len({r.prompt_groups for r in results}) == 2  # a left-padded batch
    for mine, want in zip(chunks, results):
        got = mine[-1].result
        np.testing.assert_array_equal(got.sequence.text, want.sequence.text)
        np.testing.assert_array_equal(got.sequence.codes, want.sequence.codes)
        np.testing.assert_array_equal(got.speech, want.speech)
        assert got.text == want.text


def test_joined_stream_meets_the_streaming_criterion(streamed, mimo):
    chunks, results = streamed
    for mine, want in zip(chunks, results):
        # More speech than the decoder's right context and a chunk: some is emitted early.
        assert want.speech.shape[0] > RIGHT + CHUNK_GROUPS * mimo.config.group_size
        one_shot = mimo.audio.tokenizer.decode([want.speech])[0]
        got = np.concatenate([c.wav for c in mine])
        np.testing.assert_array_equal(got, mine[-1].result.wav)
        assert got.shape == one_shot.shape
        joins = np.cumsum([len(c.wav) for c in mine if len(c.wav)])[:-1]
        assert len(joins) >= 2
        ser, join = stream_quality(got, one_shot, joins)
        assert ser >= MIN_SER_DB, f"SER {ser:.1f} dB"
        assert join <= 1.0, f"join step {join:.2f} of the largest one-shot step"


def test_first_audio_comes_while_groups_remain(streamed, mimo):
    chunks, _ = streamed
    spc = mimo.audio.tokenizer.config.samples_per_code
    for mine in chunks:
        first = next(i for i, c in enumerate(mine) if len(c.wav))
        assert mine[first].result is None  # the request had not ended
        res = mine[-1].result
        # The first audio was decoded from (its frames + the right context) frames, at least a
        # whole chunk of groups before the last frame.
        heard = sum(len(c.wav) for c in mine[: first + 1]) // spc
        assert heard + RIGHT <= res.speech.shape[0] - CHUNK_GROUPS * mimo.config.group_size


def test_text_task_streams_its_result_without_audio(fx, mimo):
    [chunk] = list(
        mimo.stream([{"task": "asr", "input": fx.wavs["q1"], "greedy": True, "max_new_groups": 3}])
    )
    [want] = mimo.run(
        [{"task": "asr", "input": fx.wavs["q1"], "greedy": True, "max_new_groups": 3}]
    )
    assert chunk.index == 0 and chunk.wav.size == 0 and chunk.result.wav is None
    assert chunk.result.text == want.text


def test_growing_wav_is_valid_after_every_append(tmp_path):
    path = tmp_path / "a.wav"
    rng = np.random.default_rng(0)
    pieces = [rng.uniform(-1, 1, n).astype(np.float32) for n in (0, 5, 960, 1)]
    with cli.GrowingWav(path, 24000) as wav:
        for i in range(len(pieces)):
            wav.append(pieces[i])
            got, rate = sf.read(io.BytesIO(path.read_bytes()), dtype="float32")
            assert rate == 24000
            np.testing.assert_array_equal(got, np.concatenate(pieces[: i + 1]))


def test_cli_streams_the_fixture_tts(fx, tmp_path, capsys):
    lm_dir = fx.lm_dir
    (gen,) = [g for g in fx.meta["generations"] if g["case"] == "tts_sft_en"]
    req, _ = fx.request(fx.cases["tts_sft_en"])
    line = {
        **req,
        "id": "tts",
        "greedy": True,
        "min_new_groups": gen["min_new_tokens"],
        "max_new_groups": gen["max_new_tokens"],
    }
    (tmp_path / "r.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "out"
    argv = [
        "--requests",
        str(tmp_path / "r.jsonl"),
        "--stream",
        "--stream-chunk",
        "2",
        "--lm",
        str(lm_dir),
        "--audio-tokenizer",
        str(fx.dir / fx.meta["audio_tokenizer"]),
        "--text-tokenizer",
        str(fx.dir / "text_tokenizer" / "tokenizer.json"),
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert (out / "tts.txt").read_text() == gen["text"]
    wav, rate = sf.read(out / "tts.wav")
    assert rate == fx.meta["wavs"]["q1"]["sampling_rate"] and wav.shape == (gen["wav_samples"],)
    assert "first audio of tts after" in capsys.readouterr().err
