"""A requests file of mixed tasks through `python -m mimo_jax.generate`, beside the baseline of as
many identical TTS requests: wall time of each command (start, model loading and every compilation
included; JAX's persistent compilation cache off), on the demo model.

    python benchmarks/mixed_requests.py [--demo runs/demo] [--batch-size 8] [--out DIR]

The mixed file has 23 lines: 7 valid requests of 7 tasks (tts, asr, understand, dialogue,
s2t_dialogue, text_dialogue, continue; audio from the demo corpus; most without a length limit,
some with min or max lengths or greedy) and 16 bad ones, each an error line (unknown task or
field, bad values, missing or unreadable audio, bad JSON, a repeated or unusable id). The baseline
is 25 identical TTS requests. Run it after `python -m experiments.demo`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mixed_requests(wavs: list[str], not_audio: str) -> list[str]:
    """The 23 lines of the mixed file: 7 valid requests, then 16 bad ones."""
    a, b, c = wavs[:3]
    valid = [
        {"id": "tts", "task": "tts", "input": "The quick brown fox."},
        {"id": "asr", "task": "asr", "input": a, "greedy": True},
        {"id": "understand", "task": "understand", "input": b, "input_text": "Who is speaking?"},
        {"id": "dialogue", "task": "dialogue", "input": c},
        {"id": "s2t", "task": "s2t_dialogue", "input": a, "max_new_groups": 20},
        {
            "id": "chat",
            "task": "text_dialogue",
            "input": "Tell me about foxes.",
            "min_new_groups": 4,
        },
        {"id": "continue", "task": "continue", "input": b, "max_new_groups": 50},
    ]
    bad = [
        {"id": "sing", "task": "sing", "input": "la"},
        {"id": "blank", "task": "tts", "input": " "},
        {"id": "volume", "task": "tts", "input": "Hi.", "volume": 3},
        {"id": "none", "task": "tts", "input": "Hi.", "max_new_groups": 0},
        {"id": "gone", "task": "asr", "input": a + ".missing"},
        {"id": "text", "task": "asr", "input": not_audio},
        {"id": "tts", "task": "tts", "input": "The same id again."},
        {"id": "a/b", "task": "tts", "input": "Not a file name."},
        {"id": "yes", "task": "tts", "input": "Hi.", "greedy": "yes"},
        {"id": "both", "task": "dialogue", "input": c, "message_list": []},
        {"id": "role", "task": "text_dialogue", "message_list": [{"role": "system"}]},
        {"id": "shots", "task": "few_shot", "input": a, "prompt_examples": "none"},
        {"id": "question", "task": "understand", "input": b},
        {"id": "template", "task": "asr", "input": a, "template": 5},
    ]
    return [json.dumps(r) for r in valid + bad] + ["{not json", "[1, 2]"]


def run(lines: list[str], work: Path, name: str, demo: Path, batch_size: int) -> tuple[float, int]:
    """(seconds, exit status) of the generate command on a requests file of `lines`."""
    (work / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    argv = [
        sys.executable,
        "-m",
        "mimo_jax.generate",
        "--requests",
        str(work / f"{name}.jsonl"),
        "--lm",
        str(demo / "stage2" / "model"),
        "--audio-tokenizer",
        str(demo / "audio_tokenizer"),
        "--text-tokenizer",
        str(demo / "data" / "tokenizer.json"),
        "--out",
        str(work / name),
        "--batch-size",
        str(batch_size),
    ]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="experiments.demo's dir")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, help="where the files and outputs go (default: a temp dir)")
    a = p.parse_args(argv)
    wavs = sorted(str(w.absolute()) for w in (a.demo / "data" / "wav").glob("*.wav"))
    if len(wavs) < 3:
        raise SystemExit(f"{a.demo}/data/wav: no demo corpus; run python -m experiments.demo")
    work = a.out or Path(tempfile.mkdtemp(prefix="mixed-requests-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "notes.txt").write_text("not audio\n")
    mixed = mixed_requests(wavs, str((work / "notes.txt").absolute()))
    tts = json.dumps({"task": "tts", "input": "The quick brown fox."})
    cases = [
        ("mixed", f"{len(mixed)} requests, 7 tasks, 7 valid", mixed, 7),
        ("tts", "25 identical tts requests (baseline)", [tts] * 25, 25),
    ]
    print(f"python -m mimo_jax.generate on {a.demo}, --batch-size {a.batch_size}, in {work}")
    print("| requests file | seconds | per valid request | exit |\n|---|---|---|---|")
    for name, shown, lines, valid in cases:
        seconds, status = run(lines, work, name, a.demo, a.batch_size)
        print(f"| {shown} | {seconds:.1f} | {seconds / valid:.2f} | {status} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
