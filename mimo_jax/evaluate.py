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
exit status 1 when there is any, or when nothing could be scored).

Each scored utterance or item is appended to DIR/results.jsonl as soon as it is scored (after
a first line naming the evaluation's settings). A rerun of the same evaluation into DIR scores only
the lines not in it yet, and the report covers all; --overwrite starts afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from mimo_jax import paths
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="score everything again (by default a rerun keeps DIR/results.jsonl's rows)",
    )
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


def _check(args) -> Path:
    """The output directory, once every option is checked (before anything loads)."""
    need = {"asr": "manifest", "few_shot": "items"}[args.mode]
    if getattr(args, need) is None:
        raise SystemExit(f"{args.mode}: --{need} FILE.jsonl is required")
    if args.min_new_groups < 0:
        raise SystemExit(f"--min-new-groups {args.min_new_groups}: expected at least 0")
    for name in ("batch_size", "max_new_groups", "context_groups"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: expected at least 1")
    if args.max_new_groups is not None and args.min_new_groups > args.max_new_groups:
        raise SystemExit(
            f"--min-new-groups {args.min_new_groups}: expected at most --max-new-groups "
            f"{args.max_new_groups}"
        )
    if not 0 <= args.seed < 2**32:
        raise SystemExit(f"--seed {args.seed}: expected an integer in [0, 2**32)")
    try:
        return Path(paths.output_dir(args.out))
    except ValueError as e:
        raise SystemExit(f"--out {e}") from None


def _settings(args) -> dict:
    """What the scores depend on: results of other settings are never mixed into a report."""
    source = args.manifest if args.mode == "asr" else args.items
    settings = {"mode": args.mode, "source": os.path.abspath(source)}
    for name in ("lm", "audio_tokenizer", "text_tokenizer", "adapter"):
        value = getattr(args, name)
        settings[name] = value and os.path.abspath(value)
    if args.mode == "asr":
        for name in ("context_groups", "min_new_groups", "max_new_groups", "template", "greedy"):
            settings[name] = getattr(args, name)
        settings["seed"] = args.seed
    return settings


class Results:
    """DIR/results.jsonl: {"evaluation": settings} on the first line, then one scored row a line,
    each appended as it is scored. A rerun with the same settings reads the rows back (a last
    line cut short by a kill is dropped); other settings are refused unless `overwrite`."""

    def __init__(self, out: Path, settings: dict, overwrite: bool):
        self.path = out / "results.jsonl"
        self.header = {"evaluation": json.loads(json.dumps(settings))}
        self.rows: list[dict] = [] if overwrite else self._read()
        self._rewrite()

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        # Rows are appended whole, each ending in a newline: text after the last one is torn.
        *whole, _torn = self.path.read_text(encoding="utf-8").split("\n")
        try:
            header, *rows = [json.loads(x) for x in whole]
        except ValueError as e:  # JSONDecodeError; or no line at all
            raise SystemExit(
                f"{self.path}: not results of this command ({e}); use another --out or --overwrite"
            ) from None
        if header != self.header:
            theirs = (header.get("evaluation") if isinstance(header, dict) else None) or {}
            ours = self.header["evaluation"]
            differ = sorted(k for k in {**theirs, **ours} if theirs.get(k) != ours.get(k))
            raise SystemExit(
                f"{self.path} holds results of another evaluation (its {', '.join(differ)} "
                f"differ); use another --out, or --overwrite to replace them"
            )
        return rows

    def _rewrite(self) -> None:
        lines = [self.header, *self.rows]
        text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
        paths.write_whole(paths.resolve(self.path), text)

    def append(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
            return "asr: no utterance could be scored"
        return (
            f"asr: {totals['utterances']} utterances, WER {totals['wer']:.4f}, "
            f"CER {totals['cer']:.4f} (mean utterance WER {totals['mean_wer']:.4f})"
        )
    if not totals["items"]:
        return "few_shot: no item could be scored"
    return f"few_shot: accuracy {totals['accuracy']:.4f} ({totals['correct']}/{totals['items']})"


def _resumed(results: Results, entries: list) -> list[dict]:
    """The kept rows of the lines still in the input (renumbered as they are now)."""
    line_of = {e.id: e.line for e in entries}
    kept = [{**r, "line": line_of[r["id"]]} for r in results.rows if r["id"] in line_of]
    if kept:
        print(
            f"resuming: {len(kept)} of {len(entries)} already scored in {results.path} "
            f"(--overwrite to score them again)",
            file=sys.stderr,
        )
    return kept


def _evaluate(args, entries: list, done: set, errors: list, on_row) -> list[dict]:
    """The scored rows of the entries not `done` (the model is loaded only when there are
    any)."""
    from mimo_jax.evaluation import run

    left = len([e for e in entries if e.id not in done])
    if not left:
        return []
    mimo = load_mimo(args)
    with tqdm(total=left, unit="item", desc=args.mode) as bar:
        if args.mode == "few_shot":
            report = run.evaluate_choices(mimo, entries, errors, bar.update, on_row, done)
            return report["items"]
        report = run.evaluate_asr(
            mimo,
            entries,
            errors,
            seed=args.seed,
            template=args.template,
            min_new_groups=args.min_new_groups,
            max_new_groups=args.max_new_groups,
            greedy=args.greedy,
            batch_size=args.batch_size,
            progress=bar.update,
            on_row=on_row,
            done=done,
        )
        return report["utterances"]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = _check(args)
    from mimo_jax.evaluation import run

    errors: list[dict] = []
    source = args.manifest if args.mode == "asr" else args.items
    read = run.read_manifest if args.mode == "asr" else run.read_choice_items
    try:
        entries = read(source, errors)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    results = Results(out, _settings(args), args.overwrite)
    kept = _resumed(results, entries)
    done = {r["id"] for r in kept}
    rows = kept + _evaluate(args, entries, done, errors, results.append)
    rows.sort(key=lambda r: r["line"])
    totals = run.asr_totals(rows) if args.mode == "asr" else run.accuracy(rows)
    rows_key = "utterances" if args.mode == "asr" else "items"
    errors.sort(key=lambda e: e["line"])
    report = {
        "mode": args.mode,
        "source": str(source),
        "totals": totals,
        rows_key: rows,
        "errors": len(errors),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "errors.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    )
    for err in errors:  # not `e`: an `except ... as e` above unbinds that name
        print(f"error: line {err['line']}: {err['error']}", file=sys.stderr)
    print("\n".join(lines(args.mode, report) + [summary(args.mode, report["totals"])]))
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
