"""The small text tokenizers of the tests and the demo (`TextTokenizer`s, mimo_jax.tasks).

`train_demo_tokenizer` builds the small byte-level BPE tokenizer of the tests and the demo: the
same special-token strings as the released MiMo tokenizer (its added tokens), trained on the demo
sentences, deterministic for a given list of sentences.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mimo_jax.tasks import templates
from mimo_jax.tasks.text_tokenizer import SPECIAL_TOKENS, TextTokenizer


def train_demo_tokenizer(sentences: Sequence[str], vocab_size: int = 1024) -> TextTokenizer:
    """Byte-level BPE with every special token of the released tokenizer, trained on `sentences`
    (deterministic).

    The chat-format words of the task prompts are added to the training text so that the
    prompts do not fall back to single bytes.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(list(sentences) + list(templates.ALL_PROMPT_TEXT), trainer=trainer)
    return TextTokenizer(tok)


def tokenizer_digest(tok: TextTokenizer) -> str:
    """A stable summary of the vocabulary and merges (for determinism checks)."""
    data = json.loads(tok.tokenizer.to_str())
    return json.dumps([data["model"]["vocab"], data["model"]["merges"]], sort_keys=True)


def word_level_tokenizer(words: Sequence[str]) -> TextTokenizer:
    """A whitespace word-level tokenizer with known ids (special tokens 0.., then `words`), for
    examples checked by hand; unknown words map to `<unk>`."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + ("<unk>",) + tuple(words))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return TextTokenizer(tok)
