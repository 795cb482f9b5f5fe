"""Command line of the audio tokenizer.

  python -m mimo_jax.tokenizer encode --checkpoint CKPT AUDIO... --out DIR [--codebooks 8]
  python -m mimo_jax.tokenizer decode --checkpoint CKPT CODES.npy... --out OUT.wav|DIR
  python -m mimo_jax.tokenizer evaluate --checkpoint CKPT --manifest M.jsonl --out DIR \
      [--codebooks 8,all] [--limit N]

encode writes DIR/<name>.npy, int32 codes [frames, codebooks], per input; files of any format
soundfile reads, any sample rate and channel count. Files are sorted by duration and encoded in
batches; a bad file is reported (and the exit status is 1) while the others are still encoded.
evaluate reconstructs the manifest's clips from their first n codebooks and scores them against
the originals (mel distance, STOI, PESQ wide- and narrow-band:
`mimo_jax.tokenizer.reconstruction_quality`);
it prints a table of the means and writes DIR/report.json (per clip and mean figures) and
DIR/errors.jsonl (lines, files or metrics that failed, one JSON object each).
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import soundfile as sf
from tqdm import tqdm

from mimo_jax import logs
from mimo_jax.nn.dtypes import DTYPES
from mimo_jax.tokenizer.audio_io import InputError, read_audio, read_codes, write_audio
from mimo_jax.tokenizer.audio_tokenizer import Tokenizer


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mimo_jax.tokenizer", description="MiMo-Audio tokenizer: audio <-> RVQ codes"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="audio files -> .npy codes [frames, codebooks]")
    enc.add_argument("audio", nargs="+", help="audio files (any rate, any channel count)")
    enc.add_argument("--out", required=True, help="output directory")
    enc.add_argument("--codebooks", type=int, default=8, help="codebooks to keep (default 8)")
    enc.add_argument(
        "--segment-frames",
        type=int,
        default=6000,
        help="mel frames per encoder segment (default 6000, as the official code)",
    )
    enc.add_argument(
        "--allow-silence",
        action="store_true",
        help="encode all-zero files instead of reporting them",
    )
    dec = sub.add_parser("decode", help=".npy codes -> 24 kHz audio")
    dec.add_argument("codes", nargs="+", help=".npy files of codes [frames, codebooks]")
    dec.add_argument(
        "--out", required=True, help="output .wav for one input, or a directory for several"
    )
    dec.add_argument(
        "--decode-chunk",
        type=int,
        default=1500,
        help="code frames decoded at once (default 1500, as the official code)",
    )
    ev = sub.add_parser("evaluate", help="reconstruction quality of a manifest's clips")
    ev.add_argument("--manifest", required=True, help="JSONL of {audio, id (optional)} lines")
    ev.add_argument("--out", required=True, help="directory for report.json and errors.jsonl")
    ev.add_argument(
        "--codebooks",
        default="8,all",
        help="comma-separated codebook counts to decode from, 'all' for every one (default 8,all)",
    )
    ev.add_argument("--limit", type=_positive, help="evaluate only the manifest's first N clips")
    for p in (enc, dec, ev):
        p.add_argument(
            "--files-per-batch",
            type=int,
            default=32,
            help="files read and processed together (default 32)",
        )
        p.add_argument(
            "--checkpoint",
            required=True,
            help="tokenizer checkpoint directory (official safetensors or Orbax)",
        )
        p.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default="float32",
            help="compute dtype (parameters stay float32)",
        )
    return parser


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _check_unique(paths: list[str], out_dir: str, suffix: str) -> None:
    seen: dict[str, str] = {}
    for path in paths:
        target = os.path.join(out_dir, _stem(path) + suffix)
        if target in seen:
            raise SystemExit(f"error: {seen[target]} and {path} would both write {target}")
        seen[target] = path


def _duration(path: str) -> float:
    """Seconds, for ordering; unreadable files sort first and fail when read."""
    try:
        return sf.info(path).duration
    except Exception:  # reported by read_audio with its own message
        return 0.0


def encode(args) -> int:
    _check_unique(args.audio, args.out, ".npy")
    tokenizer = Tokenizer.load(
        args.checkpoint, dtype=DTYPES[args.dtype], segment_frames=args.segment_frames
    )
    config = tokenizer.config
    if not 1 <= args.codebooks <= config.num_quantizers:
        raise SystemExit(
            f"error: --codebooks {args.codebooks}: the checkpoint has "
            f"{config.num_quantizers} codebooks"
        )
    os.makedirs(args.out, exist_ok=True)
    paths = sorted(args.audio, key=_duration)
    failed = 0
    with tqdm(total=len(paths), unit="file", desc="encode") as bar:
        for i in range(0, len(paths), args.files_per_batch):
            wavs, names = [], []
            for path in paths[i : i + args.files_per_batch]:
                try:
                    wavs.append(
                        read_audio(
                            path,
                            config.sampling_rate,
                            min_samples=config.min_samples,
                            allow_silence=args.allow_silence,
                        )
                    )
                    names.append(path)
                except InputError as e:
                    failed += 1
                    tqdm.write(f"error: {e}", file=sys.stderr)
                    bar.update(1)
            for path, codes in zip(names, tokenizer.encode(wavs, args.codebooks) if wavs else []):
                np.save(os.path.join(args.out, _stem(path) + ".npy"), codes)
                bar.update(1)
    if failed:
        print(f"{failed} of {len(paths)} files failed", file=sys.stderr)
    return 1 if failed else 0


def decode(args) -> int:
    single = len(args.codes) == 1 and args.out.lower().endswith(".wav")
    if not single:
        _check_unique(args.codes, args.out, ".wav")
    tokenizer = Tokenizer.load(
        args.checkpoint, dtype=DTYPES[args.dtype], decode_chunk=args.decode_chunk
    )
    config = tokenizer.config
    failed = 0
    with tqdm(total=len(args.codes), unit="file", desc="decode") as bar:
        for i in range(0, len(args.codes), args.files_per_batch):
            codes, names = [], []
            for path in args.codes[i : i + args.files_per_batch]:
                try:
                    codes.append(read_codes(path, config.codebook_sizes))
                    names.append(path)
                except InputError as e:
                    failed += 1
                    tqdm.write(f"error: {e}", file=sys.stderr)
                    bar.update(1)
            for path, wav in zip(names, tokenizer.decode(codes) if codes else []):
                out = args.out if single else os.path.join(args.out, _stem(path) + ".wav")
                write_audio(out, wav, config.sampling_rate)
                bar.update(1)
    if failed:
        print(f"{failed} of {len(args.codes)} files failed", file=sys.stderr)
    return 1 if failed else 0


def _read_batch(clips, config, errors, bar):
    """(clips, waveforms) of those that read; the others go to `errors`."""
    from mimo_jax.tokenizer.reconstruction_quality import error

    read, wavs = [], []
    for clip in clips:
        try:
            wavs.append(
                read_audio(clip.audio, config.sampling_rate, min_samples=config.min_samples)
            )
            read.append(clip)
        except InputError as e:
            errors.append(error(clip.line, clip.id, str(e)))
            bar.update(1)
    return read, wavs


def _cell(value) -> str:
    return "-" if value is None else str(value) if isinstance(value, int) else f"{value:.4f}"


def _table(report: dict) -> str:
    """Means: a row per metric (and the clip count), a column per codebook count."""
    from mimo_jax.tokenizer.reconstruction_quality import METRICS

    counts = report["codebooks"]
    heads = [f"{n} codebooks" + (" (all)" if n == report["num_quantizers"] else "") for n in counts]
    rows = [["metric", *heads]]
    rows += [
        [m, *(_cell(report["means"][str(n)][m]) for n in counts)] for m in METRICS + ("clips",)
    ]
    return "\n".join(r[0].ljust(14) + "".join(c.rjust(22) for c in r[1:]) for r in rows)


def evaluate(args) -> int:
    from mimo_jax.tokenizer import reconstruction_quality

    errors: list[dict] = []
    clips = reconstruction_quality.read_manifest(args.manifest, errors)[: args.limit]
    tokenizer = Tokenizer.load(args.checkpoint, dtype=DTYPES[args.dtype])
    config = tokenizer.config
    codebooks = reconstruction_quality.parse_codebooks(args.codebooks, config.num_quantizers)
    rows = []
    with tqdm(total=len(clips), unit="clip", desc="evaluate") as bar:
        for i in range(0, len(clips), args.files_per_batch):
            read, wavs = _read_batch(clips[i : i + args.files_per_batch], config, errors, bar)
            scored = reconstruction_quality.evaluate(tokenizer, wavs, codebooks) if wavs else []
            for clip, wav, (scores, problems) in zip(read, wavs, scored):
                rows.append(
                    {
                        **dataclasses.asdict(clip),
                        "seconds": wav.size / config.sampling_rate,
                        "scores": {str(n): s for n, s in scores.items()},
                    }
                )
                errors += [reconstruction_quality.error(clip.line, clip.id, p) for p in problems]
                bar.update(1)
    report = {
        "checkpoint": args.checkpoint,
        "manifest": args.manifest,
        "num_quantizers": config.num_quantizers,
        "codebooks": codebooks,
        "means": {
            str(n): reconstruction_quality.means([r["scores"][str(n)] for r in rows])
            for n in codebooks
        },
        "clips": rows,
        "errors": len(errors),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        f.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "errors.jsonl"), "w") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    for e in errors:
        where = f"line {e['line']}" + (f" ({e['id']})" if e["id"] is not None else "")
        print(f"error: {where}: {e['error']}", file=sys.stderr)
    print(_table(report))
    return 1 if errors else 0


COMMANDS = {"encode": encode, "decode": decode, "evaluate": evaluate}


def main(argv=None) -> int:
    parser = _parser()
    logs.add_flag(parser)
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # checkpoint, manifest or --codebooks problems
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
