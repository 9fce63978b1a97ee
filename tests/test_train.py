"""The jitted train step, the model adapter and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtljax as mtl
from tests.helpers import max_abs_diff, tiny_batch, tiny_model

T = 3


@pytest.fixture(scope="module")
def setup():
    model, params = tiny_model(T)
    return model, params, tiny_batch(T)


def make(model, params, method, opt=None, **kw):
    opt = opt or optax.adam(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    return state, mtl.make_train_step(model, method, opt, **kw)


@pytest.mark.parametrize("name", ["ew", "uw", "gradnorm"])
@pytest.mark.parametrize("mode", ["parameter", "feature"])
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


def test_feature_and_parameter_mode_agree_for_weights(setup):
    model, params, batch = setup
    m = mtl.methods.fixed([0.5, 1.0, 2.0])
    g_par, _, _ = mtl.gradients(model, m, params, (), batch, None, mode="parameter")
    g_feat, _, _ = mtl.gradients(model, m, params, (), batch, None, mode="feature")
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


def test_to_nnx_round_trip(setup):
    model, params, batch = setup
    module = mtl.to_nnx(model, params)
    z = module.encode(batch["x"])
    np.testing.assert_allclose(model.encode_fn(params.shared, batch), z, rtol=1e-6)
