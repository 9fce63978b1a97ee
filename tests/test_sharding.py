"""Scaling out: data parallelism on 8 simulated CPU devices, FSDP, two processes over
loopback; and scaling up: mixed precision, Gramians accumulated in task chunks.

The device count of a JAX process is fixed when JAX starts, so the 8-device runs happen in a
subprocess that runs this file as a script (``python tests/test_sharding.py worker OUT``); the
tests read its JSON report. For each method: training on 8 devices (the batch split over them,
the state replicated) matches training on one device with the same global batch to float32
tolerance, and a deliberately wrong data-parallel step (``shard_map`` applying the method to
each device's own Jacobian, then averaging) does not, for the nonlinear methods.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# `--dist loadgroup` keeps this module on one worker: the eight-device subprocess runs once per
# module fixture.
pytestmark = pytest.mark.xdist_group("sharding")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METHODS = ("ew", "pcgrad", "mgda", "upgrad", "nash_mtl", "gradnorm", "famo")
LINEAR = ("ew",)  # per-shard aggregation happens to be right for a linear method
FSDP_METHODS = ("upgrad",)
NUM_DEVICES = 8
T = 3
BATCH = 32
STEPS = 4
TOL = 2e-5  # float32: sums over devices are ordered differently
WRONG_MIN = 1e-3  # the wrong per-shard aggregation must be off by at least this much


# ----------------------------------------------------------------------------------------------
# The worker (runs in a subprocess with simulated devices)


def _setup(num_tasks=T, seed=0):
    import jax.numpy as jnp
    from flax import nnx

    import mtljax as mtl

    rngs = nnx.Rngs(seed)
    encoder = mtl.nn.MLP((16, 32, 16), rngs=rngs, final_activation=True)
    net = mtl.nn.HardSharing(encoder, mtl.nn.StackedLinear(16, 2, num_tasks, rngs=rngs))

    def encode(m, b):
        return m.encode(b["x"])

    def heads(m, z, b):
        return jnp.mean((m.predict(z) - b["y"]) ** 2, axis=(1, 2))

    model, params = mtl.from_nnx(
        net,
        task_names=tuple(f"t{i}" for i in range(num_tasks)),
        shared="encoder",
        encode=encode,
        heads=heads,
        last_shared="encoder/" + encoder.last_layer_path,
    )
    model = mtl.Model(
        model.task_names,
        model.losses_fn,
        model.encode_fn,
        model.heads_fn,
        model.last_shared,
        batch_spec={
            "x": mtl.BatchField(("batch", 16), jnp.float32),
            "y": mtl.BatchField(("tasks", "batch", 2), jnp.float32),
        },
    )

    def batch(i):
        # numpy, so that making batches compiles nothing; tasks with unrelated linear targets
        rng = np.random.default_rng(1000 + i)
        x = rng.standard_normal((BATCH, 16), np.float32)
        w = np.random.default_rng(7).standard_normal((num_tasks, 16, 2), np.float32)
        y = np.einsum("bi,tio->tbo", x, w) + 0.5 * rng.standard_normal((num_tasks, BATCH, 2))
        return {"x": x, "y": y.astype(np.float32)}

    return model, params, batch


def _wrong_step(model, method, optimizer, mesh):
    """Each device applies the method to its own shard's Jacobian; the updates are averaged."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import PartitionSpec as P

    import mtljax as mtl

    def mean_floats(tree):
        return jax.tree_util.tree_map(
            lambda x: jax.lax.pmean(x, "data") if jnp.issubdtype(x.dtype, jnp.inexact) else x,
            tree,
        )

    def local(params, method_state, key, batch):
        grads, method_state, _ = mtl.gradients(model, method, params, method_state, batch, key)
        return mean_floats(grads), mean_floats(method_state)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), {"x": P("data"), "y": P(None, "data")}),
        out_specs=(P(), P()),
        check_vma=False,
    )

    @jax.jit
    def step(state, batch):
        key, method_key = jax.random.split(state.key)
        grads, method_state = sharded(state.params, state.method_state, method_key, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return mtl.TrainState(params, opt_state, method_state, key, state.step + 1, state.skipped)

    return step


def _max_diff(a, b) -> float:
    import jax

    import mtljax as mtl

    a, b = mtl.to_host(a), mtl.to_host(b)
    diffs = [
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        if np.size(x)
    ]
    return max(diffs) if diffs else 0.0


def worker(out_path: str) -> None:
    import mtljax as mtl

    mtl.set_cpu_devices(NUM_DEVICES)
    import jax
    import optax

    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    model, params, batch = _setup()
    mesh = mtl.make_mesh(NUM_DEVICES)
    optimizer = optax.sgd(0.1)
    report: dict = {"devices": len(jax.devices()), "methods": {}, "seconds": {}}
    for name in METHODS:
        if name not in mtl.methods.names():
            continue
        t0 = time.perf_counter()
        method = mtl.methods.get(name)
        init = mtl.init_train_state(model, params, method, optimizer, jax.random.key(0))
        step = mtl.make_train_step(model, method, optimizer)
        one = init
        for i in range(STEPS):
            one, _ = step(one, batch(i))
        dp_step = mtl.data_parallel(step, mesh)
        dp = init
        for i in range(STEPS):
            dp, metrics = dp_step(dp, batch(i))
        sharded_batch = dp_step.shard_batch(batch(0))
        if "all_reduce" not in report:  # the compiled step sums across devices
            hlo = dp_step.lower(dp_step.place_state(init), sharded_batch).compile().as_text()
            report["all_reduce"] = "all-reduce" in hlo
        wrong_step = _wrong_step(model, method, optimizer, mesh)
        wrong = dp_step.place_state(init)
        for i in range(STEPS):
            wrong = wrong_step(wrong, dp_step.shard_batch(batch(i)))
        entry = {
            "dp_params": _max_diff(dp.params, one.params),
            "dp_method_state": _max_diff(dp.method_state, one.method_state),
            "wrong_params": _max_diff(wrong.params, one.params),
            "wrong_method_state": _max_diff(wrong.method_state, one.method_state),
            "moved": _max_diff(one.params, init.params),
            "batch_devices": len(sharded_batch["x"].sharding.device_set),
            "batch_shard_rows": sharded_batch["x"].addressable_shards[0].data.shape[0],
            "params_replicated": all(
                x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(dp.params)
            ),
            "finite": bool(np.asarray(metrics["finite"])),
        }
        if name in FSDP_METHODS:
            fsdp_step = mtl.data_parallel(step, mesh, fsdp=True, min_size=64)
            fs = init
            for i in range(STEPS):
                fs, _ = fsdp_step(fs, batch(i))
            entry["fsdp_params"] = _max_diff(fs.params, one.params)
            entry["fsdp_sharded_leaves"] = sum(
                not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(fs.params)
            )
        report["methods"][name] = entry
        report["seconds"][name] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def multihost_worker(process_id: int, port: int, out_path: str) -> None:
    """One of two processes (4 CPU devices each) training on one 8-device mesh."""
    import mtljax as mtl

    mtl.initialize_distributed(
        f"127.0.0.1:{port}", 2, process_id, cpu_devices=4, initialization_timeout=120
    )
    import jax
    import optax

    model, params, batch = _setup()
    optimizer = optax.sgd(0.1)
    method = mtl.methods.get("gradnorm")
    step = mtl.data_parallel(mtl.make_train_step(model, method, optimizer), mtl.make_mesh())
    state = mtl.init_train_state(model, params, method, optimizer, jax.random.key(0))
    for i in range(STEPS):
        state, _ = step(state, batch(i))
    host = mtl.to_host(state.params)
    leaves = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(host)]
    info = {
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "params": leaves,
    }
    with open(out_path, "w") as f:
        json.dump(info, f)


# ----------------------------------------------------------------------------------------------
# The tests


def _env(**extra):
    from tests.helpers import subprocess_env  # not at the top: the worker runs this file

    return subprocess_env(**extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory):
    """Starts the 8-device worker and the two-process run together (they overlap)."""
    d = tmp_path_factory.mktemp("sharding")
    here = os.path.abspath(__file__)
    runs = {"worker": (d / "report.json", [sys.executable, here, "worker", str(d / "report.json")])}
    port = _free_port()
    for i in range(2):
        out = d / f"process{i}.json"
        runs[f"process{i}"] = (
            out,
            [sys.executable, here, "multihost", str(i), str(port), str(out)],
        )
    procs = {
        name: (
            out,
            subprocess.Popen(
                args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
        for name, (out, args) in runs.items()
    }
    yield procs
    for _, p in procs.values():
        if p.poll() is None:
            p.kill()


def _finish(proc, timeout=600) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.fixture(scope="module")
def report(subprocesses):
    out, proc = subprocesses["worker"]
    err = _finish(proc)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


def _registered(name):
    import mtljax as mtl

    if name not in mtl.methods.names():
        pytest.skip(f"method {name!r} is not registered in mtljax.methods yet")


def test_worker_ran_on_eight_devices(report):
    assert report["devices"] == NUM_DEVICES
    assert report["all_reduce"], "the compiled data-parallel step has no cross-device sum"


@pytest.mark.parametrize("name", METHODS)
def test_eight_devices_match_one(report, name):
    _registered(name)
    r = report["methods"][name]
    assert r["batch_devices"] == NUM_DEVICES and r["batch_shard_rows"] == BATCH // NUM_DEVICES
    assert r["params_replicated"] and r["finite"]
    assert r["moved"] > 100 * TOL, "training did not move the parameters"
    assert r["dp_params"] < TOL, r
    assert r["dp_method_state"] < TOL, r


@pytest.mark.parametrize("name", [m for m in METHODS if m not in LINEAR])
def test_per_shard_aggregation_differs(report, name):
    _registered(name)
    r = report["methods"][name]
    assert max(r["wrong_params"], r["wrong_method_state"]) > WRONG_MIN, r


def test_per_shard_aggregation_of_a_linear_method_agrees(report):
    # Sanity check of the wrong step itself: for equal weights it is right.
    r = report["methods"]["ew"]
    assert r["wrong_params"] < TOL, r


@pytest.mark.parametrize("name", FSDP_METHODS)
def test_fsdp_matches_one_device(report, name):
    _registered(name)
    r = report["methods"][name]
    assert r["fsdp_sharded_leaves"] > 0
    assert r["fsdp_params"] < TOL, r


def test_two_processes_over_loopback(subprocesses):
    import jax
    import optax

    import mtljax as mtl

    runs = [subprocesses[f"process{i}"] for i in range(2)]
    errs = [_finish(p, timeout=300) for _, p in runs]
    if any(p.returncode != 0 for _, p in runs):
        text = "\n".join(errs)
        if "gloo" in text.lower() and "not" in text.lower() and "support" in text.lower():
            pytest.skip(
                f"this jaxlib's CPU backend has no multi-process collectives: {text[-500:]}"
            )
        raise AssertionError(text[-4000:])
    outs = [out for out, _ in runs]
    results = [json.loads(o.read_text()) for o in outs]
    for r in results:
        assert r["process_count"] == 2 and r["devices"] == 8 and r["local_devices"] == 4
    # the reference: one device, same global batches
    model, params, batch = _setup()
    optimizer = optax.sgd(0.1)
    method = mtl.methods.get("gradnorm")
    step = mtl.make_train_step(model, method, optimizer)
    state = mtl.init_train_state(model, params, method, optimizer, jax.random.key(0))
    for i in range(STEPS):
        state, _ = step(state, batch(i))
    ref = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
    for r in results:
        for got, want in zip(r["params"], ref, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Precision and memory (in this process)


def _probe_method(seen, *, direction=False):
    """A method that records the dtypes it is handed (at trace time) and weighs equally."""
    import jax.numpy as jnp

    import mtljax as mtl

    def weights(losses, gramian, state, key):
        seen.append(("losses", losses.dtype))
        seen.append(("gramian", gramian.dtype))
        return jnp.ones_like(losses), state

    def direction_fn(jac, losses, state, key):
        import jax

        seen.extend(("jacobian", leaf.dtype) for leaf in jax.tree_util.tree_leaves(jac))
        return jax.tree_util.tree_map(lambda j: j.sum(0), jac), state

    if direction:
        return mtl.Method("probe", lambda t: (), "jacobian", direction=direction_fn)
    return mtl.Method("probe", lambda t: (), "gramian", weights=weights)


@pytest.mark.parametrize("mode,direction", [("parameter", False), ("feature", True)])
def test_mixed_precision_hands_float32_to_methods(mode, direction):
    import jax
    import jax.numpy as jnp
    import optax

    import mtljax as mtl

    model, params, batch = _setup()
    seen = []
    method = _probe_method(seen, direction=direction)
    opt = optax.adam(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, mode=mode, compute_dtype=jnp.bfloat16)
    ref_step = mtl.make_train_step(model, method, opt, mode=mode)
    ref, bf = state, state
    for i in range(5):
        bf, metrics = step(bf, batch(i))
        ref, ref_metrics = ref_step(ref, batch(i))
    assert seen and all(dtype == jnp.float32 for _, dtype in seen), seen
    assert metrics["losses"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf.params))
    assert all(
        x.dtype == jnp.float32
        for x in jax.tree_util.tree_leaves(bf.opt_state)
        if jnp.issubdtype(x.dtype, jnp.floating)
    )
    # bfloat16 arithmetic: close to float32, not equal
    np.testing.assert_allclose(metrics["losses"], ref_metrics["losses"], rtol=0.05)
    assert not np.array_equal(np.asarray(metrics["losses"]), np.asarray(ref_metrics["losses"]))


def test_mixed_precision_computes_in_bfloat16():
    import jax
    import jax.numpy as jnp

    import mtljax as mtl

    model, params, batch = _setup()
    seen = []

    def losses_fn(shared, specific, b):
        seen.extend(x.dtype for x in jax.tree_util.tree_leaves((shared, specific, b)))
        return model.losses_fn(shared, specific, b)

    mp = mtl.mixed_precision(mtl.Model(model.task_names, losses_fn), jnp.bfloat16)
    out = jax.eval_shape(mp.losses_fn, params.shared, params.specific, batch(0))
    assert out.dtype == jnp.float32 and set(seen) == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_gramian_by_chunks_equals_the_jacobians_gramian(mode):
    import jax

    import mtljax as mtl
    from mtljax._src.engine import _chunked_gramian

    model, params, batch = _setup(num_tasks=5)
    b = batch(0)
    if mode == "parameter":
        _, jac = mtl.task_jacobian(model, params, b)
    else:
        _, jac, _, _ = mtl.feature_jacobian(model, params, b)
    want = np.asarray(mtl.gramian(jac))

    @jax.jit
    def chunked(params, b):
        return [
            _chunked_gramian(
                model, params, b, mode=mode, subset="all", chunk_size=c, constraint=None
            )[1]
            for c in (1, 2, 5, 8)
        ]

    for got in chunked(params, b):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
        assert np.array_equal(np.asarray(got), np.asarray(got).T)


@pytest.mark.parametrize("name", ["gradnorm", "upgrad"])
def test_training_with_gramian_chunks_matches(name):
    import jax
    import optax

    import mtljax as mtl

    _registered(name)
    model, params, batch = _setup(num_tasks=5)
    method = mtl.methods.get(name)
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    full = mtl.make_train_step(model, method, opt)
    chunked = mtl.make_train_step(model, method, opt, gramian_chunk_size=2)
    a = b = state
    for i in range(3):
        a, ma = full(a, batch(i))
        b, mb = chunked(b, batch(i))
    assert _max_diff(a.params, b.params) < 1e-5
    np.testing.assert_allclose(ma["grad_norms"], mb["grad_norms"], rtol=1e-4)


def _regularized_setup():
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax

    import mtljax as mtl

    model, params, batch = _setup()

    def reg(shared, specific, batch=None):
        return 0.15 * sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves((shared, specific)))

    w = jnp.array([0.5, 2.0, 3.0])
    method, lr = mtl.methods.fixed(w), 0.1
    opt = optax.sgd(lr)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    reg_model = dataclasses.replace(model, regularizer=reg)
    return model, reg_model, reg, w, method, lr, opt, state, batch(0)


def test_regularizer_under_mixed_precision_uses_the_master_parameters():
    import jax
    import jax.numpy as jnp

    import mtljax as mtl

    model, reg_model, reg, _, method, _, _, state, b = _regularized_setup()
    mp, mp_reg = (mtl.mixed_precision(m, jnp.bfloat16) for m in (model, reg_model))
    assert mp_reg.regularizer is reg  # the train step's compute model keeps it

    @jax.jit
    def both(p):
        out = [mtl.gradients(m, method, p, (), b, None)[::2] for m in (mp, mp_reg)]
        return out, jax.grad(lambda q: reg(*q))(p)

    ((g, _), (g_reg, metrics)), grad_r = both(state.params)
    assert metrics["regularizer"].dtype == jnp.float32
    np.testing.assert_allclose(metrics["regularizer"], reg(*state.params), rtol=1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g_reg))
    assert _max_diff(g_reg, jax.tree_util.tree_map(jnp.add, g, grad_r)) < 1e-6


def test_data_parallel_step_keeps_the_regularizer_and_the_prox():
    import jax

    import mtljax as mtl

    model, reg_model, reg, w, method, lr, opt, state, b = _regularized_setup()
    prox = mtl.regularizers.prox_on(lambda x: x / 1.5, "specific")
    step = mtl.make_train_step(reg_model, method, opt, prox=prox)
    one, m_one = step(state, b)
    par, m_par = mtl.data_parallel(step, mtl.make_mesh(1))(state, b)
    assert _max_diff(par.params, one.params) < 1e-6
    np.testing.assert_allclose(m_par["regularizer"], m_one["regularizer"], rtol=1e-6)
    d = jax.grad(lambda p: w @ model.losses(p, b) + reg(*p))(state.params)
    want = prox(jax.tree_util.tree_map(lambda x, g: x - lr * g, state.params, d))
    assert _max_diff(one.params, want) < 1e-5


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if sys.argv[1] == "worker":
        worker(sys.argv[2])
    elif sys.argv[1] == "multihost":
        multihost_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
