"""Analytic training FLOPs of the MiMo-Audio LM, for model FLOPs utilisation (6 * N * tokens plus
attention), counted per LLM position (group) of a packed row."""

from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.nn.stack import StackConfig


def _stack_params(s: StackConfig) -> int:
    attn = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden
    return s.layers * (attn + 3 * s.hidden * s.ffn)


def _attention_flops(s: StackConfig, context: int) -> float:
    # QK^T and AV, forward and backward (x3), causal on average over half the context.
    return 3 * 2 * 2 * s.layers * s.heads * s.head_dim * context / 2


def train_flops_per_group(c: MiMoAudioConfig, context: int, patch_decoder: bool = True) -> float:
    backbone: float = 6 * (_stack_params(c.backbone_stack()) + c.hidden_size * c.vocab_size)
    backbone += _attention_flops(c.backbone_stack(), context)
    enc = c.patch_encoder_stack()
    encoder = c.group_size * (6 * _stack_params(enc) + _attention_flops(enc, c.group_size))
    encoder += 6 * c.group_size * enc.hidden * c.hidden_size
    total = backbone + encoder
    if patch_decoder:
        dec = c.patch_decoder_stack()
        heads = sum(c.speech_vocab_sizes) * dec.hidden * c.group_size
        total += c.patch_steps * (6 * _stack_params(dec) + _attention_flops(dec, c.patch_steps))
        total += 6 * (heads + c.hidden_size * dec.hidden)
    return float(total)


def parameter_count(c: MiMoAudioConfig) -> int:
    return (
        _stack_params(c.backbone_stack())
        + _stack_params(c.patch_encoder_stack())
        + _stack_params(c.patch_decoder_stack())
        + 2 * c.hidden_size * c.vocab_size
    )
