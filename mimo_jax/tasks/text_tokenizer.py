"""Text tokenizer: HF `tokenizers` from a `tokenizer.json`, special tokens looked up by name.

The ids of the special tokens are never hard-coded: they are read from the tokenizer.
The eos token is the one `tokenizer_config.json` beside `tokenizer.json` declares (as the official
`AutoTokenizer` reads it), else `<|endoftext|>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import tokenizers
from etils import epath

from mimo_jax.lm.config import MiMoAudioConfig

# The released tokenizer's special tokens, in the order it assigns their ids.
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
DEFAULT_EOS = "<|endoftext|>"
# The LM config's special ids and the tokens they must be in the text tokenizer.
MODEL_SPECIAL_IDS = {
    "sosp_idx": "<|sosp|>",
    "eosp_idx": "<|eosp|>",
    "sostm_idx": "<|sostm|>",
    "eostm_idx": "<|eostm|>",
    "eot_idx": "<|eot|>",
    "empty_idx": "<|empty|>",
}


class TextTokenizer:
    """A `tokenizers.Tokenizer` with named access to the special ids the prompt builders use."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        source: str = "<memory>",
        eos_token: str = DEFAULT_EOS,
    ):
        self.tokenizer = tokenizer
        self.source = source
        self.eos_token = eos_token
        self.eos_id = self.special_id(eos_token)
        self.pad_id = self.special_id("<|endoftext|>")
        self.empty_id = self.special_id("<|empty|>")
        self.sosp_id = self.special_id("<|sosp|>")
        self.eosp_id = self.special_id("<|eosp|>")
        self.sostm_id = self.special_id("<|sostm|>")
        self.eostm_id = self.special_id("<|eostm|>")
        self.eot_id = self.special_id("<|eot|>")
        self.im_start_id = self.special_id("<|im_start|>")
        self.im_end_id = self.special_id("<|im_end|>")

    @classmethod
    def from_file(cls, path: str) -> "TextTokenizer":
        """From a `tokenizer.json` or a directory holding one (maybe with tokenizer_config.json)."""
        file = epath.Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"text tokenizer: {file} does not exist")
        eos = DEFAULT_EOS
        config = file.parent / "tokenizer_config.json"
        if config.exists():
            declared = json.loads(config.read_text()).get("eos_token")
            if isinstance(declared, dict):  # an AddedToken serialised as a mapping
                declared = declared.get("content")
            eos = declared or DEFAULT_EOS
        return cls(tokenizers.Tokenizer.from_str(file.read_text()), str(file), eos)

    def special_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise KeyError(
                f"text tokenizer {self.source}: special token {token!r} is missing "
                f"(expected the tokens {', '.join(SPECIAL_TOKENS)})"
            )
        return tid

    def encode(self, text: str) -> list[int]:
        """Ids without added special tokens; special-token strings in `text` become single ids."""
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
        return {"json": self.tokenizer.to_str(), "source": self.source, "eos": self.eos_token}

    def __setstate__(self, state):
        self.__init__(
            tokenizers.Tokenizer.from_str(state["json"]),
            state["source"],
            state.get("eos", DEFAULT_EOS),
        )


def model_id_problems(lm_config: MiMoAudioConfig, tok: TextTokenizer) -> list[str]:
    """Every disagreement between an LM config's special ids (and vocabulary size) and the text
    tokenizer, one line each; empty when they agree."""
    problems = []
    for key, token in MODEL_SPECIAL_IDS.items():
        mine = getattr(lm_config, key, None)
        if mine is not None and mine != tok.special_id(token):
            problems.append(f"{key}={mine} but {tok.source} has {token} = {tok.special_id(token)}")
    if tok.vocab_size > lm_config.vocab_size:
        problems.append(
            f"vocab_size={lm_config.vocab_size} but {tok.source} has {tok.vocab_size} tokens"
        )
    return problems
