"""Learned loss scales and loss ratios at the edges of their domain (UW, IMTL-L, IMTL,
GradNorm, FAMO): finite, documented behaviour, and states in the default float dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src.methods.famo import log_decrease
from mtljax._src.methods.imtl import scaled_impartial_weights
from mtljax._src.methods.imtl_l import IMTLLState


def f32(x):
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize(
    ("name", "direction"), [("uw", 1.0), ("imtl_l", -1.0)], ids=["uw", "imtl_l"]
)
def test_huge_losses_move_the_scale_by_the_learning_rate(name, direction):
    """A loss of 3e35 at ``s = 0``: the gradient's square overflows float32, the clipped
    gradient gives Adam's first step, ``s`` moves by the learning rate towards the loss
    (``+`` for UW's log-variance, ``−`` for IMTL-L's log-scale), and the state is finite."""
    method = mtl.methods.get(name, learning_rate=0.01)
    state = method.init(3)
    w, state = jax.jit(lambda l, s: method.weights(l, None, s, None))(f32([3e35, 1.0, 1e30]), state)
    s = np.asarray(state[0])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state))
    np.testing.assert_allclose(s[[0, 2]], direction * 0.01, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(w)))


def test_gradnorm_undefined_loss_ratio_counts_as_one():
    """A negative first loss leaves ``Lᵢ(t)/Lᵢ(0)`` undefined: the task's ratio is taken as 1,
    the same update as a task whose loss did not change."""
    g = f32(np.diag([1.0, 4.0]))
    method = mtl.methods.gradnorm(params="all")

    def run(l0, l1):
        fn = jax.jit(lambda l, s: method.weights(l, g, s, None))
        _, state = fn(f32(l0), method.init(2))
        w, state = fn(f32(l1), state)
        _, state = fn(f32(l1), state)
        return np.asarray(state.weights)

    undefined = run([-2.0, 1.0], [1.0, 2.0])
    unchanged = run([1.0, 1.0], [1.0, 2.0])
    np.testing.assert_array_equal(undefined, unchanged)
    assert np.all(np.isfinite(run([-2.0, 0.0], [-1e10, 1e30])))


def test_famo_log_decrease_keeps_changes_below_eps():
    """``log ℓ̃(a) − log ℓ̃(b)`` for losses of 1e-20 beside ``ε = 1e-8`` (a relative change of
    1e-12 of ``ℓ̃``): float32 keeps it to a few units of rounding, where the difference of the
    rounded logarithms is 0; far-apart losses take the difference of the logarithms."""
    before = np.array([1.5e-20, 1e-20, 3.0, 0.0])
    after = np.array([1.2e-20, 1.7e-20, 1e-30, 2.0])
    got = np.asarray(log_decrease(f32(before), f32(after), f32(np.zeros(4)), 1e-8), float)
    b32, a32 = before.astype(np.float32), after.astype(np.float32)
    a64, b64 = a32.astype(float), b32.astype(float)
    want = np.log(b64 + 1e-8) - np.log(a64 + 1e-8)
    want[:2] = np.log1p((b64[:2] - a64[:2]) / (a64[:2] + 1e-8))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] != 0.0


def _imtl_on_scaled(g: np.ndarray, c: np.ndarray) -> np.ndarray:
    """IMTL-G on ``DGD`` (Liu et al. 2021): ``β ∝ K⁻¹𝟙``, ``α̃ ∝ β/(n∘c)``, ``Σα̃ = 1``;
    returns ``α̃ ∘ c``."""
    n = np.sqrt(np.diagonal(g))
    beta = np.linalg.solve(g / np.outer(n, n), np.ones(len(g)))
    q = beta / (n * c)
    return q / q.sum() * c


def test_imtl_rescaled_impartial_weights_equal_the_scaled_gramians():
    rng = np.random.default_rng(3)
    j = rng.normal(size=(3, 8)) * np.array([[0.5], [2.0], [7.0]])
    c = np.exp(np.array([0.3, -0.4, 1.1]))
    w = np.asarray(scaled_impartial_weights(f32(j @ j.T), f32(c)), float)
    np.testing.assert_allclose(w, _imtl_on_scaled(j @ j.T, c), rtol=1e-4)


def test_imtl_where_imtl_g_has_no_answer_the_scaled_gradients_do():
    """``Σβ/n = 0`` for ``G`` (IMTL-G falls back to uniform weights) but not for the scaled
    gradients: IMTL then solves on ``DGD``, as the paper writes it."""
    u = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.8, 0.2]])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    beta = np.linalg.solve(u @ u.T, np.ones(3))
    assert beta[2] < 0 < min(beta[0], beta[1])
    n = np.array([1.0, 2.0, 0.0])
    n[2] = -beta[2] / (beta[0] / n[0] + beta[1] / n[1])  # Σ βᵢ/nᵢ = 0
    j = n[:, None] * u
    g = j @ j.T
    c = np.array([1.0, 1.0, 2.0])
    alpha = np.asarray(mtl.methods.imtl_g().weights(f32([1, 1, 1]), f32(g), (), None)[0])
    np.testing.assert_array_equal(alpha, np.full(3, 1 / 3, np.float32))  # the fallback
    w = np.asarray(scaled_impartial_weights(f32(g), f32(c)), float)
    np.testing.assert_allclose(w, _imtl_on_scaled(g, c), rtol=1e-4)


@pytest.mark.parametrize("name", ["uw", "imtl_l", "imtl", "gradnorm", "stch", "dwa", "famo"])
def test_states_follow_the_default_float_dtype(name):
    """Under ``jax_enable_x64`` the float leaves of the state are float64 and stay so after a
    step with float32 losses; without it they are float32."""
    kwargs = {"learning_rate": 1e-2} if name in ("uw", "imtl_l") else {}
    for x64, want in ((True, np.float64), (False, np.float32)):
        with jax.enable_x64(x64):
            method = mtl.methods.get(name, **kwargs)
            state = method.init(3)
            g = None if method.needs == "losses" else f32(np.eye(3))
            _, new = jax.jit(lambda l, s, m=method, g=g: m.weights(l, g, s, None))(
                f32([1.0, 2.0, 3.0]), state
            )
            for tree in (state, new):
                floats = [
                    x
                    for x in jax.tree_util.tree_leaves(tree)
                    if jnp.issubdtype(x.dtype, jnp.floating)
                ]
                assert floats and all(x.dtype == want for x in floats), (name, x64, tree)


def test_imtl_state_built_by_hand_keeps_working():
    """IMTL's state is IMTL-L's: a float32 state given by hand is used as is."""
    s = f32([0.5, -1.0])
    state = IMTLLState(s, optax.sgd(0.1).init(s))
    method = mtl.methods.imtl(optimizer=optax.sgd(0.1))
    w, new = method.weights(f32([1.0, 2.0]), f32(np.eye(2)), state, None)
    assert np.all(np.isfinite(np.asarray(w))) and new.log_scales.dtype == jnp.float32
