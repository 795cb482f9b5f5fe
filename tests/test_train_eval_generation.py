"""Generation on eval prompts during training: a smoke run of the demo config with TTS, ASR and
continuation prompts writes ASR WER/CER to metrics.jsonl and audio, log-mel images and transcripts
to TensorBoard; bad prompt settings stop the run before it starts."""

import json
import struct
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2
from train_support import metrics, smoke

from experiments import train
from experiments.config_checks import ConfigError


def events(directory: Path) -> list:
    """Every Event of the TFRecord event files (length, its CRC, payload, its CRC)."""
    out = []
    for path in sorted(directory.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            out.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return out


def _generation_config(data: Path, tmp_path: Path, **overrides):
    first = json.loads((data / "manifest.jsonl").read_text().splitlines()[0])
    clip = str(data / first["audio"])
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text(json.dumps({"id": "clip", "audio": clip, "text": first["text"]}) + "\n")
    config = smoke(
        data,
        **{
            "total_steps": 2,
            "eval_every": 2,
            "export_model": False,
            "data.eval_sources": "",
            "eval_generation.audio_tokenizer": str(data.parent / "audio_tokenizer"),
            "eval_generation.tts_texts": ("Hello there.",),
            "eval_generation.asr_manifest": str(manifest),
            "eval_generation.continuation_audio": (clip,),
            "eval_generation.max_new_groups": 3,
            **overrides,
        },
    )
    return config, first["text"]


def test_eval_generation_writes_metrics_and_tensorboard(demo_data, tmp_path):
    config, reference = _generation_config(demo_data, tmp_path)
    assert train.run(config, str(tmp_path / "w")) == 0
    (record,) = [m for m in metrics(tmp_path / "w") if "eval/asr_wer" in m]
    assert record["step"] == 2
    assert record["eval/asr_wer"] >= 0 and record["eval/asr_cer"] >= 0
    audio = summaries_by_kind(tmp_path, "audio")
    for tag in ("eval_tts/0", "eval_continuation/0"):
        assert audio[tag].audio.length_frames > 0 and audio[tag].audio.sample_rate == 24000
    images = summaries_by_kind(tmp_path, "image")
    tokenizer = json.loads((demo_data.parent / "audio_tokenizer" / "config.json").read_text())
    for tag in ("eval_tts/0", "eval_continuation/0"):
        image = images[tag].image  # the log-mel of the audio: [mels, frames]
        assert image.height == tokenizer["n_mels"], tag
        assert image.width == audio[tag].audio.length_frames // tokenizer["hop_length"] + 1, tag
        assert image.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")
    texts = summaries_by_kind(tmp_path, "text")
    assert reference in texts["eval_asr/transcripts"]
    assert "Hello there." in texts["eval_tts/0"]


def summaries_by_kind(tmp_path: Path, kind: str) -> dict:
    """tag -> value for one kind of summary ("image", "audio") of step 2 or, for "text", tag ->
    the text."""
    out = {}
    for e in events(tmp_path / "w" / "tensorboard"):
        for v in e.summary.value if e.HasField("summary") and e.step == 2 else []:
            if kind == "text" and v.metadata.plugin_data.plugin_name == "text":
                out[v.tag.removesuffix("/text_summary")] = v.tensor.string_val[0].decode()
            elif kind != "text" and v.HasField(kind):
                out[v.tag] = v
    return out


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"eval_every": 0}, "eval_every=0: expected an integer >= 1"),
        ({"eval_generation.audio_tokenizer": "/nowhere"}, "eval_generation.audio_tokenizer"),
        ({"eval_generation.asr_manifest": "/nowhere.jsonl"}, "eval_generation.asr_manifest"),
        ({"eval_generation.continuation_audio": ("/nowhere.wav",)}, "/nowhere.wav is not one"),
        ({"eval_generation.tts_texts": ("",)}, "eval_generation.tts_texts"),
        ({"eval_generation.max_new_groups": 0}, "eval_generation.max_new_groups=0"),
    ],
)
def test_bad_generation_settings_stop_before_training(demo_data, tmp_path, overrides, message):
    config, _ = _generation_config(demo_data, tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        train.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()
