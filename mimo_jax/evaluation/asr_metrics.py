"""ASR word and character error rates (jiwer) with MiMo-Audio-Eval's normalisation.

The official ASR evaluator (`slm_eval/evaluator/asr_evaluator.py`) removes every character of
`string.punctuation` and of `zhon.hanzi.punctuation` except the ASCII apostrophe, then scores
Chinese per character (each character a word) and English lower-cased per word; the hypothesis is
cut at its first "(" (where the model appends a note). Here:

  wer  the official metric: words for English, characters for Chinese (jiwer's word alignment)
  cer  characters of the normalised text (jiwer's `cer`; spaces between English words count)

Totals are corpus rates (errors over reference length) and the official `mean_wer` (the mean of
the utterances' WER). The language is the utterance's (`zh...` or `en...`) or, when not given,
Chinese if the reference holds a CJK ideograph, as the task templates decide.
"""

from __future__ import annotations

import dataclasses
import string

import jiwer

from mimo_jax.tasks.templates import is_chinese

# zhon.hanzi.punctuation (the Chinese punctuation the official evaluator removes), by code point.
ZH_PUNCTUATION = (
    "\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d"
    "\uff0f\uff1a\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f"
    "\uff40\uff5b\uff5c\uff5d\uff5e\uff5f\uff60"  # fullwidth ASCII variants
    "\uff62\uff63\uff64"  # halfwidth CJK punctuation
    "\u3000\u3001\u3003"  # CJK symbols and punctuation
    "\u300b\u300c\u300d\u300e\u300f\u3010\u3011"  # CJK angle and corner brackets
    "\u3014\u3015\u3016\u3017\u3018\u3019\u301a\u301b\u301c\u301d\u301e\u301f"
    "\u3030\u303e\u303f"  # other CJK symbols, special indicators
    "\u2013\u2014"  # dashes
    "\u2018\u2019\u201b\u201c\u201d\u201e\u201f"  # quotation marks
    "\u2026\u2027\ufe4f"  # ellipsis, hyphenation point, underscore
    "\uff01\uff1f\uff61\u3002"  # stops
)
_REMOVED = str.maketrans("", "", (ZH_PUNCTUATION + string.punctuation).replace("'", ""))
LANGUAGES = ("en", "zh")


def language_of(reference: str, language: str | None = None) -> str:
    """ "zh" or "en": from a language tag (`zh-CN`, `en_us`, ...) or from the reference text."""
    if language:
        tag = language.lower()[:2]
        if tag not in LANGUAGES:
            raise ValueError(f"language {language!r}: expected a tag starting with en or zh")
        return tag
    return "zh" if is_chinese(reference) else "en"


def normalize(text: str, language: str) -> list[str]:
    """The scored units of `text`: punctuation removed, then Chinese characters (spaces dropped)
    or lower-cased English words."""
    text = text.translate(_REMOVED)
    if language == "zh":
        return [ch for ch in text if not ch.isspace()]
    return text.lower().split()


def hypothesis_text(output: str) -> str:
    """The model's ASR output as the official evaluator scores it: cut at the first "("."""
    return output.split("(")[0]


@dataclasses.dataclass(frozen=True)
class Score:
    """One utterance: edit counts against the reference, for words and characters."""

    language: str
    reference: list[str]  # the normalised units
    hypothesis: list[str]
    word_errors: int
    words: int
    substitutions: int
    deletions: int
    insertions: int
    char_errors: int
    chars: int

    @property
    def wer(self) -> float:
        return self.word_errors / self.words

    @property
    def cer(self) -> float:
        return self.char_errors / self.chars

    def as_dict(self) -> dict:
        return {
            "language": self.language,
            "wer": self.wer,
            "cer": self.cer,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "words": self.words,
            "chars": self.chars,
            "normalized_reference": _joined(self.reference, self.language),
            "normalized_hypothesis": _joined(self.hypothesis, self.language),
        }


def _joined(units: list[str], language: str) -> str:
    return ("" if language == "zh" else " ").join(units)


def score(reference: str, hypothesis: str, language: str | None = None) -> Score:
    """Errors of `hypothesis` against `reference`; a reference with nothing left to score after
    normalisation is a ValueError (its rate would be undefined)."""
    lang = language_of(reference, language)
    ref, hyp = normalize(reference, lang), normalize(hypothesis, lang)
    if not ref:
        raise ValueError(
            f"transcript {reference!r}: nothing left to score after removing "
            f"punctuation (expected words or characters)"
        )
    # jiwer aligns lists of units: a sentence of one "word" per unit.
    words = jiwer.process_words(" ".join(ref), " ".join(hyp) if hyp else "")
    chars = jiwer.process_characters(_joined(ref, lang), _joined(hyp, lang))
    return Score(
        lang,
        ref,
        hyp,
        words.substitutions + words.deletions + words.insertions,
        len(ref),
        words.substitutions,
        words.deletions,
        words.insertions,
        chars.substitutions + chars.deletions + chars.insertions,
        len(_joined(ref, lang)),
    )


def totals(scores: list[Score]) -> dict:
    """Corpus error rates over the utterances, and the official mean of their WERs."""
    if not scores:
        return {"utterances": 0}
    words, chars = sum(s.words for s in scores), sum(s.chars for s in scores)
    return {
        "utterances": len(scores),
        "wer": sum(s.word_errors for s in scores) / words,
        "cer": sum(s.char_errors for s in scores) / chars,
        "mean_wer": sum(s.wer for s in scores) / len(scores),
        "substitutions": sum(s.substitutions for s in scores),
        "deletions": sum(s.deletions for s in scores),
        "insertions": sum(s.insertions for s in scores),
        "words": words,
        "chars": chars,
    }
