"""gs:// through the one path layer, against a real GCS JSON API (gcp-storage-emulator on loopback:
fixtures `gcs` and `gs_dir` of gcs_emulator.py): model checkpoints, the converter both ways,
tokenize and the shard reader, and a training run that is SIGTERMed, resumes and exports its model
there. End-to-end (`pytest -m e2e`): every test talks to the emulator's process."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from etils import epath
from train_support import run_sigterm_at_step, train_cmd

import convert_torch_weights
from data_pipelines import tokenize
from data_pipelines.encoders import EnergyEncoder
from data_pipelines.shards import ShardSet
from mimo_jax import model_checkpoint as checkpoint
from mimo_jax.conversion import safetensors_io as st
from mimo_jax.conversion.convert import load_torch_checkpoint
from mimo_jax.lm.conversion import LMFamily
from mimo_jax.tokenizer import audio_io

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _objects(url: str) -> list[str]:
    """Object names under a gs:// prefix, listed by google-cloud-storage (a witness independent of
    epath/gcsfs: the files are in the emulator's bucket, not in a local ./gs:/ folder)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket, _, prefix = url[len("gs://") :].partition("/")
    client = storage.Client(credentials=AnonymousCredentials(), project="test")
    return sorted(b.name[len(prefix) + 1 :] for b in client.list_blobs(bucket, prefix=prefix + "/"))


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in checkpoint.flat_params(model)}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for p in pa:
        np.testing.assert_array_equal(pa[p], pb[p], err_msg=".".join(p))


def test_model_checkpoint_round_trip(gs_dir, fixtures_root):
    _, model = load_torch_checkpoint(fixtures_root / "lm", LMFamily())
    hf = json.loads((fixtures_root / "lm" / "config.json").read_text())
    dst = f"{gs_dir}/run/model"
    assert str(checkpoint.save(model, hf, dst)) == dst
    assert checkpoint.save(model, hf, dst)  # over an existing one: replaced whole
    names = _objects(f"{gs_dir}/run")
    assert "model/config.json" in names and any(n.startswith("model/params/") for n in names)
    assert not [n for n in names if ".partial" in n]
    assert not Path("gs:").exists()
    assert checkpoint.is_model_checkpoint(dst)
    _, loaded = checkpoint.load(dst)
    _assert_same_params(loaded, model)
    # A commit to an object store copies config.json last: without it, no model checkpoint.
    epath.Path(dst, "config.json").unlink()
    assert not checkpoint.is_model_checkpoint(dst)
    with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
        checkpoint.load(dst)


def test_convert_both_ways(gs_dir, fixtures_root, capsys):
    src = fixtures_root / "lm"
    assert convert_torch_weights.main([str(src), f"{gs_dir}/orbax", "--quiet"]) == 0
    assert convert_torch_weights.main([f"{gs_dir}/orbax", f"{gs_dir}/official", "--quiet"]) == 0
    assert f"wrote {gs_dir}/official" in capsys.readouterr().out
    assert not [n for n in _objects(gs_dir) if ".partial" in n]
    _, loaded = checkpoint.load(f"{gs_dir}/orbax")
    _assert_same_params(loaded, load_torch_checkpoint(src, LMFamily())[1])
    source = st.read_index(src)
    written = st.read_index(f"{gs_dir}/official")
    assert written and set(written) <= set(source)
    for name, info in written.items():
        assert info.dtype == source[name].dtype, name
        np.testing.assert_array_equal(st.read_tensor(info), st.read_tensor(source[name]), name)
    assert json.loads(epath.Path(f"{gs_dir}/official/config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    # From gs:// back to local, and an official directory read from gs://.
    _, from_gcs = load_torch_checkpoint(f"{gs_dir}/official", LMFamily())
    _assert_same_params(from_gcs, loaded)


def _corpus(root: epath.Path, n: int = 5) -> None:
    lines = []
    for i in range(n):
        wav = 0.1 * np.random.default_rng(i).standard_normal(int((0.3 + 0.1 * i) * 24000))
        data = io.BytesIO()  # libsndfile seeks back to finish the header: not on a gcsfs upload
        soundfile.write(data, wav.astype(np.float32), 24000, format="WAV")
        (root / "wav" / f"u{i}.wav").write_bytes(data.getvalue())
        lines.append(json.dumps({"audio": f"wav/u{i}.wav", "text": f"utterance {i}"}))
    lines.insert(2, json.dumps({"audio": "wav/missing.wav"}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")


def test_tokenize_to_gcs_and_read_the_shards_back(gs_dir, tmp_path):
    (epath.Path(gs_dir) / "wav").mkdir(parents=True)
    _corpus(epath.Path(gs_dir))
    epath.Path(gs_dir, "ckpt", "params").mkdir(parents=True)
    epath.Path(gs_dir, "ckpt", "params", "w").write_bytes(b"weights")  # fingerprinted
    out = f"{gs_dir}/shards"
    args = [
        "--manifest",
        f"{gs_dir}/corpus.jsonl",
        "--encoder",
        "energy",
        "--checkpoint",
        f"{gs_dir}/ckpt",
        "--records-per-shard",
        "2",
        "--process-index",
        "0",
        "--process-count",
        "1",
    ]
    assert tokenize.run(tokenize.parse_args(args + ["--out", out])) == 0
    names = _objects(out)
    assert names == sorted(
        ["manifest.json", "errors.jsonl"]
        + [f"shard-0000{k}-of-00003.{x}" for k in range(3) for x in ("array_record", "json")]
    )
    errors = [json.loads(x) for x in epath.Path(out, "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["audio"]) for e in errors] == [(3, f"{gs_dir}/wav/missing.wav")]
    records = {r.id: r for r in ShardSet(out)}  # array_record's own GCS reader
    assert sorted(records) == [f"u{i}" for i in range(5)]
    wav = audio_io.read_audio(f"{gs_dir}/wav/u4.wav", 24000, min_samples=1)
    np.testing.assert_array_equal(records["u4"].codes, EnergyEncoder(8)([wav])[0])
    assert records["u4"].text == "utterance 4"
    # A rerun redoes a deleted shard alone, and refuses other settings, on gs:// too.
    epath.Path(out, "shard-00001-of-00003.array_record").unlink()
    assert tokenize.run(tokenize.parse_args(args + ["--out", out])) == 0
    assert _objects(out) == names and len(ShardSet(out)) == 5
    epath.Path(gs_dir, "ckpt", "params", "w").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="encoded with other settings: another --checkpoint"):
        tokenize.run(tokenize.parse_args(args + ["--out", out]))
    # The shard command in a fresh process (the emulator settings are inherited).
    shown = subprocess.run(
        [sys.executable, "-m", "data_pipelines.shards", out, "--show", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "5 records" in shown.stdout and "1 errors" in shown.stdout


def test_training_run_is_preempted_resumes_and_exports_on_gcs(gs_dir, demo_data):
    workdir = f"{gs_dir}/run"
    cmd = train_cmd(demo_data, workdir, "--config.total_steps=6", "--config.checkpoint_every=1000")
    out = run_sigterm_at_step(cmd)  # the test process's environment: the emulator's, its devices
    assert "preempted: checkpoint saved at step" in out
    names = _objects(workdir)
    steps = sorted(
        {
            int(n.split("/")[1])
            for n in names
            if n.startswith("checkpoints/") and n.split("/")[1].isdigit()
        }
    )
    assert steps and steps[-1] < 6, names
    assert "metrics.jsonl" in names and "config.json" in names
    assert any(n.startswith("tensorboard/") for n in names), names
    assert not Path("gs:").exists() and not (ROOT / "gs:").exists()
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    metrics = [json.loads(x) for x in epath.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 7))
    assert checkpoint.is_model_checkpoint(f"{workdir}/model")
    config, model = checkpoint.load(f"{workdir}/model")
    assert all(np.isfinite(v).all() for v in _params(model).values())
