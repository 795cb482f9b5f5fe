"""Demo corpus: speech synthesised with eSpeak NG, with transcripts, and a manifest for tokenize.

  python -m data_pipelines.demo_corpus --out DIR [--sentences N]

For each sentence (a built-in list in several languages) four utterances are written:
  a   voice A at the normal rate,    b  voice B at the normal rate   (a voice-conversion pair)
  s   voice A slow,                  f  voice A fast                  (a rate-conversion pair)
Files are 16-bit WAV at eSpeak's 22.05 kHz (so tokenization exercises resampling). The manifest
`DIR/manifest.jsonl` has `audio`, `id`, `text`, `speaker`, `language`, and as metadata `voice`,
`rate` (words per minute), `pair` (the sentence id shared by the four), `caption` and `instruct`
(a description and a style instruction derived from voice and rate). `DIR/tokenizer.json` is the
demo BPE text tokenizer trained on the sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import soundfile
from etils import epath

from data_pipelines.demo_text_tokenizer import train_demo_tokenizer
from data_pipelines.espeak import ESpeak

# (language, eSpeak language, sentence)
SENTENCES = (
    ("en", "en", "The quick brown fox jumps over the lazy dog."),
    ("en", "en", "A small boat drifted slowly across the quiet lake."),
    ("de", "de", "Heute scheint die Sonne über der alten Stadt."),
    ("en", "en", "Please remember to close the window before you leave."),
    ("fr", "fr", "Le petit chat dort sur le canapé du salon."),
    ("en", "en", "Our train arrives at the station in ten minutes."),
    ("es", "es", "Mañana vamos a visitar el museo con mis amigos."),
    ("zh", "cmn", "今天天气很好，我们一起去公园散步吧。"),
    ("en", "en", "She painted the old fence a bright shade of green."),
    ("en", "en", "Reading a good book is the best way to spend a rainy afternoon."),
    ("de", "de", "Der Zug nach Berlin fährt um acht Uhr ab."),
    ("en", "en", "The children laughed as the puppy chased its own tail."),
    ("fr", "fr", "Nous avons mangé des crêpes au petit déjeuner."),
    ("en", "en", "Fresh bread smells wonderful early in the morning."),
    ("es", "es", "El río corre tranquilo entre las montañas verdes."),
    ("en", "en", "He forgot his umbrella and got soaked on the way home."),
    ("zh", "cmn", "这本书讲述了一个关于勇气和友谊的故事。"),
    ("en", "en", "The library stays open late on Thursday evenings."),
    ("en", "en", "Music drifted through the open door of the little cafe."),
    ("de", "de", "Im Winter trinken wir gern heißen Tee mit Honig."),
)
# (eSpeak variant, gender word) pairs: voice A and voice B alternate over the sentences.
VOICES = (("f3", "female"), ("m3", "male"), ("f1", "female"), ("m1", "male"))
RATES = {"normal": 170, "slow": 120, "fast": 230}
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "zh": "Chinese"}


def _utterances(i: int, lang: str, espeak_lang: str, text: str):
    """The four utterances of sentence i: (suffix, variant, gender, rate name)."""
    va, vb = VOICES[i % len(VOICES)], VOICES[(i + 1) % len(VOICES)]
    for suffix, (variant, gender), rate in (
        ("a", va, "normal"),
        ("b", vb, "normal"),
        ("s", va, "slow"),
        ("f", va, "fast"),
    ):
        yield suffix, f"{espeak_lang}+{variant}", gender, rate


def _check_sentences(sentences: int) -> None:
    if not 1 <= sentences <= len(SENTENCES):
        raise ValueError(f"--sentences {sentences}: expected 1..{len(SENTENCES)}")


def _write_wav(path: epath.Path, tts: ESpeak, text: str, voice: str, rate: str) -> None:
    """`text` spoken by eSpeak `voice` at `rate` (a RATES name), as 16-bit WAV at its rate."""
    wav = tts.synth(text, voice, RATES[rate])
    with path.open("wb") as f:
        soundfile.write(f, wav, tts.sample_rate, subtype="PCM_16", format="WAV")


def build(out: str, sentences: int = 12) -> list[dict]:
    """Writes the WAV files, `manifest.jsonl` and `tokenizer.json`; returns the manifest entries."""
    _check_sentences(sentences)
    root = epath.Path(out)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    tts = ESpeak()
    entries = []
    for i, (lang, espeak_lang, text) in enumerate(SENTENCES[:sentences]):
        for suffix, voice, gender, rate in _utterances(i, lang, espeak_lang, text):
            uid = f"s{i:03d}{suffix}"
            _write_wav(root / "wav" / f"{uid}.wav", tts, text, voice, rate)
            pace = "" if rate == "normal" else f" {rate}ly" if rate == "slow" else " quickly"
            entries.append(
                {
                    "audio": f"wav/{uid}.wav",
                    "id": uid,
                    "text": text,
                    "speaker": voice,
                    "language": lang,
                    "voice": voice,
                    "rate": RATES[rate],
                    "pair": f"s{i:03d}",
                    "caption": f"A {gender} voice speaking {LANGUAGE_NAMES[lang]}{pace}.",
                    "instruct": f"Speak{pace or ' at a normal pace'} in a {gender} voice.",
                }
            )
    (root / "manifest.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    )
    train_demo_tokenizer([t for _, _, t in SENTENCES]).save(str(root / "tokenizer.json"))
    return entries


# A voice that no utterance of the corpus uses: the voice of the TTS fine-tuning demo.
NEW_VOICE = "m7"


def build_voice(out: str, sentences: int = len(SENTENCES), variant: str = NEW_VOICE) -> int:
    """A voice folder for `data_pipelines.voice`: `sNNN.wav` and its transcript `sNNN.txt` for each
    sentence, all spoken by the eSpeak variant `variant` at the normal rate. Returns the count."""
    _check_sentences(sentences)
    root = epath.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tts = ESpeak()
    for i, (_, espeak_lang, text) in enumerate(SENTENCES[:sentences]):
        _write_wav(root / f"s{i:03d}.wav", tts, text, f"{espeak_lang}+{variant}", "normal")
        (root / f"s{i:03d}.txt").write_text(text + "\n")
    return sentences


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.demo_corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--sentences",
        type=int,
        default=12,
        help=f"sentences (4 utterances each), at most {len(SENTENCES)}",
    )
    args = parser.parse_args(argv)
    entries = build(args.out, args.sentences)
    print(
        f"{args.out}: {len(entries)} utterances in "
        f"{len({e['language'] for e in entries})} languages, "
        f"{len({e['voice'] for e in entries})} voices; manifest.jsonl and tokenizer.json written"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
