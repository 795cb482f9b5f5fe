"""Packing: rows never mix documents, targets stop at boundaries, state restores, bad documents are
counted."""

import grain
import numpy as np
import pytest

from data_pipelines.config import DataConfig
from data_pipelines.packing import PackIterDataset

EMPTY_ID, PAD = 5, 0
CFG = DataConfig(context_length=48, empty_text_weight=0.25)
EMPTY = np.asarray(CFG.empty_ids)


def _doc(rng, n):
    text = rng.integers(20, 90, n).astype(np.int32)
    speech = rng.random(n) < 0.5
    text[speech] = EMPTY_ID
    codes = np.broadcast_to(EMPTY, (n, 4, 8)).astype(np.int16).copy()
    codes[speech] = rng.integers(0, 128, (speech.sum(), 4, 8))
    target = np.ones(n, bool)
    target[: rng.integers(0, n)] = False  # a prompt part
    return {"text": text, "codes": codes, "target": target}


def _pack(docs, cfg=CFG):
    ds = grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return PackIterDataset(ds, cfg, EMPTY_ID, PAD)


def test_rows_hold_whole_documents_and_targets_stay_inside():
    rng = np.random.default_rng(1)
    docs = [_doc(rng, int(n)) for n in rng.integers(1, 40, 60)]
    rows = list(_pack(docs))
    found = []
    for row in rows:
        seg, pos = row["segment_ids"], row["positions"]
        assert row["text"].shape == (48,) and row["codes"].shape == (48, 4, 8)
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
        assert (row["text"][used:] == PAD).all() and (
            row["codes"][used:] == EMPTY[None, None]
        ).all()
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
            found.append((row["text"][idx], row["codes"][idx]))
        assert row["documents"] == seg.max()
        # No target of position g refers to a group of another document or to padding.
        live = (row["text_weights"] > 0) | row["code_weights"].any(axis=1)
        g = np.flatnonzero(live)
        assert (g < 47).all() and (seg[g + 1] == seg[g]).all() and (seg[g] > 0).all()
        boundary = np.flatnonzero(seg[:-1] != seg[1:])
        assert (row["text_weights"][boundary] == 0).all() and not row["code_weights"][
            boundary
        ].any()
    assert len(found) == len(docs)
    for (t, c), d in zip(found, docs):
        np.testing.assert_array_equal(t, d["text"])
        np.testing.assert_array_equal(c, d["codes"])


def test_weights_and_targets_follow_the_next_group():
    rng = np.random.default_rng(2)
    doc = _doc(rng, 30)
    doc["target"][:] = True
    doc["target"][:10] = False
    row = next(iter(_pack([doc])))
    nxt = doc["text"][1:]
    want_tw = np.where(nxt == EMPTY_ID, 0.25, 1.0) * (np.arange(1, 30) >= 10)
    np.testing.assert_allclose(row["text_weights"][:29], want_tw)
    np.testing.assert_array_equal(row["text_targets"][9:29], nxt[9:])
    assert (row["text_targets"][:9] == PAD).all() and (row["text_targets"][29:] == PAD).all()
    speech_next = (nxt == EMPTY_ID) & (np.arange(1, 30) >= 10)
    np.testing.assert_array_equal(row["code_weights"][:29], np.repeat(speech_next[:, None], 8, 1))
    np.testing.assert_array_equal(
        row["code_targets"][:29][speech_next], doc["codes"][1:][speech_next]
    )
    np.testing.assert_array_equal(
        row["code_targets"][:29][~speech_next], np.broadcast_to(EMPTY, ((~speech_next).sum(), 4, 8))
    )


def test_state_restores_to_the_identical_next_row():
    rng = np.random.default_rng(3)
    docs = [_doc(rng, int(n)) for n in rng.integers(5, 30, 25)]
    docs.insert(7, {"error": "shard x record 7: checksum mismatch"})
    grain.experimental.assert_equal_output_after_checkpoint(_pack(docs))


def test_skipped_documents_are_counted_and_too_long_ones_stop():
    rng = np.random.default_rng(4)
    docs = [_doc(rng, 20), {"error": "bad"}, {"error": "bad"}, _doc(rng, 20), _doc(rng, 20)]
    rows = list(_pack(docs))
    assert [int(r["skipped"]) for r in rows] == [2, 0] and [int(r["documents"]) for r in rows] == [
        2,
        1,
    ]
    with pytest.raises(
        ValueError, match="document of 49 groups is longer than the context of 48 groups"
    ):
        list(_pack([_doc(rng, 10), _doc(rng, 49)]))
