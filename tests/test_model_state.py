"""Models with non-parameter state: BatchNorm statistics, dropout's random streams, any other
``nnx.Variable``; trained by every method, updated once per step from the step's own forward
pass, evaluated with running statistics, checkpointed, and equal on 8 devices and on one.

The 8-device runs happen in a subprocess that runs this file as a script
(``python tests/test_model_state.py worker OUT``), as in ``test_sharding.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

# `--dist loadgroup` keeps this module on one worker: module fixtures.
pytestmark = pytest.mark.xdist_group("model_state")

HERE = os.path.dirname(os.path.abspath(__file__))
T = 3
BATCH = 16
NUM_DEVICES = 8
DP_METHODS = ("ew", "upgrad", "gradnorm")
DP_STEPS = 3
DP_TOL = 2e-5  # float32: sums over devices are ordered differently


# ----------------------------------------------------------------------------------------------
# The model: a shared encoder with BatchNorm and dropout, a counter of forward passes, and
# stacked linear heads


def _model(seed=0, shared="encoder", dropout=0.3, batch_spec=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import mtljax as mtl

    class Count(nnx.Variable):
        """A non-parameter variable of a type of its own: how many forward passes ran."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Sequential(
                nnx.Linear(5, 8, rngs=rngs),
                nnx.BatchNorm(8, momentum=0.9, rngs=rngs),
                jax.nn.relu,
                nnx.Dropout(dropout, rngs=rngs),
                nnx.Linear(8, 8, rngs=rngs),
            )
            self.heads = mtl.nn.StackedLinear(8, 2, T, rngs=rngs)
            self.passes = Count(jnp.zeros((), jnp.int32))

        def encode(self, x):
            self.passes[...] = self.passes[...] + 1
            return self.encoder(x)

    net = Net(nnx.Rngs(seed))
    model, params = mtl.from_nnx(
        net,
        task_names=tuple(f"t{i}" for i in range(T)),
        shared=shared,
        encode=lambda m, b: m.encode(b["x"]),
        heads=lambda m, z, b: jnp.mean((m.heads(z) - b["y"]) ** 2, axis=(1, 2)),
        last_shared="encoder/layers/4",
        batch_spec=batch_spec,
    )
    return model, params


def _batch(i=0):
    rng = np.random.default_rng(100 + i)
    x = rng.standard_normal((BATCH, 5), np.float32) * 2.0 + 1.0
    w = np.random.default_rng(7).standard_normal((T, 5, 2), np.float32)
    y = np.einsum("bi,tio->tbo", x, w) + 0.3 * rng.standard_normal((T, BATCH, 2))
    return {"x": x, "y": y.astype(np.float32)}


def _method(name):
    import mtljax as mtl

    _, params = _setup()
    kwargs = {"weights": [1.0] * T} if name == "fixed" else {}
    try:
        return mtl.methods.get(name, like=params.shared, **kwargs)
    except TypeError:  # a factory without `like`
        return mtl.methods.get(name, **kwargs)


_CACHE: dict = {}


def _setup():
    if "model" not in _CACHE:
        _CACHE["model"] = _model()
    return _CACHE["model"]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _bits_equal(a, b) -> bool:
    import jax

    la, lb = (
        [
            np.asarray(jax.random.key_data(x) if _is_key(x) else x)
            for x in jax.tree_util.tree_leaves(t)
        ]
        for t in (a, b)
    )
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _is_key(x):
    import jax

    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _manual_statistics(model, params, x):
    """BatchNorm's statistics after one NNX forward pass in training mode (the reference)."""
    from flax import nnx

    import mtljax as mtl

    module = mtl.to_nnx(model, params)
    module.train()
    module.encoder(x)
    return nnx.state(module, nnx.BatchStat)


# ----------------------------------------------------------------------------------------------
# The tests


def test_from_nnx_splits_parameters_from_the_model_state():
    import jax

    model, params = _setup()
    assert model.has_state and model.uses_key
    state_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(model.initial_state)[0]]
    assert len(state_paths) == 3  # BatchNorm's mean and var, the pass counter
    # BatchNorm's scale and bias are parameters of the shared encoder.
    from mtljax._src import tree as tree_lib

    shared = tree_lib.leaf_paths(params.shared)
    assert "encoder/layers/1/scale" in shared and "encoder/layers/1/bias" in shared


# Besides the methods at parameter level: feature level, the Gramian by task chunks, the
# Jacobian in task chunks (each a different path through the engine).
EXTRA_STEPS = (
    ("upgrad", {"mode": "feature"}),
    ("upgrad", {"gramian_chunk_size": 2}),
    ("pcgrad", {"mode": "feature", "chunk_size": 2}),
)


# One method for each way a step uses the model: the losses alone (ew), a second evaluation
# after the update (famo), the last shared layer (gradnorm), the Gramian with a solver
# (upgrad), the Jacobian itself (pcgrad).
PATHS = ("ew", "famo", "gradnorm", "upgrad", "pcgrad")


def _check_one_step_each(runs):
    """A jitted step of each ``(method, make_train_step options)`` on the same state and batch:
    every step is applied, the parameters move, and the model state is that of one NNX forward
    pass (BatchNorm's statistics; the pass counter at 1), whatever
    the method computes from it (Jacobians, a layer subset, feature level, FAMO's second
    evaluation); every step sees the same losses (the same forward pass)."""
    import jax
    import optax

    import mtljax as mtl

    model, params = _setup()
    batch = _batch()
    steps, states = [], []
    for name, kwargs in runs:
        method = _method(name)
        opt = optax.sgd(1e-2)
        states.append(mtl.init_train_state(model, params, method, opt, jax.random.key(0)))
        steps.append(mtl.make_train_step(model, method, opt, **kwargs))
        steps[-1].check(states[-1], batch)

    # One jitted step per method (one program holding them all compiles 1.6 times slower).
    out = [jax.jit(s._step)(st, batch) for s, st in zip(steps, states, strict=True)]
    want = _leaves(_manual_statistics(model, params, batch["x"]))
    initial = _leaves(model.initial_state["encoder"])
    first_losses = np.asarray(out[0][1]["losses"])
    for (name, kwargs), (state, metrics) in zip(runs, out, strict=True):
        what = f"{name} {kwargs}"
        assert bool(metrics["finite"]), what
        assert int(state.skipped) == 0, what
        moved = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(_leaves(state.params), _leaves(params), strict=True)
        )
        assert moved > 0, what
        assert int(state.model_state["passes"][...]) == 1, what
        got = _leaves(state.model_state["encoder"])
        for g, w, i in zip(got, want, initial, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=what)
            assert np.max(np.abs(g - i)) > 1e-3, what  # the statistics did move
        np.testing.assert_allclose(metrics["losses"], first_losses, rtol=1e-6, err_msg=what)


def test_the_statistics_update_once_per_step_on_every_path_of_the_engine():
    _check_one_step_each([(name, {}) for name in PATHS] + list(EXTRA_STEPS))


def _all_methods():
    import mtljax as mtl

    return mtl.methods.names()


@pytest.mark.parametrize("name", _all_methods())
def test_every_method_builds_a_step_that_carries_the_model_state(name):
    """Every method's step on the BatchNorm + dropout model traces, keeps the model state's
    structure, shapes and dtypes, and reports the metrics every method reports. (Traced only:
    the steps of one method per path through the engine run in the test above; every method
    runs in the test below.)"""
    import jax
    import optax

    import mtljax as mtl

    model, params = _setup()
    method, opt = _method(name), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    step.check(state, _batch())
    new, metrics = jax.eval_shape(step.jitted, state, _batch())
    want = jax.eval_shape(lambda: state)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(want)
    for a, b in zip(
        jax.tree_util.tree_leaves(new.model_state),
        jax.tree_util.tree_leaves(want.model_state),
        strict=True,
    ):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    from mtljax._src.train import METHOD_METRICS

    assert set(METHOD_METRICS) <= set(metrics), name


def test_every_method_trains_and_updates_the_statistics_once_per_step():
    import mtljax as mtl

    others = [(name, {}) for name in mtl.methods.names() if name not in PATHS]
    _check_one_step_each([*others, ("gradnorm", {"mode": "feature"})])


def test_a_skipped_step_leaves_the_model_state():
    import jax
    import optax

    import mtljax as mtl

    model, params = _setup()
    method, opt = mtl.methods.ew(), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    bad = _batch()
    bad["y"][0, 0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mtl.SkippedStepWarning)
        new, metrics = mtl.make_train_step(model, method, opt)(state, bad)
    assert not bool(metrics["finite"]) and int(new.skipped) == 1
    assert _bits_equal(new.model_state, state.model_state)


def test_eval_mode_uses_running_statistics_and_no_dropout():
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import mtljax as mtl

    model, params = _setup()
    method, opt = mtl.methods.ew(), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    for i in range(3):
        state, _ = step(state, _batch(i))
    batch = _batch(9)
    got = model.eval_losses(state, batch)

    def losses(module):
        pred = module.heads(module.encoder(jnp.asarray(batch["x"])))
        return jnp.mean((pred - batch["y"]) ** 2, axis=(1, 2))

    module = mtl.to_nnx(model, state)
    module.eval()
    np.testing.assert_allclose(got, losses(module), rtol=1e-6)
    # Running statistics, not the batch's: normalising by the batch's own statistics differs.
    batch_stats = nnx.view(module, use_running_average=False)
    assert np.max(np.abs(np.asarray(got) - np.asarray(losses(batch_stats)))) > 1e-3
    # No dropout: any key gives the same losses.
    np.testing.assert_array_equal(got, model.eval_losses(state, batch, key=jax.random.key(5)))
    # Params alone: the statistics as built.
    module0 = mtl.to_nnx(model, state.params)
    module0.eval()
    np.testing.assert_allclose(model.eval_losses(state.params, batch), losses(module0), rtol=1e-6)


def test_each_step_draws_a_fresh_key_from_the_state():
    import jax
    import optax

    import mtljax as mtl
    from mtljax._src.train import model_key

    model, params = _setup()
    method, opt = mtl.methods.ew(), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    fns = model.step_fns()
    batch = _batch()
    seen = []
    for _ in range(2):
        key = model_key(state.key, state.step)
        ctx = fns.enter(state.model_state, key)
        want = fns.losses(state.params.shared, state.params.specific, batch, ctx)[0]
        new, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["losses"], want, rtol=1e-6)
        seen.append(
            fns.losses(params.shared, params.specific, batch, fns.enter(model.initial_state, key))[
                0
            ]
        )
        state = new
    # Two steps, two dropout masks (same parameters, same batch, different losses).
    assert np.max(np.abs(np.asarray(seen[0]) - np.asarray(seen[1]))) > 1e-4


def test_the_jacobian_sees_the_dropout_mask_of_the_losses():
    import jax

    from mtljax._src import engine

    model, params = _setup()
    batch = _batch()
    fns = model.step_fns()
    ms = model.initial_state

    def losses(shared, key):
        return fns.losses(shared, params.specific, batch, fns.enter(ms, key))[0]

    def diff(a, b):
        return max(
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        )

    key, other = jax.random.key(3), jax.random.key(4)
    q = engine.compute(model, params, batch, needs="jacobian", model_state=ms, key=key)
    ref = jax.jacrev(losses)(params.shared, key)
    np.testing.assert_allclose(q.losses, losses(params.shared, key), rtol=1e-6)
    assert diff(q.jacobian, ref) < 1e-5
    assert diff(jax.jacrev(losses)(params.shared, other), ref) > 1e-3  # the mask matters
    # The last shared layer only (GradNorm): the same pass.
    q_last = engine.compute(
        model, params, batch, needs="gramian", subset="last", model_state=ms, key=key
    )
    layer = ref["encoder"]["layers"][4]
    assert diff(q_last.jacobian, [layer["bias"], layer["kernel"]]) < 1e-5
    # Feature level: the heads' Jacobian at the representation of the same pass.
    q_z = engine.compute(
        model, params, batch, needs="jacobian", mode="feature", model_state=ms, key=key
    )
    z, ctx = fns.encode(params.shared, batch, fns.enter(ms, key))
    ref_z = jax.jacrev(lambda z_: fns.heads(params.specific, z_, batch, ctx)[0])(z)
    assert diff(q_z.jacobian, ref_z) < 1e-5
    np.testing.assert_allclose(q_z.losses, q.losses, rtol=1e-6)


def test_repeated_and_resumed_runs_are_bit_identical(tmp_path):
    import jax
    import optax

    import mtljax as mtl

    model, params = _setup()
    method, opt = mtl.methods.upgrad(), optax.adam(1e-2)

    step = mtl.make_train_step(model, method, opt)

    def run(state, steps):
        for i in range(int(state.step), steps):
            state, _ = step(state, _batch(i))
        return state

    init = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    full = run(init, 4)
    assert _bits_equal(full, run(init, 4))
    half = run(init, 2)
    with mtl.Checkpointer(
        tmp_path, method=method, optimizer=opt, task_names=model.task_names
    ) as ck:
        ck.save(half)
    with mtl.Checkpointer(tmp_path, mode="read") as ck:
        restored = ck.restore(init).state
    assert _bits_equal(restored, half)
    resumed = run(restored, 4)
    assert _bits_equal(resumed, full)
    assert int(full.model_state["passes"][...]) == 4


def test_check_shared_split_on_a_batchnorm_model():
    import jax.numpy as jnp

    import mtljax as mtl

    model, params = _setup()
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    report = mtl.nn.check_shared_split(model, params, batch)
    assert report.ok
    assert report.shared_tasks["encoder/layers/1/scale"] == T
    assert report.shared_tasks["encoder/layers/1/bias"] == T
    # BatchNorm declared task-specific by a too narrow filter: caught, and named.
    narrow, p_narrow = _model(shared="encoder/layers/0")
    with pytest.raises(ValueError, match="encoder/layers/1/scale"):
        mtl.nn.check_shared_split(narrow, p_narrow, batch)


def test_mixed_precision_keeps_the_state_in_its_dtype():
    import jax
    import jax.numpy as jnp
    import optax

    import mtljax as mtl

    model, params = _setup()
    method, opt = mtl.methods.upgrad(), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, compute_dtype=jnp.bfloat16)
    new, metrics = step(state, _batch())
    assert bool(metrics["finite"])
    for a, b in zip(_leaves(new.model_state), _leaves(state.model_state), strict=True):
        assert a.dtype == b.dtype
    want = _leaves(_manual_statistics(model, params, _batch()["x"]))
    for g, w in zip(_leaves(new.model_state["encoder"]["layers"][1]), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2)  # from bfloat16 activations


def test_unsupported_state_is_refused_naming_the_variable():
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import mtljax as mtl
    from mtljax._src.model import ModelStateError

    def build(net):
        return mtl.from_nnx(
            net, task_names=("a", "b"), shared="body", losses=lambda m, b: m(b["x"])
        )

    class Net(nnx.Module):
        def __init__(self):
            self.body = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return jnp.mean(self.body(x) ** 2, axis=0)

    net = Net()
    net.sown = nnx.Intermediate(jnp.zeros(2))
    with pytest.raises(ModelStateError, match=r"'sown'.*nnx\.pop"):
        build(net)
    net = Net()
    net.tag = nnx.Variable("not an array")
    with pytest.raises(ModelStateError, match=r"'tag'.*holds a str, not an array"):
        build(net)

    class Growing(Net):
        def __init__(self):
            super().__init__()
            self.history = nnx.BatchStat(jnp.zeros((1,)))

        def __call__(self, x):
            self.history.set_value(jnp.concatenate([self.history.get_value(), jnp.zeros((1,))]))
            return super().__call__(x)

    model, params = build(Growing())
    method, opt = mtl.methods.ew(), optax.sgd(0.1)
    import jax

    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    with pytest.raises(ModelStateError, match=r"'history' from float32\[1\] to float32\[2\]"):
        mtl.make_train_step(model, method, opt)(state, {"x": jnp.ones((4, 3))})


def test_a_state_of_another_model_is_refused():
    import jax
    import optax

    import mtljax as mtl
    from tests.helpers import tiny_model

    model, params = _setup()
    method, opt = mtl.methods.ew(), optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    stateless, _ = tiny_model(T)
    with pytest.raises(ValueError, match="model state does not fit this model"):
        mtl.make_train_step(model, method, opt)(state._replace(model_state=()), _batch())
    with pytest.raises(ValueError, match="model state does not fit this model"):
        mtl.init_train_state(
            stateless, params, method, opt, jax.random.key(0), model_state=state.model_state
        )


# ----------------------------------------------------------------------------------------------
# 8 simulated devices (a subprocess)


def worker(out_path: str) -> None:
    import mtljax as mtl

    mtl.set_cpu_devices(NUM_DEVICES)
    import jax
    import jax.numpy as jnp
    import optax

    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    spec = {
        "x": mtl.BatchField(("batch", 5), jnp.float32),
        "y": mtl.BatchField(("tasks", "batch", 2), jnp.float32),
    }
    model, params = _model(batch_spec=spec)
    mesh = mtl.make_mesh(NUM_DEVICES)
    report: dict = {"devices": len(jax.devices()), "methods": {}}

    def diff(a, b):
        a, b = mtl.to_host(a), mtl.to_host(b)
        return max(
            [
                float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(
                    jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
                )
            ],
            default=0.0,
        )

    def one_and_eight(model, params, batches, name, opt):
        """The states after the same steps on one device and data-parallel on all."""
        method = mtl.methods.get(name, like=params.shared)
        init = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
        step = mtl.make_train_step(model, method, opt)
        one = init
        for b in batches:
            one, _ = step(one, b)
        dp_step = mtl.data_parallel(step, mesh)
        dp = init
        for b in batches:
            dp, metrics = dp_step(dp, b)
        return (
            init,
            one,
            dp,
            {
                "params": diff(dp.params, one.params),
                "model_state": diff(dp.model_state, one.model_state),
                "method_state": diff(dp.method_state, one.method_state),
                "moved": diff(one.params, init.params),
                "stats_moved": diff(one.model_state["encoder"], init.model_state["encoder"]),
                "finite": bool(np.asarray(metrics["finite"])),
                "batch_devices": len(dp_step.shard_batch(batches[0])["x"].sharding.device_set),
            },
        )

    batches = [_batch(i) for i in range(DP_STEPS)]
    for name in DP_METHODS:
        *_, r = one_and_eight(model, params, batches, name, optax.sgd(0.1))
        # A per-device BatchNorm would normalise each shard by its own statistics, which
        # differ from the global batch's: the inputs' means differ by this much.
        shard = {"x": _batch(0)["x"][: BATCH // NUM_DEVICES]}
        r["shard_stats_differ"] = float(np.max(np.abs(shard["x"].mean(0) - _batch(0)["x"].mean(0))))
        report["methods"][name] = r

    # multidigits with its ResNet encoder (BatchNorm in every block, dropout), via the problem.
    from tests.test_multidigits_resnet import METHODS, RESNET

    problem = mtl.problems.get("multidigits", **RESNET)
    batches = [problem.sample(jax.random.key(10 + i)) for i in range(DP_STEPS)]
    report["multidigits"] = {}
    for name in METHODS:
        *_, r = one_and_eight(problem.model, problem.params, batches, name, problem.optimizer)
        report["multidigits"][name] = r
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


@pytest.fixture(scope="module", autouse=True)
def dp_worker(tmp_path_factory):
    """Starts the 8-device worker with the module's first test, so that it runs beside them."""
    from tests.helpers import subprocess_env

    out = tmp_path_factory.mktemp("model_state") / "report.json"
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "worker", str(out)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def dp_report(dp_worker):
    out, proc = dp_worker
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", DP_METHODS)
def test_batch_statistics_over_eight_devices_equal_one(dp_report, name):
    assert dp_report["devices"] == NUM_DEVICES
    r = dp_report["methods"][name]
    assert r["batch_devices"] == NUM_DEVICES and r["finite"]
    assert r["moved"] > 100 * DP_TOL and r["stats_moved"] > 100 * DP_TOL
    assert r["shard_stats_differ"] > 0.1  # per-device statistics would be visibly different
    assert r["params"] < DP_TOL, r
    assert r["model_state"] < DP_TOL, r
    assert r["method_state"] < DP_TOL, r


@pytest.mark.parametrize("name", ("ew", "upgrad"))
def test_multidigits_resnet_over_eight_devices_equals_one(dp_report, name):
    r = dp_report["multidigits"][name]
    assert r["batch_devices"] == NUM_DEVICES and r["finite"]
    assert r["moved"] > 100 * DP_TOL and r["stats_moved"] > 100 * DP_TOL
    assert r["params"] < DP_TOL, r
    assert r["model_state"] < DP_TOL, r
    assert r["method_state"] < DP_TOL, r


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        sys.path.insert(0, os.path.dirname(HERE))
        worker(sys.argv[2])
