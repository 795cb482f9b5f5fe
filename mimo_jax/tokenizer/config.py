"""The audio tokenizer's architecture, read from and written back to the official `config.json`.

Only the keys the model uses become fields; every other key of the file is kept in `extra` so that
writing the config back reproduces the original file. Values the implementation does not support
(another activation, norm or position embedding) are rejected when the config is read.
"""

import dataclasses
import json
import os
from typing import Any

from mimo_jax.nn.stack import StackConfig

ARCHITECTURE = "MiMoAudioTokenizer"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # Front end.
    sampling_rate: int = 24000
    hop_length: int = 240
    nfft: int = 960
    window_size: int = 960
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    # Encoder.
    d_model: int = 1280
    kernel_size: int = 3
    stride_size: int = 2
    avg_pooler: int = 2
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    encoder_skip_layer_id: int | None = 3
    encoder_causal: bool = False
    encoder_attn_window_size: tuple[int, int] = (-1, -1)
    # Quantizer.
    num_quantizers: int = 20
    codebook_size: tuple[int, ...] = (1024, 1024) + (128,) * 18
    # Decoder.
    decoder_layers: int = 32
    decoder_attention_heads: int = 20
    decoder_ffn_dim: int = 5120
    decoder_kernel_size: int = 3
    decoder_stride_size: int = 2
    decoder_causal: bool = True
    decoder_attn_window_size: tuple[int, int] = (-1, -1)
    # Vocoder.
    vocoder_dim: int = 256
    vocoder_intermediate_dim: int = 1024
    vocoder_num_layers: int = 16
    vocoder_attention_heads: int = 16
    vocoder_attn_window_size: tuple[int, int] = (40, 10)
    vocoder_padding: str = "same"
    # Shared.
    rope_theta: float = 10000.0
    ln_eps: float = 1e-5
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name, value in (
            ("encoder_attn_window_size", self.encoder_attn_window_size),
            ("decoder_attn_window_size", self.decoder_attn_window_size),
            ("vocoder_attn_window_size", self.vocoder_attn_window_size),
        ):
            if len(value) != 2:
                raise ValueError(f"config {name} must be [left, right], got {list(value)}")
        for name, dim, heads in (
            ("encoder", self.d_model, self.encoder_attention_heads),
            ("decoder", self.d_model, self.decoder_attention_heads),
            ("vocoder", self.vocoder_dim, self.vocoder_attention_heads),
        ):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(
                    f"config: {name} width {dim} does not split into {heads} heads "
                    f"of an even size (RoPE needs one)"
                )
        if len(self.codebook_size) < self.num_quantizers:
            raise ValueError(
                f"config: codebook_size lists {len(self.codebook_size)} codebooks, "
                f"num_quantizers is {self.num_quantizers}"
            )
        if self.encoder_skip_layer_id is not None and not (
            0 <= self.encoder_skip_layer_id <= self.encoder_layers
        ):
            raise ValueError(
                f"config: encoder_skip_layer_id {self.encoder_skip_layer_id} is not "
                f"a layer of the {self.encoder_layers}-layer encoder"
            )
        if self.vocoder_padding != "same":
            raise ValueError(
                f"config: vocoder_padding {self.vocoder_padding!r} is not supported "
                f"(expected 'same')"
            )
        if (self.window_size - self.hop_length) % 2:
            raise ValueError("config: window_size - hop_length must be even for 'same' padding")
        if self.decoder_kernel_size < self.decoder_stride_size:
            raise ValueError("config: decoder_kernel_size must be >= decoder_stride_size")

    def replace(self, **changes) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)

    # Derived sizes.
    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(self.codebook_size[: self.num_quantizers])

    @property
    def samples_per_code(self) -> int:
        """Waveform samples per 25 Hz code frame (960 for the released model)."""
        return self.avg_pooler * self.decoder_stride_size * self.hop_length

    @property
    def mel_frames_per_code(self) -> int:
        return self.stride_size * self.avg_pooler

    def mel_frames(self, samples: int) -> int:
        return samples // self.hop_length + 1

    def code_frames(self, mel_frames: int) -> int:
        """Codes of one segment of `mel_frames` frames (convs with padding 1, then pooling)."""
        conv1 = mel_frames + 3 - self.kernel_size
        conv2 = (conv1 + 2 - self.kernel_size) // self.stride_size + 1
        return -(-conv2 // self.avg_pooler)

    @property
    def frame_rate(self) -> float:
        """Code frames per second (25.0 for the released model)."""
        return self.sampling_rate / self.samples_per_code

    def clip_code_frames(self, samples: int) -> int:
        """Codes of a whole clip of `samples` (its 6000-frame segments give the same total)."""
        return self.code_frames(self.mel_frames(samples))

    @property
    def min_samples(self) -> int:
        """The reflect padding of the centred STFT needs more than nfft // 2 samples."""
        return self.nfft // 2 + 1

    # The three transformer stacks.
    def encoder_stack(self) -> StackConfig:
        return self._stack(
            self.encoder_layers,
            self.d_model,
            self.encoder_attention_heads,
            self.encoder_ffn_dim,
            self.encoder_causal,
            self.encoder_attn_window_size,
        )

    def decoder_stack(self) -> StackConfig:
        return self._stack(
            self.decoder_layers,
            self.d_model,
            self.decoder_attention_heads,
            self.decoder_ffn_dim,
            self.decoder_causal,
            self.decoder_attn_window_size,
        )

    def vocoder_stack(self) -> StackConfig:
        return self._stack(
            self.vocoder_num_layers,
            self.vocoder_dim,
            self.vocoder_attention_heads,
            self.vocoder_intermediate_dim,
            False,
            self.vocoder_attn_window_size,
        )

    def _stack(self, layers, dim, heads, ffn, causal, window) -> StackConfig:
        return StackConfig(
            dim,
            layers,
            heads,
            heads,
            dim // heads,
            ffn,
            self.rope_theta,
            self.ln_eps,
            causal=causal,
            window=tuple(window),
        )


# Keys of config.json that the architecture is checked against but that have no field.
_REQUIRED_VALUES = {
    "activation_function": "gelu",
    "ln_type": "LayerNorm",
    "position_embedding_type": "rope",
    "rope_type": "default",
}
_FIELDS = [f.name for f in dataclasses.fields(TokenizerConfig) if f.name not in ("extra", "ln_eps")]
_TUPLES = {
    "encoder_attn_window_size",
    "decoder_attn_window_size",
    "vocoder_attn_window_size",
    "codebook_size",
}


def from_hf(hf: dict, where: str = "config.json") -> TokenizerConfig:
    """The config of an official config.json dict; `where` names the file in errors."""
    archs = hf.get("architectures") or []
    if archs and ARCHITECTURE not in archs:
        raise ValueError(f"{where}: architectures {archs} is not {ARCHITECTURE}")
    for key, expected in _REQUIRED_VALUES.items():
        if key in hf and hf[key] != expected:
            raise ValueError(f"{where}: {key} is {hf[key]!r}; only {expected!r} is implemented")
    missing = [k for k in _FIELDS if k not in hf and k not in ("fmax", "encoder_skip_layer_id")]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    values: dict[str, Any] = {}
    for key in _FIELDS:
        if key in hf:
            value = hf[key]
            values[key] = tuple(value) if key in _TUPLES else value
    extra = {k: v for k, v in hf.items() if k not in _FIELDS}
    try:
        return TokenizerConfig(**values, extra=extra)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def to_hf(config: TokenizerConfig) -> dict:
    out = dict(config.extra)
    for key in _FIELDS:
        value = getattr(config, key)
        out[key] = list(value) if key in _TUPLES else value
    out.setdefault("architectures", [ARCHITECTURE])
    return dict(sorted(out.items()))


def load(path: str) -> TokenizerConfig:
    """Read a config.json file (or the config.json inside a checkpoint directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return from_hf(hf, where=path)


def save(config: TokenizerConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_hf(config), f, indent=2)
        f.write("\n")
