"""The TTS voice fine-tuning demo on the CPU: an eSpeak NG voice that the demo corpus never used,
prepared with `data_pipelines.voice`, and the demo's stage 2 model fine-tuned to it with
experiments/configs/lora_tts_voice.py; prints the held-out loss of the voice before and after.

    python -m experiments.demo                  # first: the demo model, its tokenizers and data
    python -m experiments.demo_voice [--workdir runs/demo] [--smoke]

Writes WORKDIR/voice/: espeak-m7/ (the recordings and transcripts), data/ (their shards) and lora/
(the run); each step is skipped when its output exists, so a rerun resumes. `--base`,
`--tokenizer` and `--audio-tokenizer` default to the demo's files in WORKDIR.
"""

import argparse
from pathlib import Path

from experiments import demo
from experiments.configs import lora_tts_voice
from mimo_jax import logs


def held_out_losses(workdir: Path) -> list[tuple[int, float]]:
    """(step, eval/loss) of each evaluation of the run, in order."""
    return demo.logged(workdir, "eval/loss")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--base", type=Path, help="default: WORKDIR/stage2/model")
    p.add_argument("--tokenizer", type=Path, help="default: WORKDIR/data/tokenizer.json")
    p.add_argument("--audio-tokenizer", type=Path, help="default: WORKDIR/audio_tokenizer")
    p.add_argument("--sentences", type=int, default=20, help="recordings of the voice")
    p.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    logs.add_flag(p)
    a = p.parse_args(argv)
    logs.configure(a.log_level)
    base = (a.base or a.workdir / "stage2" / "model").absolute()
    tokenizer = (a.tokenizer or a.workdir / "data" / "tokenizer.json").absolute()
    audio_tokenizer = (a.audio_tokenizer or a.workdir / "audio_tokenizer").absolute()
    for path, what in (
        (base, "--base"),
        (tokenizer, "--tokenizer"),
        (audio_tokenizer, "--audio-tokenizer"),
    ):
        if not path.exists():
            print(f"error: {what} {path} does not exist; run python -m experiments.demo first")
            return 2
    root = (a.workdir / "voice").absolute()
    _prepare(root, a.sentences, audio_tokenizer, a.log_level)
    config = lora_tts_voice.get_config(
        f"data={root / 'data'},base={base},tokenizer={tokenizer},smoke={a.smoke}"
    )
    demo.train_once("the LoRA adapters of the voice", config, root / "lora")
    (first_step, before), *_, (last_step, after) = held_out_losses(root / "lora")
    print(
        f"[voice] held-out loss of the new voice: {before:.3f} (step {first_step}) -> "
        f"{after:.3f} (step {last_step})",
        flush=True,
    )
    return 0


def _prepare(root: Path, sentences: int, audio_tokenizer: Path, log_level: str) -> None:
    from data_pipelines import demo_corpus, voice

    recordings = root / f"espeak-{demo_corpus.NEW_VOICE}"
    if not recordings.exists():
        n = demo_corpus.build_voice(str(recordings), sentences)
        print(f"[voice] {n} recordings of eSpeak NG voice {demo_corpus.NEW_VOICE}", flush=True)
    if not (root / "data" / "heldout" / "manifest.json").exists():
        args = ["--voice-dir", str(recordings), "--checkpoint", str(audio_tokenizer)]
        args += ["--out", str(root / "data"), "--log-level", log_level]
        if voice.main(args):
            raise SystemExit("[voice] preparing the voice failed")


if __name__ == "__main__":
    raise SystemExit(main())
