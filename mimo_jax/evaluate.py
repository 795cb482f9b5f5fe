"""Evaluation of a checkpoint: ASR error rates and few-shot multiple-choice accuracy.

  python -m mimo_jax.evaluate asr --manifest FILE.jsonl --lm CKPT --audio-tokenizer CKPT \
      --text-tokenizer tokenizer.json --out DIR [--max-new-groups N] [--greedy] [--seed S]
      [--template TEXT] [--min-new-groups N]
  python -m mimo_jax.evaluate few_shot --items FILE.jsonl --lm CKPT --audio-tokenizer CKPT \
      --text-tokenizer tokenizer.json --out DIR

`asr` transcribes every line of a manifest (the format `data_pipelines.tokenize` reads: `audio`,
`text`, optional `id` and `language`) and scores it with MiMo-Audio-Eval's normalisation
(`mimo_jax.evaluation.asr_metrics`); `few_shot` scores the options of each multiple-choice item
(`mimo_jax.evaluation.run` describes the lines). Both print the totals and write DIR/report.json
(totals, and per utterance the hypothesis and reference or per item the prediction and scores)
and DIR/errors.jsonl (one line per bad input line: missing audio, bad JSON, empty transcript...;
exit status 1 when there is any).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from mimo_jax.inference.model_args import add_model_args, load_mimo


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mimo_jax.evaluate",
        description="ASR error rates and few-shot accuracy of a checkpoint",
    )
    p.add_argument("mode", choices=("asr", "few_shot"))
    p.add_argument("--manifest", help="asr: JSONL of audio and transcripts")
    p.add_argument("--items", help="few_shot: JSONL of multiple-choice items")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8, help="asr: utterances per batch")
    p.add_argument(
        "--min-new-groups",
        type=int,
        default=0,
        help="asr: groups generated before a stop token is allowed",
    )
    p.add_argument("--max-new-groups", type=int, help="asr: generated groups per utterance")
    p.add_argument(
        "--template",
        help="asr: one prompt template for every utterance (default: "
        "the official list of its language, drawn with --seed)",
    )
    p.add_argument("--greedy", action="store_true", help="asr: both samplers greedy")
    p.add_argument("--seed", type=int, default=0, help="asr: templates and sampling")
    return p


def _check(args) -> None:
    need = {"asr": "manifest", "few_shot": "items"}[args.mode]
    if getattr(args, need) is None:
        raise SystemExit(f"{args.mode}: --{need} FILE.jsonl is required")
    if args.min_new_groups < 0:
        raise SystemExit(f"--min-new-groups {args.min_new_groups}: expected at least 0")
    for name in ("batch_size", "max_new_groups", "context_groups"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: expected at least 1")


def lines(mode: str, report: dict) -> list[str]:
    """One line per scored utterance or item."""
    if mode == "asr":
        return [
            f"{u['id']}: WER {u['wer']:.3f} CER {u['cer']:.3f} | ref: {u['reference']} | "
            f"hyp: {u['hypothesis']}"
            for u in report["utterances"]
        ]
    return [
        f"{r['id']}: {'correct' if r['correct'] else 'wrong'} (chose {r['prediction']}, "
        f"answer {r['answer']})"
        for r in report["items"]
    ]


def summary(mode: str, totals: dict) -> str:
    if mode == "asr":
        if not totals["utterances"]:
            return "asr: no utterance scored"
        return (
            f"asr: {totals['utterances']} utterances, WER {totals['wer']:.4f}, "
            f"CER {totals['cer']:.4f} (mean utterance WER {totals['mean_wer']:.4f})"
        )
    return f"few_shot: accuracy {totals['accuracy']:.4f} ({totals['correct']}/{totals['items']})"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    from mimo_jax.evaluation import run

    errors: list[dict] = []
    source = args.manifest if args.mode == "asr" else args.items
    utterances: list[run.Utterance] = []  # asr
    items: list[run.ChoiceItem] = []  # choice
    try:
        if args.mode == "asr":
            utterances = run.read_manifest(source, errors)
        else:
            items = run.read_choice_items(source, errors)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    mimo = load_mimo(args)
    with tqdm(total=len(utterances) + len(items), unit="item", desc=args.mode) as bar:
        if args.mode == "asr":
            report = run.evaluate_asr(
                mimo,
                utterances,
                errors,
                seed=args.seed,
                template=args.template,
                min_new_groups=args.min_new_groups,
                max_new_groups=args.max_new_groups,
                greedy=args.greedy,
                batch_size=args.batch_size,
                progress=bar.update,
            )
        else:
            report = run.evaluate_choices(mimo, items, errors, progress=bar.update)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors.sort(key=lambda e: e["line"])
    report = {"mode": args.mode, "source": str(source), **report, "errors": len(errors)}
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "errors.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    )
    for err in errors:  # not `e`: an `except ... as e` above unbinds that name
        print(f"error: line {err['line']}: {err['error']}", file=sys.stderr)
    print("\n".join(lines(args.mode, report) + [summary(args.mode, report["totals"])]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
