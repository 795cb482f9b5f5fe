"""experiments.aot for a TPU topology: the devices libtpu describes, the train steps of a tiny LM
and a tiny tokenizer compiled by libtpu's compiler for v5p:2x2x1, its per-device memory against a
chip's HBM, the --max-batch search, and the refusal of a topology it does not know.

libtpu comes with the test extra (jax[tpu]): without it these tests fail, they do not skip. JAX's
persistent cache cannot hold an executable compiled without a TPU, so the two step compiles run
on every run (about 20 and 30 s on two busy cores)."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import aot_lib
from experiments.configs import demo, tokenizer_stage1
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.train import flops
from sharding.mesh import mesh_and_rules

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PARTS = ("arguments", "outputs", "temporaries", "aliased", "code")


def _bytes(out: str, name: str) -> int:
    return int(re.search(rf"^  {name} .*\((\d+) bytes\)$", out, re.M).group(1))


def _check_memory(out: str, hbm_gib: float) -> dict[str, int]:
    """The memory section's parts, checked: the total is their sum, the HBM line adds the code,
    and the verdict agrees with the chip's HBM."""
    parts = {name: _bytes(out, name) for name in PARTS}
    assert all(parts[p] > 0 for p in ("arguments", "outputs", "temporaries", "code")), parts
    total = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
    shown = float(re.search(r"^per-device memory: (\d+\.\d+) GiB$", out, re.M).group(1))
    assert shown == pytest.approx(total / GIB, abs=6e-4)
    hbm = re.search(
        r"^HBM per device: \S+ GiB \((\d+) bytes, with the code\) of (\S+) GiB: (.*)$", out, re.M
    )
    assert hbm and int(hbm.group(1)) == total + parts["code"], out
    assert float(hbm.group(2)) == hbm_gib
    assert hbm.group(3) == ("fits" if int(hbm.group(1)) <= hbm_gib * GIB else "does not fit")
    return parts


@pytest.mark.parametrize(
    "name, devices, per_chip",
    [
        ("v5p:2x2x1", 4, 1),
        ("v5p:4x4x4", 64, 1),
        ("v5e:8x8", 64, 1),
        ("v6e:8x8", 64, 1),
        ("v4:4x4x4", 128, 2),
    ],
)
def test_the_device_count_is_libtpus(name, devices, per_chip):
    target = aot_lib.tpu_target(name)
    assert len(target.devices) == devices and target.devices_per_chip == per_chip
    assert {d.platform for d in target.devices} == {"tpu"}
    assert len(aot_lib.tpu_target(name, slices=2).devices) == 2 * devices


def test_the_environment_is_left_as_it_was(monkeypatch):
    # What libtpu's loading sets (TPU_WORKER_HOSTNAMES among it) made a later in-process
    # experiments.train, and the processes it starts, take this machine for a TPU pod's worker.
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    before = dict(os.environ)
    aot_lib.tpu_target("v5p:2x2x1")
    assert dict(os.environ) == before


def test_a_chip_s_hbm_is_split_among_its_devices():
    assert aot_lib.tpu_target("v5p:2x2x1").hbm_per_device == 95 * GIB
    assert aot_lib.tpu_target("v5e:2x2").hbm_per_device == 16 * GIB
    assert aot_lib.tpu_target("v6e:2x2").hbm_per_device == 32 * GIB
    assert aot_lib.tpu_target("v4:2x2x1").hbm_per_device == 16 * GIB  # two TensorCores a chip


def test_topologies_libtpu_or_the_hbm_table_do_not_know_are_refused():
    accepted = "v4, v5e, v5p, v6e"
    with pytest.raises(ValueError, match=r"--topology v9:2x2x1: libtpu refuses it \(Invalid TPU"):
        aot_lib.tpu_target("v9:2x2x1")
    with pytest.raises(ValueError, match=rf"no HBM size known for TPU v3 chips; .*{accepted}"):
        aot_lib.tpu_target("v3:2x2")
    with pytest.raises(ValueError, match=r"v5p:3x3x3: libtpu refuses it \(Topology layout"):
        aot_lib.tpu_target("v5p:3x3x3")
    with pytest.raises(ValueError, match=r"--num-slices 0: expected at least 1"):
        aot_lib.tpu_target("v5p:2x2x1", slices=0)


def test_the_command_names_an_unknown_topology_and_the_accepted_ones_in_one_line():
    """While this process holds libtpu too: a compile without a TPU does not need libtpu's
    one-process-per-machine lock."""
    aot_lib.tpu_target("v5p:2x2x1")
    cmd = [sys.executable, "-m", "experiments.aot", "--config", "experiments/configs/demo.py"]
    done = subprocess.run(
        [*cmd, "--topology", "v9:2x2x1"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: --topology v9:2x2x1: libtpu refuses it (Invalid TPU external name: TPU v9); "
        "expected GENERATION:SHAPE with GENERATION one of v4, v5e, v5p, v6e "
        "(e.g. v5p:4x4x4, v5e:8x8, v6e:8x8, v4:4x4x4)"
    ]


def test_a_tiny_lm_step_compiles_for_v5p(capsys):
    target = aot_lib.tpu_target("v5p:2x2x1")
    config = demo.get_config("smoke=True")
    assert aot_lib.run(config, target, "fsdp=4", "fsdp", batch_per_device=2) == 0
    out = capsys.readouterr().out
    assert out.startswith("target: v5p:2x2x1 x 1 slice(s): 4 TPU v5 devices (one per chip)")
    assert "on 4 devices, rules fsdp" in out and "global batch 8 rows x 128 groups" in out
    parts = _check_memory(out, 95)
    assert "HBM per device" in out.splitlines()[-1]
    # The parameters and both Adam moments (f32), split over the 4 chips rather than replicated.
    params = int(
        re.search(r"^trainable parameters \S+ of (\S+) ", out, re.M).group(1).replace(",", "")
    )
    assert parts["arguments"] < 3 * 4 * params / 2
    # The model's FLOPs per device per step (the train loop's MFU formula); the compiler's, with
    # a loop's body counted once, only positive.
    analytic = float(re.search(r"^  analytic train_flops_per_group\s+(\S+)$", out, re.M).group(1))
    lm = MiMoAudioConfig.from_hf(dict(config.model.hf))
    per_step = flops.train_flops_per_group(lm, 128, True) * 8 * 128
    assert analytic == pytest.approx(per_step / 4, rel=1e-4)
    assert (
        float(re.search(r"^  compiled \(XLA cost analysis\)\s+(\S+)  \(", out, re.M).group(1)) > 0
    )


def test_a_tiny_tokenizer_step_compiles_for_v5p(capsys):
    """Stage 1 as experiments.train_tokenizer runs it, the demo's tokenizer cut to one layer per
    stack and two quantizers (libtpu's compile time grows with each)."""
    config = tokenizer_stage1.get_config("demo")
    config.model.tokenizer.update(
        num_quantizers=2,
        codebook_size=[64, 64],
        encoder_layers=1,
        encoder_skip_layer_id=0,
        decoder_layers=1,
        vocoder_num_layers=1,
    )
    config.a2t.layers = 1
    config.data.crop_seconds, config.data.max_text_tokens = 0.4, 8
    assert aot_lib.run(config, aot_lib.tpu_target("v5p:2x2x1"), text_vocab=64) == 0
    out = capsys.readouterr().out
    assert "tokenizer_stage1 on 4 devices (state sharded by mesh.rules fsdp)" in out
    assert "1 crop(s) of 0.4 s per device (global batch 4)" in out
    _check_memory(out, 95)
    assert (
        float(re.search(r"^  compiled \(XLA cost analysis\)\s+(\S+)  \(", out, re.M).group(1)) > 0
    )


def test_libtpu_running_out_of_hbm_is_a_step_that_does_not_fit():
    """A program whose buffers exceed a v5e chip's 16 GiB: libtpu refuses it while compiling."""
    target = aot_lib.tpu_target("v5e:2x2")
    mesh = Mesh(np.asarray(target.devices), ("d",))
    # 20 GiB of float32 on each of the 4 chips.
    x = jax.ShapeDtypeStruct(
        (4 * 5 * GIB,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("d"))
    )
    with pytest.raises(aot_lib.DoesNotFit, match=r"^libtpu: Ran out of memory on HBM"):
        aot_lib.compile_for(target, jax.jit(lambda a: a * 2).lower(x))


CACHE_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from experiments import aot_lib

def probe(a):
    return a * 2

for target in (aot_lib.cpu_target(), aot_lib.tpu_target("v5p:2x2x1")):
    sharding = NamedSharding(Mesh(np.asarray(target.devices[:1]), ("d",)), PartitionSpec())
    x = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)
    aot_lib.compile_for(target, jax.jit(probe).lower(x))
"""


def test_no_tpu_executable_goes_to_the_persistent_cache(tmp_path):
    """libtpu cannot load back what it compiled without a TPU: a TPU compile writes no entry to
    JAX's persistent cache, where the CPU compile of the same program writes one. (A process of
    its own: the cache directory is fixed when a process first compiles.)"""
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PLATFORMS="cpu",
    )
    done = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert [p.name.split("-")[0] for p in tmp_path.glob("*-cache")] == ["jit_probe"]


def test_the_search_doubles_then_bisects():
    for largest in (0, 1, 2, 5, 12, 64, 100, 1024):
        calls = []

        def fits_at(n, largest=largest):
            calls.append(n)
            return n <= largest

        assert aot_lib.largest_fitting(fits_at, limit=1024) == largest
        assert len(calls) == len(set(calls)) <= 2 * 11, calls
    calls.clear()
    assert aot_lib.largest_fitting(fits_at, limit=6) == 6 and calls == [1, 2, 4, 6]
    calls.clear()
    assert aot_lib.largest_fitting(lambda n: calls.append(n) or n <= 12) == 12
    assert calls == [1, 2, 4, 8, 16, 12, 14, 13]


def _fake_compile(need_per_row: int, refused_from: int):
    """compile_train_step as if each row took `need_per_row` bytes of temporaries and libtpu ran
    out of HBM from `refused_from` rows per device."""
    lm = MiMoAudioConfig.from_hf(dict(demo.get_config("smoke=True").model.hf))

    def compile_train_step(config, target):
        rows = config.data.batch_size // len(target.devices)
        if rows >= refused_from:
            raise aot_lib.DoesNotFit("libtpu: Ran out of memory on HBM")
        memory = types.SimpleNamespace(
            argument_size_in_bytes=GIB,
            output_size_in_bytes=GIB,
            temp_size_in_bytes=rows * need_per_row,
            alias_size_in_bytes=GIB,
            generated_code_size_in_bytes=5 * GIB,
        )
        return aot_lib.Compiled(lm, True, memory, 1e9, len(target.devices), 1.0, 10, 10)

    return compile_train_step


def test_max_batch_reports_the_largest_batch_that_fits(monkeypatch, capsys):
    """On a v5p chip (95 GiB): 1 GiB of state, 5 GiB of code and 10 GiB a row, so 8 rows fit (9
    would without the code); libtpu refuses 16."""
    monkeypatch.setattr(aot_lib, "compile_train_step", _fake_compile(10 * GIB, 16))
    target = aot_lib.tpu_target("v5p:2x2x1")
    config = demo.get_config("smoke=True")
    assert aot_lib.run(config, target, "fsdp=4", "fsdp", max_batch=True) == 0
    lines = capsys.readouterr().out.splitlines()
    tried = [line for line in lines if line.startswith("batch-per-device ")]
    assert [t.split(":")[0].split()[-1] for t in tried] == [
        "1",
        "2",
        "4",
        "8",
        "16",
        "12",
        "10",
        "9",
    ]
    assert tried[3].startswith("batch-per-device 8: fits, 86.000 GiB HBM per device")
    assert "does not fit (libtpu: Ran out of memory on HBM)" in tried[4]
    assert tried[5].startswith("batch-per-device 12: does not fit, 126.000 GiB HBM per device")
    assert "global batch 32 rows" in "\n".join(lines)  # the report of the 8 rows
    assert (
        lines[-1]
        == "--max-batch: 8 compiles; the largest batch per device that fits: 8, 9 does not"
    )
    # One batch that does not fit: its report says so, and the command fails.
    assert aot_lib.run(config, target, "fsdp=4", "fsdp", batch_per_device=9) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("of 95 GiB: does not fit")
    assert aot_lib.run(config, target, "fsdp=4", "fsdp", batch_per_device=16) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "batch-per-device 16: does not fit (libtpu: Ran out of memory on HBM)"
    )


def test_max_batch_needs_a_tpu():
    with pytest.raises(ValueError, match=r"--max-batch needs --topology"):
        aot_lib.run(demo.get_config("smoke=True"), aot_lib.cpu_target(), max_batch=True)


@pytest.mark.parametrize("get_config", [demo.get_config, tokenizer_stage1.get_config])
def test_slices_are_data_parallel(get_config):
    """Two slices: the mesh (the LM's and the tokenizer's) puts them on the data axis (the rows
    double)."""
    target = aot_lib.tpu_target("v5p:2x2x1", slices=2)
    arg = "smoke=True" if get_config is demo.get_config else "demo"
    config = aot_lib.configure(get_config(arg), aot_lib.parse_mesh("fsdp=-1"), "fsdp", 1, target)
    mesh, _ = mesh_and_rules(config, target.devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert config.data.batch_size == 8
    assert [[d.slice_index for d in row] for row in mesh.devices[:, :, 0, 0]] == [[0] * 4, [1] * 4]


def test_a_cpu_target_is_unchanged_by_a_tpu_one():
    """The CPU compile keeps its options (no loop-invariant code motion); libtpu gets none."""
    assert aot_lib.cpu_target().compiler_options == aot_lib.CPU_COMPILER_OPTIONS
    assert aot_lib.tpu_target("v5p:2x2x1").compiler_options is None
