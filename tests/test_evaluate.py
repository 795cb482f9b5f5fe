"""Few-shot multiple choice and `python -m mimo_jax.evaluate` on the tasks/ fixture: batched
option scores equal an independent per-option forward pass, single-token options pick the model's
most likely next token, ASR end to end gives the fixture's greedy transcript, and bad lines are
each one line of errors.jsonl (one that is not UTF-8 too); scored lines survive a kill and a rerun
scores only the rest; few_shot with nothing scored says so and fails."""

import json

import numpy as np
import pytest
import soundfile as sf
from tasks_support import fixture_lm, record_batches
from test_readme import readme_command

from mimo_jax import evaluate
from mimo_jax.evaluation import asr_metrics, choice
from mimo_jax.tasks import prompts, segments


@pytest.fixture(scope="module")
def tasks_lm(fx):
    return fixture_lm(fx)


def _text_prompt(fx, config):
    segs = prompts.few_shot(
        [("Two plus two?", "Four"), ("Capital of France?", "Paris")],
        "Colour of the sky?",
        speech_output=False,
    )
    return segments.assemble(segs, fx.tok, config.group_size, config.speech_empty_ids)


def _alone(model, config, prompt, ids) -> float:
    """One option, unpadded, its log-likelihood from a plain forward pass and numpy."""
    text = np.concatenate([prompt.text, ids])[None]
    empty = np.broadcast_to(
        np.asarray(config.speech_empty_ids, np.int32),
        (len(ids), config.group_size, config.audio_channels),
    )
    codes = np.concatenate([prompt.codes, empty])[None]
    logits = np.asarray(model.text_logits(model(text, codes)), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    p = prompt.groups
    return sum(logp[p - 1 + k, t] for k, t in enumerate(ids))


def test_batched_option_scores_equal_each_option_alone(fx, tasks_lm):
    config, model = tasks_lm
    prompt = _text_prompt(fx, config)
    options = [fx.tok.encode(o) for o in ("Blue", "Green and yellow", "It is red")]
    scores = choice.option_logprobs(model, prompt, options, fx.tok.pad_id)
    want = [_alone(model, config, prompt, ids) for ids in options]
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


def test_single_token_options_pick_the_most_likely_next_token(fx, tasks_lm):
    config, model = tasks_lm
    prompt = _text_prompt(fx, config)
    logits = np.asarray(model.text_logits(model(prompt.text[None], prompt.codes[None])))[0, -1]
    order = np.argsort(logits)
    best, others = int(order[-1]), [int(i) for i in order[:3]]
    pick, _ = choice.choose(
        model, prompt, [[others[0]], [others[1]], [best], [others[2]]], fx.tok.pad_id
    )
    assert pick == 2


@pytest.fixture(scope="module")
def lm_dir(fx):
    return fx.lm_dir


def _readme_argv(fx, lm_dir, mode: str, inputs, out) -> list[str]:
    """The README's evaluate command of `mode` (optional parts left out) on the fixture."""
    words = readme_command("Evaluation", f"python -m mimo_jax.evaluate {mode}")[3:]
    paths = {
        "--manifest": inputs,
        "--items": inputs,
        "--lm": lm_dir,
        "--audio-tokenizer": fx.dir / fx.meta["audio_tokenizer"],
        "--text-tokenizer": fx.dir / "text_tokenizer" / "tokenizer.json",
        "--out": out,
    }
    return [str(paths[words[i - 1]]) if words[i - 1] in paths else w for i, w in enumerate(words)]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_asr_on_a_manifest(fx, lm_dir, tmp_path, capsys):
    (gen,) = [g for g in fx.meta["generations"] if g["case"] == "asr_sft"]
    template = fx.cases["asr_sft"]["template"]["value"]
    rate = fx.meta["wavs"]["q1"]["sampling_rate"]
    sf.write(tmp_path / "q1.wav", fx.wavs["q1"], rate)
    reference = fx.meta["wavs"]["q1"]["spoken_text"]
    lines = [
        json.dumps({"audio": "q1.wav", "text": reference}),  # relative to the manifest
        json.dumps({"id": "gone", "audio": "nope.wav", "text": "Hello."}),
        "{not json",
        json.dumps({"id": "blank", "audio": "q1.wav", "text": "  "}),
        json.dumps({"id": "fr", "audio": "q1.wav", "text": "Bonjour.", "language": "fr"}),
        json.dumps({"id": "dot", "audio": "q1.wav", "text": "..."}),
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = _readme_argv(fx, lm_dir, "asr", tmp_path / "manifest.jsonl", out) + [
        "--template",
        template,
        "--greedy",
        "--min-new-groups",
        str(gen["min_new_tokens"]),
        "--max-new-groups",
        str(gen["max_new_tokens"]),
    ]
    assert evaluate.main(argv) == 1
    printed = capsys.readouterr().out
    assert "q1: WER 1.000" in printed and "asr: 1 utterances, WER 1.0000" in printed
    report = json.loads((out / "report.json").read_text())
    (utt,) = report["utterances"]
    assert utt["id"] == "q1" and utt["output"] == gen["text"]
    assert utt["hypothesis"] == asr_metrics.hypothesis_text(gen["text"])
    want = asr_metrics.score(reference, utt["hypothesis"])
    assert utt["wer"] == want.wer == 1.0  # one word for five: one substitution, four deletions
    assert report["totals"]["wer"] == want.wer and report["totals"]["cer"] == want.cer
    errors = _lines(out / "errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6] and report["errors"] == 5
    for e, text in zip(
        errors,
        [
            "no such file",
            "not a JSON object",
            "not a non-empty transcript",
            "language 'fr'",
            "nothing left to score",
        ],
    ):
        assert text in e["error"], (e, text)


def test_few_shot_items(fx, lm_dir, tasks_lm, tmp_path, capsys):
    config, model = tasks_lm
    rate = fx.meta["wavs"]["q1"]["sampling_rate"]
    sf.write(tmp_path / "q1.wav", fx.wavs["q1"], rate)
    options = ["Blue", "Green and yellow", "It is red"]
    prompt = _text_prompt(fx, config)
    want = [_alone(model, config, prompt, fx.tok.encode(o)) for o in options]
    text_item = {
        "id": "sky",
        "subject": "nature",
        "options": options,
        "answer": 0,
        "examples": [["Two plus two?", "Four"], ["Capital of France?", "Paris"]],
        "question": "Colour of the sky?",
    }
    speech_item = {
        "id": "heard",
        "options": ["Now", "Later"],
        "answer": 1,
        "examples": [[{"audio": "q1.wav"}, "A question"]],
        "question": {"text": "What time is it now?", "audio": "q1.wav"},
    }
    lines = [
        json.dumps(text_item),
        json.dumps(speech_item),
        json.dumps({**speech_item, "id": "gone", "question": {"audio": "nope.wav"}}),
        json.dumps({**text_item, "id": "one", "options": ["Only"]}),
        json.dumps({**text_item, "id": "far", "answer": 3}),
        "[1, 2]",
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert evaluate.main(_readme_argv(fx, lm_dir, "few_shot", tmp_path / "items.jsonl", out)) == 1
    report = json.loads((out / "report.json").read_text())
    assert f"few_shot: accuracy {report['totals']['accuracy']:.4f}" in capsys.readouterr().out
    sky, heard = report["items"]
    np.testing.assert_allclose(sky["scores"], want, rtol=1e-4, atol=1e-4)
    assert sky["prediction"] == int(np.argmax(want))
    assert len(heard["scores"]) == 2 and heard["prediction"] == int(np.argmax(heard["scores"]))
    correct = [r["prediction"] == r["answer"] for r in (sky, heard)]
    assert report["totals"]["accuracy"] == sum(correct) / 2
    assert report["totals"]["subjects"] == {"nature": float(correct[0])}
    errors = _lines(out / "errors.jsonl")
    assert [e["line"] for e in errors] == [3, 4, 5, 6]
    for e, text in zip(
        errors, ["no such file", "options: ['Only']", "answer: 3", "not a JSON object"]
    ):
        assert text in e["error"], (e, text)


@pytest.fixture
def batches(monkeypatch):
    """The requests of each batch generated; `fail[id] = exception` makes its batch raise it."""
    return record_batches(monkeypatch, lambda requests: requests)


def _asr_argv(fx, lm_dir, tmp_path, lines) -> list[str]:
    sf.write(tmp_path / "q1.wav", fx.wavs["q1"], fx.meta["wavs"]["q1"]["sampling_rate"])
    raw = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    (tmp_path / "manifest.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    argv = _readme_argv(fx, lm_dir, "asr", tmp_path / "manifest.jsonl", tmp_path / "out")
    return argv + ["--greedy", "--max-new-groups", "2", "--batch-size", "1"]


def test_scored_utterances_are_kept_and_a_rerun_scores_only_the_rest(
    fx, lm_dir, tmp_path, batches, capsys
):
    """Seen: evaluate kept nothing until every line was scored, and a rerun redid everything.
    Each scored utterance goes to results.jsonl at once; a rerun scores only the others, and
    refuses results of other settings."""
    ran, fail = batches
    text = fx.meta["wavs"]["q1"]["spoken_text"]
    lines = [{"id": rid, "audio": "q1.wav", "text": text} for rid in ("a", "b")]
    argv = _asr_argv(fx, lm_dir, tmp_path, lines)
    ids = lambda: [[r["id"] for r in batch] for batch in ran]  # noqa: E731
    fail["b"] = KeyboardInterrupt()  # killed inside the second batch
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv)
    kept = _lines(tmp_path / "out" / "results.jsonl")
    assert ids() == [["a"], ["b"]] and [r.get("id") for r in kept[1:]] == ["a"]

    (b,) = ran.pop()
    ran.clear()
    del fail["b"]
    assert evaluate.main(argv) == 0 and ran == [[b]]  # its request (template draw) as before
    assert "resuming: 1 of 2 already scored" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [u["id"] for u in report["utterances"]] == ["a", "b"]
    assert report["totals"]["utterances"] == 2 and report["utterances"][0] == kept[1]

    with pytest.raises(SystemExit, match="another evaluation \\(its seed differ"):
        evaluate.main(argv + ["--seed", "7"])
    ran.clear()
    assert evaluate.main(argv + ["--seed", "7", "--overwrite"]) == 0 and len(ran) == 2


def test_a_manifest_line_that_is_not_utf8_is_one_error(fx, lm_dir, tmp_path):
    """Seen: one non-UTF-8 line rejected the whole manifest."""
    text = fx.meta["wavs"]["q1"]["spoken_text"]
    lines = [
        b'{"audio": "q1.wav", "text": "caf\xe9"}',
        {"id": "a", "audio": "q1.wav", "text": text},
    ]
    assert evaluate.main(_asr_argv(fx, lm_dir, tmp_path, lines)) == 1
    (error,) = _lines(tmp_path / "out" / "errors.jsonl")
    assert error["line"] == 1 and "not UTF-8" in error["error"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [u["id"] for u in report["utterances"]] == ["a"]


def test_few_shot_with_no_item_scored_says_so_and_fails(fx, tmp_path, capsys):
    """Seen: few_shot printed "accuracy 0.0000 (0/0)" with exit 0 when no item could be scored.
    (Nothing to score: the checkpoint, here missing, is not even loaded.)"""
    bad = {"id": "one", "options": ["Only"], "answer": 0, "question": "Why?"}
    (tmp_path / "items.jsonl").write_text(json.dumps(bad) + "\n")
    argv = _readme_argv(
        fx, tmp_path / "no-checkpoint", "few_shot", tmp_path / "items.jsonl", tmp_path / "out"
    )
    assert evaluate.main(argv) == 1
    printed = capsys.readouterr().out
    assert "few_shot: no item could be scored" in printed and "accuracy" not in printed
