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
    return proc.returncode, err


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
        rc, err = _run_and_kill(ckpt, when=saving_after_first, extra=extra)
        kills.append((rc, err, _complete_steps(ckpt), _partial(ckpt)))
        if kills[-1][3] or rc != -signal.SIGKILL:
            break
    rc, err, complete, partial = kills[-1]
    # the uninterrupted reference (same seed, no checkpoints) runs alongside the resumed run
    ref_out = tmp_path_factory.mktemp("ref") / "reference.json"
    args = _cli(ckpt)
    args = args[: args.index("--ckpt-dir")] + ["--out", str(ref_out)]
    reference = subprocess.Popen(
        args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # 2. resumed to the end
    proc = subprocess.run(
        [*_cli(ckpt, "--resume"), "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    with mtl.Checkpointer(tmp_path, method=method, task_names=model.task_names) as ckpt:
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
        with mtl.Checkpointer(tmp_path, method=method_, task_names=tasks, config=config_) as c:
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
    with pytest.raises(mtl.CheckpointMismatchError, match="optimizer or method state"):
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
    with mtl.Checkpointer(tmp_path, keep=1, best_mode="max", method=method) as ckpt:
        assert ckpt.best_step() == 5


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    method = mtl.methods.ew()
    model, opt, state = _state(method)
    with mtl.Checkpointer(tmp_path, method=method) as ckpt:
        ckpt.save(state)
    # what a process killed in the middle of saving step 7 leaves behind
    shutil.copytree(tmp_path / "0", tmp_path / "7.orbax-checkpoint-tmp")
    (tmp_path / "7.orbax-checkpoint-tmp" / "commit_success.txt").unlink(missing_ok=True)
    with mtl.Checkpointer(tmp_path, method=method) as ckpt:
        assert ckpt.latest_step() == 0
    assert not any(re.search("tmp", n) for n in os.listdir(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        mtl.Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        mtl.Checkpointer(tmp_path, best_mode="lowest")
    with mtl.Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no complete"):
        ckpt.restore(_state(mtl.methods.ew())[2])
