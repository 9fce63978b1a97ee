"""The jitted train step, the model adapter and their errors."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtljax as mtl
from mtljax._src import tree as tree_lib
from tests.helpers import max_abs_diff, tiny_batch, tiny_model

# `--dist loadgroup` keeps this module on one worker: module fixtures.
pytestmark = pytest.mark.xdist_group("train")

T = 3


@pytest.fixture(scope="module")
def setup():
    model, params = tiny_model(T)
    return model, params, tiny_batch(T)


def make(model, params, method, opt=None, **kw):
    opt = opt or optax.adam(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    return state, mtl.make_train_step(model, method, opt, **kw)


@pytest.mark.parametrize(
    "name, mode",
    # Losses-only methods never take the feature path: feature mode is run with Gramian ones.
    [
        ("ew", "parameter"),
        ("uw", "parameter"),
        ("gradnorm", "parameter"),
        ("gradnorm", "feature"),
        ("upgrad", "parameter"),
        ("upgrad", "feature"),
    ],
)
def test_training_lowers_losses_without_retracing(setup, name, mode):
    model, params, batch = setup
    state, step = make(model, params, mtl.methods.get(name), mode=mode)
    first = None
    for _ in range(60):
        state, metrics = step(state, batch)
        first = metrics["losses"] if first is None else first
    assert step.jitted._cache_size() == 1
    assert np.all(np.asarray(metrics["losses"]) < np.asarray(first))
    assert int(state.step) == 60 and int(state.skipped) == 0


def test_metrics_cosines_and_norms(setup):
    model, params, batch = setup
    state, step = make(model, params, mtl.methods.gradnorm(params="all"))
    _, metrics = step(state, batch)
    _, jac = mtl.task_jacobian(model, params, batch)
    flat = np.concatenate(
        [np.asarray(x).reshape(T, -1) for x in jax.tree_util.tree_leaves(jac)], axis=1
    )
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(metrics["grad_norms"], norms, rtol=1e-4)
    np.testing.assert_allclose(
        metrics["cosines"], flat @ flat.T / np.outer(norms, norms), atol=1e-5
    )
    np.testing.assert_allclose(metrics["weights"], np.ones(T))


MODES = ("parameter", "feature")


def fixed_from_gramian(weights) -> mtl.Method:
    """Fixed weights declared as a Gramian method, so that the train step takes the
    parameter- or feature-level Jacobian path (a losses-only method never does)."""
    w = jnp.asarray(weights, jnp.float32)
    return mtl.Method("fixed_g", lambda t: (), "gramian", weights=lambda l, g, s, k: (w, s))


def test_feature_and_parameter_mode_agree_for_weights(setup):
    model, params, batch = setup
    m = fixed_from_gramian([0.5, 1.0, 2.0])

    @jax.jit
    def both(p):
        return [mtl.gradients(model, m, p, (), batch, None, mode=k)[0] for k in MODES]

    g_par, g_feat = both(params)
    ref = jax.grad(lambda p: jnp.array([0.5, 1.0, 2.0]) @ model.losses(p, batch))(params)
    assert max_abs_diff(g_par, ref) < 1e-5
    assert max_abs_diff(g_feat, ref) < 1e-5


def test_head_grads_unit_vs_weighted(setup):
    model, params, batch = setup
    m = mtl.methods.fixed([0.5, 1.0, 2.0])
    weighted, _, _ = mtl.gradients(model, m, params, (), batch, None)
    unit, _, _ = mtl.gradients(model, m, params, (), batch, None, head_grads="unit")
    ref = jax.grad(lambda p: jnp.sum(model.losses(p, batch)))(params)
    assert max_abs_diff(unit.specific, ref.specific) < 1e-6
    assert max_abs_diff(unit.shared, weighted.shared) < 1e-6
    k_w, k_u = weighted.specific["heads"]["kernel"], unit.specific["heads"]["kernel"]
    np.testing.assert_allclose(k_w, np.array([0.5, 1.0, 2.0])[:, None, None] * k_u, rtol=1e-5)


def test_nonfinite_step_is_skipped(setup):
    model, params, batch = setup
    state, step = make(model, params, mtl.methods.ew())
    bad = dict(batch, y=batch["y"].at[1, 0, 0].set(jnp.nan))
    new, metrics = step(state, bad)
    assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
    assert max_abs_diff(new.params, state.params) == 0.0
    new, metrics = step(new, batch)
    assert bool(metrics["finite"]) and max_abs_diff(new.params, state.params) > 0


def test_wrong_number_of_task_names(setup):
    model, params, batch = setup
    wrong = mtl.Model(("a", "b"), model.losses_fn)
    state, step = make(wrong, params, mtl.methods.ew())
    with pytest.raises(ValueError, match=r"shape \(T,\) = \(2,\).*got \(3,\)"):
        step(state, batch)


def test_bad_arguments_are_named(setup):
    model, params, batch = setup
    with pytest.raises(ValueError, match="mode"):
        mtl.make_train_step(model, mtl.methods.ew(), optax.sgd(1.0), mode="layer")
    with pytest.raises(ValueError, match="chunk_size"):
        mtl.make_train_step(model, mtl.methods.ew(), optax.sgd(1.0), chunk_size=0)
    with pytest.raises(ValueError, match="feature"):
        mtl.make_train_step(
            mtl.Model(model.task_names, model.losses_fn),
            mtl.methods.ew(),
            optax.sgd(1.0),
            mode="feature",
        )
    with pytest.raises(ValueError, match="last_shared"):
        mtl.make_train_step(
            mtl.Model(model.task_names, model.losses_fn), mtl.methods.gradnorm(), optax.sgd(1.0)
        )
    with pytest.raises(ValueError, match="duplicates"):
        mtl.Model(("a", "a"), model.losses_fn)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        mtl.make_train_step(
            mtl.Model(("a",), model.losses_fn), mtl.methods.gradnorm(), optax.sgd(1.0)
        )
    bad_last = mtl.Model(model.task_names, model.losses_fn, last_shared="encoder/nope")
    with pytest.raises(ValueError, match="matches no shared parameter"):
        bad_last.check(params, batch)


def test_from_nnx_shared_name_is_a_path_prefix():
    """``shared="encoder"`` is the top-level attribute: a head's own ``encoder`` sub-module
    stays task-specific (and so gets its own task's gradient, not a shared one)."""

    class Head(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(4, 4, rngs=rngs)
            self.out = nnx.Linear(4, 1, rngs=rngs)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(3, 4, rngs=rngs)
            self.heads = nnx.List([Head(rngs), Head(rngs)])

    def losses(m, b):
        z = m.encoder(b["x"])
        return jnp.stack([jnp.mean(h.out(h.encoder(z)) ** 2) for h in m.heads])

    model, params = mtl.from_nnx(
        Net(nnx.Rngs(0)), task_names=("a", "b"), shared="encoder", losses=losses
    )
    shared = tree_lib.leaf_paths(params.shared)
    specific = tree_lib.leaf_paths(params.specific)
    assert shared == ["encoder/bias", "encoder/kernel"]
    assert "heads/0/encoder/kernel" in specific and "heads/1/encoder/kernel" in specific
    batch = {"x": jnp.ones((8, 3))}
    assert mtl.nn.check_shared_split(model, params, batch).over_shared() == ()


def test_from_nnx_errors():
    net = mtl.nn.HardSharing(
        mtl.nn.MLP((3, 4), rngs=nnx.Rngs(0)), mtl.nn.StackedLinear(4, 1, 2, rngs=nnx.Rngs(1))
    )
    with pytest.raises(ValueError, match="selects no nnx.Param"):
        mtl.from_nnx(net, task_names=("a", "b"), shared="trunk", losses=lambda m, b: 0)
    with pytest.raises(ValueError, match="not both"):
        mtl.from_nnx(
            net,
            task_names=("a", "b"),
            shared="encoder",
            losses=lambda m, b: 0,
            encode=lambda m, b: 0,
            heads=lambda m, z, b: 0,
        )


class _ScaledHeads(nnx.Module):
    """An encoder, per-task linear heads and a scale ``s`` (shared or not, by the filter)."""

    def __init__(self):
        self.encoder = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        self.heads = nnx.Linear(4, 2, rngs=nnx.Rngs(1))
        self.s = nnx.Param(jnp.ones(()))


def _scaled_losses(pred, b):
    return jnp.mean((pred - b["y"]) ** 2, axis=0)


def _encode_scaled(m, b):
    return jnp.tanh(m.encoder(b["x"])) * m.s[...]


def _encode(m, b):
    return jnp.tanh(m.encoder(b["x"]))


def _heads_scaled(m, z, b):
    return _scaled_losses(m.heads(z) * m.s[...], b)


def _heads(m, z, b):
    return _scaled_losses(m.heads(z), b)


_ENCODER_AND_S = nnx.Any(nnx.PathContains("encoder"), nnx.PathContains("s"))
_XY = {"x": jnp.ones((5, 3)), "y": jnp.zeros((5, 2))}


@pytest.mark.parametrize(
    "encode, heads, shared",
    [(_encode, _heads_scaled, _ENCODER_AND_S), (_encode_scaled, _heads, "encoder")],
    ids=["heads read a shared parameter", "encode reads a task-specific parameter"],
)
def test_from_nnx_feature_mode_refuses_reads_of_the_other_half(encode, heads, shared):
    """Feature mode gives ``encode`` the shared parameters and ``heads`` the task-specific ones;
    the other half would be its value at build time, stale and without gradient (a shared
    scale ``s = 2`` read in the heads gave the losses of ``s = 1`` and a zero gradient for
    ``s``). Such a read is an error naming the parameter; parameter mode is unaffected."""
    model, params = mtl.from_nnx(
        _ScaledHeads(), task_names=("a", "b"), shared=shared, encode=encode, heads=heads
    )
    method = mtl.methods.mgda()
    g = jax.jit(lambda p: mtl.gradients(model, method, p, (), _XY, None)[0])(params)
    g_s = g.shared["s"] if "s" in g.shared else g.specific["s"]
    assert abs(float(g_s[...])) > 0  # parameter mode: s is read and trained
    with pytest.raises(ValueError, match=r"reads the [\w-]+ parameters \['s'\]"):
        mtl.gradients(model, method, params, (), _XY, None, mode="feature")


def test_from_nnx_feature_mode_agrees_with_parameter_mode_under_vmap():
    model, params = mtl.from_nnx(
        _ScaledHeads(),
        task_names=("a", "b"),
        shared=_ENCODER_AND_S,
        encode=_encode_scaled,
        heads=_heads,
    )
    method = fixed_from_gramian([0.3, 1.7])  # the same weights in both modes

    def both(p):
        return [mtl.gradients(model, method, p, (), _XY, None, mode=m)[0] for m in MODES]

    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), params)
    g_param, g_feat = jax.jit(jax.vmap(both))(stacked)
    assert max_abs_diff(g_param, g_feat) < 1e-5


def test_no_shared_parameters_weighted_gramian_method_by_mode():
    """Without shared parameters, Nash-MTL's weights are undefined in parameter mode (G = 0:
    it raises) but defined at feature level, where G is the representation's Gramian."""

    class Towers(nnx.Module):
        def __init__(self):
            self.heads = mtl.nn.StackedLinear(3, 1, 2, rngs=nnx.Rngs(1))

    def heads(m, z, b):
        return jnp.mean((m.heads(z)[..., 0] - b["y"]) ** 2, axis=-1)

    model, params = mtl.from_nnx(
        Towers(), task_names=("a", "b"), shared=None, encode=lambda m, b: b["x"], heads=heads
    )
    batch = {"x": jax.random.normal(jax.random.key(0), (8, 3)), "y": jnp.ones((2, 8))}
    method = mtl.methods.nash_mtl()
    with pytest.raises(ValueError, match="no shared parameters"):
        mtl.gradients(model, method, params, method.init(2), batch, None)
    run = jax.jit(
        lambda p: mtl.gradients(model, method, p, method.init(2), batch, None, mode="feature")
    )
    g, _, metrics = run(params)
    assert np.all(np.asarray(metrics["weights"]) > 0)
    assert max_abs_diff(g, jax.tree_util.tree_map(jnp.zeros_like, g)) > 0


def test_to_nnx_round_trip(setup):
    model, params, batch = setup
    module = mtl.to_nnx(model, params)
    z = module.encode(batch["x"])
    np.testing.assert_allclose(model.encode_fn(params.shared, batch), z, rtol=1e-6)


# -- regularizers added outside the method, proximal steps -------------------------------------

C_SHARED, C_SPECIFIC = 0.3, 0.7


def _reg(shared, specific, batch=None):
    """``R = ½c‖θ_shared‖² + c'‖θ_specific‖²``: ``∇R = (c θ_shared, 2c' θ_specific)``."""
    sq = lambda tree: sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    return 0.5 * C_SHARED * sq(shared) + C_SPECIFIC * sq(specific)


def _reg_grad(params):
    return mtl.Params(
        jax.tree_util.tree_map(lambda x: C_SHARED * x, params.shared),
        jax.tree_util.tree_map(lambda x: 2 * C_SPECIFIC * x, params.specific),
    )


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


@pytest.mark.parametrize("mode", ["parameter", "feature"])
@pytest.mark.parametrize("name", ["fixed", "mgda"])
def test_regularizer_gradient_is_added_once_and_unweighted(setup, name, mode):
    model, params, batch = setup
    reg_model = dataclasses.replace(model, regularizer=_reg)
    w = jnp.array([0.5, 2.0, 3.0])
    method = mtl.methods.fixed(w) if name == "fixed" else mtl.methods.mgda()
    state = method.init(T)
    key = jax.random.key(0)

    @jax.jit
    def both(p):
        return tuple(
            mtl.gradients(mdl, method, p, state, batch, key, mode=mode)
            for mdl in (model, reg_model)
        )

    (g, _, m), (g_r, _, m_r) = both(params)
    # The method sees the same losses and gives the same weights: R is not a task loss.
    np.testing.assert_allclose(m_r["weights"], m["weights"], rtol=1e-6)
    np.testing.assert_allclose(m_r["losses"], m["losses"], rtol=1e-6)
    np.testing.assert_allclose(m_r["regularizer"], _reg(*params), rtol=1e-6)
    assert "regularizer" not in m
    assert max_abs_diff(g_r, _add(g, _reg_grad(params))) < 1e-6
    if name == "fixed":  # by hand: ∇(w·L) + ∇R
        want = _add(jax.grad(lambda p: w @ model.losses(p, batch))(params), _reg_grad(params))
        assert max_abs_diff(g_r, want) < 1e-5
    # The train step descends along it: SGD with learning rate 1 moves by −(d + ∇R).
    state0, step = make(reg_model, params, method, optax.sgd(1.0), mode=mode)
    new, metrics = step(state0, batch)
    assert max_abs_diff(new.params, jax.tree_util.tree_map(jnp.subtract, params, g_r)) < 1e-5
    np.testing.assert_allclose(metrics["regularizer"], _reg(*params), rtol=1e-6)


def test_regularizer_in_scan_and_the_nonfinite_guard(setup):
    model, params, batch = setup
    reg_model = dataclasses.replace(model, regularizer=_reg)
    state, step = make(reg_model, params, mtl.methods.ew(), optax.sgd(0.1))
    one, _ = step(state, batch)
    scanned, metrics = step.scan(state, lambda k: batch, jax.random.split(jax.random.key(0), 1))
    assert max_abs_diff(scanned.params, one.params) < 1e-6
    assert metrics["regularizer"].shape == (1,)
    # A non-finite regularizer skips the step (or raises, naming the regularizer).
    bad = dataclasses.replace(model, regularizer=lambda s, p, b: jnp.log(-_reg(s, p)))
    state, step = make(bad, params, mtl.methods.ew(), optax.sgd(0.1))
    new, metrics = step(state, batch)
    assert not bool(metrics["finite"]) and int(new.skipped) == 1
    assert max_abs_diff(new.params, state.params) == 0.0
    state, step = make(bad, params, mtl.methods.ew(), optax.sgd(0.1), nonfinite="raise")
    with pytest.raises(mtl.NonFiniteError, match="non-finite regularizer"):
        step(state, batch)


def test_regularizer_errors_are_named(setup):
    model, params, batch = setup
    with pytest.raises(TypeError, match="regularizer"):
        dataclasses.replace(model, regularizer=1.0)
    vector = dataclasses.replace(model, regularizer=lambda s, p, b: jnp.ones(3))
    with pytest.raises(ValueError, match="scalar"):
        vector.check(params, batch)


def test_prox_is_applied_after_the_update_in_step_and_scan(setup):
    model, params, batch = setup

    def shrink(p):  # the prox of ½·0.5‖θ‖² on the heads: θ / 1.5
        return mtl.Params(p.shared, jax.tree_util.tree_map(lambda x: x / 1.5, p.specific))

    method, opt = mtl.methods.ew(), optax.sgd(0.1)
    state, plain = make(model, params, method, opt)
    _, step = make(model, params, method, opt, prox=shrink)
    want, _ = plain(state, batch)
    got, metrics = step(state, batch)
    assert max_abs_diff(got.params, shrink(want.params)) < 1e-6
    d = jax.tree_util.tree_map(jnp.subtract, got.params, state.params)
    np.testing.assert_allclose(metrics["update_norm"], optax.tree.norm(d), rtol=1e-5)
    scanned, _ = step.scan(state, lambda k: batch, jax.random.split(jax.random.key(0), 2))
    twice, _ = step(got, batch)
    assert max_abs_diff(scanned.params, twice.params) < 1e-5
    # The guard judges the parameters after the prox.
    _, nan_step = make(
        model,
        params,
        method,
        opt,
        prox=lambda p: jax.tree_util.tree_map(lambda x: x * jnp.nan, p),
    )
    new, metrics = nan_step(state, batch)
    assert not bool(metrics["finite"]) and max_abs_diff(new.params, state.params) == 0.0
    with pytest.raises(TypeError, match="prox"):
        mtl.make_train_step(model, method, opt, prox="l1")
    _, wrong = make(model, params, method, opt, prox=lambda p: p.shared)
    with pytest.raises(TypeError, match="Params"):
        wrong(state, batch)


def test_from_nnx_shared_none_constants_and_regularizer():
    class Towers(nnx.Module):
        def __init__(self):
            self.towers = mtl.nn.StackedLinear(3, 1, 2, rngs=nnx.Rngs(0))
            self.prior = mtl.nn.Constant(jnp.ones((2, 3, 1)))

    def losses(m, b):
        return jnp.mean((m.towers(b["x"]) - b["y"]) ** 2, axis=(1, 2))

    def penalty(m, b):
        return jnp.sum((m.towers.kernel[...] - m.prior[...]) ** 2)

    model, params = mtl.from_nnx(
        Towers(), task_names=("a", "b"), shared=None, losses=losses, regularizer=penalty
    )
    assert jax.tree_util.tree_leaves(params.shared) == []
    kernel = params.specific["towers"]["kernel"][...]
    np.testing.assert_allclose(
        model.regularizer(params.shared, params.specific, None), jnp.sum((kernel - 1.0) ** 2)
    )
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((2, 4, 1))}
    model.check(params, batch)
    # A filter that matches nothing is still an error (a typo), with the way out named.
    with pytest.raises(ValueError, match="shared=None"):
        mtl.from_nnx(Towers(), task_names=("a", "b"), shared="tower", losses=losses)
    # Other non-parameter state is model state, carried by the train state (see
    # tests/test_model_state.py).
    net = Towers()
    net.stats = nnx.BatchStat(jnp.zeros(()))
    stateful, _ = mtl.from_nnx(net, task_names=("a", "b"), shared=None, losses=losses)
    assert stateful.has_state and not model.has_state


def test_model_and_params_do_not_alias_a_module():
    """Changing a module in place (training it, ``Cascade.set_anchor()``) after ``from_nnx``, or
    a module rebuilt by ``to_nnx``, changes neither the Params nor the model's constants."""

    class Net(nnx.Module):
        def __init__(self):
            self.body = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
            self.heads = mtl.nn.StackedLinear(2, 1, 2, rngs=nnx.Rngs(1))
            self.anchor = mtl.nn.Constant(jnp.zeros((2, 2, 1)))

    def losses(m, b):
        return jnp.mean(m.heads(m.body(b["x"])) ** 2, axis=(1, 2))

    def penalty(m, b):
        return jnp.sum((m.heads.kernel[...] - m.anchor[...]) ** 2)

    def values(tree):
        return [np.array(x) for x in jax.tree_util.tree_leaves(tree)]

    def bump(module):
        for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            v[...] = v[...] + 1.0
        module.anchor[...] = module.anchor[...] + 5.0

    net = Net()
    model, params = mtl.from_nnx(
        net, task_names=("a", "b"), shared="body", losses=losses, regularizer=penalty
    )
    p0, c0 = values(params), values(model.nnx_rest)
    r0 = float(model.regularizer(*params, None))
    bump(net)  # the module the model was built from
    bump(mtl.to_nnx(model, params))  # a module rebuilt from the model
    for a, b in zip(p0, values(params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(c0, values(model.nnx_rest), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(model.regularizer(*params, None)) == r0
    # The rebuilt module's changes reach a model built from it, and only that one.
    moved = mtl.to_nnx(model, params)
    moved.anchor[...] = moved.heads.kernel[...]
    model2, params2 = mtl.from_nnx(
        moved, task_names=("a", "b"), shared="body", losses=losses, regularizer=penalty
    )
    assert float(model2.regularizer(*params2, None)) == 0.0
    assert float(model.regularizer(*params, None)) == r0 > 0.0


def test_from_nnx_feature_mode_checks_reads_once_per_signature():
    """The read check traces ``encode`` / ``heads`` once for each new argument signature (shapes
    and dtypes), not at every call: eager feature-mode calls cost one trace each, as without
    the check, and a new batch shape is checked again."""
    calls = {"encode": 0, "heads": 0}

    def encode(m, b):
        calls["encode"] += 1
        return _encode(m, b)

    def heads(m, z, b):
        calls["heads"] += 1
        return _heads(m, z, b)

    model, params = mtl.from_nnx(
        _ScaledHeads(), task_names=("a", "b"), shared="encoder", encode=encode, heads=heads
    )
    for _ in range(3):
        z = model.encode_fn(params.shared, _XY)
        model.heads_fn(params.specific, z, _XY)
    assert calls == {"encode": 4, "heads": 4}  # one check + three calls each
    xy7 = {"x": jnp.ones((7, 3)), "y": jnp.zeros((7, 2))}
    model.heads_fn(params.specific, model.encode_fn(params.shared, xy7), xy7)
    assert calls == {"encode": 6, "heads": 6}  # a new shape: checked again


def _reporting_method(converged_until: int):
    """Equal weights, with a solver report that says 'converged' for the first
    ``converged_until`` calls (counted in the state) and not after."""

    class State(NamedTuple):
        calls: jax.Array
        solver: mtl.SolverInfo

    def init(num_tasks):
        return State(jnp.zeros((), jnp.int32), mtl.SolverInfo.initial())

    def weights(losses, gramian, state, key):
        calls = state.calls + 1
        info = mtl.SolverInfo.of(calls, calls <= converged_until, jnp.where(calls > 1, 0.5, 0.0))
        return jnp.ones_like(losses), State(calls, info)

    return mtl.Method("reporting", init, needs="gramian", weights=weights)


def test_solver_info_summarises_a_batch():
    info = mtl.SolverInfo.of(jnp.array([3, 7, 5]), jnp.array([True, False, True]), [1e-3, 2.0, 0.1])
    assert int(info.iterations) == 7 and not bool(info.converged)
    assert float(info.residual) == 2.0 and info.residual.dtype == jnp.float32
    merged = mtl.SolverInfo.merge(mtl.SolverInfo.initial(), mtl.SolverInfo.of(4, True, 1e-7))
    assert int(merged.iterations) == 4 and bool(merged.converged)
    assert float(merged.residual) == pytest.approx(1e-7)
    assert mtl.solver_info(mtl.SolverState(merged)) is merged and mtl.solver_info(()) is None


@pytest.mark.parametrize("nonfinite", ["skip", "apply"])
def test_unconverged_solves_are_reported_skipped_or_raised(setup, nonfinite):
    model, params, batch = setup
    method = _reporting_method(converged_until=1)
    # 'report' applies every step and reports the solve.
    state, step = make(model, params, method, nonfinite=nonfinite)
    s1, m1 = step(state, batch)
    s2, m2 = step(s1, batch)
    assert bool(m1["solver_converged"]) and not bool(m2["solver_converged"])
    assert int(m2["solver_iterations"]) == 2 and float(m2["solver_residual"]) == 0.5
    assert max_abs_diff(s2.params, s1.params) > 0 and int(s2.skipped) == 0
    # 'skip' does not apply the step whose solve failed, and counts it.
    state, step = make(model, params, method, nonfinite=nonfinite, unconverged="skip")
    s1, m1 = step(state, batch)
    s2, m2 = step(s1, batch)
    assert bool(m1["applied"]) and not bool(m2["applied"])
    assert max_abs_diff(s2.params, s1.params) == 0.0 and int(s2.skipped) == 1
    if nonfinite == "skip":
        assert bool(m2["finite"])  # finite, but not applied
    # 'raise' names the step; scan raises after the whole scan.
    state, step = make(model, params, method, nonfinite=nonfinite, unconverged="raise")
    s1, _ = step(state, batch)
    with pytest.raises(mtl.SolverError, match="did not converge at step 1") as err:
        step(s1, batch)
    assert err.value.step == 1 and err.value.iterations == 2
    with pytest.raises(mtl.SolverError, match="at step 1"):
        step.scan(state, lambda k: batch, jax.random.split(jax.random.key(1), 3))


def test_unconverged_option_is_checked(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="unconverged must be"):
        mtl.make_train_step(model, mtl.methods.ew(), optax.sgd(0.1), unconverged="ignore")
