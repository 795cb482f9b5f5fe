"""The end-to-end demo on the CPU: build the eSpeak NG demo corpus, tokenize it with a small
randomly initialised audio tokenizer, train a tiny MiMo-Audio LM stage 1 (text targets) then
stage 2 (text and speech), and show the loss falling.

    python -m experiments.demo [--workdir runs/demo] [--smoke] [--sentences 20]

`--smoke` runs the same pipeline at the smallest size (a few steps, for tests). Each step is skipped
when its output exists, so a rerun resumes. The runs use experiments/configs/demo.py.
"""

import argparse
import json
from pathlib import Path

import jax
from flax import nnx

from experiments import train
from experiments.configs import demo as demo_config
from experiments.configs.common import DEMO_TOKENIZER_HF as TOKENIZER_HF
from mimo_jax import logs


def build_corpus(data: Path, sentences: int) -> None:
    from data_pipelines import demo_corpus

    if not (data / "manifest.jsonl").exists():
        entries = demo_corpus.build(str(data), sentences)
        print(f"[demo] corpus: {len(entries)} utterances in {data}", flush=True)


def random_tokenizer(path: Path) -> None:
    from mimo_jax import model_checkpoint as checkpoint
    from mimo_jax.tokenizer.config import from_hf
    from mimo_jax.tokenizer.model import MiMoAudioTokenizer

    if not checkpoint.is_model_checkpoint(path):
        model = MiMoAudioTokenizer(from_hf(TOKENIZER_HF), rngs=nnx.Rngs(0))
        checkpoint.save(model, TOKENIZER_HF, path)
        print(f"[demo] random audio tokenizer: {path}", flush=True)


def tokenize(data: Path, tokenizer: Path) -> None:
    from data_pipelines import tokenize as tokenize_cmd

    if not (data / "shards" / "manifest.json").exists():
        code = tokenize_cmd.main(
            [
                "--manifest",
                str(data / "manifest.jsonl"),
                "--checkpoint",
                str(tokenizer),
                "--out",
                str(data / "shards"),
            ]
        )
        if code:
            raise SystemExit(f"[demo] tokenizing failed (exit {code})")


def logged(workdir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of each record of the run's metrics.jsonl that has `key`, in order."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def train_once(name: str, config, workdir: Path) -> None:
    """Trains `config` in `workdir` unless the run has already exported its model."""
    if not (workdir / "model").exists():
        d = config.data
        rows = f"{d.context_length} groups" if "context_length" in d else f"{d.crop_seconds} s"
        print(
            f"[demo] training {name}: {config.total_steps} steps, batch {d.batch_size} x {rows}",
            flush=True,
        )
        if train.run(config, str(workdir)):
            raise SystemExit(f"[demo] {name} failed")


def run_stage(name: str, data: Path, workdir: Path, smoke: bool, init: Path | None) -> None:
    config = demo_config.get_config(f"stage={name},data={data},smoke={smoke}")
    if init is not None:
        config.model.init_checkpoint = str(init)
    train_once(name, config, workdir)
    curve = [loss for _, loss in logged(workdir, "loss")]
    print(
        f"[demo] {name}: loss {curve[0]:.3f} -> {curve[-1]:.3f} over {len(curve)} logged steps",
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--smoke", action="store_true", help="smallest size, a few steps")
    p.add_argument("--sentences", type=int, default=20, help="demo sentences (4 utterances each)")
    logs.add_flag(p)
    a = p.parse_args(argv)
    logs.configure(a.log_level)
    data = (a.workdir / "data").absolute()
    print(f"[demo] devices: {jax.devices()}", flush=True)
    build_corpus(data, 4 if a.smoke else a.sentences)
    random_tokenizer(a.workdir / "audio_tokenizer")
    tokenize(data, a.workdir / "audio_tokenizer")
    run_stage("stage1", data, a.workdir / "stage1", a.smoke, None)
    run_stage("stage2", data, a.workdir / "stage2", a.smoke, a.workdir / "stage1" / "model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
