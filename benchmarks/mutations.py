"""Mutation check: each deliberate bug below, applied as a text patch to a copy of the project, must
make one of its targeted tests fail. Prints a table mutation -> the tests that caught it.

    python benchmarks/mutations.py [--only NAME ...] [--baseline] [--keep]

Each mutation runs only its targeted tests (`pytest -x`, in the copy, with MIMO_FIXTURES pointing
at this project's fixture root unless set), one mutation at a time. `--baseline` first runs every
mutation's tests on the unmodified copy (they must pass). Exit status 1 if a mutation survives.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = (
    "mimo_jax",
    "data_pipelines",
    "experiments",
    "sharding",
    "tests",
    "convert_torch_weights.py",
    "pyproject.toml",
    "setup.cfg",
)


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, -k expressions)


MUTATIONS = [
    Mutation(
        "RoPE position of generated groups +2 (cached generation)",
        "mimo_jax/inference/generate.py",
        "pos = jax.lax.dynamic_slice_in_dim(s.cache_pos, cur - 1, 1, axis=1) + 1",
        "pos = jax.lax.dynamic_slice_in_dim(s.cache_pos, cur - 1, 1, axis=1) + 3",
        ("tests/test_cached_decoding.py", "-k", "generated_steps"),
    ),
    Mutation(
        "patch encoder always bidirectional",
        "mimo_jax/lm/model.py",
        "mask = attention_mask(pos, pos, causal=self.input_local_transformer.cfg.causal)",
        "mask = attention_mask(pos, pos, causal=False)",
        ("tests/test_lm_model.py", "-k", "full_attention"),
    ),
    Mutation(
        "per-position code weights of channels 0 and 1 swapped in the loss",
        "mimo_jax/train/losses.py",
        'batch["code_weights"].reshape(b * g, -1)',
        'jnp.concatenate([batch["code_weights"][..., 1::-1], batch["code_weights"][..., 2:]],'
        " -1).reshape(b * g, -1)",
        ("tests/test_train_loss_optimizer.py", "-k", "by_hand"),
    ),
    Mutation(
        "patch sampler ignored in generation (always greedy)",
        "mimo_jax/inference/generate.py",
        "return sample(logits, rows.patch_sampler, key,",
        "return sample(logits, GREEDY, key,",
        ("tests/test_generation_sampling.py", "-k", "patch_sampler"),
    ),
    Mutation(
        "min_length off by one",
        "mimo_jax/inference/generate.py",
        "forbidden = jnp.where(cur < rows.min_length[:, None], rows.stop_mask, False)",
        "forbidden = jnp.where(cur < rows.min_length[:, None] - 1, rows.stop_mask, False)",
        ("tests/test_generation_sampling.py", "-k", "min_length or max_length"),
    ),
    Mutation(
        "codebook loss weights swapped (reversed)",
        "mimo_jax/train/losses.py",
        "has = (total > 0).astype(jnp.float32) * cfg.codebook_weights[ch]",
        "has = (total > 0).astype(jnp.float32) * cfg.codebook_weights[::-1][ch]",
        ("tests/test_train_loss_optimizer.py", "-k", "by_hand"),
    ),
    Mutation(
        "delay pattern shifted by one step",
        "mimo_jax/lm/model.py",
        "return (t >= d) & (t < d + group_size)",
        "return (t >= d + 1) & (t < d + 1 + group_size)",
        (
            "tests/test_lm_model.py",
            "tests/test_lm_parity.py",
            "-k",
            "delay or teacher or greedy_patch",
        ),
    ),
    Mutation(
        "segment mask dropped (packed documents see each other)",
        "mimo_jax/nn/attention.py",
        "mask &= (q_segments[:, :, None] == k_segments[:, None, :]) & ",
        "mask &= ",
        ("tests/test_lm_packing_sharding.py", "-k", "packed"),
    ),
    Mutation(
        "interleave 5:4 instead of 5:5",
        "mimo_jax/tasks/segments.py",
        "AUDIO_CHUNK = 5  # patches per interleave chunk",
        "AUDIO_CHUNK = 4  # patches per interleave chunk",
        ("tests/test_data_sequences.py", "-k", "interleave"),
    ),
    Mutation(
        "one tensor (layer 0's up_proj) skipped in conversion",
        "mimo_jax/conversion/convert.py",
        "            info = found[p.torch_name]\n",
        "            if p.torch_name == 'model.layers.0.mlp.up_proj.weight':\n"
        "                continue\n"
        "            info = found[p.torch_name]\n",
        ("tests/test_lm_parity.py", "-k", "end_to_end or round_trip"),
    ),
    Mutation(
        "data iterator off by one document on restore",
        "data_pipelines/packing.py",
        "parent = self._pending_state if self._pending is not None else self._parent.get_state()",
        "parent = self._parent.get_state()",
        ("tests/test_data_pipeline.py", "-k", "restore"),
    ),
    Mutation(
        "wrong RVQ codebook (codebook 3 decoded with codebook 2's entries)",
        "mimo_jax/tokenizer/quantizer.py",
        "out = out + self.layers[q].lookup(codes[..., q])",
        "out = out + self.layers[2 if q == 3 else q].lookup(codes[..., q])",
        ("tests/test_tokenizer_parity.py", "-k", "decode_from_reference"),
    ),
    Mutation(
        "unstacked decoding skips the last layer",
        "mimo_jax/nn/stack.py",
        "return _loop_layers(list(layers)[start:stop], step, carry, xs, start)",
        "return _loop_layers(list(layers)[start:stop][:-1], step, carry, xs, start)",
        ("tests/test_generation.py", "-k", "unstacked"),
    ),
    Mutation(
        "MimoAudio.load keeps the scanned stacks on the CPU",
        "mimo_jax/inference/tasks.py",
        "model = unstack_for_decoding(model)",
        "pass",
        ("tests/test_tasks_cli.py", "-k", "unstacks"),
    ),
    Mutation(
        "LoRA adapter output without its alpha / r scale",
        "mimo_jax/train/lora.py",
        "return y + (self.lora(x) * self.scale).astype(y.dtype)",
        "return y + self.lora(x).astype(y.dtype)",
        ("tests/test_lora.py", "-k", "peft_formula"),
    ),
    Mutation(
        "LoRA merge without its alpha / r scale",
        "mimo_jax/train/lora.py",
        "f32(module.lora.lora_b[...])) * module.scale",
        "f32(module.lora.lora_b[...]))",
        ("tests/test_lora_peft.py", "-k", "merges_to_our"),
    ),
    Mutation(
        "PEFT adapter names without the base_model.model. prefix",
        "mimo_jax/lm/adapters.py",
        'PREFIX = "base_model.model."',
        'PREFIX = "base_model."',
        ("tests/test_lora_peft.py", "-k", "merges_to_our"),
    ),
    Mutation(
        "adapter dropout key never reaches the adapters",
        "mimo_jax/nn/transformer.py",
        'if rng is None or not getattr(layer, "takes_dropout_rng", False):',
        "if True:",
        ("tests/test_lora.py", "-k", "merge_into"),
    ),
    Mutation(
        "base weights of a LoRA group trained too",
        "mimo_jax/train/step.py",
        "return group in groups and (group not in lora_groups or isinstance(value, nnx.LoRAParam))",
        "return group in groups",
        ("tests/test_lora.py", "-k", "only_adapters"),
    ),
    Mutation(
        "RVQ codebook update without Laplace smoothing",
        "mimo_jax/tokenizer/rvq_training.py",
        "smoothed = laplace_smoothing(cluster_size, cfg.epsilon) * jnp.sum(cluster_size)",
        "smoothed = cluster_size",
        ("tests/test_rvq_training.py",),
    ),
    Mutation(
        "RVQ codebook update counts padded frames",
        "mimo_jax/tokenizer/rvq_training.py",
        "onehot = onehot * mask.reshape(-1, 1).astype(jnp.float32)",
        "onehot = onehot",
        ("tests/test_rvq_training.py",),
    ),
    Mutation(
        "RVQ k-means initialises every codebook on the input, not its residual",
        "mimo_jax/tokenizer/rvq_training.py",
        "residual = residual - state.embed[nearest_entry(residual, state.embed)]",
        "residual = residual",
        ("tests/test_rvq_training.py",),
    ),
    Mutation(
        "QLoRA dequantises its base without the scales",
        "mimo_jax/nn/quantized.py",
        "return qwix.dequantize(qwix.QArray(values, scales, qtype=QTYPES[qtype]))",
        "return values.astype(scales.dtype)",
        ("tests/test_qlora.py",),
    ),
    Mutation(
        "QLoRA leaves the untrained, unadapted layers in float",
        "mimo_jax/train/lora.py",
        "            _set_module(model, layer.path, QuantizedDense(module, q))",
        "            pass",
        ("tests/test_qlora.py",),
    ),
]


def mutated(m: Mutation, root: Path = ROOT) -> str:
    """The text of m.file under `root` with the mutation applied; its text must occur once."""
    text = (root / m.file).read_text()
    if text.count(m.old) != 1:
        raise RuntimeError(
            f"{m.name}: the patch's text occurs {text.count(m.old)} times "
            f"in {m.file} (expected once); update the mutation"
        )
    return text.replace(m.old, m.new)


def copy_project(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        ignore = shutil.ignore_patterns("__pycache__", "fixtures", "*.pyc")
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)


def run_tests(where: Path, args: tuple[str, ...], env: dict) -> tuple[bool, list[str], float]:
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = [" ".join(f) for f in re.findall(r"^(FAILED|ERROR) (\S+)", out.stdout, re.M)]
    if out.returncode not in (0, 1):  # collection or usage error: not a verdict
        raise RuntimeError(
            f"pytest {' '.join(args)} exited {out.returncode}:\n"
            f"{out.stdout[-3000:]}{out.stderr[-3000:]}"
        )
    return out.returncode == 0, failed, time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="substrings of the mutations to run")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    env = dict(
        os.environ, MIMO_FIXTURES=os.environ.get("MIMO_FIXTURES", str(ROOT / "tests" / "fixtures"))
    )
    env.pop("PYTHONPATH", None)
    rows, survived = [], 0
    for m in chosen:
        work = Path(tempfile.mkdtemp(prefix="mutation-"))
        try:
            copy_project(work)
            if args.baseline:
                ok, failed, _ = run_tests(work, m.tests, env)
                if not ok:
                    raise RuntimeError(f"{m.name}: tests fail without the mutation: {failed}")
            (work / m.file).write_text(mutated(m, work))
            ok, failed, seconds = run_tests(work, m.tests, env)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        survived += ok
        rows.append((m.name, "NOT CAUGHT" if ok else ", ".join(failed), seconds))
        print(f"{m.name}: {rows[-1][1]} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'mutation':<{width}} | caught by | time |\n|{'-' * (width + 2)}|---|---|")
    for name, caught, seconds in rows:
        print(f"| {name:<{width}} | {caught} | {seconds:.0f} s |")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
