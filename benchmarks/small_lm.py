"""The benchmarks' LM of a given backbone size (random weights, the special ids at the end of the
vocabulary) and the same backbone as a transformers Qwen2Config."""

from mimo_jax.lm.config import MiMoAudioConfig, small_config


def add_size_args(p) -> None:
    """The backbone size flags (default: a ~100M-parameter Qwen2 backbone)."""
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=16384)


def build_config(a, local_dim: int = 256) -> MiMoAudioConfig:
    """From the arguments hidden, layers, heads, kv_heads, ffn and vocab."""
    v = a.vocab
    return small_config(
        vocab_size=v,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        intermediate_size=a.ffn,
        empty_idx=v - 1,
        sosp_idx=v - 6,
        eosp_idx=v - 5,
        sostm_idx=v - 4,
        eostm_idx=v - 3,
        eot_idx=v - 2,
        local_dim=local_dim,
        local_layers=2,
        local_attn_heads=4,
        local_ffn_dim=4 * local_dim,
        input_local_dim=local_dim,
        remat_policy="none",
    )


def torch_config(config: MiMoAudioConfig):
    """The backbone as a transformers Qwen2Config (SDPA attention)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        attn_implementation="sdpa",
    )
