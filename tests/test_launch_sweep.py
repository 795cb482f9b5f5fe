"""experiments.sweep: run names, the exact dry-run commands, validation before any run, local
runs."""

import textwrap

import pytest

from experiments import sweep

DEMO = "experiments/configs/demo.py:smoke=True"


def config_file(tmp_path, points: str):
    path = tmp_path / "exp.py"
    path.write_text(
        textwrap.dedent(f"""
        from experiments.configs import demo
        def get_config(arg=None):
            return demo.get_config(arg)
        def sweep(arg=None):
            return {points}
        """)
    )
    return str(path)


def test_dry_run_prints_one_exact_command_per_point(capsys):
    rc = sweep.main(["--config", DEMO, "--workdir", "/runs/demo", "--dry-run", "--python", "py"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        f"py -m experiments.train --config={DEMO} --workdir=/runs/demo/llm=0.001 "
        "--config.optimizer.learning_rates.llm=0.001",
        f"py -m experiments.train --config={DEMO} --workdir=/runs/demo/llm=0.003 "
        "--config.optimizer.learning_rates.llm=0.003",
    ]


def test_names_are_short_unique_and_filesystem_safe():
    points = [
        {
            "optimizer.learning_rates.llm": 1e-4,
            "data.tokenizer": "a/b c.json",
            "model.remat_policy": "full",
        },
        {"optimizer.learning_rates.llm": 1e-4, "model.hf.num_hidden_layers": 2},
    ]
    short = sweep._short_keys(sorted({k for p in points for k in p}))
    assert [sweep.run_name(p, short) for p in points] == [
        "llm=0.0001,tokenizer=a_b_c.json,remat_policy=full",
        "llm=0.0001,num_hidden_layers=2",
    ]
    clash = sweep._short_keys(["optimizer.learning_rates.llm", "model.llm"])
    assert clash == {"optimizer.learning_rates.llm": "learning_rates.llm", "model.llm": "model.llm"}
    assert sweep.run_name({}, {}) == "base"


@pytest.mark.parametrize(
    "points, message",
    [
        (
            '[{"optimizer.learning_rates.llm": 1e-3}, {"optimizer.lr": 1e-3}]',
            "sweep override 'optimizer.lr': optimizer has no key 'lr'",
        ),
        ('[{"total_steps": "ten"}]', "sweep override 'total_steps'='ten': expected type int"),
        ('[{"model.remat_policy": True}]', "'model.remat_policy'=True: expected type str"),
        ('[{"mesh.ici": {"data": 2}}]', "override the leaves of a sub-config"),
        ('[{"seed": 1}, {"seed": 1}]', "sweep points with the same overrides: ['seed=1']"),
    ],
)
def test_bad_points_stop_the_sweep_before_any_run(tmp_path, capsys, points, message):
    marker = tmp_path / "ran"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    rc = sweep.main(
        [
            "--config",
            config_file(tmp_path, points),
            "--workdir",
            str(tmp_path / "r"),
            "--python",
            str(fake),
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not marker.exists()


def test_local_runs_every_point_in_order_and_reports_failures(tmp_path, capsys):
    log = tmp_path / "log"
    fake = tmp_path / "fake_python"
    # Records its arguments; fails for the second point.
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *seed=2*) exit 3;; esac\n')
    fake.chmod(0o755)
    cfg = config_file(tmp_path, '[{"seed": 1}, {"seed": 2}, {"seed": 3}]')
    rc = sweep.main(["--config", cfg, "--workdir", str(tmp_path / "r"), "--python", str(fake)])
    assert rc == 1
    lines = log.read_text().splitlines()
    assert [line.split()[-1] for line in lines] == [f"--config.seed={i}" for i in (1, 2, 3)]
    assert lines[0].split()[3] == f"--workdir={tmp_path}/r/seed=1"
    assert "failed (3)" in capsys.readouterr().err


def test_slurm_launcher_gets_one_job_per_point(capsys):
    rc = sweep.main(
        [
            "--config",
            DEMO,
            "--workdir",
            "/w",
            "--dry-run",
            "--launcher",
            "slurm",
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 2
    assert "sbatch mimo-jax-llm=0.001.sbatch\n" in out and "--workdir=/w/llm=0.003" in out


def test_missing_config_file_is_named(capsys):
    assert sweep.main(["--config", "nope.py", "--workdir", "/w", "--dry-run"]) == 2
    assert "no config file 'nope.py'" in capsys.readouterr().err
