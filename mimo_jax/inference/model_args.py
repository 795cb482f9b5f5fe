"""The command-line flags that name a MimoAudio (the LM, the audio tokenizer, the text tokenizer and
the context), shared by `python -m mimo_jax.generate` and `python -m mimo_jax.evaluate`. Light to
import: JAX and the models load only in `load_mimo`."""

import argparse

from mimo_jax.tasks.requests import MAX_GROUPS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", required=True, help="LM checkpoint (official or converted)")
    p.add_argument("--audio-tokenizer", required=True, help="audio tokenizer checkpoint")
    p.add_argument("--text-tokenizer", required=True, help="tokenizer.json (or its directory)")
    p.add_argument(
        "--adapter",
        default=None,
        help="a LoRA adapter directory for the LM (PEFT format: adapter_config.json "
        "and adapter_model.safetensors, e.g. a LoRA run's workdir/adapter)",
    )
    p.add_argument(
        "--context-groups",
        type=int,
        default=None,
        help=f"prompt and generation together, in groups (default {MAX_GROUPS}, as the "
        f"official generation, or the LM's max_position_embeddings where smaller)",
    )


def load_mimo(args: argparse.Namespace):
    """The MimoAudio the flags name; a checkpoint or tokenizer that cannot be used ends the
    command with one line."""
    from mimo_jax.inference.mimo_audio import MimoAudio

    try:
        return MimoAudio.load(
            args.lm,
            args.audio_tokenizer,
            args.text_tokenizer,
            adapter=args.adapter,
            context_groups=args.context_groups,
        )
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
