"""EW, fixed weights, uncertainty weighting and GradNorm: contract and paper properties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl


def run_weights(method, losses, gram, steps, key=None):
    state = method.init(losses.shape[0])
    fn = jax.jit(lambda s: method.weights(losses, gram, s, key))
    for _ in range(steps):
        w, state = fn(state)
    return w, state, fn


def test_ew_sum_and_mean():
    jac = jnp.arange(12.0).reshape(3, 4)
    losses = jnp.ones(3)
    d, _ = mtl.aggregate(mtl.methods.ew(), jac, losses, ())
    np.testing.assert_allclose(d, jac.sum(0))
    d, _ = mtl.aggregate(mtl.methods.ew("mean"), jac, losses, ())
    np.testing.assert_allclose(d, jac.mean(0))
    with pytest.raises(ValueError, match="reduction"):
        mtl.methods.ew("max")


def test_fixed_weights_and_errors():
    m = mtl.methods.fixed([1.0, 0.0, 2.0])
    jac = jnp.arange(12.0).reshape(3, 4)
    d, _ = mtl.aggregate(m, jac, jnp.ones(3), m.init(3))
    np.testing.assert_allclose(d, jac[0] + 2 * jac[2])
    with pytest.raises(ValueError, match="3 weights were given but there are 2 tasks"):
        m.init(2)
    for bad in ([], [1.0, -1.0], [float("nan")], [0.0, 0.0], "ab"):
        with pytest.raises(ValueError, match="fixed"):
            mtl.methods.fixed(bad)


@pytest.mark.parametrize("kind,factor", [("regression", 1.0), ("classification", 2.0)])
def test_uw_stationarity(kind, factor):
    # With the losses held fixed, s converges to the stationary point of its objective:
    # e^{s} = L (regression, ½e^{-s}L + ½s) or e^{s} = 2L (classification, e^{-s}L + ½s).
    losses = jnp.array([0.05, 0.7, 3.0, 40.0])
    method = mtl.methods.uw(kind, learning_rate=0.05)
    w, state, _ = run_weights(method, losses, None, 3000)
    np.testing.assert_allclose(jnp.exp(state.log_vars), factor * losses, rtol=2e-2)
    c = 0.5 if kind == "regression" else 1.0
    w_next, _ = method.weights(losses, None, state, None)
    np.testing.assert_allclose(w_next, c * np.exp(-np.asarray(state.log_vars)), rtol=1e-5)


def test_uw_mixed_kinds_and_weights():
    method = mtl.methods.uw(("regression", "classification"), init_log_var=np.log(2.0))
    state = method.init(2)
    w, _ = method.weights(jnp.array([1.0, 1.0]), None, state, None)
    np.testing.assert_allclose(w, [0.25, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="2 kinds were given but there are 3 tasks"):
        method.init(3)
    with pytest.raises(ValueError, match="kinds"):
        mtl.methods.uw("poisson")
    with pytest.raises(ValueError, match="learning_rate"):
        mtl.methods.uw(learning_rate=-1.0)


def test_uw_tracks_noise_in_training():
    problem = mtl.problems.get("uw_noise", seed=0, num_train=4000)
    method = mtl.methods.uw(learning_rate=1e-2)
    opt = optax.adam(3e-3)
    state = mtl.init_train_state(problem.model, problem.params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(problem.model, method, opt)

    @jax.jit
    def train(state, key):
        def body(s, k):
            s, m = step.jitted(s, problem.sample(k))
            return s, m["losses"]

        return jax.lax.scan(body, state, jax.random.split(key, 1500))

    state, losses = train(state, jax.random.key(1))
    mse = np.asarray(losses[-300:]).mean(0)
    sigma2 = np.exp(np.asarray(state.method_state.log_vars))
    # The learned σ² tracks each task's MSE, and both order the tasks by their noise.
    np.testing.assert_allclose(sigma2, mse, rtol=0.25)
    assert np.all(np.diff(sigma2) > 0)


def gradnorm_setup():
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(4, 30)) * np.array([[0.1], [1.0], [5.0], [20.0]])
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    return gram


def test_gradnorm_equalizes_weighted_grad_norms_with_constant_losses():
    gram = gradnorm_setup()
    losses = jnp.array([1.0, 2.0, 3.0, 4.0])
    method = mtl.methods.gradnorm(learning_rate=1e-3)
    w, state, fn = run_weights(method, losses, gram, 4000)
    w = state.weights
    wg = np.asarray(w * jnp.sqrt(jnp.diagonal(gram)))
    assert np.ptp(wg) / np.mean(wg) < 0.02, wg
    np.testing.assert_allclose(jnp.sum(w), 4.0, rtol=1e-5)


def test_gradnorm_weights_always_sum_to_T():
    gram = gradnorm_setup()
    method = mtl.methods.gradnorm(alpha=3.0, learning_rate=0.5)
    state = method.init(4)
    fn = jax.jit(lambda L, s: method.weights(L, gram, s, None))
    rng = np.random.default_rng(1)
    for _ in range(200):
        _, state = fn(jnp.asarray(rng.uniform(0.01, 10, 4), jnp.float32), state)
        assert abs(float(jnp.sum(state.weights)) - 4.0) < 1e-4
        assert float(jnp.min(state.weights)) >= 0.0
    first = method.init(4)
    _, s1 = fn(jnp.array([1.0, 2.0, 3.0, 4.0]), first)
    _, s2 = fn(jnp.array([9.0, 9.0, 9.0, 9.0]), s1)
    np.testing.assert_allclose(s2.initial_losses, [1.0, 2.0, 3.0, 4.0])


def test_gradnorm_rate_balancing_favours_slow_tasks():
    # Equal gradient norms; task 0's loss has fallen less (L/L0 larger): it gets more weight.
    gram = jnp.eye(3)
    method = mtl.methods.gradnorm(alpha=1.5, learning_rate=1e-2)
    state = method.init(3)
    _, state = method.weights(jnp.array([1.0, 1.0, 1.0]), gram, state, None)
    for _ in range(300):
        _, state = method.weights(jnp.array([0.9, 0.5, 0.5]), gram, state, None)
    assert state.weights[0] > state.weights[1]
    np.testing.assert_allclose(state.weights[1], state.weights[2], rtol=1e-5)


def test_gradnorm_validation():
    with pytest.raises(ValueError, match="alpha"):
        mtl.methods.gradnorm(alpha=-1.0)
    with pytest.raises(ValueError, match="params"):
        mtl.methods.gradnorm(params="first")
    with pytest.raises(ValueError, match="at least 2 tasks"):
        mtl.methods.gradnorm().init(1)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        mtl.aggregate(mtl.methods.gradnorm(), jnp.ones((1, 3)), jnp.ones(1), ())


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="valid methods: .*uw"):
        mtl.methods.get("uncertainty")
