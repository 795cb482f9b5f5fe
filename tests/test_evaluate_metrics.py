"""ASR error rates with MiMo-Audio-Eval's normalisation, on hand-made cases whose rates are
counted by hand: punctuation (ASCII and Chinese) removed with the apostrophe kept, English
lower-cased and scored per word, Chinese scored per character."""

import pytest

from mimo_jax.evaluation import asr_metrics as m

CASES = [  # reference, hypothesis, language, (word errors, words), (char errors, chars)
    # one substituted word of six; one substituted letter of 22 characters (spaces count)
    ("The cat sat, on the MAT.", "the cat sit on the mat", None, (1, 6), (1, 22)),
    # one inserted word; "good " is five inserted characters
    ("Good morning!", "good good morning", None, (1, 2), (5, 12)),
    # casing only
    ("HELLO There", "hello there", "en", (0, 2), (0, 11)),
    # the apostrophe is not removed: "don't" against "dont" is a substitution, one deleted char
    ("Don't!", "dont", "en", (1, 1), (1, 5)),
    # Chinese per character, fullwidth punctuation removed: 气->汽 substituted, 边 deleted
    ("今天天气很好，我们去海边。", "今天天汽很好我们去海", None, (2, 11), (2, 11)),
    # spaces do not count in Chinese; 界->介 substituted
    ("你好！ 世界", "你 好 世 介", "zh-CN", (1, 4), (1, 4)),
    # an empty hypothesis deletes everything
    ("a b", "", None, (2, 2), (3, 3)),
]


@pytest.mark.parametrize("ref,hyp,lang,words,chars", CASES)
def test_hand_counted_rates(ref, hyp, lang, words, chars):
    s = m.score(ref, hyp, lang)
    assert (s.word_errors, s.words) == words
    assert (s.char_errors, s.chars) == chars
    assert s.wer == pytest.approx(words[0] / words[1])
    assert s.cer == pytest.approx(chars[0] / chars[1])


def test_normalisation():
    assert m.normalize("Hello, World! It's (fine) — ok…", "en") == [
        "hello",
        "world",
        "it's",
        "fine",
        "ok",
    ]
    assert m.normalize("「你好」，世界！", "zh") == list("你好世界")
    assert m.language_of("今天 ok") == "zh" and m.language_of("ok") == "en"
    assert m.language_of("ok", "ZH_tw") == "zh"
    assert m.hypothesis_text("hello world (English)") == "hello world "


def test_totals_are_corpus_rates_and_the_official_mean():
    scores = [
        m.score("The cat sat, on the MAT.", "the cat sit on the mat"),
        m.score("Good morning!", "good good morning"),
    ]
    t = m.totals(scores)
    assert t["wer"] == pytest.approx(2 / 8) and t["cer"] == pytest.approx(6 / 34)
    assert t["mean_wer"] == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert (t["substitutions"], t["deletions"], t["insertions"]) == (1, 0, 1)


@pytest.mark.parametrize(
    "ref,lang,message",
    [
        ("?!。", None, "nothing left to score"),
        ("bonjour", "fr", "language 'fr'"),
    ],
)
def test_bad_references_are_named(ref, lang, message):
    with pytest.raises(ValueError, match=message):
        m.score(ref, "x", lang)
