"""The runner (python -m mtljax) and the built-in problems of the foundation."""

import json
import subprocess
import sys

import numpy as np
import pytest

import mtljax as mtl
from mtljax._src import runner

SMALL_TOY = {"num_tasks": 4, "sigmas": (1.0, 2.0, 4.0, 8.0), "num_train": 2000, "num_test": 500}


def test_train_result_and_determinism():
    a = runner.run_training(
        "gradnorm_toy", "gradnorm", steps=30, problem_args=SMALL_TOY, progress=False
    )
    b = runner.run_training(
        "gradnorm_toy", "gradnorm", steps=30, problem_args=SMALL_TOY, progress=False
    )
    c = runner.run_training(
        "gradnorm_toy", "gradnorm", steps=30, seed=1, problem_args=SMALL_TOY, progress=False
    )
    assert a["params_sha256"] == b["params_sha256"] != c["params_sha256"]
    assert a["task_names"] == ["task0", "task1", "task2", "task3"]
    final = a["final"]
    assert set(final) >= {"train_losses", "weights", "grad_norms", "cosines", "eval"}
    assert abs(sum(final["weights"].values()) - 4.0) < 1e-4
    assert a["median_step_ms"] > 0
    json.dumps(a)  # serialisable
    table = runner.summary_table(a)
    assert "task3" in table and "weights" in table
    assert a["skipped_steps"] == 0 and "skipped" not in table
    line = runner.summary_table(dict(a, skipped_steps=30)).splitlines()[-1]
    assert line.startswith("30 of 30 steps were skipped") and "--nonfinite raise" in line


def test_gradnorm_weights_ordered_inversely_to_sigma():
    r = runner.run_training(
        "gradnorm_toy", "gradnorm", steps=800, problem_args=SMALL_TOY, progress=False
    )
    w = np.array(list(r["final"]["weights"].values()))
    assert np.all(np.diff(w) < 0), w


def test_cli_train_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtljax",
            "train",
            "--problem",
            "uw_noise",
            "--method",
            "uw",
            "--method-arg",
            "learning_rate=0.01",
            "--steps",
            "20",
            "--seed",
            "3",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["method_args"] == {"learning_rate": 0.01} and result["seed"] == 3
    assert "log_vars" in result["final"]["method_state"]
    assert "uw_noise / uw" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--problem", "nope", "--method", "ew"], "valid problems: .*uw_noise"),
        (["train", "--problem", "uw_noise", "--method", "nope"], "valid methods: .*gradnorm"),
        (
            ["train", "--problem", "uw_noise", "--method", "gradnorm", "--method-arg", "alpha=-2"],
            "alpha",
        ),
        (["bench", "--suite", "huge"], "valid suites"),
    ],
)
def test_cli_errors_name_the_problem(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(args)
    assert e.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_help_lists_choices(capsys):
    with pytest.raises(SystemExit):
        runner.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--problem" in out and "gradnorm_toy" in out and "--method-arg" in out


def test_problem_registry():
    assert {"gradnorm_toy", "uw_noise"} <= set(mtl.problems.names())
    with pytest.raises(ValueError, match="valid problems"):
        mtl.problems.get("mnist")
    with pytest.raises(ValueError, match="sigmas"):
        mtl.problems.get("gradnorm_toy", num_tasks=3, sigmas=(1.0, 2.0))
