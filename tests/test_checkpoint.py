"""Checkpoints: exact resume after a real SIGKILL, refusal of other runs' checkpoints, retention."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import mtljax as mtl
from tests.helpers import max_abs_diff, subprocess_env, tiny_batch, tiny_model

# `--dist loadgroup` keeps this module on one worker: module fixtures.
pytestmark = pytest.mark.xdist_group("checkpoint")

# A stateful method (GradNorm: learned weights, initial losses, its own Adam state, a step
# counter) on a small GradNorm toy.
PROBLEM = "gradnorm_toy"
METHOD = "gradnorm"
PROBLEM_ARGS = {"num_tasks": 3, "sigmas": (1.0, 2.0, 4.0), "num_train": 1000, "num_test": 200}
STEPS = 240
SAVE_EVERY = 20


def _cli(ckpt_dir, *extra):
    args = [sys.executable, "-m", "mtljax", "train", "--problem", PROBLEM, "--method", METHOD]
    for k, v in PROBLEM_ARGS.items():
        args += ["--problem-arg", f"{k}={v!r}".replace(" ", "")]
    args += ["--steps", str(STEPS), "--seed", "5", "--no-progress"]
    args += ["--ckpt-dir", str(ckpt_dir), "--save-every", str(SAVE_EVERY), "--keep", "2"]
    return args + list(extra)


def _resume(ckpt, out) -> subprocess.CompletedProcess:
    """The CLI run resumed from ``ckpt`` to the end, writing ``out``; it must succeed."""
    proc = subprocess.run(
        [*_cli(ckpt, "--resume"), "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


_CACHE: list[str] = []  # a compilation cache shared by the subprocesses of this module


def _env():
    env = subprocess_env()
    if _CACHE:
        env["JAX_COMPILATION_CACHE_DIR"] = _CACHE[0]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    return env


def _complete_steps(d) -> list[int]:
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _partial(d) -> list[str]:
    if not os.path.isdir(d):
        return []
    return [n for n in os.listdir(d) if "tmp" in n]


def _run_and_kill(ckpt_dir, *, when, extra=(), timeout=240.0):
    """Starts a training subprocess and SIGKILLs it when ``when()`` holds; returns its code."""
    proc = subprocess.Popen(
        _cli(ckpt_dir, *extra),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, proc.pid


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    _CACHE[:] = [str(tmp_path_factory.mktemp("jax_cache"))]
    ckpt = tmp_path_factory.mktemp("ckpt") / "run"
    out = tmp_path_factory.mktemp("out") / "resumed.json"

    # 1. killed after its first checkpoint is complete, while it writes a later one (its
    #    temporary directory exists); if the kill came a moment too late (the save had just
    #    finished), resumed and killed again the same way
    def saving_after_first():
        done = _complete_steps(ckpt)
        return bool(done) and any(
            n.split(".")[0].isdigit() and int(n.split(".")[0]) > done[-1] for n in _partial(ckpt)
        )

    kills = []
    for attempt in range(3):
        extra = ("--resume",) if attempt else ()
        rc, err, pid = _run_and_kill(ckpt, when=saving_after_first, extra=extra)
        lock = (ckpt / "mtljax.lock").read_text() if (ckpt / "mtljax.lock").exists() else ""
        kills.append((rc, err, _complete_steps(ckpt), _partial(ckpt), pid, lock))
        if kills[-1][3] or rc != -signal.SIGKILL:
            break
    rc, err, complete, partial, killed_pid, lock_at_kill = kills[-1]
    # the uninterrupted reference (same seed, no checkpoints) runs alongside the resumed run
    ref_out = tmp_path_factory.mktemp("ref") / "reference.json"
    args = _cli(ckpt)
    args = args[: args.index("--ckpt-dir")] + ["--out", str(ref_out)]
    reference = subprocess.Popen(
        args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # 2. resumed to the end
    _resume(ckpt, out)
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]
    return {
        "reference": json.loads(ref_out.read_text()),
        "ckpt": ckpt,
        "rc": rc,
        "err": err,
        "complete_at_kill": complete,
        "partial_at_kill": partial,
        "result": json.loads(out.read_text()),
        "final_steps": _complete_steps(ckpt),
        "killed_pid": killed_pid,
        "lock_at_kill": lock_at_kill,
    }


def test_sigkill_during_a_save_then_resume_is_bit_identical(killed_and_resumed):
    r = killed_and_resumed
    assert r["rc"] == -signal.SIGKILL, r["err"]
    assert r["complete_at_kill"] and r["complete_at_kill"][-1] < STEPS
    # the kill hit a save in progress: its temporary directory was left behind
    assert r["partial_at_kill"], "the SIGKILL did not land during a save"
    res = r["result"]
    assert 0 < res["resumed_from"] < STEPS
    reference = r["reference"]
    assert reference["resumed_from"] == 0
    assert res["params_sha256"] == reference["params_sha256"]
    assert res["final"]["weights"] == reference["final"]["weights"]
    assert res["history"]["step"] == reference["history"]["step"]
    assert res["history"]["losses"] == reference["history"]["losses"]


def test_a_killed_runs_lock_does_not_block_its_resume(killed_and_resumed):
    r = killed_and_resumed
    # the killed process still held the folder's lock: its record names it, and the
    # resume (which succeeded above) was not blocked by it
    assert json.loads(r["lock_at_kill"])["pid"] == r["killed_pid"]
    assert r["result"]["resumed_from"] > 0


def test_cli_resumes_from_the_newest_intact_checkpoint(killed_and_resumed, tmp_path):
    r = killed_and_resumed
    ckpt = tmp_path / "run"
    shutil.copytree(r["ckpt"], ckpt)
    steps = _complete_steps(ckpt)
    latest, previous = steps[-1], steps[-2]
    _flip(_array_file(ckpt / str(latest)))
    out = tmp_path / "resumed.json"
    proc = _resume(ckpt, out)
    assert re.search(
        rf"warning: skipped the damaged checkpoint of step {latest} in {ckpt} \(its arrays "
        rf"cannot be restored .*DATA_LOSS.*\); moved it to {latest}\.damaged",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert f"resuming from step {previous}, the newest intact checkpoint" in proc.stderr
    result = json.loads(out.read_text())
    assert result["resumed_from"] == previous
    # bit-identical to the run that never stopped (resume is exact), hence to any run resumed
    # from that step
    assert result["params_sha256"] == r["reference"]["params_sha256"]
    assert _complete_steps(ckpt)[-1] == latest and f"{latest}.damaged" in os.listdir(ckpt)


def test_retention_and_partial_cleanup(killed_and_resumed):
    r = killed_and_resumed
    # the last 2 plus the best by validation metric; no temporary directory left
    steps = r["final_steps"]
    assert steps[-2:] == [STEPS - SAVE_EVERY, STEPS] and len(steps) <= 3
    assert not _partial(r["ckpt"])


def test_cli_refuses_another_runs_checkpoint(killed_and_resumed):
    ckpt = killed_and_resumed["ckpt"]
    args = _cli(ckpt, "--resume")
    args[args.index("--method") + 1] = "uw"
    args = [a.replace("4.0", "3.0") if a.startswith("sigmas") else a for a in args]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "belongs to another run" in proc.stderr
    assert "problem_args: checkpoint" in proc.stderr
    assert "method: checkpoint 'gradnorm', this run 'uw'" in proc.stderr
    args = [a for a in _cli(ckpt) if a != "--resume"]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pass --resume" in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# The library API


T = 3


def _state(method, key=0, model_params=None, opt=None):
    model, params = model_params or tiny_model(T)
    opt = opt or optax.adam(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(key))
    return model, opt, state


def test_restore_then_continue_is_exact(tmp_path):
    method = mtl.methods.gradnorm()
    model, opt, state = _state(method)
    step = mtl.make_train_step(model, method, opt)
    batches = [tiny_batch(T, seed=s) for s in range(6)]
    for b in batches[:3]:
        state, _ = step(state, b)
    with mtl.Checkpointer(tmp_path, method=method, task_names=model.task_names) as ckpt:
        assert ckpt.save(state, data_position=3, extra={"note": "x"})
        assert not ckpt.save(state)  # that step is already saved
    cont = state
    for b in batches[3:]:
        cont, _ = step(cont, b)
    _, _, template = _state(method, key=1)
    with mtl.Checkpointer(
        tmp_path, method=method, task_names=model.task_names, mode="resume"
    ) as ckpt:
        restored = ckpt.restore(template)
    assert restored.step == 3 and restored.data_position == 3 and restored.extra == {"note": "x"}
    assert jax.dtypes.issubdtype(restored.state.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(restored.state.key), jax.random.key_data(state.key)
    )
    assert max_abs_diff(restored.state.method_state, state.method_state) == 0.0
    again = restored.state
    for b in batches[3:]:
        again, _ = step(again, b)
    assert max_abs_diff(again.params, cont.params) == 0.0
    assert max_abs_diff(again.opt_state, cont.opt_state) == 0.0


def test_refuses_other_runs_and_says_what_differs(tmp_path):
    method = mtl.methods.gradnorm()
    model, opt, state = _state(method)
    config = {"problem": "tiny", "method_args": {}}
    with mtl.Checkpointer(
        tmp_path, method=method, task_names=model.task_names, config=config
    ) as ckpt:
        ckpt.save(state)

    def restore(template, method_, tasks, config_):
        with mtl.Checkpointer(
            tmp_path, method=method_, task_names=tasks, config=config_, mode="resume"
        ) as c:
            return c.restore(template)

    with pytest.raises(
        mtl.CheckpointMismatchError, match=r"problem: checkpoint 'tiny', this run 'big'"
    ):
        restore(state, method, model.task_names, {**config, "problem": "big"})
    uw = mtl.methods.uw()
    with pytest.raises(
        mtl.CheckpointMismatchError, match="method: checkpoint 'gradnorm', this run 'uw'"
    ):
        restore(_state(uw)[2], uw, model.task_names, config)
    with pytest.raises(mtl.CheckpointMismatchError, match=r"method_args: checkpoint \{\}"):
        restore(state, method, model.task_names, {**config, "method_args": {"alpha": 0.5}})
    with pytest.raises(mtl.CheckpointMismatchError, match="task_names: checkpoint"):
        restore(state, method, ("a", "b", "c"), config)
    other = tiny_model(T, features=(5, 9, 7))
    with pytest.raises(
        mtl.CheckpointMismatchError,
        match=r"parameters: .*encoder/layers/0/kernel: checkpoint float32\(5, 12\), this run "
        r"float32\(5, 9\)",
    ):
        restore(_state(method, model_params=other)[2], method, model.task_names, config)
    with pytest.raises(
        mtl.CheckpointMismatchError,
        match=r"optimizer state: checkpoint '\(ScaleByAdamState\(count, .*\), EmptyState\(\)\)', "
        r"this run '\(EmptyState\(\), EmptyState\(\)\)'",
    ):
        restore(_state(method, opt=optax.sgd(0.1))[2], method, model.task_names, config)


def test_keeps_latest_n_plus_best(tmp_path):
    method = mtl.methods.ew()
    model, opt, state = _state(method)
    metrics = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0}
    with mtl.Checkpointer(tmp_path, keep=2, method=method) as ckpt:
        for s, m in metrics.items():
            ckpt.save(state._replace(step=jax.numpy.asarray(s, jax.numpy.int32)), metric=m)
        ckpt.wait_until_finished()
        assert ckpt.steps() == [2, 4, 5] and ckpt.best_step() == 2 and ckpt.latest_step() == 5
    with mtl.Checkpointer(tmp_path, keep=1, best_mode="max", method=method, mode="read") as ckpt:
        assert ckpt.best_step() == 5 and ckpt.steps() == [2, 4, 5]  # reading deletes nothing


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    method = mtl.methods.ew()
    model, opt, state = _state(method)
    with mtl.Checkpointer(tmp_path, method=method) as ckpt:
        ckpt.save(state)
    # what a process killed in the middle of saving step 7 leaves behind
    shutil.copytree(tmp_path / "0", tmp_path / "7.orbax-checkpoint-tmp")
    (tmp_path / "7.orbax-checkpoint-tmp" / "commit_success.txt").unlink(missing_ok=True)
    with mtl.Checkpointer(tmp_path, method=method, mode="resume") as ckpt:
        assert ckpt.latest_step() == 0
    assert not any(re.search("tmp", n) for n in os.listdir(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        mtl.Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        mtl.Checkpointer(tmp_path, best_mode="lowest")
    with pytest.raises(ValueError, match="mode must be one of"):
        mtl.Checkpointer(tmp_path, mode="append")
    with mtl.Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no complete"):
        ckpt.restore(_state(mtl.methods.ew())[2])


# ----------------------------------------------------------------------------------------------
# What a checkpoint folder may delete, and who may write it


def _tree_files(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_never_deletes_a_folder_it_did_not_write(tmp_path):
    method = mtl.methods.ew()
    _, _, state = _state(method)
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):  # a folder per seed, with the user's files
        (runs / str(seed)).mkdir(parents=True)
        (runs / str(seed) / "result.json").write_text(f'{{"seed": {seed}}}')
    (runs / "7.orbax-checkpoint-tmp").mkdir()
    (runs / "7.orbax-checkpoint-tmp" / "notes.txt").write_text("mine")
    before = _tree_files(runs)
    for mode in ("new", "resume", "overwrite"):
        with pytest.raises(mtl.CheckpointFolderError, match=r"did not write \(1, 2, 3, 7\.orb"):
            mtl.Checkpointer(runs, keep=1, method=method, mode=mode)
    assert _tree_files(runs) == before and sorted(os.listdir(runs)) == sorted(
        ["1", "2", "3", "7.orbax-checkpoint-tmp"]
    )  # nothing removed, nothing created (not even the lock file)

    # In a folder of its own, retention and overwrite delete mtljax's checkpoints only.
    ck_dir = runs / "ckpt"
    ck_dir.mkdir()
    (ck_dir / "notes.txt").write_text("keep me")
    (ck_dir / "plots").mkdir()
    (ck_dir / "plots" / "a.png").write_bytes(b"png")
    with mtl.Checkpointer(ck_dir, keep=1, method=method) as ckpt:
        ckpt.save(state, data_position=10, step=10)
        ckpt.save(state, data_position=20, step=20)
    assert sorted(os.listdir(ck_dir)) == ["20", "mtljax.lock", "notes.txt", "plots"]
    with mtl.Checkpointer(ck_dir, keep=1, method=method, mode="overwrite") as ckpt:
        assert ckpt.steps() == []
    assert sorted(os.listdir(ck_dir)) == ["mtljax.lock", "notes.txt", "plots"]
    assert (ck_dir / "plots" / "a.png").read_bytes() == b"png"
    assert _tree_files(runs / "1") == {"result.json": b'{"seed": 1}'}


def test_a_folder_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    method = mtl.methods.ew()
    _, _, state = _state(method)
    with mtl.Checkpointer(tmp_path, method=method) as ckpt:
        ckpt.save(state, step=2024)
    with pytest.raises(mtl.CheckpointExistsError, match=r"latest: step 2024\).*mode='resume'"):
        mtl.Checkpointer(tmp_path, method=method)
    with mtl.Checkpointer(tmp_path, method=method, mode="resume") as ckpt:
        assert ckpt.restore(state).step == 2024
        ckpt.save(state, step=2025)
        assert ckpt.steps() == [2024, 2025]
    with mtl.Checkpointer(tmp_path, method=method, mode="overwrite") as ckpt:
        assert ckpt.steps() == []


def test_resuming_another_runs_folder_is_refused_at_the_first_save(tmp_path):
    _, _, state = _state(mtl.methods.ew())
    with mtl.Checkpointer(tmp_path, method=mtl.methods.ew()) as ckpt:
        ckpt.save(state)
    uw = mtl.methods.uw()
    with mtl.Checkpointer(tmp_path, method=uw, mode="resume") as ckpt:  # never restores
        with pytest.raises(mtl.CheckpointMismatchError, match="method: checkpoint 'ew'"):
            ckpt.save(_state(uw)[2]._replace(step=jax.numpy.asarray(5, jax.numpy.int32)))
        assert ckpt.steps() == [0]


@pytest.mark.parametrize(
    "saved, resumed, message",
    [
        (
            (mtl.methods.cagrad, {"c": 0.4}, optax.adam(1e-2)),
            (mtl.methods.cagrad, {"c": 0.9}, optax.adam(1e-2)),
            [r"method hyper-parameter c: checkpoint 0\.4, this run 0\.9"],
        ),
        (
            (mtl.methods.famo, {"gamma": 0.0}, optax.adam(1e-2)),
            (mtl.methods.famo, {}, optax.adam(1e-2)),
            [r"method hyper-parameter gamma: checkpoint 0\.0, this run 0\.001"],
        ),
        (
            (mtl.methods.ew, {}, optax.adamw(1e-2)),
            (mtl.methods.ew, {}, optax.adam(1e-2)),
            [r"optimizer state: checkpoint .*EmptyState\(\), EmptyState\(\)\)', this run "],
        ),
        (
            (mtl.methods.ew, {}, optax.adam(1e-2)),
            (mtl.methods.ew, {}, optax.adam(1e-3)),
            [r"optimizer update_fns\[1\]\.tx\.step_size: checkpoint -0\.01, this run -0\.001"],
        ),
        (
            (mtl.methods.ew, {}, optax.adam(1e-2, b1=0.8)),
            (mtl.methods.ew, {}, optax.adam(1e-2)),
            [r"optimizer update_fns\[0\]\.tx\.b1: checkpoint 0\.8, this run 0\.9"],
        ),
        (  # every difference is listed
            (mtl.methods.cagrad, {"c": 0.4, "rescale": True}, optax.adam(1e-2)),
            (mtl.methods.cagrad, {"c": 0.5}, optax.adam(1e-3)),
            [
                r"method hyper-parameter c: checkpoint 0\.4, this run 0\.5",
                r"method hyper-parameter rescale: checkpoint True, this run False",
                r"step_size: checkpoint -0\.01, this run -0\.001",
            ],
        ),
    ],
)
def test_refuses_a_different_method_or_optimizer(tmp_path, saved, resumed, message):
    (f0, kw0, opt0), (f1, kw1, opt1) = saved, resumed
    m0, m1 = f0(**kw0), f1(**kw1)
    _, _, state0 = _state(m0, opt=opt0)
    with mtl.Checkpointer(tmp_path, method=m0, optimizer=opt0) as ckpt:
        ckpt.save(state0)
    _, _, state1 = _state(m1, opt=opt1)
    with mtl.Checkpointer(tmp_path, method=m1, optimizer=opt1, mode="resume") as ckpt:
        with pytest.raises(mtl.CheckpointMismatchError) as e:
            ckpt.restore(state1)
    for m in message:
        assert re.search(m, str(e.value)), str(e.value)
    assert len(e.value.differences) >= len(message)
    # the same run is restored
    with mtl.Checkpointer(tmp_path, method=f0(**kw0), optimizer=opt0, mode="read") as ckpt:
        assert ckpt.restore(state0).step == 0


def test_methods_record_their_hyper_parameters():
    assert mtl.methods.cagrad(c=0.9).hparams == (("c", 0.9), ("rescale", False))
    assert mtl.methods.get("cagrad", c=0.9).hparams == mtl.methods.cagrad(0.9).hparams
    assert dict(mtl.methods.famo().hparams)["gamma"] == 1e-3  # defaults included
    hp = dict(mtl.methods.uw(optimizer=optax.sgd(0.5)).hparams)
    assert "step_size" in str(hp["optimizer"]) and "-0.5" in str(hp["optimizer"])
    assert "like" not in dict(mtl.methods.get("db_mtl", like={"w": np.zeros(3)}).hparams)
    hash(mtl.methods.uw(optimizer=optax.adam(1e-3)))  # a Method stays hashable


_HOLD_LOCK = """
import sys, time
import mtljax as mtl
ck = mtl.Checkpointer(sys.argv[1], mode="resume")
print("locked", flush=True)
time.sleep(600)
"""


def _lock_holder(folder):
    """A subprocess that holds ``folder``'s checkpoint lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(folder)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(proc.stderr.read()[-3000:])
    return proc


def test_one_writer_per_folder_and_a_killed_holder_never_blocks(tmp_path):
    method = mtl.methods.ew()
    _, _, state = _state(method)
    with mtl.Checkpointer(tmp_path, method=method) as ckpt:
        with pytest.raises(mtl.CheckpointLockedError, match=rf"process {os.getpid()} on host"):
            mtl.Checkpointer(tmp_path, method=method, mode="resume")
        ckpt.save(state)
    holder = _lock_holder(tmp_path)
    try:
        with pytest.raises(mtl.CheckpointLockedError) as e:
            mtl.Checkpointer(tmp_path, method=method, mode="resume")
        assert e.value.holder["pid"] == holder.pid
        assert f"is being written by process {holder.pid} on host" in str(e.value)
        with mtl.Checkpointer(tmp_path, method=method, mode="read") as reader:  # no lock
            assert reader.steps() == [0]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # the lock file still names the killed process: it is stale, and a resume goes on
    assert json.loads((tmp_path / "mtljax.lock").read_text())["pid"] == holder.pid
    with mtl.Checkpointer(tmp_path, method=method, mode="resume") as ckpt:
        assert ckpt.restore(state).step == 0
        assert ckpt.save(state._replace(step=jax.numpy.asarray(1, jax.numpy.int32)))


_FAILING_SAVE = """
import os, shutil, sys, time
import jax.numpy as jnp
import mtljax as mtl
folder = sys.argv[1]
ckpt = mtl.Checkpointer(folder)
shutil.rmtree(folder)
open(folder, "w").close()  # the folder is gone: the save cannot create its directory
t0 = time.monotonic()
try:
    ckpt.save({"w": jnp.zeros(3)}, step=1)
except mtl.CheckpointSaveError as e:
    print(f"{time.monotonic() - t0:.1f}", e, flush=True)
"""


def test_a_failed_save_raises_and_the_process_ends_promptly(tmp_path):
    folder = tmp_path / "ck"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_SAVE, str(folder)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds, message = proc.stdout.split(" ", 1)
    assert float(seconds) < 10
    assert f"saving the checkpoint of step 1 in {folder} failed" in message
    # before, orbax's background threads kept the process alive for 300 s after the error
    assert elapsed < 120, elapsed


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints


def _flip(path, *, keep_json=False):
    data = bytearray(path.read_bytes())
    if keep_json:  # a digit of the record changed: still valid JSON, a different record
        i = data.index(b'"step": ') + len(b'"step": ')
        data[i] = ord("9") if data[i] != ord("9") else ord("8")
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _array_file(step_dir):
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: _flip(d / "meta" / "metadata", keep_json=True), "fails its SHA-256 checksum"),
        (lambda d: _truncate(d / "meta" / "metadata"), "cannot be read"),
        (lambda d: _flip(_array_file(d)), "arrays cannot be restored"),
        (lambda d: _flip(d / "state" / "_METADATA"), "arrays cannot be restored"),
    ],
)
def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage, reason):
    method = mtl.methods.ew()
    _, _, state = _state(method)
    states = {
        s: state._replace(
            step=jax.numpy.asarray(s, jax.numpy.int32),
            params=jax.tree_util.tree_map(lambda x, s=s: x + s, state.params),
        )
        for s in (1, 2, 3)
    }
    with mtl.Checkpointer(tmp_path, keep=3, method=method) as ckpt:
        for s, st in states.items():
            ckpt.save(st, data_position=s)
    damage(tmp_path / "3")
    with mtl.Checkpointer(tmp_path, method=method, mode="read") as ckpt:
        with pytest.warns(mtl.DamagedCheckpointWarning, match=rf"step 3: .*{reason}"):
            restored = ckpt.restore(state)
        assert ckpt.steps() == [1, 2, 3]  # a reader moves nothing
    assert restored.step == 2 and restored.data_position == 2 and restored.skipped[0][0] == 3
    assert max_abs_diff(restored.state.params, states[2].params) == 0.0
    with mtl.Checkpointer(tmp_path, method=method, mode="resume") as ckpt:
        with pytest.warns(mtl.DamagedCheckpointWarning, match="moved to <step>.damaged"):
            assert ckpt.restore(state).step == 2
        assert ckpt.steps() == [1, 2]
        assert ckpt.save(states[3])  # the step can be saved again
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "3.damaged", "mtljax.lock"]


def test_no_intact_checkpoint_names_each_one_tried(tmp_path):
    method = mtl.methods.ew()
    _, _, state = _state(method)
    with mtl.Checkpointer(tmp_path, method=method) as ckpt:
        for s in (1, 2):
            ckpt.save(state._replace(step=jax.numpy.asarray(s, jax.numpy.int32)))
    _truncate(tmp_path / "2" / "meta" / "metadata")
    _flip(_array_file(tmp_path / "1"))
    with mtl.Checkpointer(tmp_path, method=method, mode="read") as ckpt:
        with pytest.raises(mtl.CheckpointDamagedError) as e:
            ckpt.restore(state)
    message = str(e.value)
    assert f"no intact checkpoint in {tmp_path}" in message
    assert re.search(rf"step 2: its record {tmp_path}/2/meta/metadata cannot be read", message)
    assert re.search(r"step 1: its arrays cannot be restored .*DATA_LOSS", message)
    assert [s for s, _ in e.value.tried] == [2, 1]


def test_without_flock_the_recorded_holder_is_checked(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    first = mtl.Checkpointer(tmp_path)
    with pytest.raises(mtl.CheckpointLockedError, match=rf"process {os.getpid()} on host"):
        mtl.Checkpointer(tmp_path, mode="resume")
    first.close()
    with mtl.Checkpointer(tmp_path, mode="resume"):  # released: the record is cleared
        pass
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "killed"}
    (tmp_path / "mtljax.lock").write_text(json.dumps(stale))
    with mtl.Checkpointer(tmp_path, mode="resume"):  # that process is gone: a stale record
        assert json.loads((tmp_path / "mtljax.lock").read_text())["pid"] == os.getpid()
    elsewhere = dict(stale, host=socket.gethostname() + "-other")
    (tmp_path / "mtljax.lock").write_text(json.dumps(elsewhere))
    with pytest.raises(mtl.CheckpointLockedError, match="-other"):  # cannot tell: refused
        mtl.Checkpointer(tmp_path, mode="resume")
