"""The train step's method hooks: ``after_update`` (the losses after the update, on the same
batch) and ``with_optimizer`` (learned weighting parameters trained with the model's
optimizer, i.e. jointly with the model as UW's and IMTL's papers do)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src import base
from tests.conformance import references
from tests.methods.test_loss_methods import linear_model

# ----------------------------------------------------------------------------------------------
# after_update


def recording_method(poison: bool = False):
    """Unit weights; ``after_update`` stores the losses it is given (before, after) in the state,
    or turns the state non-finite (``poison``)."""

    def init(num_tasks):
        return (jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((num_tasks,), jnp.float32))

    def weights(losses, gramian, state, key):
        return jnp.ones_like(losses), state

    def after_update(before, after, state):
        if poison:
            return jax.tree_util.tree_map(lambda x: x * jnp.nan, state)
        return (before, after)

    return base.make_method(
        "recording", init, needs="losses", weights=weights, after_update=after_update
    )


def test_after_update_gets_the_losses_before_and_after_on_the_same_batch():
    model, params, batch = linear_model()
    method = recording_method()
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    new, metrics = step(state, batch)
    before, after = new.method_state
    np.testing.assert_allclose(before, metrics["losses"], rtol=1e-6)
    np.testing.assert_allclose(before, model.losses(params, batch), rtol=1e-6)
    np.testing.assert_allclose(after, model.losses(new.params, batch), rtol=1e-6)
    assert float(jnp.sum(after)) < float(jnp.sum(before))  # a descent step on Σ L, this batch


def test_after_update_runs_the_compute_model_under_mixed_precision():
    model, params, batch = linear_model()
    method = recording_method()
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, compute_dtype=jnp.bfloat16)
    new, _ = step(state, batch)
    _, after = new.method_state
    assert after.dtype == jnp.float32
    bf16 = mtl.mixed_precision(model, jnp.bfloat16).losses(new.params, batch)
    np.testing.assert_allclose(after, bf16, rtol=1e-6)
    assert not np.allclose(after, model.losses(new.params, batch), rtol=1e-6, atol=0)


def test_a_step_that_is_not_applied_keeps_the_hooks_state():
    model, params, batch = linear_model()
    method = recording_method(poison=True)
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    new, metrics = mtl.make_train_step(model, method, opt)(state, batch)
    assert not bool(metrics["finite"]) and int(new.skipped) == 1
    for a, b in zip(
        jax.tree_util.tree_leaves((new.params, new.method_state)),
        jax.tree_util.tree_leaves((state.params, state.method_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(mtl.NonFiniteError):
        mtl.make_train_step(model, method, opt, nonfinite="raise")(state, batch)


def test_famo_step_that_is_not_applied_does_not_move_the_logits():
    model, params, batch = linear_model()
    method = mtl.methods.famo()
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    state, _ = step(state, batch)
    bad = dict(batch, y=batch["y"].at[1, 0, 0].set(jnp.nan))
    skipped, metrics = step(state, bad)
    assert not bool(metrics["finite"])
    for a, b in zip(
        jax.tree_util.tree_leaves(skipped.method_state),
        jax.tree_util.tree_leaves(state.method_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("name", "forwards"), [("ew", 1), ("famo", 2), ("uw", 1)])
def test_only_a_method_with_the_hook_pays_for_the_extra_forward_pass(name, forwards):
    model, params, batch = linear_model()
    calls = []

    def losses_fn(shared, specific, b):
        calls.append(1)
        return model.losses_fn(shared, specific, b)

    counted = mtl.Model(model.task_names, losses_fn)
    method = mtl.methods.get(name)
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(counted, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(counted, method, opt)
    calls.clear()
    jax.make_jaxpr(step._step)(state, batch)  # one trace of the step
    assert len(calls) == forwards


# ----------------------------------------------------------------------------------------------
# with_optimizer: UW, IMTL-L and IMTL trained jointly with the model


def _scaled_linear_model():
    """The linear model with targets scaled per task: losses from about 1 to 10², so that the
    scales ``s`` travel far."""
    model, params, batch = linear_model()
    scale = jnp.asarray([1.0, 3.0, 10.0])[:, None, None]
    return model, params, dict(batch, y=scale * batch["y"])


def joint_reference(model, params, batch, objective, s0, lr, steps):
    """Plain gradient descent with ``lr`` on the paper's joint objective over ``(θ, s)``."""

    def loss(theta_s):
        theta, s = theta_s
        return objective(model.losses(theta, batch), s)

    theta_s = (params, jnp.full((model.num_tasks,), s0, jnp.float32))
    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
        theta_s = jax.tree_util.tree_map(lambda p, g: p - lr * g, theta_s, grad(theta_s))
    return theta_s


def _train(model, params, batch, method, opt, steps):
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    for _ in range(steps):
        state, _ = step(state, batch)
    assert int(state.skipped) == 0
    return state


def uw_objective(losses, s):  # Kendall et al., eq. 7 (regression)
    return jnp.sum(0.5 * jnp.exp(-s) * losses + 0.5 * s)


def imtl_l_objective(losses, s):  # Liu et al. 2021, Section 3.1
    return jnp.sum(jnp.exp(s) * losses - s)


@pytest.mark.parametrize(
    ("name", "objective", "field"),
    [("uw", uw_objective, "log_vars"), ("imtl_l", imtl_l_objective, "log_scales")],
)
def test_default_equals_joint_training_with_the_models_optimizer(name, objective, field):
    model, params, batch = _scaled_linear_model()
    lr = 0.05
    state = _train(model, params, batch, mtl.methods.get(name), optax.sgd(lr), 50)
    theta, s = joint_reference(model, params, batch, objective, 0.0, lr, 50)
    learned = np.asarray(getattr(state.method_state, field))
    np.testing.assert_allclose(learned, s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.params.shared["w"], theta.shared["w"], rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(s)).max() > 1.0  # the scales did move
    # An optimizer of its own (here Adam(1e-3)) is not the joint training.
    own = _train(model, params, batch, mtl.methods.get(name, learning_rate=1e-3), optax.sgd(lr), 50)
    assert np.abs(np.asarray(getattr(own.method_state, field)) - s).max() > 0.5


def imtl_joint_reference(model, params, batch, lr, steps):
    """IMTL's hybrid (Liu et al. 2021, Algorithm 1) by plain gradient descent with ``lr`` on
    ``(θ, s)``: the shared parameters along ``Σᵢ αᵢ e^{sᵢ} ∇Lᵢ`` (``α``: IMTL-G on the scaled
    gradients, the float64 reference), each task's own parameters along ``∇Lᵢ``
    (``head_grads="unit"``), ``s`` along ``e^{s} ∘ L − 1``."""
    jac = jax.jit(jax.jacobian(lambda p: model.losses(p, batch)))
    theta, s = params, np.zeros(model.num_tasks)
    for _ in range(steps):
        losses = np.asarray(model.losses(theta, batch), float)
        jp = jac(theta)
        j = np.asarray(jp.shared["w"], float).reshape(model.num_tasks, -1)
        e = np.exp(s)
        w = references.impartial_weights(e[:, None] * (j @ j.T) * e[None, :]) * e
        shared = theta.shared["w"] - lr * jnp.tensordot(
            jnp.asarray(w, jnp.float32), jp.shared["w"], 1
        )
        specific = theta.specific - lr * jnp.sum(jp.specific, axis=0)
        theta = mtl.Params({"w": shared}, specific)
        s = s - lr * (e * losses - 1.0)
    return theta, s


def test_imtl_default_equals_joint_training_with_the_models_optimizer():
    """IMTL's scales follow the same rule as IMTL-L's: the model's optimizer by default."""
    model, params, batch = _scaled_linear_model()
    lr = 0.05
    state = _train(model, params, batch, mtl.methods.imtl(), optax.sgd(lr), 50)
    theta, s = imtl_joint_reference(model, params, batch, lr, 50)
    np.testing.assert_allclose(state.method_state.log_scales, s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.params.shared["w"], theta.shared["w"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.params.specific, theta.specific, rtol=1e-4, atol=1e-6)
    assert np.abs(s).max() > 1.0  # the scales did move
    # An optimizer of its own (here Adam(1e-3)) is not the joint training.
    own = _train(model, params, batch, mtl.methods.imtl(learning_rate=1e-3), optax.sgd(lr), 50)
    assert np.abs(np.asarray(own.method_state.log_scales) - s).max() > 0.5


def test_uw_shares_adams_moments_structure_but_not_its_state():
    model, params, batch = _scaled_linear_model()
    opt = optax.adam(1e-2)
    state = _train(model, params, batch, mtl.methods.uw(), opt, 3)
    theta, s = joint_reference(model, params, batch, uw_objective, 0.0, 0.0, 0)  # initial point
    # Adam on (θ, s) jointly: its per-coordinate steps on s, from s's own moments.
    ref_opt = optax.adam(1e-2)
    ref_state = ref_opt.init((theta, s))
    grad = jax.grad(lambda ts: uw_objective(model.losses(ts[0], batch), ts[1]))
    ts = (theta, s)
    for _ in range(3):
        updates, ref_state = ref_opt.update(grad(ts), ref_state, ts)
        ts = optax.apply_updates(ts, updates)
    np.testing.assert_allclose(state.method_state.log_vars, ts[1], rtol=1e-5, atol=1e-6)


def test_binding_the_models_optimizer():
    method = mtl.methods.uw()
    assert method.with_optimizer is not None
    bound = base.bind_optimizer(method, optax.sgd(0.1))
    assert bound.with_optimizer is None and base.bind_optimizer(bound, optax.adam(1.0)) is bound
    s = bound.init(2)
    assert jax.tree_util.tree_structure(s.opt_state) == jax.tree_util.tree_structure(
        optax.sgd(0.1).init(jnp.zeros(2))
    )
    # Its own optimizer: nothing to bind.
    assert mtl.methods.uw(optimizer=optax.sgd(0.1)).with_optimizer is None
    assert mtl.methods.imtl_l(learning_rate=1e-2).with_optimizer is None
    assert mtl.methods.imtl(optimizer=optax.sgd(0.1)).with_optimizer is None
    assert mtl.methods.imtl().with_optimizer is not None
    with pytest.raises(ValueError, match="not both"):
        mtl.methods.uw(optimizer=optax.sgd(0.1), learning_rate=0.1)
    # Outside a train step: Adam(1e-3) on s.
    w, new = method.weights(jnp.asarray([4.0, 0.25]), None, method.init(2), None)
    np.testing.assert_allclose(new.log_vars, [1e-3, -1e-3], rtol=1e-3)


def test_a_models_optimizer_that_cannot_take_the_scales_is_named():
    model, params, batch = linear_model()
    labels = jax.tree_util.tree_map(lambda _: "a", params)
    opt = optax.multi_transform({"a": optax.sgd(0.1)}, labels)
    with pytest.raises(ValueError, match=r"uw\(optimizer=\.\.\.\)"):
        mtl.init_train_state(model, params, mtl.methods.uw(), opt, jax.random.key(0))
    method = mtl.methods.uw(optimizer=optax.adam(1e-2))  # the way out
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    state, _ = mtl.make_train_step(model, method, opt)(state, batch)
    assert int(state.skipped) == 0
