"""Evaluation during training: the LM generates on fixed eval prompts with the current weights, the
audio tokenizer reconstructs fixed crops (`reconstruction`).

Every `eval_every` steps (when the config's `eval_generation` has prompts): TTS of the eval texts,
ASR of the eval clips (a manifest with transcripts, scored as `mimo_jax.evaluate asr` scores) and
continuation of the eval audio, through `MimoAudio` on the training model. Scalars (ASR WER/CER)
go to metrics.jsonl; audio, log-mel spectrogram images and transcripts to TensorBoard. The prompts
use fixed seeds, so evaluations differ only by the weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mimo_jax.evaluation import run
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.model import MiMoAudioLM


@dataclasses.dataclass(frozen=True)
class GenerationEvalConfig:
    audio_tokenizer: str
    text_tokenizer: str
    tts_texts: tuple[str, ...] = ()
    asr_manifest: str = ""
    continuation_audio: tuple[str, ...] = ()
    max_new_groups: int = 100
    seed: int = 0


def log_mel_image(tokenizer_config, wav: np.ndarray) -> np.ndarray:
    """The log-mel spectrogram the audio tokenizer computes, as an image [mels, frames] in
    [0, 1], low frequencies at the bottom."""
    import jax.numpy as jnp

    from mimo_jax.tokenizer.frontend import log_mel

    wav = np.asarray(wav, np.float32)
    need = tokenizer_config.nfft // 2 + 1  # the front end's shortest clip
    if wav.size < need:
        wav = np.pad(wav, (0, need - wav.size))
    mel = np.asarray(
        log_mel(tokenizer_config, jnp.asarray(wav[None]), jnp.asarray([wav.size], jnp.int32))
    )[0]
    image = mel.T[::-1]
    span = float(image.max() - image.min())
    return (image - image.min()) / span if span > 0 else np.zeros_like(image)


class GenerationEval:
    """Loads the audio and text tokenizers and reads the eval clips once; `__call__` runs the
    prompts with a model and returns (scalars, media for `MetricsWriter.media`)."""

    def __init__(self, cfg: GenerationEvalConfig, lm_config: MiMoAudioConfig):
        from mimo_jax.tasks.text_tokenizer import TextTokenizer
        from mimo_jax.tokenizer.audio_tokenizer import Tokenizer

        self.cfg, self.lm_config = cfg, lm_config
        self.audio_tokenizer = Tokenizer.load(cfg.audio_tokenizer)
        self.text_tokenizer = TextTokenizer.from_file(cfg.text_tokenizer)
        errors: list[dict] = []
        self.utterances = run.read_manifest(cfg.asr_manifest, errors) if cfg.asr_manifest else []
        if errors:
            raise ValueError(
                f"eval_generation.asr_manifest {cfg.asr_manifest}: "
                + "; ".join(f"line {e['line']}: {e['error']}" for e in errors)
            )

    def __call__(self, model: MiMoAudioLM) -> tuple[dict[str, float], dict]:
        from mimo_jax.inference.mimo_audio import MimoAudio

        mimo = MimoAudio(self.lm_config, model, self.audio_tokenizer, self.text_tokenizer)
        opts = {"seed": self.cfg.seed, "max_new_groups": self.cfg.max_new_groups}
        audio: dict[str, np.ndarray] = {}
        texts, scalars = {}, {}
        if self.cfg.tts_texts:
            for i, (text, res) in enumerate(
                zip(
                    self.cfg.tts_texts, mimo.tts([{"input": t, **opts} for t in self.cfg.tts_texts])
                )
            ):
                assert res.wav is not None  # a speech task's result (errors raise)
                audio[f"eval_tts/{i}"] = res.wav
                texts[f"eval_tts/{i}"] = f"**text:** {text}\n\n**output text:** {res.text}"
        if self.cfg.continuation_audio:
            for i, res in enumerate(
                mimo.continue_speech([{"input": p, **opts} for p in self.cfg.continuation_audio])
            ):
                assert res.wav is not None
                audio[f"eval_continuation/{i}"] = res.wav
        if self.utterances:
            errors: list[dict] = []
            report = run.evaluate_asr(
                mimo,
                self.utterances,
                errors,
                seed=self.cfg.seed,
                max_new_groups=self.cfg.max_new_groups,
            )
            totals = report["totals"]
            if totals["utterances"]:
                scalars.update({"eval/asr_wer": totals["wer"], "eval/asr_cer": totals["cer"]})
            texts["eval_asr/transcripts"] = asr_table(report["utterances"], errors)
        rate = self.audio_tokenizer.config.sampling_rate
        images = {
            tag: log_mel_image(self.audio_tokenizer.config, wav) for tag, wav in audio.items()
        }
        return scalars, {"audio": audio, "images": images, "texts": texts, "sampling_rate": rate}


def asr_table(rows: list[dict], errors: list[dict]) -> str:
    """Markdown: id, reference, hypothesis and WER per clip; the clips that failed."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| id | reference | hypothesis | WER |", "|---|---|---|---|"]
    lines += [
        f"| {cell(r['id'])} | {cell(r['reference'])} | {cell(r['hypothesis'])} | {r['wer']:.3f} |"
        for r in rows
    ]
    lines += [f"| {cell(str(e['id']))} | (failed: {cell(e['error'])}) | | |" for e in errors]
    return "\n".join(lines)


def reconstruction(tokenizer, batch: dict) -> tuple[dict[str, float], dict]:
    """An audio tokenizer's evaluation during its training: fixed crops (`wav` [batch, samples],
    `lengths`) through the tokenizer at 8 codebooks and all. Returns the mel distance of each and
    (for `MetricsWriter.media`) the first crop's audio and log-mel images."""
    import jax

    from mimo_jax.tokenizer.mel_loss import multiscale_mel_loss
    from mimo_jax.tokenizer.stage1 import fit_length

    config = tokenizer.config
    wav, lengths = batch["wav"], batch["lengths"]
    codes, code_lengths = jax.jit(tokenizer.encode)(wav, lengths)
    values, audio = {}, {"reconstruction/original": np.asarray(wav[0])}
    for n in sorted({min(8, codes.shape[-1]), codes.shape[-1]}):
        out, _ = jax.jit(tokenizer.decode)(codes[..., :n], code_lengths)
        out = fit_length(out, wav.shape[1])
        values[f"eval/mel_distance_{n}"] = float(
            multiscale_mel_loss(wav, out, config.sampling_rate, lengths)
        )
        audio[f"reconstruction/{n}_codebooks"] = np.asarray(out[0])
    images = {tag: log_mel_image(config, wav) for tag, wav in audio.items()}
    return values, {"audio": audio, "images": images, "sampling_rate": config.sampling_rate}
