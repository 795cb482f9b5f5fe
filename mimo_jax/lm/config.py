"""The MiMo-Audio LM configuration, read from and written back to the official config.json.

The official `MiMoAudioConfig` is a Qwen2 config plus audio fields; the two local transformers (the
patch encoder and the patch decoder) are Qwen2 stacks whose sizes derive from those fields. Every
size here comes from the file; keys this code does not use are kept verbatim for the write-back.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from mimo_jax.nn.attention import IMPLEMENTATIONS
from mimo_jax.nn.remat import POLICIES as REMAT_POLICIES
from mimo_jax.nn.stack import StackConfig

ARCHITECTURE = "MiMoAudioForCausalLM"
# The official code's values of the audio keys a config.json may leave out (MiMo-Audio-7B's).
AUDIO_DEFAULTS: dict[str, Any] = dict(
    group_size=4,
    audio_channels=8,
    speech_vocab_size="1025-1025-129-129-129-129-129-129",
    speech_zeroemb_idx="1024-1024-128-128-128-128-128-128",
    delay_pattern="0-1-2-3-4-5-6-7",
    local_dim=1024,
    local_layers=16,
    local_attn_heads=64,
    local_ffn_dim=4096,
    local_attn_dropout=0.1,
    input_local_layers=6,
)
TOKEN_ID_KEYS = ("sosp_idx", "eosp_idx", "sostm_idx", "eostm_idx", "eot_idx", "empty_idx")
_POSITIVE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "group_size",
    "audio_channels",
    "local_dim",
    "local_layers",
    "local_attn_heads",
    "local_ffn_dim",
    "input_local_layers",
    "input_local_dim",
)


def parse_dashed(value: str | Any, kind: type = int) -> tuple:
    """`"1-2-3"` -> `(1, 2, 3)`, the official config's spelling of a list; sequences pass through
    (converted element-wise)."""
    if isinstance(value, str):
        return tuple(kind(v) for v in value.split("-"))
    return tuple(kind(v) for v in value)


def join_dashed(values: tuple) -> str:
    return "-".join(str(v) for v in values)


def _parse_list(value: str | int, length: int, key: str) -> tuple[int, ...]:
    """A dashed list of `length` ints, or one int for every channel."""
    if isinstance(value, str) and "-" in value:
        out = parse_dashed(value)
    else:
        out = (int(value),) * length
    if len(out) != length:
        raise ValueError(
            f"config {key}={value!r}: expected {length} values (audio_channels={length})"
        )
    return out


@dataclasses.dataclass(frozen=True)
class MiMoAudioConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    group_size: int
    audio_channels: int
    speech_vocab_sizes: tuple[int, ...]
    speech_empty_ids: tuple[int, ...]
    delay_pattern: tuple[int, ...]
    local_dim: int
    local_layers: int
    local_attn_heads: int
    local_ffn_dim: int
    local_attn_dropout: float
    input_local_layers: int
    input_local_dim: int
    input_full_attention: bool
    # Special text token ids (looked up in the text tokenizer by the official processor).
    empty_idx: int
    sosp_idx: int | None = None
    eosp_idx: int | None = None
    sostm_idx: int | None = None
    eostm_idx: int | None = None
    eot_idx: int | None = None
    # Runtime choices (not in the official file).
    remat_policy: str = "minimal"
    attention: str = "auto"  # the kernel of the stacks' attention (nn.attention)
    # The official config.json, kept for the write-back.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        # Sizes the official code cannot build with (a zero division, a negative nn.Linear).
        for key in _POSITIVE_KEYS:
            if getattr(self, key) < 1:
                raise ValueError(
                    f"invalid MiMo-Audio config: {key}={getattr(self, key)} must be >= 1"
                )
        # The local transformers take head_dim = width // heads (floor division, as the official
        # code does): any width of at least one head is valid, the projections are then narrower.
        local_head_dims = [("local_dim", self.local_dim), ("input_local_dim", self.input_local_dim)]
        checks = [
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}",
            ),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE"),
            *[
                (
                    width // self.local_attn_heads >= 1 and width // self.local_attn_heads % 2 == 0,
                    f"{key}={width} // local_attn_heads={self.local_attn_heads} gives head_dim "
                    f"{width // self.local_attn_heads}, which must be even and >= 2 for RoPE",
                )
                for key, width in local_head_dims
            ],
            (min(self.delay_pattern) >= 0, f"delay_pattern {self.delay_pattern} must be >= 0"),
            (
                all(v >= 1 for v in self.speech_vocab_sizes),
                f"speech_vocab_size {self.speech_vocab_sizes} must be >= 1 in every channel",
            ),
            (
                all(0 <= e < v for e, v in zip(self.speech_empty_ids, self.speech_vocab_sizes)),
                f"speech empty ids {self.speech_empty_ids} must lie inside the speech vocabularies "
                f"{self.speech_vocab_sizes}",
            ),
            (
                0 <= self.empty_idx < self.vocab_size,
                f"empty_idx {self.empty_idx} outside the text vocabulary of {self.vocab_size}",
            ),
            (
                self.remat_policy in REMAT_POLICIES,
                f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}",
            ),
            (
                self.attention in IMPLEMENTATIONS,
                f"attention {self.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid MiMo-Audio config: {message}")

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def patch_steps(self) -> int:
        """Steps of the patch decoder for one patch: group_size + max(delay)."""
        return self.group_size + max(self.delay_pattern)

    @property
    def max_positions(self) -> int | None:
        """The positions the LM was made for (config.json's `max_position_embeddings`), when its
        file names them: prompt and generation together stay within them."""
        value = self.hf_config.get("max_position_embeddings")
        return None if value is None else int(value)

    def backbone_stack(self) -> StackConfig:
        """The Qwen2 backbone's stack (the module `MiMoAudioLM.model`; its forward pass is
        `MiMoAudioLM.backbone`)."""
        return StackConfig(
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.intermediate_size,
            self.rope_theta,
            self.rms_norm_eps,
            attention=self.attention,
        )

    def patch_decoder_stack(self) -> StackConfig:
        return StackConfig(
            self.local_dim,
            self.local_layers,
            self.local_attn_heads,
            self.local_attn_heads,
            self.local_dim // self.local_attn_heads,
            self.local_ffn_dim,
            self.rope_theta,
            self.rms_norm_eps,
            attn_dropout=self.local_attn_dropout,
            attention=self.attention,
        )

    def patch_encoder_stack(self) -> StackConfig:
        return StackConfig(
            self.input_local_dim,
            self.input_local_layers,
            self.local_attn_heads,
            self.local_attn_heads,
            self.input_local_dim // self.local_attn_heads,
            4 * self.input_local_dim,
            self.rope_theta,
            self.rms_norm_eps,
            causal=not self.input_full_attention,
            attn_dropout=self.local_attn_dropout,
            attention=self.attention,
        )

    def replace(self, **changes) -> "MiMoAudioConfig":
        return dataclasses.replace(self, **changes)

    # The official config.json ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, **runtime) -> "MiMoAudioConfig":
        """From the official config.json, with the official code's defaults for absent audio
        keys."""

        def need(key):
            if key not in hf:
                raise ValueError(f"config.json has no {key!r}, which a MiMo-Audio LM config needs")
            return hf[key]

        def token_ids() -> dict[str, Any]:  # int or None each; Any as `**` could fill any field
            return {k: (int(hf[k]) if hf.get(k) is not None else None) for k in TOKEN_ID_KEYS[:-1]}

        def audio(key):
            return hf.get(key, AUDIO_DEFAULTS[key])

        channels = int(audio("audio_channels"))
        local_dim = int(audio("local_dim"))
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(
                heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"]
            ),
            head_dim=int(hf.get("head_dim", 128)),
            intermediate_size=int(need("intermediate_size")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            group_size=int(audio("group_size")),
            audio_channels=channels,
            speech_vocab_sizes=_parse_list(
                audio("speech_vocab_size"), channels, "speech_vocab_size"
            ),
            speech_empty_ids=_parse_list(
                audio("speech_zeroemb_idx"), channels, "speech_zeroemb_idx"
            ),
            delay_pattern=_parse_list(audio("delay_pattern"), channels, "delay_pattern"),
            local_dim=local_dim,
            local_layers=int(audio("local_layers")),
            local_attn_heads=int(audio("local_attn_heads")),
            local_ffn_dim=int(audio("local_ffn_dim")),
            local_attn_dropout=float(audio("local_attn_dropout")),
            input_local_layers=int(audio("input_local_layers")),
            input_local_dim=int(hf.get("input_local_dim") or local_dim),
            input_full_attention=bool(hf.get("input_full_attention")),
            empty_idx=int(need("empty_idx")),
            **token_ids(),
            hf_config=dict(hf),
            **runtime,
        )

    def to_hf(self) -> dict:
        """The official config.json: the original keys, with every architecture field from here."""
        hf = dict(self.hf_config)
        hf.update(
            architectures=[ARCHITECTURE],
            model_type=hf.get("model_type", "qwen2"),
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            group_size=self.group_size,
            audio_channels=self.audio_channels,
            speech_vocab_size=join_dashed(self.speech_vocab_sizes),
            speech_zeroemb_idx=join_dashed(self.speech_empty_ids),
            delay_pattern=join_dashed(self.delay_pattern),
            local_dim=self.local_dim,
            local_layers=self.local_layers,
            local_attn_heads=self.local_attn_heads,
            local_ffn_dim=self.local_ffn_dim,
            local_attn_dropout=self.local_attn_dropout,
            input_local_layers=self.input_local_layers,
            input_local_dim=self.input_local_dim,
            input_full_attention=self.input_full_attention,
            **{k: getattr(self, k) for k in TOKEN_ID_KEYS if getattr(self, k) is not None},
        )
        # Keep the file's own spelling of values that compare equal (e.g. 640000 vs 640000.0).
        for key, value in self.hf_config.items():
            if key in hf and hf[key] == value:
                hf[key] = value
        return hf

    @classmethod
    def from_file(cls, path: str | Path, **runtime) -> "MiMoAudioConfig":
        with open(path) as f:
            return cls.from_hf(json.load(f), **runtime)


def mimo_7b_hf() -> dict:
    """MiMo-Audio-7B's architecture (the released config.json, which a converted checkpoint
    carries; this copy is for from-scratch runs and ahead-of-time checks): a Qwen2-7B backbone
    with the official audio defaults."""
    return dict(
        architectures=[ARCHITECTURE],
        model_type="qwen2",
        vocab_size=151680,
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=11008,
        rms_norm_eps=1e-6,
        rope_theta=640000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        sliding_window=None,
        use_sliding_window=False,
        **AUDIO_DEFAULTS,
        input_local_dim=1024,
        input_full_attention=True,
        sosp_idx=151665,
        eosp_idx=151666,
        empty_idx=151667,
        sostm_idx=151670,
        eostm_idx=151671,
        eot_idx=151672,
    )


def small_config(**overrides: Any) -> MiMoAudioConfig:
    """A tiny LM for demos, tests and benchmarks; every size can be overridden."""
    hf = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=160,
        rms_norm_eps=1e-6,
        rope_theta=640000.0,
        group_size=4,
        audio_channels=8,
        local_dim=32,
        local_layers=2,
        local_attn_heads=4,
        local_ffn_dim=96,
        input_local_layers=2,
        input_local_dim=32,
        input_full_attention=True,
        empty_idx=511,
        sosp_idx=506,
        eosp_idx=507,
        sostm_idx=508,
        eostm_idx=509,
        eot_idx=510,
        architectures=[ARCHITECTURE],
        model_type="qwen2",
    )
    runtime = {k: overrides.pop(k) for k in ("remat_policy", "attention") if k in overrides}
    hf.update(overrides)
    return MiMoAudioConfig.from_hf(hf, **runtime)
