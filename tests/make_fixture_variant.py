"""Writes a fixture root whose LM has other sizes than the bundled one, to show that the tests
which read MIMO_FIXTURES derive every size from the fixture's files:

    python tests/make_fixture_variant.py DST [--src tests/fixtures]
    MIMO_FIXTURES=DST python -m pytest -q tests/test_conversion_errors.py ...

`lm/` gets a random model of other widths, depth, GQA ratio, group size, channel count, delay
pattern and head counts (a floor-division head_dim, a causal patch encoder) in the official format,
with `reference.npz` computed by this implementation (so the parity tests only check consistency
there). The other folders are copied from SRC.
"""

import argparse
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VARIANT = dict(
    vocab_size=100,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=96,
    group_size=3,
    audio_channels=4,
    delay_pattern="0-2-2-3",
    speech_vocab_size="33-17-17-9",
    speech_zeroemb_idx="32-16-16-8",
    local_dim=40,
    local_attn_heads=6,
    local_ffn_dim=72,
    local_layers=3,
    input_local_dim=28,
    input_local_layers=1,
    input_full_attention=False,
    empty_idx=99,
    sosp_idx=94,
    eosp_idx=95,
    sostm_idx=96,
    eostm_idx=97,
    eot_idx=98,
)


def _ids(config, rng, groups: int, speech) -> np.ndarray:
    """Official layout [1 + C, groups * G] with the given groups as speech (others text)."""
    from mimo_jax.lm.layout import to_official

    text = rng.integers(0, config.vocab_size - 6, groups)
    text[speech] = config.empty_idx
    codes = np.stack(
        [rng.integers(0, v - 1, (groups, config.group_size)) for v in config.speech_vocab_sizes], -1
    )
    codes[~speech] = config.speech_empty_ids
    codes[speech.argmax(), 0, 0] = config.speech_empty_ids[0]  # one empty entry in a speech group
    return to_official(text[None], codes[None])[0]


def write_lm(dst: Path, seed: int = 0) -> None:
    from test_lm_floor_heads import randomize

    import convert_torch_weights
    from mimo_jax import model_checkpoint as checkpoint
    from mimo_jax.inference.generation_loop import GenerationConfig, generate
    from mimo_jax.inference.sampling import GREEDY, forbid_one, sample
    from mimo_jax.lm.config import small_config
    from mimo_jax.lm.layout import from_official, to_official
    from mimo_jax.lm.model import MiMoAudioLM

    config = small_config(**VARIANT)
    model = randomize(MiMoAudioLM(config, rngs=nnx.Rngs(seed)), seed)
    tmp = dst.parent / f".{dst.name}.ckpt"
    checkpoint.save(model, config.to_hf(), tmp)
    assert convert_torch_weights.main([str(tmp), str(dst), "--quiet", "--overwrite"]) == 0
    shutil.rmtree(tmp)

    rng = np.random.default_rng(seed)
    t = 12
    speech = [rng.random(t) < 0.6 for _ in range(2)]
    for s in speech:
        s[:2] = True
    ids = np.stack([_ids(config, rng, t, s) for s in speech])
    text, codes = (jnp.asarray(a) for a in from_official(ids, config.group_size))
    embeds = model.embed_inputs(text, codes)
    hidden = model.backbone(embeds, jnp.broadcast_to(jnp.arange(t), text.shape))
    local = model.local_hidden(hidden)
    position = 5
    targets = np.stack(
        [rng.integers(0, v - 1, (2, config.group_size)) for v in config.speech_vocab_sizes], -1
    )
    logits = model.patch_logits(local[:, position], jnp.asarray(targets))
    full = np.full(
        (2, config.patch_steps, config.audio_channels, max(config.speech_vocab_sizes)),
        np.nan,
        np.float32,
    )
    for ch, lg in enumerate(logits):
        d = config.delay_pattern[ch]
        full[:, d : d + config.group_size, ch, : lg.shape[-1]] = lg

    def greedy(lg, forbidden_id, key):
        return sample(lg, GREEDY, key, forbid_one(lg.shape[-1], forbidden_id))

    patch = model.decode_patch(local[:, position], greedy, jax.random.key(0))
    prompt = ids[1:2, :, : 6 * config.group_size]
    out = generate(
        model, *from_official(prompt, config.group_size), GenerationConfig(max_length=16)
    )
    np.savez(
        dst / "reference.npz",
        input_ids=ids.astype(np.int64),
        speech_mask=np.stack(speech),
        input_embeds=np.asarray(embeds, np.float32),
        hidden=np.asarray(hidden),
        text_logits=np.asarray(model.text_logits(hidden)),
        local_hidden=np.asarray(local),
        local_hidden_position=np.int64(position),
        local_targets=targets.astype(np.int64),
        local_logits=full,
        greedy_patch=np.asarray(patch, np.int64),
        prompt_ids=prompt.astype(np.int64),
        generated_ids=to_official(out.text, out.codes).astype(np.int64),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dst")
    parser.add_argument("--src", default=str(ROOT / "tests" / "fixtures"))
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    for folder in src.iterdir():
        if folder.is_dir() and folder.name != "lm":
            shutil.copytree(folder, dst / folder.name, dirs_exist_ok=True)
    write_lm(dst / "lm")
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
