"""Mutation check: each deliberate bug below, applied as a text patch to a copy of the project, must
make one of its targeted tests fail. Prints a table mutation -> the tests that caught it.

    python benchmarks/mutations.py [--only NAME ...] [--baseline] [--keep]

Each mutation runs only its targeted tests (`pytest -x`, in the copy, with MIMO_FIXTURES pointing
at this project's fixture root unless set), one mutation at a time. `--baseline` first runs every
mutation's tests on the unmodified copy (they must pass). Every mutation gets a verdict: the tests
that caught it, NOT CAUGHT (its tests ran and passed), or NOT RUN (no test ran, some were skipped,
or pytest could not run them: the reason is printed). Exit status 1 unless every one was caught.
"""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
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


# The sampler's two filters, in the official order and swapped.
_TOP_K = """    if rows.any_top_k:
        # The k-th largest key: the largest u with at least k keys >= u.
        kth = _largest(lambda u: jnp.sum(keys >= u, -1, keepdims=True) >= rows.top_k, len(keys))
        # top_k >= V keeps every entry.
        on_k = (rows.top_k > 0) & (rows.top_k < scores.shape[-1])
        scores = jnp.where(on_k & (keys < kth), -jnp.inf, scores)
"""
_TOP_P = """    if rows.any_top_p:
        scores = jnp.where(rows.top_p, _top_p_of_budget(scores, keys, rows.top_p_budget), scores)
"""
TOP_K_THEN_P, TOP_P_THEN_K = _TOP_K + _TOP_P, _TOP_P + _TOP_K


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
        "mimo_jax/inference/generation_loop.py",
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
        "mimo_jax/inference/generation_loop.py",
        "return sample(logits, rows.patch_sampler, key,",
        "return sample(logits, GREEDY, key,",
        ("tests/test_generation_sampling.py", "-k", "patch_sampler"),
    ),
    Mutation(
        "min_length off by one",
        "mimo_jax/inference/generation_loop.py",
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
        "mimo_jax/inference/mimo_audio.py",
        "model = unstack_for_decoding(model)",
        "pass",
        ("tests/test_tasks_cli.py", "-k", "unstacks"),
    ),
    Mutation(
        "LoRA adapter output without its alpha / r scale",
        "mimo_jax/lm/lora.py",
        "return y + (self.lora(x) * self.scale).astype(y.dtype)",
        "return y + self.lora(x).astype(y.dtype)",
        ("tests/test_lora.py", "-k", "peft_formula"),
    ),
    Mutation(
        "LoRA merge without its alpha / r scale",
        "mimo_jax/lm/lora.py",
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
        "mimo_jax/lm/lora.py",
        "            _set_module(model, layer.path, QuantizedDense(module, q))",
        "            pass",
        ("tests/test_qlora.py",),
    ),
    Mutation(
        "few-shot prompt with its examples in reverse order",
        "mimo_jax/tasks/prompts.py",
        "    for source, target in examples:\n        out += [_item(source)",
        "    for source, target in reversed(examples):\n        out += [_item(source)",
        ("tests/test_tasks_segments.py", "-k", "few_shot"),
    ),
    Mutation(
        "sampler applies top-p before top-k",
        "mimo_jax/inference/sampling.py",
        TOP_K_THEN_P,
        TOP_P_THEN_K,
        ("tests/test_generation_sampling.py", "-k", "top_k_filters_before_top_p"),
    ),
    Mutation(
        "EMA decay default 0.999 instead of the official 0.99",
        "mimo_jax/tokenizer/rvq_training.py",
        "    decay: float = 0.99\n",
        "    decay: float = 0.999\n",
        ("tests/test_rvq_training.py", "-k", "defaults"),
    ),
    Mutation(
        "discriminators' hinge loss with its generated-audio term's sign flipped",
        "mimo_jax/tokenizer/gan_losses.py",
        "_f32_mean(jax.nn.relu(1.0 + fake))",
        "_f32_mean(jax.nn.relu(1.0 - fake))",
        ("tests/test_tokenizer_stage2.py", "-k", "hinge"),
    ),
    Mutation(
        "stage 2 hands the discriminators' loss real and generated audio swapped",
        "mimo_jax/tokenizer/stage2.py",
        "[o.logits for o in real_out], [o.logits for o in fake_out]",
        "[o.logits for o in fake_out], [o.logits for o in real_out]",
        ("tests/test_tokenizer_stage2.py", "-k", "hinge"),
    ),
    Mutation(
        "patch encoder always causal (whatever input_full_attention says)",
        "mimo_jax/lm/model.py",
        "mask = attention_mask(pos, pos, causal=self.input_local_transformer.cfg.causal)",
        "mask = attention_mask(pos, pos, causal=True)",
        ("tests/test_tasks_outputs.py",),
    ),
    Mutation(
        "an unreadable shard is skipped as a bad record",
        "data_pipelines/shards.py",
        "            return self[index]\n        except RecordError as e:",
        "            return self[index]\n        except (RecordError, ShardError) as e:",
        ("tests/test_data_pipeline.py", "-k", "skipping"),
    ),
    Mutation(
        "SIGTERM only flags a run that waits for data",
        "experiments/loop_support.py",
        "            self._waiting = False\n            raise Preempted",
        "            self._waiting = False",
        ("tests/test_train_loop.py", "-k", "waiting_for_data"),
    ),
    Mutation(
        "a tokenize rerun trusts a sidecar whose shard file is gone",
        "data_pipelines/shard_job.py",
        '            open_shard(str(self.out / info["path"]), info["records"]).close()',
        "            pass",
        ("tests/test_data_tokenize.py", "-k", "rerun"),
    ),
    Mutation(
        "stage 2 trains the whole tokenizer (its encoder and codebooks too)",
        "mimo_jax/tokenizer/stage2.py",
        'tuple(path[:2]) == ("tokenizer", "decoder")',
        'path[0] == "tokenizer"',
        ("tests/test_tokenizer_train.py", "-m", "e2e", "-k", "stage2_trains"),
    ),
    Mutation(
        "a resume trusts arrays that differ from their saved checksums",
        "mimo_jax/train/train_checkpoints.py",
        "        if wrong:\n            raise DamagedCheckpoint(",
        "        if False:\n            raise DamagedCheckpoint(",
        ("tests/test_train_checkpoint_damage.py",),
    ),
    Mutation(
        "a non-finite loss is logged and training goes on",
        "experiments/loop_support.py",
        'if np.isfinite(values["loss"]) and values.get("update_skipped", 0) == 0:',
        "if True:",
        ("tests/test_train_loop.py", "-k", "non_finite"),
    ),
    Mutation(
        "SIGTERM before the training loop leaves the workdir locked",
        "experiments/train.py",
        "    finally:\n        lock.release()\n",
        "    finally:\n",
        ("tests/test_train_rundir.py", "-k", "releases_the_lock"),
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


@dataclasses.dataclass(frozen=True)
class Outcome:
    caught_by: tuple[str, ...]  # the tests that failed
    passed: int
    not_run: str  # why no verdict could be drawn from the tests ("" when they all ran)
    seconds: float

    @property
    def verdict(self) -> str:
        if self.caught_by:
            return ", ".join(self.caught_by)
        return f"NOT RUN: {self.not_run}" if self.not_run else "NOT CAUGHT"


def run_tests(where: Path, args: tuple[str, ...], env: dict) -> Outcome:
    start = time.time()
    report = where / "mutation-report.xml"
    report.unlink(missing_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        + ["--junitxml", str(report), *args],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.time() - start
    cases = ET.parse(report).getroot().iter("testcase") if report.exists() else iter(())
    failed, passed, skipped = [], 0, 0
    for case in cases:
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    why = ""
    if not failed:
        if out.returncode not in (0, 1):
            tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
            why = f"pytest exited {out.returncode} ({' / '.join(tail)})"
        elif skipped or not passed:
            why = f"{skipped} skipped, {passed} passed"
    return Outcome(tuple(failed), passed, why, seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="substrings of the mutations to run")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    env = dict(os.environ)
    env.setdefault("MIMO_FIXTURES", str(ROOT / "tests" / "fixtures"))
    # The copies share this project's compilation cache (each copy would start an empty one).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
    env.pop("PYTHONPATH", None)
    rows = []
    for m in chosen:
        work = Path(tempfile.mkdtemp(prefix="mutation-"))
        try:
            copy_project(work)
            outcome = run_tests(work, m.tests, env) if args.baseline else None
            if outcome is not None and (outcome.caught_by or outcome.not_run):
                verdict, caught = f"NOT RUN: fails unmutated ({outcome.verdict})", False
            else:
                (work / m.file).write_text(mutated(m, work))
                outcome = run_tests(work, m.tests, env)
                verdict, caught = outcome.verdict, bool(outcome.caught_by)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        rows.append((m.name, verdict, outcome.seconds, caught))
        print(f"{m.name}: {verdict} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'mutation':<{width}} | caught by | time |\n|{'-' * (width + 2)}|---|---|")
    for name, verdict, seconds, _ in rows:
        print(f"| {name:<{width}} | {verdict} | {seconds:.0f} s |")
    return 0 if all(caught for *_, caught in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
