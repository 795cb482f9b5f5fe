"""Demo corpus (eSpeak NG) and the tokenize command: bad input, resume, process slices, the CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from data_pipelines import demo_corpus, tokenize
from data_pipelines.encoders import EnergyEncoder
from data_pipelines.shards import ShardSet
from mimo_jax.tasks.text_tokenizer import SPECIAL_TOKENS, TextTokenizer
from mimo_jax.tokenizer import audio_io
from mimo_jax.tokenizer.config import TokenizerConfig

AUDIO = TokenizerConfig()  # the released tokenizer's rate and frame rate, as EnergyEncoder's

FIXTURE_TOKENIZER = os.path.join(
    os.environ.get("MIMO_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures")),
    "tokenizer",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo_corpus.build(str(root), sentences=3)
    return root


def _with_bad_lines(corpus, tmp_path):
    """The demo manifest plus one bad line of each kind; returns (manifest path, bad line
    numbers)."""
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
    bad = [
        "{not json",
        json.dumps({"text": "no audio key"}),
        json.dumps({"audio": str(tmp_path / "missing.wav")}),
        json.dumps({"audio": str(tmp_path / "garbage.wav"), "text": "corrupt"}),
        json.dumps({"audio": str(corpus / "wav" / "s000a.wav"), "id": "s000b"}),  # duplicate id
    ]
    lines = lines[:5] + bad + lines[5:]
    path = corpus / f"with_bad_{tmp_path.name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, list(range(6, 11))


def _argv(manifest, out, *extra):
    return [
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--encoder",
        "energy",
        "--records-per-shard",
        "4",
        "--process-index",
        "0",
        "--process-count",
        "1",
        *extra,
    ]


def _args(manifest, out, *extra):
    return tokenize.parse_args(_argv(manifest, out, *extra))


class CountingEncoder(EnergyEncoder):
    def __init__(self, codebooks=8):
        super().__init__(codebooks)
        self.batches = []

    def __call__(self, wavs):
        self.batches.append([len(w) for w in wavs])
        return super().__call__(wavs)


def test_demo_corpus_files_pairs_and_tokenizer(corpus):
    entries = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 12 and {e["language"] for e in entries} == {"en", "de"}
    info = soundfile.info(str(corpus / entries[0]["audio"]))
    assert info.samplerate == 22050 and info.channels == 1
    by_id = {e["id"]: e for e in entries}
    a, b, slow, fast = (by_id[f"s000{x}"] for x in "absf")
    assert a["text"] == b["text"] == slow["text"] == fast["text"] and a["voice"] != b["voice"]
    assert slow["voice"] == fast["voice"] == a["voice"] and slow["rate"] < a["rate"] < fast["rate"]
    secs = {k: audio_io.audio_seconds(str(corpus / by_id[k]["audio"])) for k in ("s000s", "s000f")}
    assert secs["s000s"] > 1.5 * secs["s000f"]
    assert "slowly" in slow["caption"] and "female" in a["instruct"]
    tok = TextTokenizer.from_file(str(corpus / "tokenizer.json"))
    assert all(tok.encode(t) == [tok.special_id(t)] for t in SPECIAL_TOKENS)
    assert tok.decode(tok.encode(a["text"])) == a["text"]


def test_tokenize_writes_shards_and_reports_every_bad_line(corpus, tmp_path, capsys):
    manifest, bad = _with_bad_lines(corpus, tmp_path)
    encoder = CountingEncoder()
    assert tokenize.run(_args(manifest, tmp_path / "out"), encode=encoder) == 0
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == bad
    reasons = [e["reason"] for e in errors]
    assert reasons[0].startswith("not JSON") and reasons[1] == "no 'audio' path"
    assert reasons[2].endswith("missing.wav: no such file") and errors[2]["audio"].endswith(
        "missing.wav"
    )
    assert reasons[3].startswith("bad audio") and errors[3]["audio"].endswith("garbage.wav")
    assert reasons[4] == "duplicate id 's000b' (first on line 2)"
    manifest_json = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (
        manifest_json["records"] == 12
        and manifest_json["errors"] == 5
        and manifest_json["lines"] == 17
    )
    assert len(manifest_json["shards"]) == 5
    assert sum(s["errors"] for s in manifest_json["shards"]) == 5
    out = capsys.readouterr().out
    assert "12 records" in out and "5 errors" in out
    # Codes are the encoder's codes of the 24 kHz audio, with the tokenizer's frame count.
    recs = {r.id: r for r in ShardSet(str(tmp_path / "out"), codebooks=8)}
    wav = audio_io.read_audio(
        str(corpus / "wav" / "s002f.wav"), AUDIO.sampling_rate, min_samples=AUDIO.min_samples
    )
    np.testing.assert_array_equal(recs["s002f"].codes, EnergyEncoder(8)([wav])[0])
    assert recs["s002f"].frames == AUDIO.clip_code_frames(len(wav))
    assert recs["s002f"].meta["pair"] == "s002" and recs["s002f"].language == "de"
    assert recs["s002f"].duration == pytest.approx(len(wav) / 24000, abs=1e-3)
    # Batches were sorted by length.
    assert all(b == sorted(b) for b in encoder.batches)


def test_resume_redoes_only_unfinished_shards(corpus, tmp_path):
    manifest, _ = _with_bad_lines(corpus, tmp_path)
    out = tmp_path / "out"
    assert tokenize.run(_args(manifest, out), encode=EnergyEncoder(8)) == 0
    first = (out / "manifest.json").read_text()
    codes = {r.id: r.codes.copy() for r in ShardSet(str(out))}
    for name in ("shard-00002-of-00005.json", "shard-00002-of-00005.array_record", "manifest.json"):
        (out / name).unlink()
    (out / "shard-00003-of-00005.array_record.tmp").write_bytes(b"partial")  # an interrupted write
    (out / "shard-00003-of-00005.json").unlink()
    encoder = CountingEncoder()
    assert tokenize.run(_args(manifest, out), encode=encoder) == 0
    # shard 2 (lines 9-12) has two good lines after the garbage file and the duplicate; shard 3 four
    assert sum(len(b) for b in encoder.batches) == 2 + 4
    assert (out / "manifest.json").read_text() == first
    assert {r.id: r.codes.tolist() for r in ShardSet(str(out))} == {
        k: v.tolist() for k, v in codes.items()
    }
    assert not (out / "shard-00003-of-00005.array_record.tmp").exists()


def _never(wavs):
    pytest.fail("a shard was encoded")


def test_rerun_redoes_stale_shards_and_refuses_other_settings(corpus, tmp_path, capsys):
    manifest, out = corpus / "manifest.jsonl", tmp_path / "out"
    checkpoint, copy = tmp_path / "ckpt", tmp_path / "copy"
    checkpoint.mkdir()
    (checkpoint / "weights").write_bytes(b"first")
    shutil.copytree(checkpoint, copy)
    assert (
        tokenize.run(_args(manifest, out, "--checkpoint", str(checkpoint)), EnergyEncoder(8)) == 0
    )
    # The same checkpoint files elsewhere: every shard is done.
    assert tokenize.run(_args(manifest, out, "--checkpoint", str(copy)), encode=_never) == 0
    # Other settings are refused before anything is encoded or changed.
    (checkpoint / "weights").write_bytes(b"other")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra, why in (
        (["--checkpoint", str(checkpoint)], "another --checkpoint (its files differ)"),
        (["--checkpoint", str(copy), "--codebooks", "4"], "--codebooks 8 (now 4)"),
    ):
        assert tokenize.main(_argv(manifest, out, *extra)) == 2
        assert capsys.readouterr().err == (
            f"error: {out / 'shard-00000-of-00003.json'}: encoded with other settings: {why} "
            "(and 2 more); use --overwrite to redo such shards, or another --out\n"
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    # --overwrite redoes them: the codes and the manifest are the new settings'.
    four = ["--checkpoint", str(copy), "--codebooks", "4"]
    assert tokenize.run(_args(manifest, out, *four, "--overwrite"), encode=EnergyEncoder(4)) == 0
    assert {r.codes.shape[1] for r in ShardSet(str(out))} == {4}
    assert json.loads((out / "manifest.json").read_text())["codebooks"] == 4
    # A shard file deleted (its sidecar kept): that shard alone is redone, and the manifest says so
    # only once it is back. A sidecar of an earlier version (no encoding) is redone too.
    (out / "shard-00001-of-00003.array_record").unlink()
    sidecar = out / "shard-00002-of-00003.json"
    sidecar.write_text(
        json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "encoding"})
    )
    kept = (out / "shard-00000-of-00003.array_record").read_bytes()

    def lost(wavs):
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        tokenize.run(_args(manifest, out, *four), encode=lost)
    assert not (out / "manifest.json").exists()  # it would claim the shard being redone
    assert (out / "shard-00000-of-00003.array_record").read_bytes() == kept
    encoder = CountingEncoder(4)
    assert tokenize.run(_args(manifest, out, *four), encode=encoder) == 0
    assert sum(len(b) for b in encoder.batches) == 8
    assert "2 shards tokenized, 1 skipped as done; 12 records written" in capsys.readouterr().out
    assert len(ShardSet(str(out))) == 12
    # Another --records-per-shard is another layout: refused, or its shards replaced.
    assert tokenize.main(_argv(manifest, out, *four, "--records-per-shard", "6")) == 2
    assert "a shard of another layout (now 2 shards" in capsys.readouterr().err
    six = _args(manifest, out, *four, "--records-per-shard", "6", "--overwrite")
    assert tokenize.run(six, encode=EnergyEncoder(4)) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == [
        f"shard-0000{k}-of-00002.{x}" for k in range(2) for x in ("array_record", "json")
    ]


def test_codebooks_the_tokenizer_lacks_are_refused_before_encoding(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    for n, expected in (
        (0, "1 or more (at most the audio tokenizer's)"),
        (21, "1 to 20, the audio tokenizer's codebooks"),
    ):
        assert tokenize.main(_argv(corpus / "manifest.jsonl", out, "--codebooks", str(n))) == 2
        assert capsys.readouterr().err == f"error: --codebooks {n}: expected {expected}\n"
    assert not list(out.glob("*"))


def test_command_line_mistakes_are_one_line(corpus, tmp_path, capsys):
    manifest = str(corpus / "manifest.jsonl")
    for argv, message in (
        (
            ["--manifest", str(tmp_path / "no.jsonl")],
            f"--manifest {tmp_path / 'no.jsonl'}: no such file; expected a JSONL manifest",
        ),
        (
            ["--manifest", str(tmp_path)],
            f"--manifest {tmp_path}: a directory; expected a JSONL manifest file",
        ),
        (
            ["--manifest", manifest, "--records-per-shard", "0"],
            "--records-per-shard 0: expected 1 or more lines per shard",
        ),
    ):
        assert tokenize.main([*argv, "--out", str(tmp_path / "out"), "--encoder", "energy"]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_process_slices_together_write_everything(corpus, tmp_path, capsys):
    manifest = corpus / "manifest.jsonl"
    out = tmp_path / "out"
    args = lambda p: tokenize.parse_args(
        [
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--encoder",
            "energy",  # noqa: E731
            "--records-per-shard",
            "2",
            "--process-index",
            str(p),
            "--process-count",
            "2",
        ]
    )
    assert tokenize.run(args(1)) == 0
    assert not (out / "manifest.json").exists() and "pending" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.json")) == [
        f"shard-0000{k}-of-00006.json" for k in (1, 3, 5)
    ]
    assert tokenize.run(args(0)) == 0
    assert sorted(r.id for r in ShardSet(str(out))) == sorted(
        json.loads(x)["id"] for x in manifest.read_text().splitlines()
    )


def test_resume_refuses_a_changed_manifest(corpus, tmp_path):
    out = tmp_path / "out"
    assert tokenize.run(_args(corpus / "manifest.jsonl", out), encode=EnergyEncoder(8)) == 0
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    with pytest.raises(
        ValueError, match="shard-00000-of-00003.json: written from different manifest lines"
    ):
        tokenize.run(_args(changed, out), encode=EnergyEncoder(8))


def test_encoder_breaking_the_contract_stops(corpus, tmp_path):
    with pytest.raises(
        RuntimeError,
        match=(
            r"encoder returned codes \(3, 8\) for .*/s00\d\w.wav \(\d+ samples\), "
            r"expected \(\d+, 8\)"
        ),
    ):
        tokenize.run(
            _args(corpus / "manifest.jsonl", tmp_path / "o"),
            encode=lambda ws: [np.zeros((3, 8))] * len(ws),
        )


@pytest.mark.e2e
def test_commands_run_as_modules(corpus, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.tokenize",
            "--manifest",
            str(corpus / "manifest.jsonl"),
            "--out",
            str(out),
            "--encoder",
            "energy",
            "--process-index",
            "0",
            "--process-count",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "12 records" in done.stdout
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.shards",
            str(out),
            "--export",
            "s001s",
            str(tmp_path / "c.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int16 and codes.shape[1] == 8 and codes.shape[0] > 25


def test_with_the_fixture_tokenizer_checkpoint(corpus, tmp_path):
    pytest.importorskip(
        "mimo_jax.tokenizer",
        reason="the JAX audio tokenizer (mimo_jax.tokenizer) is not in this tree",
    )
    args = tokenize.parse_args(
        [
            "--manifest",
            str(corpus / "manifest.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--checkpoint",
            FIXTURE_TOKENIZER,
            "--process-index",
            "0",
            "--process-count",
            "1",
        ]
    )
    assert tokenize.run(args) == 0
    recs = list(ShardSet(str(tmp_path / "o"), codebooks=8))
    assert len(recs) == 12
    sizes = np.array([1024, 1024] + [128] * 6)
    for r in recs:
        assert abs(r.frames - AUDIO.clip_code_frames(int(round(r.duration * 24000)))) <= 1
        assert (r.codes >= 0).all() and (r.codes < sizes).all()


def test_demo_corpus_through_tokenize_and_the_pipeline(corpus, tmp_path):
    from data_pipelines.config import DataConfig
    from data_pipelines.pipeline import Source, make_dataset

    out = tmp_path / "out"
    assert tokenize.run(_args(corpus / "manifest.jsonl", out), encode=EnergyEncoder(8)) == 0
    tok = TextTokenizer.from_file(str(corpus / "tokenizer.json"))
    cfg = DataConfig(context_length=512)
    batch = next(
        iter(
            make_dataset(
                [Source(str(out), "tts", 1.0), Source(str(out), "instruct_tts", 1.0)],
                cfg,
                tok,
                batch_size=2,
                seed=0,
            )
        )
    )
    speech = batch["text"] == tok.empty_id
    assert speech.any() and (batch["codes"][speech] < np.array([1024, 1024] + [128] * 6)).all()
    # one speech target per speech group after the first of a document (the loss weighs them)
    assert (
        batch["code_weights"][..., 0].sum()
        == (speech[:, 1:] & (batch["segment_ids"][:, 1:] > 0)).sum()
    )
    assert tok.sostm_id in batch["text"] and tok.eostm_id in batch["text"]


def test_relative_manifest_audio_and_out(tmp_path, monkeypatch):
    (tmp_path / "data" / "wav").mkdir(parents=True)
    for i in range(3):
        wav = 0.1 * np.random.default_rng(i).standard_normal(6000 + 2400 * i).astype(np.float32)
        soundfile.write(tmp_path / "data" / "wav" / f"r{i}.wav", wav, 24000)
    (tmp_path / "data" / "corpus.jsonl").write_text(
        "".join(json.dumps({"audio": f"wav/r{i}.wav"}) + "\n" for i in range(3))
    )
    monkeypatch.chdir(tmp_path)
    assert tokenize.run(_args("data/corpus.jsonl", "shards/out")) == 0
    assert sorted(r.id for r in ShardSet("shards/out")) == ["r0", "r1", "r2"]
    assert (tmp_path / "shards" / "out" / "errors.jsonl").read_text() == ""
