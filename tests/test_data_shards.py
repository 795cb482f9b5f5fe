"""Shard record format, writer, reader, manifest and the `data_pipelines.shards` command."""

import json

import numpy as np
import pytest
from array_record.python import array_record_module

from data_pipelines import shards
from data_pipelines.shards import (
    Record,
    RecordError,
    ShardError,
    ShardSet,
    decode_record,
    encode_record,
)


def _records(n=5, codebooks=8):
    rng = np.random.default_rng(0)
    recs = [
        Record(
            id=f"utt{i}",
            codes=rng.integers(0, 1024, (3 + 7 * i, codebooks)).astype(np.int16),
            text=f"sentence {i} ünïcode 你好",
            speaker=f"spk{i % 2}",
            language="en",
            task="asr",
            duration=0.12 * (3 + 7 * i),
            meta={"pair": i // 2},
        )
        for i in range(n)
    ]
    recs.append(
        Record(
            id="textonly", codes=np.zeros((0, codebooks), np.int16), text="just text", task="text"
        )
    )
    return recs


def test_round_trip_and_manifest(tmp_path):
    recs = _records()
    manifest = shards.write_shards(str(tmp_path), recs, records_per_shard=4, codebooks=8)
    assert [s["records"] for s in manifest["shards"]] == [4, 2]
    assert manifest["records"] == 6 and manifest["errors"] == 0
    assert manifest["frames"] == sum(r.frames for r in recs)
    assert manifest["hours"] == pytest.approx(manifest["frames"] / 25 / 3600)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["shards"][1]["path"] == "shard-00001-of-00002.array_record"
    got = ShardSet(str(tmp_path), codebooks=8)
    assert len(got) == 6
    for want, have in zip(recs, got):
        np.testing.assert_array_equal(have.codes, want.codes)
        assert have.codes.dtype == np.int16
        assert (have.id, have.text, have.speaker, have.language, have.task, have.meta) == (
            want.id,
            want.text,
            want.speaker,
            want.language,
            want.task,
            want.meta,
        )
        assert have.duration == pytest.approx(want.duration)
    assert got.locate(4) == (1, 0)
    assert got[5].origin.endswith("shard-00001-of-00002.array_record record 1")


def test_decode_reports_truncation_corruption_and_codebooks():
    data = encode_record(_records()[2])
    with pytest.raises(
        RecordError, match=r"shard s7 record 3: truncated or padded: \d+ bytes, expected"
    ):
        decode_record(data[:-5], "s7", 3)
    with pytest.raises(RecordError, match="truncated: 6 bytes"):
        decode_record(data[:6], "s7", 3)
    corrupt = bytearray(data)
    corrupt[-20] ^= 0xFF
    with pytest.raises(RecordError, match="record 3: checksum mismatch"):
        decode_record(bytes(corrupt), "s7", 3)
    seven = encode_record(Record(id="x", codes=np.ones((4, 7), np.int16)))
    with pytest.raises(RecordError, match="record 0: codes have 7 codebooks, expected 8"):
        decode_record(seven, "s", 0, codebooks=8)
    # More codebooks than needed are cut (the tokenizer writes 20, the LM reads 8).
    wide = decode_record(
        encode_record(Record(id="w", codes=np.arange(40, dtype=np.int16).reshape(2, 20))),
        codebooks=8,
    )
    np.testing.assert_array_equal(wide.codes, np.arange(40).reshape(2, 20)[:, :8])


def test_reader_names_shard_and_record_of_a_bad_record(tmp_path):
    shards.write_shards(str(tmp_path), _records(3), records_per_shard=10, codebooks=8)
    path = tmp_path / "shard-00000-of-00001.array_record"
    good = [encode_record(r) for r in _records(3)]
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i, data in enumerate(good):
        writer.write(data[:-9] if i == 1 else data)
    writer.close()
    got = ShardSet(str(tmp_path), codebooks=8)
    assert got[0].id == "utt0"
    with pytest.raises(RecordError, match=f"shard {path} record 1: truncated"):
        got[1]
    assert isinstance(got.get(1), RecordError) and got.get(2).id == "utt2"


def test_a_shard_unlike_the_manifest_is_an_error_of_the_directory(tmp_path):
    shards.write_shards(str(tmp_path), _records(5), records_per_shard=2, codebooks=8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["records"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    missing = tmp_path / "shard-00001-of-00003.array_record"
    missing.unlink()
    got = ShardSet(str(tmp_path))
    for read in (got.__getitem__, got.get):  # never a bad record to skip
        with pytest.raises(ShardError, match="holds 2 records, the manifest says 3"):
            read(0)
    assert got.problems() == [
        f"shard {tmp_path / 'shard-00000-of-00003.array_record'}: holds 2 records, the "
        "manifest says 3",
        f"shard {missing}: missing (the manifest lists 2 records in it)",
    ]
    assert got[5].id == "utt4"  # the intact shard is read


def test_command_prints_summary_and_exports(tmp_path, capsys):
    recs = _records()
    shards.write_shards(str(tmp_path / "d"), recs, records_per_shard=4, codebooks=8)
    assert shards.main([str(tmp_path / "d"), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("6 records,") and "utt0: 3 frames x 8 codebooks" in out and "utt2" not in out
    )
    assert shards.main([str(tmp_path / "d"), "--export", "utt3", str(tmp_path / "c.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), recs[3].codes)
    assert shards.main([str(tmp_path / "d"), "--export", "nope", str(tmp_path / "n.npy")]) == 1
    assert "no record with id 'nope'" in capsys.readouterr().err
