"""A small end-to-end demo on the CPU: convert an official-format MiMo-Audio LM checkpoint to Orbax,
load it, generate text and speech groups from a prompt with the KV-cached loop, and convert the
weights back to the official format, checking the round trip.

    python -m experiments.convert_demo [--checkpoint DIR] [--workdir runs/convert_demo]
                                       [--groups 24]

The default checkpoint is the small randomly initialised one in tests/fixtures/lm (official names
and shapes); point --checkpoint at a released MiMo-Audio directory to run the real model.
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import convert_torch_weights
from mimo_jax import model_checkpoint as checkpoint
from mimo_jax.conversion import safetensors_io as st
from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.inference.sampling import SamplerConfig
from mimo_jax.lm.layout import empty_patch

ROOT = Path(__file__).resolve().parents[1]


def demo_prompt(config, rng: np.random.Generator):
    """A prompt of a few text groups, then a speech segment of random codes between sosp/eosp."""
    text = list(rng.integers(0, min(config.empty_idx, config.sosp_idx or config.empty_idx), 3))
    text += [config.sosp_idx] + [config.empty_idx] * 4 + [config.eosp_idx]
    empty = empty_patch(config.speech_empty_ids, config.group_size)
    codes = np.stack([empty] * len(text))
    for g, tok in enumerate(text):
        if tok == config.empty_idx:
            codes[g] = rng.integers(0, np.asarray(config.speech_empty_ids), empty.shape)
    return np.asarray(text)[None], codes[None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "tests" / "fixtures" / "lm")
    p.add_argument("--workdir", type=Path, default=Path("runs/convert_demo"))
    p.add_argument("--groups", type=int, default=24, help="total groups to generate to")
    a = p.parse_args(argv)

    orbax_dir, back_dir = a.workdir / "orbax", a.workdir / "official"
    t0 = time.time()
    convert_torch_weights.main([str(a.checkpoint), str(orbax_dir), "--overwrite", "--quiet"])
    config, model = checkpoint.load(orbax_dir)
    print(
        f"[demo] converted and loaded {a.checkpoint} in {time.time() - t0:.1f}s: "
        f"{config.num_hidden_layers}-layer backbone, hidden {config.hidden_size}, "
        f"{config.audio_channels} codebooks, group size {config.group_size}"
    )

    text, codes = demo_prompt(config, np.random.default_rng(0))
    sampler = SamplerConfig(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)
    gen = GenerationConfig(max_length=a.groups, text_sampler=sampler, patch_sampler=sampler)
    t0 = time.time()
    out = generate(model, text, codes, gen, rng=jax.random.key(0))
    secs = time.time() - t0
    prompt_len = text.shape[1]
    new = out.text[0, prompt_len:]
    speech = int((new == config.empty_idx).sum())
    print(
        f"[demo] generated {len(new)} groups ({speech} speech patches, {len(new) - speech} text "
        f"tokens) in {secs:.1f}s including compilation"
    )
    print(f"[demo] text channel: {out.text[0].tolist()}")
    first = prompt_len + int(np.argmax(new == config.empty_idx)) if speech else None
    if first is not None:
        print(f"[demo] first generated patch [frames x codebooks]:\n{out.codes[0, first]}")

    convert_torch_weights.main([str(orbax_dir), str(back_dir), "--overwrite", "--quiet"])
    original, restored = st.read_index(a.checkpoint), st.read_index(back_dir)
    same = all(
        st.read_tensor(info).tobytes() == st.read_tensor(restored[name]).tobytes()
        for name, info in original.items()
    )
    print(
        f"[demo] round trip back to official tensors: {len(original)} tensors, "
        f"{'bit-identical' if same else 'DIFFERENT'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
