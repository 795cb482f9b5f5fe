"""Grain pipeline: determinism, save/restore mid-epoch, per-process sharding, mixing, bad
records."""

import json

import array_record.python.array_record_module as arm
import numpy as np
import pytest

from data_pipelines import shards
from data_pipelines.config import DataConfig
from data_pipelines.demo_text_tokenizer import word_level_tokenizer
from data_pipelines.pipeline import Source, document_dataset, make_dataset
from data_pipelines.shards import Record, encode_record

TOK = word_level_tokenizer([f"w{i}" for i in range(50)])
CFG = DataConfig(context_length=64)


def _records(n, prefix, rng, max_frames=60):
    return [
        Record(
            id=f"{prefix}{i}",
            codes=rng.integers(0, 128, (int(rng.integers(4, max_frames)), 8)).astype(np.int16),
            text=" ".join(f"w{j}" for j in rng.integers(0, 50, int(rng.integers(1, 12)))),
            task="asr",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    shards.write_shards(str(root / "a"), _records(40, "a", rng), records_per_shard=15, codebooks=8)
    shards.write_shards(str(root / "b"), _records(40, "b", rng), records_per_shard=40, codebooks=8)
    return root


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_deterministic_for_a_seed(corpus):
    srcs = [Source(str(corpus / "a"), "interleave", 1.0), Source(str(corpus / "b"), "asr", 1.0)]
    one = _batches(iter(make_dataset(srcs, CFG, TOK, batch_size=2, seed=3)), 4)
    two = _batches(iter(make_dataset(srcs, CFG, TOK, batch_size=2, seed=3)), 4)
    other = _batches(iter(make_dataset(srcs, CFG, TOK, batch_size=2, seed=4)), 4)
    _assert_same(one, two)
    assert not all(np.array_equal(x["text"], y["text"]) for x, y in zip(one, other))
    assert one[0]["codes"].shape == (2, 64, 4, 8) and one[0]["code_weights"].shape == (2, 64, 8)


def test_restore_mid_epoch_continues_with_the_next_batch(corpus):
    srcs = [Source(str(corpus / "a"), "continuation")]
    ds = make_dataset(srcs, CFG, TOK, batch_size=2, seed=1)
    it = iter(ds)
    _batches(it, 5)  # about 6 batches per epoch: the next ones cross into epoch 2
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state  # what grain.checkpoint.CheckpointSave stores
    expected = _batches(it, 4)
    restored = iter(make_dataset(srcs, CFG, TOK, batch_size=2, seed=1))
    restored.set_state(state)
    _assert_same(_batches(restored, 4), expected)


def test_restore_with_worker_processes(corpus):
    srcs = [Source(str(corpus / "a"), "continuation")]
    ds = make_dataset(srcs, CFG, TOK, batch_size=2, seed=1, workers=2)
    it = iter(ds)
    _batches(it, 3)
    state = it.get_state()
    expected = _batches(it, 3)
    it.close()
    restored = iter(make_dataset(srcs, CFG, TOK, batch_size=2, seed=1, workers=2))
    restored.set_state(state)
    _assert_same(_batches(restored, 3), expected)
    restored.close()


def test_two_processes_see_each_record_once_per_epoch(corpus):
    srcs = [Source(str(corpus / "a"), "continuation")]
    seen = []
    groups = 0
    for p in range(2):
        docs = document_dataset(
            srcs, CFG, TOK, seed=5, process_index=p, process_count=2, num_epochs=1
        )
        seen.append([d["id"] for d in docs])
        rows = make_dataset(
            srcs, CFG, TOK, batch_size=1, seed=5, process_index=p, process_count=2, num_epochs=1
        )
        groups += sum(int((b["text"] == TOK.empty_id).sum()) for b in rows)
    assert sorted(seen[0] + seen[1]) == sorted(f"a{i}" for i in range(40))
    assert not set(seen[0]) & set(seen[1])
    all_recs = shards.ShardSet(str(corpus / "a"))
    assert groups == sum(-(-r.frames // 4) for r in all_recs)  # every patch packed exactly once


def test_mixing_follows_weights(corpus):
    srcs = [Source(str(corpus / "a"), "continuation", 3.0), Source(str(corpus / "b"), "asr", 1.0)]
    ids = [d["id"] for d in document_dataset(srcs, CFG, TOK, seed=0)[:40]]
    assert sum(i.startswith("a") for i in ids) == 30


def test_bad_record_stops_or_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    recs = _records(6, "r", rng)
    shards.write_shards(str(tmp_path), recs, records_per_shard=10, codebooks=8)
    path = tmp_path / "shard-00000-of-00001.array_record"
    writer = arm.ArrayRecordWriter(str(path), "group_size:1")
    for i, r in enumerate(recs):
        writer.write(encode_record(r)[:-3] if i == 4 else encode_record(r))
    writer.close()
    srcs = [Source(str(tmp_path), "continuation")]
    with pytest.raises(ValueError, match=f"shard {path} record 4: truncated"):
        list(make_dataset(srcs, CFG, TOK, batch_size=1, num_epochs=1, shuffle=False))
    lenient = DataConfig(context_length=64, skip_bad_records=True)
    rows = list(make_dataset(srcs, lenient, TOK, batch_size=1, num_epochs=1, shuffle=False))
    assert sum(int(r["skipped"].sum()) for r in rows) == 1
    assert sum(int(r["documents"].sum()) for r in rows) == 5


def test_skipping_is_bounded_and_a_missing_shard_is_never_skipped(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    recs = _records(4, "r", rng)
    shards.write_shards(str(tmp_path / "bad"), recs, records_per_shard=10, codebooks=8)
    writer = arm.ArrayRecordWriter(
        str(tmp_path / "bad" / "shard-00000-of-00001.array_record"), "group_size:1"
    )
    for r in recs:
        writer.write(encode_record(r)[:-3])  # every record truncated
    writer.close()
    reads, get = [], shards.ShardSet.get

    def counted(self, index):
        reads.append(index)
        if len(reads) > 100:
            raise AssertionError("the pipeline skips bad records without end")
        return get(self, index)

    monkeypatch.setattr(shards.ShardSet, "get", counted)
    lenient = DataConfig(context_length=64, skip_bad_records=True)
    with pytest.raises(
        ValueError,
        match=r"^8 bad records in a row, twice the 4 this process reads of their source per "
        r"epoch: no good record left to skip to \(the last: shard .* truncated",
    ):
        next(iter(make_dataset([Source(str(tmp_path / "bad"), "asr")], lenient, TOK, batch_size=1)))
    assert len(reads) == 8
    shards.write_shards(str(tmp_path / "gone"), recs, records_per_shard=2, codebooks=8)
    (tmp_path / "gone" / "shard-00001-of-00002.array_record").unlink()
    srcs = [Source(str(tmp_path / "gone"), "asr")]
    with pytest.raises(shards.ShardError, match=r"shard-00001-of-00002.array_record: missing"):
        list(make_dataset(srcs, lenient, TOK, batch_size=1, num_epochs=1, shuffle=False))


def test_document_longer_than_context_is_reported(corpus):
    small = DataConfig(context_length=8)
    srcs = [Source(str(corpus / "a"), "asr")]
    with pytest.raises(
        ValueError,
        match=r"shard .*record \d+ \(a\d+\): the asr sequence has \d+ groups, "
        r"longer than the context of 8 groups",
    ):
        next(iter(make_dataset(srcs, small, TOK, batch_size=1)))
    lenient = DataConfig(context_length=8, skip_bad_records=True)
    rows = list(
        make_dataset([Source(str(corpus / "a"), "text")], lenient, TOK, batch_size=1, num_epochs=1)
    )
    assert sum(int(r["skipped"][0]) for r in rows) + sum(int(r["documents"][0]) for r in rows) == 40
