"""The audio tokenizer training demo on the CPU: the demo's eSpeak NG corpus split into training
clips and one held-out sentence; the held-out clips scored (STOI, mel distance, PESQ) through a
randomly initialised tokenizer, through it after stage 1 (experiments/configs/tokenizer_stage1.py
:demo) and after stage 2 (tokenizer_stage2.py:demo, against the discriminators); prints STOI
before and after, and the discriminators' hinge loss at initialisation and at the end.

    python -m experiments.demo_tokenizer [--workdir runs/demo_tokenizer] [--data runs/demo/data]
        [--smoke]

`--data` is the corpus `python -m experiments.demo` builds (built here when missing). Writes
WORKDIR/train.jsonl and heldout.jsonl, init/ (the random tokenizer), stage1/ and stage2/ (the
runs) and eval/ (each model's report.json); each step is skipped when its output exists, so a
rerun resumes. `--smoke` trains a few steps on short crops (for tests).
"""

import argparse
import json
from pathlib import Path

from experiments import demo
from experiments.config_checks import set_value
from experiments.configs import tokenizer_stage1, tokenizer_stage2
from mimo_jax import logs
from mimo_jax.train import tokenizer_build

STAGES = {"stage1": tokenizer_stage1, "stage2": tokenizer_stage2}
# A few steps on short crops, each part of a run exercised: k-means, checkpoints, evaluation.
SMOKE = {
    "data.crop_seconds": 0.4,
    "ema.kmeans_iters": 5,
    "log_every": 1,
    "checkpoint_every": 2,
    "eval_every": 2,
    "checkpoint.async_save": False,
}
# Stage 1 exercises checkpoints and reconstructions; stage 2 skips them (a minute saved).
SMOKE_STAGES = {"stage1": {"total_steps": 4}, "stage2": {"total_steps": 2, "eval_every": 0}}


def stage_config(stage: str, data: Path, manifest: Path, smoke: bool):
    """The demo config of `stage` ("stage1" or "stage2") trained on `manifest`."""
    config = STAGES[stage].get_config(f"demo,data={data}")
    config.data.manifests = str(manifest)
    if smoke:
        for key, value in {**SMOKE, **SMOKE_STAGES[stage]}.items():
            set_value(config, key, value)
    return config


def split(data: Path, workdir: Path) -> tuple[Path, Path]:
    """(train, held-out) manifests: the corpus's last sentence, in all its voices, is held out.
    Audio paths are made absolute, so the manifests live in the workdir."""
    train_path, held_path = workdir / "train.jsonl", workdir / "heldout.jsonl"
    if not held_path.exists():
        lines = (data / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
        for e in entries:
            e["audio"] = str((data / e["audio"]).absolute())
        last = entries[-1]["pair"]
        held = [e for e in entries if e["pair"] == last]
        parts = ([e for e in entries if e["pair"] != last], held)
        workdir.mkdir(parents=True, exist_ok=True)
        for path, part in zip((train_path, held_path), parts):
            path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in part))
    return train_path, held_path


def random_init(config, path: Path) -> None:
    """The tokenizer stage 1 starts from (same config and seed), saved to be scored."""
    from mimo_jax import model_checkpoint
    from mimo_jax.tokenizer.config import to_hf

    if not model_checkpoint.is_model_checkpoint(path):
        tok_config, tokenizer = tokenizer_build.initial_tokenizer(config)
        model_checkpoint.save(tokenizer, to_hf(tok_config), path)


def scores(checkpoint: Path, heldout: Path, out: Path) -> dict:
    """{"8": means, "<all>": means} of `python -m mimo_jax.tokenizer evaluate` on the held-out
    clips (run unless out/report.json exists)."""
    from mimo_jax.tokenizer import __main__ as tokenizer_cli

    if not (out / "report.json").exists():
        args = ["evaluate", "--checkpoint", str(checkpoint), "--manifest", str(heldout)]
        if tokenizer_cli.main([*args, "--out", str(out)]):
            raise SystemExit(f"[tokenizer demo] evaluating {checkpoint} failed")
    return json.loads((out / "report.json").read_text())["means"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo_tokenizer"))
    p.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    p.add_argument("--sentences", type=int, default=20, help="corpus size when it is built")
    p.add_argument("--smoke", action="store_true", help="a few steps on short crops")
    logs.add_flag(p)
    a = p.parse_args(argv)
    logs.configure(a.log_level)
    data, workdir = a.data.absolute(), a.workdir.absolute()
    demo.build_corpus(data, a.sentences)
    train_manifest, heldout = split(data, workdir)
    config1 = stage_config("stage1", data, train_manifest, a.smoke)
    random_init(config1, workdir / "init")
    before = scores(workdir / "init", heldout, workdir / "eval" / "init")
    demo.train_once("tokenizer stage 1", config1, workdir / "stage1")
    after = scores(workdir / "stage1" / "model", heldout, workdir / "eval" / "stage1")
    config2 = stage_config("stage2", data, train_manifest, a.smoke)
    config2.model.init_checkpoint = str(workdir / "stage1" / "model")
    demo.train_once("tokenizer stage 2", config2, workdir / "stage2")
    final = scores(workdir / "stage2" / "model", heldout, workdir / "eval" / "stage2")
    _report(config1, config2, workdir, before, after, final)
    return 0


def _stoi(means: dict) -> str:
    return "n/a" if means["stoi"] is None else f"{means['stoi']:.3f}"  # None: no clip scored


def _report(config1, config2, workdir: Path, before: dict, after: dict, final: dict) -> None:
    clips = before["8"]["clips"]
    for n in before:
        print(
            f"[tokenizer demo] STOI of {clips} held-out clips, {n} codebooks: "
            f"{_stoi(before[n])} (random init) -> {_stoi(after[n])} (stage 1, "
            f"{config1.total_steps} steps) -> {_stoi(final[n])} (stage 2, "
            f"{config2.total_steps} steps)",
            flush=True,
        )
    (s0, a2t0), *_, (s1, a2t1) = demo.logged(workdir / "stage1", "a2t_loss")
    print(f"[tokenizer demo] stage 1: A2T loss {a2t0:.3f} (step {s0}) -> {a2t1:.3f} (step {s1})")
    (d0_step, d0), *_, (d1_step, d1) = demo.logged(workdir / "stage2", "disc_loss")
    print(
        f"[tokenizer demo] stage 2: discriminators' hinge loss {d0:.3f} (step {d0_step}, at "
        f"initialisation) -> {d1:.3f} (step {d1_step})",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
