"""Text tokenizer: HF `tokenizers` from a `tokenizer.json`, special tokens looked up by name.

`train_demo_tokenizer` builds the small byte-level BPE tokenizer of the tests and the demo: the
same special-token strings as the released MiMo tokenizer (SPEC §2.1), trained on the demo
sentences, deterministic for a given list of sentences.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipelines import prompts

# SPEC §2.1, in the order the released tokenizer assigns their ids.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|sosp|>",
    "<|eosp|>",
    "<|empty|>",
    "<think>",
    "</think>",
    "<|sostm|>",
    "<|eostm|>",
    "<|eot|>",
    "<|Human|>",
    "<|SpeechLM|>",
)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with named access to the special ids the sequence builders use."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, source: str = "<memory>"):
        self.tokenizer = tokenizer
        self.source = source
        self.pad_id = self.special_id("<|endoftext|>")
        self.empty_id = self.special_id("<|empty|>")
        self.sosp_id = self.special_id("<|sosp|>")
        self.eosp_id = self.special_id("<|eosp|>")
        self.sostm_id = self.special_id("<|sostm|>")
        self.eostm_id = self.special_id("<|eostm|>")
        self.eot_id = self.special_id("<|eot|>")

    @classmethod
    def from_file(cls, path: str) -> "TextTokenizer":
        path = epath.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"text tokenizer: {path} does not exist")
        return cls(tokenizers.Tokenizer.from_str(path.read_text()), str(path))

    def special_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise KeyError(
                f"text tokenizer {self.source}: special token {token!r} is missing "
                f"(expected the tokens {', '.join(SPECIAL_TOKENS)})"
            )
        return tid

    def encode(self, text: str) -> list[int]:
        """Ids without added special tokens; special-token strings inside `text` become single ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def save(self, path: str) -> None:
        epath.Path(path).write_text(self.tokenizer.to_str())

    # Pickled by value so that Grain worker processes get their own copy.
    def __getstate__(self):
        return {"json": self.tokenizer.to_str(), "source": self.source}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["source"])


def train_demo_tokenizer(sentences: Sequence[str], vocab_size: int = 1024) -> TextTokenizer:
    """Byte-level BPE with every SPEC §2.1 special token, trained on `sentences` (deterministic).

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
    tok.train_from_iterator(list(sentences) + list(prompts.ALL_PROMPT_TEXT), trainer=trainer)
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
