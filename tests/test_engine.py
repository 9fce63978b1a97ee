"""The per-task gradient engine: Jacobians, Gramians, feature level, chunks, cost."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src import engine
from tests.helpers import max_abs_diff, tiny_batch, tiny_model

T = 3


@pytest.fixture(scope="module")
def setup():
    model, params = tiny_model(T)
    return model, params, tiny_batch(T)


def per_task_grads(model, params, batch):
    return [
        jax.grad(lambda s, i=i: model.losses_fn(s, params.specific, batch)[i])(params.shared)
        for i in range(T)
    ]


def test_jacobian_rows_equal_per_task_grad(setup):
    model, params, batch = setup
    losses, jac = mtl.task_jacobian(model, params, batch)
    np.testing.assert_allclose(losses, model.losses(params, batch), rtol=1e-6)
    for i, g in enumerate(per_task_grads(model, params, batch)):
        row = jax.tree_util.tree_map(lambda j, i=i: j[i], jac)
        assert max_abs_diff(row, g) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_chunked_jacobian_matches_vmap(setup, chunk_size):
    model, params, batch = setup
    _, full = mtl.task_jacobian(model, params, batch)
    _, chunked = mtl.task_jacobian(model, params, batch, chunk_size=chunk_size)
    assert max_abs_diff(full, chunked) < 1e-6


def test_last_layer_subset_jacobian(setup):
    model, params, batch = setup
    _, jac_last, _ = mtl.jacobian(model, params, batch, subset="last")
    _, jac_all = mtl.task_jacobian(model, params, batch)
    layer = jac_all["encoder"]["layers"][1]
    expected = [layer["bias"], layer["kernel"]]
    assert max_abs_diff(list(jac_last), expected) < 1e-6


def test_subset_needs_last_shared_declared(setup):
    model, params, batch = setup
    bare = mtl.Model(model.task_names, model.losses_fn)
    with pytest.raises(ValueError, match="last_shared"):
        mtl.jacobian(bare, params, batch, subset="last")


def test_feature_jacobian_and_backprop(setup):
    model, params, batch = setup
    losses, jz, vjp, backprop = mtl.feature_jacobian(model, params, batch)
    z = model.encode_fn(params.shared, batch)
    assert jz.shape == (T, *z.shape)
    for i in range(T):
        gz = jax.grad(lambda z_, i=i: model.heads_fn(params.specific, z_, batch)[i])(z)
        np.testing.assert_allclose(jz[i], gz, atol=1e-6)
    # Pulling Σ wᵢ ∂Lᵢ/∂z back through the encoder gives ∇ Σ wᵢ Lᵢ.
    w = jnp.array([0.3, 1.2, -0.5])
    g_ref = jax.grad(lambda s: w @ model.losses_fn(s, params.specific, batch))(params.shared)
    assert max_abs_diff(backprop(jnp.tensordot(w, jz, axes=1)), g_ref) < 1e-5
    assert max_abs_diff(vjp(w).shared, g_ref) < 1e-5


def test_gramian_and_combine():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 5))
    jac = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    flat = np.concatenate([a.reshape(4, -1), b], axis=1)
    np.testing.assert_allclose(mtl.gramian(jac), flat @ flat.T, rtol=1e-5, atol=1e-5)
    w = rng.normal(size=4)
    out = mtl.combine(jnp.asarray(w), jac)
    np.testing.assert_allclose(out["b"], w @ b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["a"], np.tensordot(w, a, axes=1), rtol=1e-5, atol=1e-6)


def test_jacobian_leaves_must_share_task_axis():
    with pytest.raises(ValueError, match="leading task axis"):
        mtl.gramian({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))})


@pytest.mark.parametrize("name", ["ew", "uw"])
def test_losses_only_methods_never_compute_a_jacobian(setup, name, monkeypatch):
    model, params, batch = setup

    def forbidden(*args, **kwargs):
        raise AssertionError("a losses-only method computed a Jacobian")

    monkeypatch.setattr(engine, "map_cotangents", forbidden)
    method = mtl.methods.get(name)
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    state, metrics = mtl.make_train_step(model, method, opt)(state, batch)
    assert np.all(np.isfinite(metrics["losses"]))
    assert np.isnan(np.asarray(metrics["grad_norms"])).all()  # not computed (see the schema)


def _step_flops(model, params, batch, method):
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    cost = step.jitted.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_losses_only_cost_matches_one_backward():
    # A wide model so that the parameter work dominates the flop count.
    model, params = tiny_model(8, features=(64, 256, 256))
    batch = tiny_batch(8, d=64, n=128)
    fwd_bwd = jax.jit(jax.grad(lambda p: jnp.sum(model.losses(p, batch))))
    cost = fwd_bwd.lower(params).compile().cost_analysis()
    base = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    ew = _step_flops(model, params, batch, mtl.methods.ew())
    uw = _step_flops(model, params, batch, mtl.methods.uw())
    gn_all = _step_flops(model, params, batch, mtl.methods.gradnorm(params="all"))
    assert ew < 1.1 * base and uw < 1.1 * base
    # A full Jacobian of 8 tasks costs several backward passes more.
    assert gn_all > 3 * base


def test_gradnorm_last_layer_does_not_pay_for_full_jacobian():
    model, params = tiny_model(8, features=(64, 256, 256, 256))
    batch = tiny_batch(8, d=64, n=128)
    last = _step_flops(model, params, batch, mtl.methods.gradnorm())
    full = _step_flops(model, params, batch, mtl.methods.gradnorm(params="all"))
    ew = _step_flops(model, params, batch, mtl.methods.ew())
    assert last < 0.6 * full
    assert last < ew + 0.6 * (full - ew)


def test_no_shared_parameters_give_an_empty_jacobian_and_a_zero_gramian():
    np.testing.assert_array_equal(mtl.gramian({}, 3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no leaves"):
        mtl.gramian({})
    with pytest.raises(ValueError, match="expected 2"):
        mtl.gramian({"w": jnp.ones((3, 4))}, 2)
    direction, _ = mtl.aggregate(mtl.methods.upgrad(), {}, jnp.ones(3), ())
    assert direction == {}

    def losses(shared, specific, batch):
        return jnp.sum(specific["w"] * batch, axis=1)

    model = mtl.Model(("a", "b", "c"), losses)
    params = mtl.Params({}, {"w": jnp.ones((3, 2))})
    out, jac, vjp = mtl.jacobian(model, params, jnp.ones((3, 2)), chunk_size=2)
    assert jax.tree_util.tree_leaves(jac) == []
    np.testing.assert_allclose(
        vjp(jnp.array([1.0, 2.0, 3.0])).specific["w"], [[1, 1], [2, 2], [3, 3]]
    )


def test_rows_finite_given_gramian_is_rows_finite():
    """Read from the Gramian's diagonal, yet the same answer as scanning the rows: a row whose
    squares overflow (finite entries, ``Gᵢᵢ = inf``) is finite, a row with an inf or a NaN is
    not."""
    rows = jnp.array(
        [[1.0, 2.0, 3.0], [3e30, 1.0, 0.0], [1.0, jnp.inf, 0.0], [jnp.nan, 0.0, 1.0]], jnp.float32
    )
    jac = {"a": rows.reshape(4, 3, 1), "b": jnp.ones((4, 2))}
    fn = jax.jit(lambda j: engine.rows_finite_given_gramian(j, mtl.gramian(j), 4))
    np.testing.assert_array_equal(fn(jac), [True, True, False, False])
    np.testing.assert_array_equal(fn(jac), engine.rows_finite(jac, 4))
    finite = {"a": jnp.ones((4, 3, 1)), "b": jnp.ones((4, 2))}
    np.testing.assert_array_equal(fn(finite), [True] * 4)
