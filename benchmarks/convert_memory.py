"""Peak resident memory of the converter relative to the checkpoint's size.

Writes a synthetic official-format LM checkpoint (random float32 tensors, streamed to disk) of about
`--params` parameters, converts it with convert_torch_weights.py in a child process, and prints the
child's peak resident set size divided by the checkpoint's size on disk (target: at most 1.3),
for the official -> Orbax direction and back.

    python benchmarks/convert_memory.py [--params 1e9] [--workdir /tmp/convert_memory]
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimo_jax.conversion import safetensors_io as st  # noqa: E402
from mimo_jax.conversion.convert import placements  # noqa: E402
from mimo_jax.lm.config import small_config  # noqa: E402
from mimo_jax.model_checkpoint import family_for  # noqa: E402


def synthetic_config(params: float):
    """Qwen2-style sizes (hidden 2048, ffn 5504, vocab 32000) with enough layers for `params`."""
    hidden, ffn, vocab = 2048, 5504, 32000
    per_layer = 2 * hidden * hidden + 2 * hidden * 512 + 3 * hidden * ffn
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return small_config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=ffn,
        empty_idx=vocab - 1,
        sosp_idx=vocab - 6,
        eosp_idx=vocab - 5,
        sostm_idx=vocab - 4,
        eostm_idx=vocab - 3,
        eot_idx=vocab - 2,
        local_dim=512,
        local_layers=2,
        local_attn_heads=8,
        local_ffn_dim=2048,
        input_local_dim=512,
    )


def write_synthetic(dst: Path, config) -> int:
    from flax import nnx

    hf = config.to_hf()
    family = family_for(hf, "synthetic")
    abstract = nnx.state(nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0))), nnx.Param)
    needed, _ = placements(family, abstract)
    rng = np.random.default_rng(0)
    pending = [
        st.PendingTensor(
            p.torch_name,
            np.dtype(np.float32),
            p.torch_shape,
            lambda p=p: rng.standard_normal(p.torch_shape, np.float32) * 0.02,
        )
        for p in needed
    ]
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(hf, indent=2))
    files = st.write_checkpoint(dst, pending)
    return sum(f.stat().st_size for f in files if f.suffix == ".safetensors")


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """Runs cmd in a fresh child and returns (its peak RSS in bytes, wall seconds)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.time(); "
        "r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.time() - t); "
        "sys.exit(r.returncode)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe] + cmd, capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rss, secs = out.stdout.strip().splitlines()[-1].split()
    return int(rss), float(secs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/convert_memory"))
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    config = synthetic_config(a.params)
    t0 = time.time()
    size = write_synthetic(a.workdir / "official", config)
    print(
        f"synthetic checkpoint: {size / 2**30:.2f} GiB ({size / 4 / 1e9:.2f}B float32 parameters, "
        f"{config.num_hidden_layers} layers), written in {time.time() - t0:.0f}s"
    )
    script = str(ROOT / "convert_torch_weights.py")
    baseline, _ = peak_rss_of([sys.executable, "-c", "import jax, orbax.checkpoint, flax"])
    print(f"baseline: python + jax + orbax + flax imported: {baseline / 2**30:.2f} GiB")
    for name, src, dst in (
        ("official -> orbax", "official", "orbax"),
        ("orbax -> official", "orbax", "back"),
    ):
        rss, secs = peak_rss_of(
            [sys.executable, script, str(a.workdir / src), str(a.workdir / dst), "--quiet"]
        )
        print(
            f"{name}: peak RSS {rss / 2**30:.2f} GiB = {rss / size:.2f} x checkpoint size "
            f"(target <= 1.30), {secs:.0f}s"
        )
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
