"""Converts MiMo-Audio checkpoints between the official PyTorch format and Orbax, either way.

    python convert_torch_weights.py SRC DST [--dtype float32|bfloat16] [--overwrite]

SRC an official directory (config.json + model.safetensors or a sharded index): DST becomes a model
checkpoint (config.json + Orbax params/). SRC a model checkpoint: DST becomes an official directory
with the official tensor names, shapes and config.json. The model (LM or audio tokenizer) is read
from SRC's config.json.
"""

import argparse
import sys

from mimo_jax import logs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official checkpoint directory, or model checkpoint directory")
    parser.add_argument("dst", help="output directory (refused if it exists, unless --overwrite)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="dtype of the written parameters (default: as stored in SRC)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    logs.add_flag(parser)
    args = parser.parse_args(argv)
    logs.configure(args.log_level)

    from mimo_jax.model_checkpoint import convert

    try:
        out = convert(args.src, args.dst, args.dtype, args.overwrite, progress=not args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
