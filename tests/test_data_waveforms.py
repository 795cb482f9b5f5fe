"""Waveform pipeline of tokenizer training: crops traced to their clips, resampling, determinism,
resume, per-process sharding, short clips, missing transcripts, bad lines and bad clips."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile

from data_pipelines.demo_text_tokenizer import word_level_tokenizer
from data_pipelines.waveforms import (
    WaveformConfig,
    WaveformDataError,
    example_dataset,
    make_dataset,
    preflight,
)
from mimo_jax.tokenizer import audio_io

TOK = word_level_tokenizer([f"w{i}" for i in range(20)])
CROP = 480
CLIPS = 10  # clip i: noise at 24 kHz (odd i: 16 kHz), transcript "w{i} w{i+1}"


def _wav(i: int, rate: int) -> np.ndarray:
    return np.random.default_rng(i).uniform(-0.5, 0.5, rate // 10).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i in range(CLIPS):
        rate = 16000 if i % 2 else 24000
        soundfile.write(root / f"c{i}.wav", _wav(i, rate), rate, subtype="FLOAT")
    soundfile.write(root / "short.wav", _wav(99, 24000)[:200], 24000, subtype="FLOAT")
    t = np.arange(1600) / 16000
    soundfile.write(root / "sine.wav", 0.5 * np.sin(2 * np.pi * 300 * t), 16000, subtype="FLOAT")
    return root


def _manifest(root, name, entries) -> str:
    path = root / name
    path.write_text("".join(e if isinstance(e, str) else json.dumps(e) + "\n" for e in entries))
    return str(path)


def _clips(root, name="m.jsonl", extra=()) -> str:
    entries = [{"audio": f"c{i}.wav", "text": f"w{i} w{i + 1}"} for i in range(CLIPS)]
    return _manifest(root, name, entries + list(extra))


def _cfg(manifest, **kw) -> WaveformConfig:
    return WaveformConfig(manifests=(manifest,), crop_samples=CROP, max_text_tokens=4, **kw)


def _take(cfg, n, **kw):
    it = iter(make_dataset(preflight(cfg, TOK), cfg, TOK.pad_id, **kw))
    return [next(it) for _ in range(n)]


def _clip_of(row_text) -> int:
    """The clip a row comes from, read from its transcript ("w{i} w{i+1}")."""
    return int(TOK.decode(row_text[:1])[1:])


def _offset(full: np.ndarray, crop: np.ndarray) -> int:
    """Where `crop` lies in `full` (an AssertionError when nowhere)."""
    windows = np.lib.stride_tricks.sliding_window_view(full, len(crop))
    found = np.flatnonzero((windows == crop).all(axis=1))
    assert len(found) == 1, "the crop is not a slice of its clip"
    return int(found[0])


def _offsets(root, batches) -> list[tuple[int, int]]:
    """(clip, crop start) of every row, each crop checked to be a slice of its clip at 24 kHz."""
    out = []
    for b in batches:
        for wav, text in zip(b["wav"], b["text"]):
            i = _clip_of(text)
            full = audio_io.read_audio(str(root / f"c{i}.wav"), 24000, min_samples=1)
            out.append((i, _offset(full, wav)))
    return out


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_hold_crops_of_their_clips_with_their_transcripts(corpus):
    cfg = _cfg(_clips(corpus), batch_size=2)
    batches = list(make_dataset(preflight(cfg, TOK), cfg, TOK.pad_id, num_epochs=1))
    assert len(batches) == CLIPS // 2
    b = batches[0]
    assert b["wav"].shape == (2, CROP) and b["wav"].dtype == np.float32
    assert b["text"].shape == (2, 4) and b["text"].dtype == np.int32
    for key in ("lengths", "text_lengths", "skipped"):
        assert b[key].shape == (2,) and b[key].dtype == np.int32, key
    assert all((x["lengths"] == CROP).all() and (x["text_lengths"] == 2).all() for x in batches)
    assert all((x["text"][:, 2:] == TOK.pad_id).all() for x in batches)
    seen = _offsets(corpus, batches)  # 16 kHz clips are only found resampled to 24 kHz
    assert sorted(i for i, _ in seen) == list(range(CLIPS))
    texts = {_clip_of(t): TOK.decode(t[:2]) for x in batches for t in x["text"]}
    assert texts == {i: f"w{i} w{i + 1}" for i in range(CLIPS)}


def test_16khz_audio_is_resampled_to_24khz(corpus):
    cfg = _cfg(_manifest(corpus, "sine.jsonl", [{"audio": "sine.wav", "text": "w1"}]))
    clips = preflight(cfg, TOK).clips
    assert clips[0].samples == 2400  # 0.1 s at 24 kHz
    wav = _take(dataclasses.replace(cfg, batch_size=1), 1)[0]["wav"][0]
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.argmax(spectrum) == round(300 * CROP / 24000)  # 300 Hz at 24 kHz


def test_reproducible_for_a_seed_and_new_crops_each_epoch(corpus):
    cfg = _cfg(_clips(corpus), batch_size=2, seed=3)
    one, two = _take(cfg, 10), _take(cfg, 10)
    _assert_same(one, two)
    other = _take(dataclasses.replace(cfg, seed=4), 10)
    assert not all(np.array_equal(x["wav"], y["wav"]) for x, y in zip(one, other))
    first, second = dict(_offsets(corpus, one[:5])), dict(_offsets(corpus, one[5:]))
    assert sorted(first) == sorted(second) == list(range(CLIPS))
    assert first != second  # each epoch draws its own crop of a clip


def test_resume_yields_the_next_batches(corpus):
    cfg = _cfg(_clips(corpus), batch_size=2, seed=1)
    corpus_ = preflight(cfg, TOK)
    it = iter(make_dataset(corpus_, cfg, TOK.pad_id))
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state
    expected = [next(it) for _ in range(4)]  # crosses into the second epoch
    restored = iter(make_dataset(corpus_, cfg, TOK.pad_id))
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(4)], expected)


def test_two_processes_get_disjoint_clips_covering_the_set(corpus):
    cfg = _cfg(_clips(corpus), seed=5)
    corpus_ = preflight(cfg, TOK)
    whole = {_clip_of(e["text"]): e["wav"] for e in example_dataset(corpus_, cfg, 0, num_epochs=1)}
    seen = []
    for p in range(2):
        ds = example_dataset(corpus_, cfg, 0, process_index=p, process_count=2, num_epochs=1)
        part = {_clip_of(e["text"]): e["wav"] for e in ds}
        for i, wav in part.items():  # the crop does not depend on the process count
            np.testing.assert_array_equal(wav, whole[i])
        seen.append(set(part))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(CLIPS))


def test_short_clips_are_padded_or_skipped_and_counted(corpus):
    manifest = _clips(corpus, "short.jsonl", [{"audio": "short.wav", "text": "w0 w0"}])
    padded = _cfg(manifest, batch_size=11, short_clips="pad")
    found = preflight(padded, TOK)
    assert "11 clips kept; 1 shorter than the crop of 480 samples (padded)" in found.summary[0]
    (batch,) = make_dataset(found, padded, TOK.pad_id, num_epochs=1, shuffle=False)
    assert batch["lengths"][-1] == 200 and (batch["lengths"][:-1] == CROP).all()
    short = audio_io.read_audio(str(corpus / "short.wav"), 24000, min_samples=1)
    np.testing.assert_array_equal(batch["wav"][-1], np.pad(short, (0, CROP - 200)))
    skipping = dataclasses.replace(padded, short_clips="skip", batch_size=1)
    found = preflight(skipping, TOK)
    assert "10 clips kept; 1 shorter than the crop of 480 samples (skipped)" in found.summary[0]
    rows = list(make_dataset(found, skipping, TOK.pad_id, num_epochs=1))
    assert len(rows) == CLIPS and all(r["lengths"][0] == CROP for r in rows)


def test_missing_transcripts_stop_when_the_a2t_loss_needs_them(corpus):
    entries = [{"audio": f"c{i}.wav", "text": "w1"} for i in range(5)]
    entries[1]["text"] = ""
    del entries[3]["text"]
    entries.append({"audio": "short.wav"})  # skipped as short: its transcript is not needed
    manifest = _manifest(corpus, "notext.jsonl", entries)
    with pytest.raises(WaveformDataError) as err:
        preflight(_cfg(manifest, short_clips="skip"), TOK)
    assert str(err.value) == (
        f"2 of 5 clips of {manifest} have no transcript (lines 2, 4); the A2T loss needs one "
        f"per clip: give `text` or set its weight to 0"
    )
    cfg = _cfg(manifest, needs_text=False, batch_size=5, short_clips="skip")
    found = preflight(cfg, TOK)
    assert "2 without transcript" in found.summary[0]
    (batch,) = make_dataset(found, cfg, TOK.pad_id, num_epochs=1, shuffle=False)
    assert batch["text_lengths"].tolist() == [1, 0, 1, 0, 1]


def test_unusable_lines_stop_or_are_skipped_and_counted(corpus):
    manifest = _clips(corpus, "bad.jsonl", ["{not json\n", {"audio": "gone.wav", "text": "w1"}])
    with pytest.raises(WaveformDataError) as err:
        preflight(_cfg(manifest), TOK)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"2 of 12 lines of {manifest} cannot be used (lines 11, 12; ")
    assert "line 11: not JSON" in message and "gone.wav: no such file" in message
    found = preflight(_cfg(manifest, skip_bad_records=True), TOK)
    assert "12 lines, 10 clips kept" in found.summary[0]
    assert "2 unusable lines skipped" in found.summary[0]


def test_a_clip_that_fails_to_decode_stops_or_is_skipped_and_counted(tmp_path, corpus):
    for i in range(4):
        (tmp_path / f"c{i}.wav").write_bytes((corpus / f"c{i}.wav").read_bytes())
    entries = [{"audio": f"c{i}.wav", "text": "w1"} for i in range(4)]
    manifest = _manifest(tmp_path, "four.jsonl", entries)
    cfg = _cfg(manifest, batch_size=1)
    found = preflight(cfg, TOK)
    (tmp_path / "c2.wav").write_bytes(b"RIFF damaged")  # after the preflight
    with pytest.raises(WaveformDataError, match=f"{manifest} line 3: .*c2.wav: cannot read audio"):
        list(make_dataset(found, cfg, TOK.pad_id, num_epochs=1, shuffle=False))
    lenient = dataclasses.replace(cfg, skip_bad_records=True)
    rows = list(make_dataset(found, lenient, TOK.pad_id, num_epochs=1, shuffle=False))
    assert len(rows) == 3 and [int(r["skipped"][0]) for r in rows] == [0, 0, 1]


def test_worker_processes_decode_and_resume(corpus):
    cfg = _cfg(_clips(corpus), batch_size=2, seed=2, workers=1)
    found = preflight(cfg, TOK)
    it = iter(make_dataset(found, cfg, TOK.pad_id))
    first = [next(it) for _ in range(4)]
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    it.close()
    # Decoded in the worker: two epochs hold each clip twice.
    seen = sorted(i for i, _ in _offsets(corpus, first + expected))
    assert seen == sorted(list(range(CLIPS)) * 2)
    restored = iter(make_dataset(found, cfg, TOK.pad_id))
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(6)], expected)
    restored.close()
