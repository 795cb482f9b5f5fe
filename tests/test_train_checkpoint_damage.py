"""Verified training checkpoints on real Orbax files: every kind of damage to the newest step (a bit
flipped in an array's stored bytes, bytes overwritten, a cut data file, a deleted _METADATA, a
missing meta item, a changed data-iterator state) is named and set aside, and the run resumes from
the newest intact step; with none intact it stops naming each step."""

import json
import shutil
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mimo_jax.train.train_checkpoints import TrainCheckpoints, abstract_like, checksums

IDENTITY = {"model": {"hidden_size": 8}, "trainable": ["llm"]}


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)  # random bits: stored uncompressed, found by their bytes
    return {
        "w": jnp.asarray(rng.integers(0, 2**32, (128, 64), dtype=np.uint32)),
        "v": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((16,)), jnp.bfloat16),
        "step": jnp.int32(step),
    }


def _iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _save_steps(workdir: Path, steps=(1, 2, 3)) -> dict[int, dict]:
    ckpts = TrainCheckpoints(str(workdir), IDENTITY, keep=3, async_save=False)
    it, saved = _iterator(), {}
    for step in steps:
        next(it)
        ckpts.save(step, _state(step), it)
        saved[step] = it.get_state()
    ckpts.close()
    return saved


def _restore(workdir: Path):
    ckpts = TrainCheckpoints(str(workdir), IDENTITY, keep=3, async_save=False)
    it = _iterator()
    try:
        step, state = ckpts.restore_latest(abstract_like(_state(0)), it)
    finally:
        ckpts.close()
    return step, state, it, ckpts


def _data_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def flip_bit_in_array(step_dir: Path, array: np.ndarray) -> None:
    """One bit of the array's stored bytes, wherever Orbax put them (every copy of the chunk)."""
    needle, hits = np.asarray(array).tobytes()[:64], 0
    for path in (step_dir / "state").rglob("*"):
        data = bytearray(path.read_bytes()) if path.is_file() else b""
        at = data.find(needle)
        if at >= 0:
            data[at + 21] ^= 1 << 4
            path.write_bytes(bytes(data))
            hits += 1
    assert hits, "the array's bytes were not found in the checkpoint"


def flip_bytes(step_dir: Path) -> None:
    path = _data_files(step_dir)[-1]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def truncate(step_dir: Path) -> None:
    path = _data_files(step_dir)[-1]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def delete_meta(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "meta")


def change_iterator(step_dir: Path) -> None:
    path = next((step_dir / "data").glob("process_*.json"))
    state = json.loads(path.read_text())
    state["next_index"] += 1
    path.write_text(json.dumps(state))


DAMAGE = {
    "flipped bit": (
        lambda d: flip_bit_in_array(d, _state(3)["w"]),
        "differ from their saved checksums",
    ),
    "flipped bytes": (flip_bytes, ""),
    "truncated data file": (truncate, "cannot be read"),
    "missing meta": (delete_meta, "meta item cannot be read"),
    "changed iterator state": (change_iterator, "data-iterator state differs"),
}


def test_checksum_changes_with_every_single_bit():
    tree = _state(0)
    base = checksums(tree)
    words = np.asarray(tree["v"]).view(np.uint32).reshape(-1)
    for position in (0, 1, 1000, words.size - 1):
        for bit in (0, 7, 22, 31):
            flipped = words.copy()
            flipped[position] ^= np.uint32(1 << bit)
            changed = dict(tree, v=jnp.asarray(flipped.view(np.float32).reshape(64, 32)))
            sums = checksums(changed)
            assert sums["['v']"] != base["['v']"], (position, bit)
            assert sums["['w']"] == base["['w']"]
    half = np.asarray(tree["b"]).view(np.uint16).copy()
    half[5] ^= np.uint16(1 << 15)
    assert checksums(dict(tree, b=jnp.asarray(half.view(jnp.bfloat16))))["['b']"] != base["['b']"]
    swapped = np.asarray(tree["v"]).copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values in other places
    assert checksums(dict(tree, v=jnp.asarray(swapped)))["['v']"] != base["['v']"]


def test_a_flipped_bit_restores_silently_without_the_checksums(tmp_path):
    """What the checksums are for: Orbax itself reads the damaged array without complaint."""
    _save_steps(tmp_path)
    flip_bit_in_array(tmp_path / "checkpoints" / "3", _state(3)["w"])
    w = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")["w"]
    assert w.shape == (128, 64) and not np.array_equal(np.asarray(w), np.asarray(_state(3)["w"]))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_step_is_set_aside_and_the_one_before_restored(tmp_path, damage, capsys):
    saved = _save_steps(tmp_path)
    damage_fn, problem = DAMAGE[damage]
    damage_fn(tmp_path / "checkpoints" / "3")
    step, state, it, ckpts = _restore(tmp_path)
    assert step == 2 and ckpts.good_step == 2
    for key, value in _state(2).items():
        np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(value))
    assert it.get_state() == saved[2]
    assert not (tmp_path / "checkpoints" / "3").exists()
    assert (tmp_path / "checkpoints_damaged" / "3" / "state").is_dir()  # moved, not deleted
    line = [x for x in capsys.readouterr().out.splitlines() if "step 3 is damaged" in x]
    assert len(line) == 1 and problem in line[0] and "resuming from step 2" in line[0], line


def test_intact_newest_step_is_restored(tmp_path):
    saved = _save_steps(tmp_path)
    step, state, it, _ = _restore(tmp_path)
    assert step == 3 and it.get_state() == saved[3]
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(3)["w"]))
    assert not (tmp_path / "checkpoints_damaged").exists()


def test_no_intact_step_stops_naming_each_and_moves_nothing(tmp_path):
    _save_steps(tmp_path)
    truncate(tmp_path / "checkpoints" / "3")
    delete_meta(tmp_path / "checkpoints" / "2")
    flip_bit_in_array(tmp_path / "checkpoints" / "1", _state(1)["w"])
    with pytest.raises(ValueError, match="no intact checkpoint") as e:
        _restore(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert "step 3 cannot be read" in message
    assert "step 2 its meta item cannot be read" in message
    assert "step 1 1 arrays differ from their saved checksums: ['w']" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_a_step_without_metadata_restores_when_every_array_matches(tmp_path):
    """Orbax needs no _METADATA when given the restore target; the checksums, not the presence of
    a file, decide. (The train state's restore does need it: tests/test_train_rundir.py.)"""
    saved = _save_steps(tmp_path)
    delete_metadata(tmp_path / "checkpoints" / "3")
    step, state, it, _ = _restore(tmp_path)
    assert step == 3 and it.get_state() == saved[3]
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(3)["w"]))


def test_a_step_damaged_twice_is_set_aside_under_a_new_name(tmp_path):
    _save_steps(tmp_path)
    truncate(tmp_path / "checkpoints" / "3")
    assert _restore(tmp_path)[0] == 2
    _save_steps(tmp_path, steps=(3,))  # the resumed run saves step 3 again; damaged again
    truncate(tmp_path / "checkpoints" / "3")
    assert _restore(tmp_path)[0] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir()) == ["3", "3.1"]


def test_keep_below_two_is_refused(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.keep=1: expected at least 2"):
        TrainCheckpoints(str(tmp_path), IDENTITY, keep=1)
