"""The runner (python -m mtljax) and the built-in problems of the foundation."""

import json
import subprocess
import sys

import jax
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


def test_cli_layerwise_gramian_trains_like_the_jacobian_path(tmp_path):
    """``--gramian layerwise``: the same run as the Jacobian path, to float32 rounding (the
    Gramian is exact either way; only the order of the sums differs)."""
    args = ["train", "--problem", "gradnorm_toy", "--method", "upgrad", "--steps", "5"]
    args += [f"--problem-arg={k}={v}" for k, v in SMALL_TOY.items()] + ["--no-progress"]
    out = {}
    for path in ("jacobian", "layerwise"):
        runner.main([*args, "--gramian", path, "--out", str(tmp_path / f"{path}.json")])
        with open(tmp_path / f"{path}.json") as f:
            out[path] = json.load(f)["final"]
    for key in ("train_losses", "weights"):
        a, b = out["jacobian"][key], out["layerwise"][key]
        assert np.allclose(list(a.values()), list(b.values()), rtol=1e-4, atol=1e-6), key


def test_solver_report_and_the_unconverged_flag():
    r = runner.run_training("toy2d", "mgda", steps=20, unconverged="raise", progress=False)
    assert r["solver"] == {
        "unconverged_steps": 0,
        "max_iterations": r["solver"]["max_iterations"],
        "unconverged": "raise",
    }
    assert r["solver"]["max_iterations"] >= 1
    assert "converge" not in runner.summary_table(r)
    failed = dict(r, solver=dict(r["solver"], unconverged_steps=3, unconverged="skip"))
    line = runner.summary_table(failed).splitlines()[-1]
    assert line.startswith("3 steps' solves did not converge (skipped;") and "raise" in line
    ew = runner.run_training("toy2d", "ew", steps=3, progress=False)
    assert "solver" not in ew  # no solver, no report


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


# ----------------------------------------------------------------------------------------------
# Output paths are checked before any work; flags are refused rather than ignored

TRAIN = ["train", "--problem", "gradnorm_toy", "--method", "ew", "--no-progress"]


def _read_only_folder(tmp_path):
    """A folder this process cannot write in (root ignores permission bits: /sys then)."""
    import os

    from mtljax._src.paths import _probe

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if _probe(str(folder)) is not None:
        return str(folder)
    if os.path.isdir("/sys") and _probe("/sys") is not None:
        return "/sys"
    pytest.skip("no read-only folder available")


@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the output paths were checked")

    monkeypatch.setattr(runner, "run_training", fail)
    monkeypatch.setattr(runner, "run_suite", fail)


@pytest.mark.parametrize(
    "case",
    [
        "out_missing_folder",
        "out_is_a_folder",
        "out_read_only",
        "out_under_a_file",
        "ckpt_dir_is_a_file",
        "ckpt_dir_read_only",
        "plots_under_a_file",
    ],
)
def test_output_paths_are_checked_before_any_work(case, tmp_path, no_work, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    ro = _read_only_folder(tmp_path) if "read_only" in case else None
    args, message = {
        "out_missing_folder": (
            [*TRAIN, "--out", str(tmp_path / "nope" / "r.json")],
            f"--out {tmp_path}/nope/r.json: the folder {tmp_path}/nope does not exist",
        ),
        "out_is_a_folder": (
            [*TRAIN, "--out", str(tmp_path)],
            f"--out {tmp_path}: is a folder; give a file name",
        ),
        "out_read_only": (
            [*TRAIN, "--out", f"{ro}/r.json"],
            f"--out {ro}/r.json: cannot create a file in {ro} (",
        ),
        "out_under_a_file": (
            [*TRAIN, "--out", f"{a_file}/r.json"],
            f"--out {a_file}/r.json: {a_file} is not a folder",
        ),
        "ckpt_dir_is_a_file": (
            [*TRAIN, "--ckpt-dir", str(a_file)],
            f"--ckpt-dir {a_file}: is a file, not a folder",
        ),
        "ckpt_dir_read_only": (
            [*TRAIN, "--ckpt-dir", f"{ro}/ck"],
            f"--ckpt-dir {ro}/ck: cannot create it in {ro} (",
        ),
        "plots_under_a_file": (
            ["bench", "--suite", "quick", "--plots", f"{a_file}/plots"],
            f"--plots {a_file}/plots: cannot create it, {a_file} is a file",
        ),
    }[case]
    with pytest.raises(SystemExit) as e:
        runner.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_bad_out_fails_in_seconds_not_after_training(tmp_path):
    import time

    from tests.helpers import subprocess_env

    out = tmp_path / "missing" / "r.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mtljax", *TRAIN, "--steps", "100000", "--out", str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"error: --out {out}: the folder {out.parent} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60  # 100000 steps would take minutes


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--resume"], "--resume need(s) --ckpt-dir"),
        (["--overwrite"], "--overwrite need(s) --ckpt-dir"),
        (["--save-every", "10", "--keep", "2"], "--save-every, --keep need(s) --ckpt-dir"),
        (["--ckpt-dir", "x", "--resume", "--overwrite"], "--resume and --overwrite exclude"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
    ],
)
def test_flags_are_refused_not_ignored(extra, message, no_work, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main([*TRAIN, *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_problem_sizes_are_named(capsys):
    with pytest.raises(SystemExit) as e:
        runner.main([*TRAIN, "--steps", "2", "--problem-arg", "batch_size=-4"])
    assert e.value.code == 2
    assert "--problem-arg batch_size must be a positive integer, got -4" in capsys.readouterr().err


def test_bench_seed_range_is_checked(no_work, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["bench", "--seed", "4294967295", "--seeds", "2"])
    assert e.value.code == 2
    assert "--seed + --seeds - 1 must be an integer from 0 to 4294967295" in (
        capsys.readouterr().err
    )


def test_a_second_cli_writer_is_refused_naming_the_holder(tmp_path):
    import signal
    import time

    from tests.helpers import subprocess_env
    from tests.test_checkpoint import _lock_holder

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    holder = _lock_holder(ckpt)  # another process writing this folder
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "mtljax", *TRAIN, "--steps", "100000"]
            + ["--ckpt-dir", str(ckpt), "--resume"],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - t0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: {ckpt} is being written by process {holder.pid} on host" in proc.stderr
    assert elapsed < 60


def test_a_users_folder_is_not_called_a_checkpoint(tmp_path, capsys):
    (tmp_path / "2024").mkdir()
    (tmp_path / "2024" / "data.csv").write_text("1,2")
    with pytest.raises(SystemExit) as e:
        runner.main([*TRAIN, "--steps", "2", "--ckpt-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "holds 1 entries named like checkpoints that mtljax did not write (2024)" in err
    assert "already holds checkpoints" not in err
    assert (tmp_path / "2024" / "data.csv").read_text() == "1,2"


def test_json_output_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "r.json"
    runner.write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        runner.write_json(str(path), {"a": object()})  # fails halfway through
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_the_gramian_path_defaults_to_auto_and_a_resume_keeps_the_checkpoints_path(tmp_path):
    """``gramian=None`` (the CLI's default): ``"auto"`` for a new run (recorded in its
    checkpoints), and on ``--resume`` the path the checkpoints were written with, so that a
    run saved on the Jacobian path (or before the option existed: no record) continues bit for
    bit although ``"auto"`` would take the layer-wise Gramian on this problem."""
    from mtljax._src import engine

    args = {"num_train": 2000, "num_test": 500}  # T = 10: the layer-wise Gramian pays here
    problem = mtl.problems.get("gradnorm_toy", seed=0, **args)
    batch = problem.sample(jax.random.key(0))
    fns, ctx = engine._enter(problem.model, None, None)
    f = lambda s, sp: fns.losses(s, sp, batch, ctx)  # noqa: E731
    assert engine.layerwise_pays(f, problem.params.shared, problem.params.specific)

    def train(steps, **kw):
        return runner.run_training(
            "gradnorm_toy", "upgrad", steps=steps, problem_args=args, progress=False, **kw
        )

    def saved_config(folder):
        with mtl.Checkpointer(folder, mode="read") as ckpt:
            return ckpt.record()["config"]

    reference = train(6, gramian="jacobian")
    auto = train(6)
    assert auto["params_sha256"] != reference["params_sha256"]  # another path, other rounding
    jac_dir = str(tmp_path / "jacobian")
    train(4, gramian="jacobian", ckpt_dir=jac_dir, save_every=2)
    assert "gramian" not in saved_config(jac_dir)  # as written before the option existed
    resumed = train(6, ckpt_dir=jac_dir, save_every=2, resume=True)
    assert resumed["params_sha256"] == reference["params_sha256"]
    auto_dir = str(tmp_path / "auto")
    train(4, ckpt_dir=auto_dir, save_every=2)
    assert saved_config(auto_dir)["gramian"] == "auto"
    resumed = train(6, ckpt_dir=auto_dir, save_every=2, resume=True)
    assert resumed["params_sha256"] == auto["params_sha256"]
