"""Experiment configs are checked before anything is built: config arguments (bare booleans),
data sources from the command line, every invalid value named in one line, and command-line
mistakes reported in one line without a traceback (through the train command's entry point in
this process, and once in a process of its own)."""

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from data_pipelines.demo_text_tokenizer import word_level_tokenizer
from data_pipelines.pipeline import Source, parse_sources
from data_pipelines.shards import write_manifest
from experiments import config_checks, train
from experiments.cli import parse_flags
from experiments.config_checks import set_value
from experiments.configs import common
from experiments.configs import demo as demo_config
from mimo_jax.tokenizer.config import TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """What the checks look at in a demo data directory: tokenizer.json (the demo's special ids)
    and a shard manifest of the released tokenizer's first 8 codebooks."""
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    write_manifest(str(data / "shards"), [], TokenizerConfig().codebook_sizes[:8], 25.0)
    word_level_tokenizer(["hello"]).save(str(data / "tokenizer.json"))
    return data


def test_bare_boolean_argument_sets_true():
    smoke = demo_config.get_config("smoke=true").total_steps
    assert demo_config.get_config("smoke").total_steps == smoke
    assert demo_config.get_config("smoke=false").total_steps > smoke
    a = common.parse_arg("flag,n=3", flag=False, n=1)
    assert a.flag is True and a.n == 3


@pytest.mark.parametrize(
    "arg,message",
    [
        ("smok", "config argument 'smok': expected one of"),
        ("smoke=maybe", "expected true or false"),
        ("stage", "expected stage=VALUE"),
        ("channels=9", "config argument channels=9: expected 1 to 8"),
    ],
)
def test_bad_config_arguments(arg, message):
    with pytest.raises(ValueError, match=message):
        demo_config.get_config(arg)


def test_sources_parse_from_text():
    assert parse_sources("a/shards:tts:0.5, gs://b/x:asr,gs://b/y:record:2") == [
        Source("a/shards", "tts", 0.5),
        Source("gs://b/x", "asr", 1.0),
        Source("gs://b/y", "record", 2.0),
    ]
    assert parse_sources("") == []
    with pytest.raises(ValueError, match="'a/shards:speech': expected DIR:TASK"):
        parse_sources("a/shards:speech")


def config_with(data: Path, **overrides):
    config = demo_config.get_config(f"data={data},smoke")
    for key, value in overrides.items():
        set_value(config, key, value)
    return config


def test_valid_config_passes(data_dir):
    config_checks.check(config_with(data_dir))


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("total_steps", 0, "total_steps=0: expected an integer >= 1"),
        ("log_every", -1, "log_every=-1: expected an integer >= 0"),
        ("checkpoint_every", -2, "checkpoint_every=-2: expected an integer >= 0"),
        ("eval_every", -1, "eval_every=-1: expected an integer >= 0"),
        ("checkpoint.keep", 1, "checkpoint.keep=1: expected an integer >= 2"),
        ("checkpoint.keep", 0, "checkpoint.keep=0: expected an integer >= 2"),
        (
            "optimizer.learning_rates.llm",
            -1e-4,
            "optimizer.learning_rates.llm=-0.0001: expected a number >= 0",
        ),
        ("optimizer.warmup_ratio", 1.5, "optimizer.warmup_ratio=1.5: expected a number in [0, 1]"),
        ("optimizer.b2", 1.0, "optimizer.b2=1.0: expected a number in [0, 1)"),
        ("optimizer.schedule", "linear", "optimizer.schedule='linear': expected one of cosine"),
        ("model.dtype", "float16", "model.dtype='float16': expected one of float32, bfloat16"),
        ("model.remat_policy", "most", "model.remat_policy='most': expected one of"),
        (
            "model.attention",
            "flash",
            "model.attention='flash': expected one of auto, xla, splash, cudnn",
        ),
        ("mesh.rules", "pipeline", "mesh.rules='pipeline': expected one of"),
        (
            "loss.weights",
            "1-2",
            "loss.weights='1-2': expected 9 numbers >= 0 joined by '-' (text, "
            "then one per codebook of the model's 8)",
        ),
        ("loss.weights", "1-a", "loss.weights='1-a': expected 9 numbers"),
        ("data.tokenizer", "", "data.tokenizer='': expected the path"),
        ("data.sources", "", "data.sources='': expected one or more shard sources"),
        ("data.sources", "nowhere:tts", "nowhere has none"),
        ("data.sources", "x:speech", "data.sources='x:speech': expected DIR:TASK"),
        (
            "model.init_checkpoint",
            "no/such/ckpt",
            "model.init_checkpoint='no/such/ckpt': expected an existing model checkpoint",
        ),
    ],
)
def test_each_invalid_value_is_named(data_dir, key, value, expected):
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.check(config_with(data_dir, **{key: value}))
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and expected in lines[0], str(e.value)


def test_the_text_tokenizer_must_hold_the_models_special_ids(data_dir):
    config = config_with(data_dir, **{"model.hf.sosp_idx": 7})
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.check(config)
    (line,) = str(e.value).splitlines()[1:]
    assert line.endswith(
        "expected the text tokenizer of the model's special ids: sosp_idx=7 but "
        f"{data_dir / 'tokenizer.json'} has <|sosp|> = 3"
    ), line


@pytest.mark.parametrize(
    "sizes,expected",
    [
        ((1024,) * 8, "they have codebook sizes (1024, 1024, 1024, 1024, 1024, 1024, 1024, 1024)"),
        (
            (1024, 1024, 128, 128),
            "expected shards of at least the model's 8 codebooks; they have 4",
        ),
    ],
)
def test_shards_must_hold_the_codes_the_model_models(data_dir, sizes, expected):
    write_manifest(str(data_dir / "shards"), [], sizes, 25.0)
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.check(config_with(data_dir))
    assert expected in str(e.value), str(e.value)


def test_every_problem_at_once_and_before_anything_is_built(data_dir, tmp_path):
    config = config_with(data_dir, total_steps=0, log_every=-1, **{"checkpoint.keep": 0})
    with pytest.raises(config_checks.ConfigError) as e:
        train.run(config, str(tmp_path / "w"))
    assert len(str(e.value).splitlines()) == 4
    assert not (tmp_path / "w").exists()


def test_closest_key():
    config = demo_config.get_config("smoke")
    assert config_checks.closest_key(config, "data.sorces") == "data.sources"
    assert config_checks.closest_key(config, "optimizer.learning_rate.llm") == (
        "optimizer.learning_rates.llm"
    )


@pytest.fixture
def train_command(monkeypatch, capsys):
    """`python -m experiments.train ARGS` in this process, as its `cli()` runs it (from the
    project root): returns (exit status, stderr)."""
    monkeypatch.chdir(ROOT)

    def run(*args):
        argv = ["experiments.train", *args]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
        try:
            status = train.main(parse_flags(argv))
        except SystemExit as e:
            status = e.code
        finally:  # parsing a config file defines a flag per override: gone before the next parse
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
        return status, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    "args,status,message",
    [
        (
            ["--config.data.sorces=x"],
            2,
            "error: --config.data.sorces: the config has no key "
            "'data.sorces'; did you mean --config.data.sources?",
        ),
        (["--config.nope=1"], 2, "error: --config.nope: the config has no key 'nope'"),
        (["--config.total_steps=abc"], 2, "error: flag --config.total_steps=abc: invalid literal"),
        (["--config.total_steps=0"], 1, "total_steps=0: expected an integer >= 1"),
    ],
)
def test_command_line_mistakes_are_one_line(
    data_dir, tmp_path, train_command, args, status, message
):
    spec = f"experiments/configs/demo.py:smoke,data={data_dir}"
    got, err = train_command("--config", spec, "--workdir", str(tmp_path / "w"), *args)
    assert got == status and message in err, err
    assert "Traceback" not in err
    if status == 2:  # a flag's mistake: one line (a config's problems: one line each)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("experiments/configs/nope.py", "no config file 'experiments/configs/nope.py'"),
        ("experiments/configs/demo.py:smok", "config argument 'smok': expected one of"),
    ],
)
def test_bad_config_file_or_argument_is_one_line(tmp_path, train_command, spec, message):
    status, err = train_command("--config", spec, "--workdir", str(tmp_path / "w"))
    assert status == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_mistake_in_a_process_of_its_own_exits_2_with_one_line(data_dir, tmp_path):
    """The command as a user runs it: its `cli()` parses the flags with experiments.cli, and the
    process exits 2 with the one line."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config",
            f"experiments/configs/demo.py:smoke,data={data_dir}",
            "--workdir",
            str(tmp_path / "w"),
            "--config.data.sorces=x",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: --config.data.sorces: the config has no key 'data.sorces'; did you mean "
        "--config.data.sources?"
    ]
    assert not (tmp_path / "w").exists()
