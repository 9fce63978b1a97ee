"""Gradient-manipulation methods (PCGrad, GradDrop, GradVac, IMTL-L/G/IMTL, Aligned-MTL,
ConFIG, DB-MTL): each paper's claimed property, checked against direct float64 computations on
the gradient vectors, plus the contract every method must meet."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src.methods import _gramian_tools as gt
from mtljax._src.methods.aligned_mtl import alignment_matrix
from mtljax._src.methods.pcgrad import project_conflicting
from tests import helpers

# `--dist loadgroup` keeps this module on one worker: cached corpora.
pytestmark = pytest.mark.xdist_group("projection_methods")

ALL = (
    "pcgrad",
    "graddrop",
    "gradvac",
    "imtl_l",
    "imtl_g",
    "imtl",
    "aligned_mtl",
    "config",
    "db_mtl",
)
P = 8
KEY = jax.random.key(0)


def _hashable(v):
    if isinstance(v, list | np.ndarray):
        return tuple(float(x) for x in v)
    return v


@functools.cache
def _method(name, items):
    return mtl.methods.get(name, **dict(items))


def get(name, **kwargs):
    """The method, built once per hyper-parameters so that its compiled functions are reused."""
    return _method(name, tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))


def build(name, t=3, p=P, **kwargs):
    """The method; DB-MTL's EMA is sized for a ``(T, p)`` jacobian."""
    if name == "db_mtl":
        kwargs.setdefault("like", jax.ShapeDtypeStruct((p,), jnp.float32))
    return get(name, **kwargs)


@functools.cache
def aggregate_fn(method):
    return jax.jit(functools.partial(mtl.aggregate, method))


def agg(method, *args, **kwargs):
    return aggregate_fn(method)(*args, **kwargs)


@functools.cache
def _weights_fn(method):
    return jax.jit(functools.partial(mtl.weights_from_gramian, method))


def weights_from_gramian(method, *args, **kwargs):
    return _weights_fn(method)(*args, **kwargs)


def rand(seed, t, p=P, scales=None):
    j = np.random.default_rng(seed).normal(size=(t, p))
    if scales is not None:
        j = j * np.asarray(scales, float)[:, None]
    return j


def f32(x):
    return jnp.asarray(x, jnp.float32)


def unit(x):
    return x / np.linalg.norm(x)


def gram_weights(method, j, losses=None, state=None, key=None):
    """The method's weights on the float64 Gramian of ``j`` (cast to float32), with ``KEY``."""
    j = np.asarray(j, float)
    losses = np.ones(len(j)) if losses is None else losses
    state = method.init(len(j)) if state is None else state
    key = KEY if key is None else key
    w, _ = weights_from_gramian(method, f32(j @ j.T), f32(losses), state, key=key)
    return np.asarray(w, float)


# ----------------------------------------------------------------------------------------------
# float64 references, written directly on the gradient vectors


def pcgrad_ref(j, orders):
    """Yu et al.'s Algorithm 1 on vectors; returns the coefficient rows (``gᵢᴾᶜ = C[i] @ j``)."""
    t = len(j)
    c = np.eye(t)
    for i in range(t):
        for k in orders[i]:
            if k == i:
                continue
            dot = (c[i] @ j) @ j[k]
            if dot < 0:
                c[i, k] -= dot / (j[k] @ j[k])
    return c


def gradvac_ref(j, targets, orders, beta):
    """Wang et al.'s Algorithm 1 on vectors; returns the coefficient rows and the new targets."""
    t = len(j)
    c, tgt = np.eye(t), np.array(targets, float)
    for i in range(t):
        for k in orders[i]:
            if k == i:
                continue
            gi = c[i] @ j
            phi = gi @ j[k] / (np.linalg.norm(gi) * np.linalg.norm(j[k]))
            goal = tgt[i, k]
            if phi < goal:
                num = goal * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - goal**2)
                c[i, k] += np.linalg.norm(gi) * num / (np.linalg.norm(j[k]) * np.sqrt(1 - goal**2))
            tgt[i, k] = (1 - beta) * goal + beta * phi
    return c, tgt


def imtl_g_ref(j):
    """The paper's closed form: ``α₂:T = g₁Uᵀ(DUᵀ)⁻¹``, ``α₁ = 1 − Σα₂:T``."""
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    d, um = j[0] - j[1:], u[0] - u[1:]
    a = j[0] @ um.T @ np.linalg.inv(d @ um.T)
    return np.concatenate([[1 - a.sum()], a])


def config_ref(j):
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    g_u = unit(np.linalg.pinv(u) @ np.ones(len(j)))
    return (j @ g_u).sum() * g_u


# ----------------------------------------------------------------------------------------------
# The contract, for every method


def test_registered_with_the_declared_needs():
    expected = {
        "pcgrad": ("gramian", "unit"),
        "graddrop": ("jacobian", "unit"),
        "gradvac": ("gramian", "unit"),
        "imtl_l": ("losses", "weighted"),
        "imtl_g": ("gramian", "unit"),
        "imtl": ("gramian", "unit"),
        "aligned_mtl": ("gramian", "unit"),
        "config": ("jacobian", "unit"),
        "db_mtl": ("jacobian", "unit"),
    }
    for name, (needs, heads) in expected.items():
        assert name in mtl.methods.names()
        m = mtl.methods.get(name)
        assert (m.name, m.needs, m.head_grads, m.min_tasks) == (name, needs, heads, 1)
        assert (m.weights is None) == (needs == "jacobian")


def degenerate_cases():
    g = rand(0, 1)[0]
    r = rand(1, 3)
    return {
        "zero_row": np.stack([r[0], np.zeros(P), r[2]]),
        "all_zero": np.zeros((3, P)),
        "identical": np.stack([g, g, g]),
        "identical_pair": np.stack([g, g, r[2]]),
        "opposite": np.stack([g, -g, r[2]]),
        "opposite_scaled": np.stack([g, -3.0 * g, np.zeros(P)]),
        "scales": rand(2, 3, scales=[1e-10, 1.0, 1e10]),
        "tiny": rand(3, 3, scales=[1e-10, 1e-10, 1e-10]),
        "huge": rand(4, 3, scales=[1e10, 1e10, 1e10]),
        "collinear": np.stack([g, 2.0 * g, 1e-3 * g]),
    }


SYMMETRIC = ("imtl_l", "imtl_g", "imtl", "aligned_mtl", "config", "db_mtl")


@pytest.mark.parametrize("name", ALL)
def test_contract_degenerate_inputs_one_compile_vmap_and_permutations(name):
    """One compiled function per method (shape (3, P)): finite on degenerate Jacobians, no
    retracing, vmap over problems equal to one-by-one calls, permutation equivariance."""
    method = build(name)
    fn = aggregate_fn(method)
    key = jax.random.key(0)
    losses = f32([0.5, 1.0, 2.0])
    for case, j in degenerate_cases().items():
        state = method.init(3)
        for step in range(2):  # a second step exercises the updated state
            d, state = fn(f32(j), losses, state, key=jax.random.fold_in(key, step))
            assert np.all(np.isfinite(np.asarray(d))), (case, step)
            for leaf in jax.tree_util.tree_leaves(state):
                assert np.all(np.isfinite(np.asarray(leaf))), (case, step)
    assert fn._cache_size() == 1

    # vmap over a batch of problems (and states, keys) equals one-by-one calls.
    n = 3
    js = f32(np.stack([rand(10 + b, 3, scales=[1.0, 4.0, 0.5]) for b in range(n)]))
    ls = f32(np.abs(np.random.default_rng(9).normal(size=(n, 3))) + 0.1)
    keys = jax.random.split(jax.random.key(1), n)
    state = method.init(3)
    states = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state)
    batched, new_states = jax.vmap(lambda j, l, s, k: fn(j, l, s, key=k))(js, ls, states, keys)
    singles = [fn(js[b], ls[b], state, key=keys[b]) for b in range(n)]
    assert fn._cache_size() == 1
    for b, (d, s) in enumerate(singles):
        np.testing.assert_allclose(batched[b], d, rtol=1e-5, atol=1e-6)
        leaves = zip(
            jax.tree_util.tree_leaves(new_states), jax.tree_util.tree_leaves(s), strict=True
        )
        for x, y in leaves:
            np.testing.assert_allclose(x[b], y, rtol=1e-5, atol=1e-6)

    # Permuting the tasks leaves the direction unchanged (methods without a random order).
    if name in SYMMETRIC:
        perm = np.array([2, 0, 1])
        for b in range(n):
            dp, sp = fn(js[b][perm], ls[b][perm], state, key=keys[b])
            np.testing.assert_allclose(dp, singles[b][0], rtol=1e-4, atol=1e-6)
            if name in ("imtl_l", "imtl"):
                np.testing.assert_allclose(sp.log_scales, singles[b][1].log_scales[perm])

    # T = 1: the method returns a positive multiple of the single gradient.
    method1 = build(name, t=1)
    g = f32(rand(5, 1))
    d, _ = agg(method1, g, f32([0.7]), method1.init(1), key=key)
    cos = float(np.asarray(d) @ np.asarray(g[0]) / (np.linalg.norm(d) * np.linalg.norm(g[0])))
    assert cos == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_two_task_surgery_is_permutation_equivariant(name):
    # With two tasks the visiting order is fixed, so the result cannot depend on the key.
    method = build(name, t=2)
    j = rand(21, 2)
    j[1] = -0.5 * j[0] + 0.3 * j[1]
    w = gram_weights(method, j, state=method.init(2), key=jax.random.key(0))
    wp = gram_weights(method, j[::-1], state=method.init(2), key=jax.random.key(1))
    np.testing.assert_allclose(wp, w[::-1], rtol=1e-5)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "imtl_g", "imtl", "aligned_mtl"])
def test_gramian_methods_give_the_same_weights_on_a_gramian(name):
    method = build(name, t=3)
    j = rand(22, 3)
    key = jax.random.key(3)
    d, _ = agg(method, f32(j), f32([1.0, 2.0, 3.0]), method.init(3), key=key)
    w, _ = weights_from_gramian(
        method, mtl.gramian(f32(j)), f32([1.0, 2.0, 3.0]), method.init(3), key=key
    )
    np.testing.assert_allclose(d, np.asarray(w) @ j, rtol=1e-5, atol=1e-6)
    if name in SYMMETRIC:  # the weights follow the tasks
        perm = np.array([1, 2, 0])
        wp = gram_weights(method, j[perm], np.array([2.0, 3.0, 1.0]), method.init(3))
        np.testing.assert_allclose(wp, np.asarray(w)[perm], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "param"),
    [
        ("gradvac", {"beta": 1.5}, "beta"),
        ("gradvac", {"beta": -0.1}, "beta"),
        ("graddrop", {"leak": 2.0}, "leak"),
        ("graddrop", {"leak": [0.0, -1.0]}, "leak"),
        ("graddrop", {"batch_dims": -1}, "batch_dims"),
        ("imtl_l", {"learning_rate": 0.0}, "learning_rate"),
        ("imtl", {"learning_rate": -1.0}, "learning_rate"),
        ("aligned_mtl", {"importance": [1.0, 0.0]}, "importance"),
        ("db_mtl", {"beta": 1.0}, "beta"),
        ("db_mtl", {"beta_sigma": -0.5}, "beta_sigma"),
        ("db_mtl", {"eps": 0.0}, "eps"),
    ],
)
def test_bad_hyper_parameters_raise(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        mtl.methods.get(name, **kwargs)


def test_per_task_hyper_parameters_must_match_the_number_of_tasks():
    with pytest.raises(ValueError, match="leak"):
        get("graddrop", leak=[0.0, 1.0]).init(3)
    with pytest.raises(ValueError, match="importance"):
        get("aligned_mtl", importance=[1.0, 2.0]).init(3)
    with pytest.raises(TypeError, match="optimizer"):
        get("imtl_l", optimizer="adam")


# ----------------------------------------------------------------------------------------------
# PCGrad


def test_pcgrad_orders_are_independent_permutations():
    orders = np.asarray(gt.task_orders(jax.random.key(0), 5))
    assert all(sorted(row) == list(range(5)) for row in orders)
    assert len({tuple(row) for row in orders}) > 1
    np.testing.assert_array_equal(gt.task_orders(None, 3), np.tile(np.arange(3), (3, 1)))


def conflicting(seed, scales=None):
    j = rand(seed, 3)
    j[2] = -j[0] + 0.3 * j[2]  # tasks 0 and 2 conflict
    j[1] = -0.4 * j[0] + j[1]
    return j if scales is None else j * np.asarray(scales, float)[:, None]


@pytest.mark.parametrize("scales", [None, [1e-3, 1.0, 1e3], [1e-10, 1.0, 1e10]])
def test_pcgrad_matches_sequential_projection_on_vectors(scales):
    j = conflicting(30, scales)
    c = pcgrad_ref(j, np.asarray(gt.task_orders(KEY, 3)))
    assert not np.allclose(c, np.eye(3))  # some projections happened
    np.testing.assert_allclose(gram_weights(get("pcgrad"), j), c.sum(0), rtol=2e-4)


def test_pcgrad_projected_gradient_does_not_conflict_with_the_last_task_it_met():
    j = conflicting(31)
    norms, k = gt.unit_gramian(f32(j @ j.T))
    for seed in range(4):
        orders = np.asarray(gt.task_orders(jax.random.key(seed), 3))
        coef = np.asarray(project_conflicting(k, jnp.asarray(orders)), float)
        projected = (coef * np.asarray(norms)[:, None]) @ (j / np.asarray(norms)[:, None])
        np.testing.assert_allclose(projected, pcgrad_ref(j, orders) @ j, rtol=1e-4, atol=1e-5)
        for i in range(3):
            last = [o for o in orders[i] if o != i][-1]
            assert projected[i] @ j[last] >= -1e-4 * np.linalg.norm(j[last]) ** 2


def test_pcgrad_two_task_closed_form():
    pc = get("pcgrad")
    g1, g2 = np.array([1.0, 0.0, 0.5]), np.array([-2.0, 1.0, 0.0])
    dot = g1 @ g2
    assert dot < 0
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    w = gram_weights(pc, np.stack([g1, g2]))
    np.testing.assert_allclose(w @ np.stack([g1, g2]), expected, rtol=1e-5, atol=1e-6)
    # gᵢᴾᶜ loses (gᵢ·gⱼ/‖gⱼ‖²) gⱼ, which lands on task j's weight.
    np.testing.assert_allclose(w, [1 - dot / (g1 @ g1), 1 - dot / (g2 @ g2)], rtol=1e-5)
    # Without conflict PCGrad is the plain sum.
    g3 = np.array([1.0, 2.0, 0.0])
    np.testing.assert_allclose(gram_weights(pc, np.stack([g1, g3])), [1.0, 1.0])


def test_pcgrad_row_scaling_scales_each_projected_gradient():
    # Projections do not depend on the scale of the gradient projected against.
    j = conflicting(32)
    c = np.array([1e-4, 1.0, 1e4])
    w = gram_weights(get("pcgrad"), c[:, None] * j)
    expected = c @ (pcgrad_ref(j, np.asarray(gt.task_orders(KEY, 3))) @ j)
    np.testing.assert_allclose(w @ (c[:, None] * j), expected, rtol=2e-4)


# ----------------------------------------------------------------------------------------------
# GradVac

BETA = 0.5  # the factory's default (LibMTL's and torchjd's)


def gradvac_state(targets):
    return mtl._src.methods.gradvac.GradVacState(f32(targets))


def test_gradvac_adjusted_cosine_reaches_the_target():
    g1, g2 = np.array([1.0, 0.2, 0.0]), np.array([-0.5, 1.0, 0.3])
    j = np.stack([g1, g2])
    phi = g1 @ g2 / (np.linalg.norm(g1) * np.linalg.norm(g2))
    assert phi < 0.5
    # Target 0.5 for task 1 against task 2; task 2's target −1 is never above its cosine.
    targets = np.array([[0.0, 0.5], [-1.0, 0.0]])
    w, new = weights_from_gramian(
        get("gradvac"), f32(j @ j.T), f32([1, 1]), gradvac_state(targets), key=KEY
    )
    w = np.asarray(w, float)
    assert w[0] == pytest.approx(1.0)
    adjusted = w @ j - g2  # g₁' = g₁ + a g₂
    cos = adjusted @ g2 / (np.linalg.norm(adjusted) * np.linalg.norm(g2))
    assert cos == pytest.approx(0.5, abs=1e-5)
    # The targets move toward the observed cosines by β.
    expected = np.array([[0.0, 0.5], [-1.0, 0.0]]) * (1 - BETA) + BETA * phi * (1 - np.eye(2))
    np.testing.assert_allclose(new.targets, expected, rtol=1e-5)


def test_gradvac_matches_the_algorithm_on_vectors():
    j = rand(40, 3, scales=[1.0, 1e-3, 1e3])
    targets = np.random.default_rng(1).uniform(-0.5, 0.8, size=(3, 3))
    np.fill_diagonal(targets, 0.0)
    w, new = weights_from_gramian(
        get("gradvac"), f32(j @ j.T), f32(np.ones(3)), gradvac_state(targets), key=KEY
    )
    c, tgt = gradvac_ref(j, targets, np.asarray(gt.task_orders(KEY, 3)), BETA)
    assert not np.allclose(c, np.eye(3))
    np.testing.assert_allclose(w, c.sum(0), rtol=2e-4)
    np.testing.assert_allclose(new.targets, tgt, rtol=1e-4, atol=1e-5)


def test_gradvac_with_zero_targets_is_pcgrad():
    j = conflicting(41)
    w_pc = gram_weights(get("pcgrad"), j)
    w_gv = gram_weights(get("gradvac"), j, state=gradvac_state(np.zeros((3, 3))))
    np.testing.assert_allclose(w_gv, w_pc, rtol=1e-5)


def test_gradvac_row_scaling_scales_each_adjusted_gradient():
    j = rand(42, 3)
    targets = np.full((3, 3), 0.3)
    c = np.array([1e-4, 1.0, 1e4])
    w = gram_weights(get("gradvac"), c[:, None] * j, state=gradvac_state(targets))
    cref, _ = gradvac_ref(j, targets, np.asarray(gt.task_orders(KEY, 3)), BETA)
    np.testing.assert_allclose(w @ (c[:, None] * j), c @ (cref @ j), rtol=2e-4)


# ----------------------------------------------------------------------------------------------
# GradDrop


def sign_candidates(j):
    return np.where(j > 0, j, 0).sum(0), np.where(j < 0, j, 0).sum(0)


def drop(j, key=KEY, **kwargs):
    d, _ = agg(get("graddrop", **kwargs), f32(j), f32(np.ones(len(j))), (), key=key)
    return np.asarray(d, float)


def test_graddrop_every_element_keeps_one_sign():
    j = rand(50, 3, p=40)
    # A pytree: each leaf draws its own U (two equal leaves get different masks).
    tree = {"a": f32(j[:, :20]), "b": f32(j[:, :20]), "c": f32(j[:, 20:].reshape(3, 4, 5))}
    out, _ = agg(get("graddrop"), tree, f32(np.ones(3)), (), key=KEY)
    assert not np.allclose(out["a"], out["b"])
    d = np.concatenate([out["a"], out["c"].reshape(-1)])
    j = np.concatenate([j[:, :20], j[:, 20:]], axis=1)
    pos, neg = sign_candidates(j)
    is_pos, is_neg = np.isclose(d, pos, rtol=1e-5), np.isclose(d, neg, rtol=1e-5)
    assert np.all(is_pos | is_neg)
    assert is_pos.any() and is_neg.any()
    # Elements where every task agrees keep the plain sum.
    agree = np.all(j > 0, 0) | np.all(j < 0, 0)
    assert agree.any()
    np.testing.assert_allclose(d[agree], j.sum(0)[agree], rtol=1e-5)


def test_graddrop_keeps_the_positive_sign_with_probability_purity():
    j = np.array([[1.0, 3.0, -1.0, 0.5], [-1.0, -1.0, -3.0, 0.5], [0.0, 0.0, 1.0, -2.0]])
    purity = 0.5 * (1 + j.sum(0) / np.abs(j).sum(0))
    method = get("graddrop")
    keys = jax.random.split(jax.random.key(0), 4000)
    d = jax.vmap(lambda k: agg(method, f32(j), f32(np.ones(3)), (), key=k)[0])(keys)
    pos, _ = sign_candidates(j)
    freq = np.isclose(np.asarray(d), pos, rtol=1e-6).mean(0)
    np.testing.assert_allclose(freq, purity, atol=4 * 0.5 / np.sqrt(4000))


def test_graddrop_leak_one_is_the_sum_and_leak_interpolates():
    j = rand(51, 3, p=40)
    np.testing.assert_allclose(drop(j, leak=1.0), j.sum(0), rtol=1e-5, atol=1e-6)
    d0, dh = drop(j), drop(j, leak=0.5)
    np.testing.assert_allclose(dh, 0.5 * d0 + 0.5 * j.sum(0), rtol=1e-5, atol=1e-6)
    # A per-task leak of 1 always passes that task's gradient; the others are masked.
    rest = drop(j, leak=[1.0, 0.0, 0.0]) - j[0]
    pos, neg = sign_candidates(j[1:])
    assert np.all(np.isclose(rest, pos, atol=1e-6) | np.isclose(rest, neg, atol=1e-6))


def test_graddrop_batch_separated_gradients_share_one_draw_per_unit():
    rng = np.random.default_rng(52)
    j = rng.normal(size=(3, 6, 10))  # (T, batch, features)
    j[:, :, :3] += 2.0 * rng.choice([-1.0, 1.0], size=(3, 1, 3))  # units with clear signs
    d = drop(j, batch_dims=1)
    summed = j.sum(1)  # the signs are chosen on the batch sums
    for f in range(10):
        keep_pos = (j[:, :, f] * (summed[:, f] > 0)[:, None]).sum(0)
        keep_neg = (j[:, :, f] * (summed[:, f] < 0)[:, None]).sum(0)
        assert np.allclose(d[:, f], keep_pos, atol=1e-5) or np.allclose(
            d[:, f], keep_neg, atol=1e-5
        ), f


def test_graddrop_scale_invariance_and_task_permutation_invariance():
    j = rand(53, 3, p=40)
    d = drop(j)
    np.testing.assert_allclose(drop(1e6 * j), 1e6 * d, rtol=1e-5)
    # P and U do not depend on the order of the tasks.
    np.testing.assert_allclose(drop(j[[2, 0, 1]]), d, rtol=1e-5, atol=1e-6)


def test_graddrop_needs_a_key():
    with pytest.raises(ValueError, match="key"):
        mtl.aggregate(get("graddrop"), f32(rand(0, 2)), f32([1.0, 1.0]), ())


# ----------------------------------------------------------------------------------------------
# IMTL-G, IMTL-L, IMTL


@pytest.mark.parametrize("scales", [None, [1e-3, 1.0, 1e3], [1e-10, 1.0, 1e10]])
def test_imtl_g_equal_projections_and_weights_summing_to_one(scales):
    j = rand(60, 3, scales=scales)
    w = gram_weights(get("imtl_g"), j)
    assert w.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(w, imtl_g_ref(j), rtol=1e-3)
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    proj = u @ (w @ j)
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)


def test_imtl_g_direction_ignores_row_scales():
    j = rand(61, 3)
    c = np.array([1e-3, 1.0, 1e3])
    d = gram_weights(get("imtl_g"), j) @ j
    ds = gram_weights(get("imtl_g"), c[:, None] * j) @ (c[:, None] * j)
    np.testing.assert_allclose(unit(ds), unit(d), atol=1e-4)


def test_imtl_g_collinear_and_opposite_gradients():
    g = rand(62, 1)[0]
    # Same direction, norms 1 and 3: α ∝ 1/‖gᵢ‖, so both contribute equally.
    w = gram_weights(get("imtl_g"), np.stack([g, 3 * g]))
    np.testing.assert_allclose(w, [0.75, 0.25], rtol=1e-5)
    # Opposite: only the zero direction has equal projections; Σα = 1 still holds.
    w = gram_weights(get("imtl_g"), np.stack([g, -3 * g]))
    np.testing.assert_allclose(w, [0.75, 0.25], rtol=1e-5)
    np.testing.assert_allclose(w @ np.stack([g, -3 * g]), 0.0, atol=1e-5)
    # A zero gradient takes no part.
    j = np.stack([g, np.zeros(P), rand(63, 1)[0]])
    w = gram_weights(get("imtl_g"), j)
    assert w[1] == 0.0 and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w[[0, 2]], imtl_g_ref(j[[0, 2]]), rtol=1e-4)


def test_imtl_g_paper_normalization_can_oppose_every_task():
    # A case where the paper's closed form (Σα = 1) gives equal but negative projections.
    j = None
    rng = np.random.default_rng(0)
    for _ in range(2000):
        cand = rng.normal(size=(3, 5)) * np.exp(2 * rng.normal(size=(3, 1)))
        a = imtl_g_ref(cand)
        if (cand / np.linalg.norm(cand, axis=1, keepdims=True) @ (a @ cand))[0] < 0:
            j = cand
            break
    assert j is not None
    w = gram_weights(get("imtl_g"), j)
    np.testing.assert_allclose(w, imtl_g_ref(j), rtol=1e-3)
    assert np.all(j @ (w @ j) < 0)


def test_imtl_l_reaches_equal_scaled_losses():
    losses = f32([1e-2, 1.0, 30.0])
    method = get("imtl_l", learning_rate=0.05)

    def body(state, _):
        w, state = method.weights(losses, None, state, None)
        return state, w

    state, ws = jax.jit(lambda s: jax.lax.scan(body, s, None, length=2000))(method.init(3))
    np.testing.assert_allclose(np.exp(state.log_scales) * losses, 1.0, rtol=1e-2)
    np.testing.assert_allclose(ws[0], 1.0)  # e^{s} at s = 0
    np.testing.assert_allclose(ws[-1] * losses, 1.0, rtol=1e-2)


def test_imtl_l_scale_gradient_by_hand():
    method = get("imtl_l", optimizer=optax.sgd(0.1), init_log_scale=0.5)
    state = method.init(3)
    w, new = method.weights(f32([2.0, 0.1, 1.0]), None, state, None)
    np.testing.assert_allclose(w, np.exp([0.5, 0.5, 0.5]), rtol=1e-6)
    grad = np.exp(0.5) * np.array([2.0, 0.1, 1.0]) - 1.0
    np.testing.assert_allclose(new.log_scales, 0.5 - 0.1 * grad, rtol=1e-6)


def test_imtl_is_imtl_g_on_the_scaled_gradients():
    j = rand(64, 3)
    s = np.array([0.5, -1.0, 2.0])
    losses = np.array([1.0, 2.0, 0.5])
    method = get("imtl", optimizer=optax.sgd(0.1))
    state = mtl._src.methods.imtl_l.IMTLLState(f32(s), optax.sgd(0.1).init(f32(s)))
    w, new = weights_from_gramian(method, f32(j @ j.T), f32(losses), state, key=KEY)
    alpha = imtl_g_ref(np.exp(s)[:, None] * j)
    np.testing.assert_allclose(w, alpha * np.exp(s), rtol=1e-4)
    np.testing.assert_allclose(new.log_scales, s - 0.1 * (np.exp(s) * losses - 1), rtol=1e-5)
    d_g = gram_weights(get("imtl_g"), j) @ j
    cos = unit(np.asarray(w, float) @ j) @ unit(d_g)
    assert cos == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Aligned-MTL


def test_aligned_mtl_components_are_orthogonal_with_equal_norms():
    j = rand(70, 3, scales=[1.0, 5.0, 0.3])
    b = np.asarray(alignment_matrix(f32(j @ j.T)), float)
    aligned = b @ j
    sigma_min = np.linalg.svd(j, compute_uv=False).min()
    np.testing.assert_allclose(aligned @ aligned.T, sigma_min**2 * np.eye(3), atol=1e-4 * 25)
    # The weights are B·ω, checked against a float64 eigen-decomposition.
    lam, v = np.linalg.eigh(j @ j.T)
    b_ref = np.sqrt(lam.min()) * (v / np.sqrt(lam)) @ v.T
    np.testing.assert_allclose(gram_weights(get("aligned_mtl"), j), b_ref.sum(1), rtol=1e-3)
    omega = np.array([1.0, 2.0, 0.5])
    w = gram_weights(get("aligned_mtl", importance=omega), j)
    np.testing.assert_allclose(w, b_ref @ omega, rtol=1e-3)


def test_aligned_mtl_rank_deficient_gramian():
    # Three gradients in a plane: rank 2. The non-zero singular directions are aligned.
    j = rand(71, 3, p=2) @ rand(72, 2, p=P)
    b = np.asarray(alignment_matrix(f32(j @ j.T)), float)
    aligned = b @ j
    s = np.linalg.svd(j, compute_uv=False)
    u, _, _ = np.linalg.svd(j @ j.T)
    proj = u[:, :2] @ u[:, :2].T
    np.testing.assert_allclose(aligned @ aligned.T, s[1] ** 2 * proj, atol=1e-3 * s[0] ** 2)
    # Duplicated and zero rows: rank 1, B is the projector on the span (σ_min = σ_max).
    g = rand(73, 1)[0]
    w = gram_weights(get("aligned_mtl"), np.stack([g, g, np.zeros(P)]))
    np.testing.assert_allclose(w, [1.0, 1.0, 0.0], rtol=1e-5, atol=1e-6)


def test_aligned_mtl_exactly_dependent_tasks_keep_their_scale_in_float32():
    """The rank cut on K, 4·ε₃₂·λ_max(K), is above the eigenvalues that computing ``G = JJᵀ``
    in float32 leaves where the gradients are exactly dependent (a task the sum of two others):
    the update is the one of the exact rank (float64), not one shrunk to the rounding's σ_min.
    A cut at float64's level (the conformance reference's) keeps such an eigenvalue in some
    draws and shrinks the update by about 3e3 (README, solver accuracy)."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        j = rng.normal(size=(6, 1000))
        j[5] = j[0] + j[1]
        j = np.asarray(f32(j), np.float64)  # the rounded sum: dependent to ε₃₂
        g = jnp.matmul(f32(j), f32(j).T)  # as a float32 train step forms it
        w = np.asarray(get("aligned_mtl").weights(jnp.zeros(6), g, (), None)[0], float)
        lam, v = np.linalg.eigh(j @ j.T)
        keep = lam > 1e-9 * lam.max()  # the exact rank, 5
        assert keep.sum() == 5
        lam, v = lam[keep], v[:, keep]
        b_ref = np.sqrt(lam.min()) * (v / np.sqrt(lam)) @ v.T
        d, d_ref = j.T @ w, j.T @ b_ref.sum(1)
        assert np.linalg.norm(d - d_ref) <= 1e-3 * np.linalg.norm(d_ref), seed


@pytest.mark.parametrize("t", [2, 7, 40])
def test_aligned_mtl_jacobi_rotations_match_a_float64_svd(t):
    # One-sided Jacobi in round-robin order on Y with columns graded over eight decades: V
    # orthogonal, the columns of YV orthogonal, and their norms the singular values of Y to a
    # relative accuracy that the grading does not spoil (Demmel & Veselić).
    from mtljax._src.methods.aligned_mtl import _jacobi_rotations

    rng = np.random.default_rng(t)
    y = rng.normal(size=(t, t)) * 10.0 ** rng.uniform(-8, 0, size=(1, t))
    yv, v, sweeps = jax.jit(_jacobi_rotations)(f32(y))
    yv, v = np.asarray(yv, float), np.asarray(v, float)
    assert 1 <= int(sweeps) < 30
    np.testing.assert_allclose(v.T @ v, np.eye(t), atol=1e-5)
    sigma = np.linalg.norm(yv, axis=0)
    cos = (yv.T @ yv) / np.outer(sigma, sigma)
    np.testing.assert_allclose(cos, np.eye(t), atol=1e-5)
    ref = np.linalg.svd(f32(y).astype(float), compute_uv=False)
    np.testing.assert_allclose(np.sort(sigma)[::-1], ref, rtol=2e-4)


def test_aligned_mtl_scaling_the_jacobian_scales_the_direction():
    j = rand(74, 3)
    w = gram_weights(get("aligned_mtl"), j)
    ws = gram_weights(get("aligned_mtl"), 1e4 * j)
    np.testing.assert_allclose(ws, w, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# ConFIG


def config_direction(j):
    """ConFIG's update on the float32 Jacobian ``j`` (float64 numpy out)."""
    method = get("config")
    d, _ = agg(method, f32(j), f32(np.ones(len(j))), method.init(len(j)))
    return np.asarray(d, float)


@pytest.mark.parametrize("scales", [None, [1e-3, 1.0, 1e3], [1e-10, 1.0, 1e10]])
def test_config_equal_cosines_and_the_length_rule(scales):
    j = conflicting(80, scales)
    d = config_direction(j)
    cos = (j @ d) / (np.linalg.norm(j, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cos, cos.mean(), rtol=1e-3)
    assert np.all(cos > 0)
    # Length: the sum of the projections of the gradients on the direction.
    np.testing.assert_allclose(np.linalg.norm(d), (j @ unit(d)).sum(), rtol=1e-3)
    np.testing.assert_allclose(unit(d), unit(config_ref(j)), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(config_ref(j)), rtol=1e-3)


def test_config_direction_ignores_row_scales():
    j = rand(81, 3)
    c = np.array([1e-3, 1.0, 1e3])
    d = config_direction(j)
    ds = config_direction(c[:, None] * j)
    np.testing.assert_allclose(unit(ds), unit(d), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(ds), c @ (j @ unit(d)), rtol=1e-3)


def test_config_rank_deficient_stays_conflict_free():
    e = np.eye(P)
    j = np.stack([e[0], -2 * e[0], e[1]])
    d = config_direction(j)
    assert np.all(j @ d >= -1e-6)
    np.testing.assert_allclose(d, config_ref(j), atol=1e-5)


def test_config_on_a_pytree_jacobian_and_without_shared_parameters():
    j = rand(82, 3, p=10)
    tree = {"w": f32(j[:, :6].reshape(3, 2, 3)), "b": f32(j[:, 6:])}
    method = get("config")
    d, _ = agg(method, tree, f32(np.ones(3)), ())
    flat = np.concatenate([np.asarray(d["w"], float).reshape(-1), np.asarray(d["b"], float)])
    np.testing.assert_allclose(flat, config_ref(j), rtol=1e-4, atol=1e-6)
    assert d["w"].shape == (2, 3) and d["b"].shape == (4,)
    empty, _ = mtl.aggregate(method, {}, f32(np.ones(3)), ())
    assert empty == {}


# ----------------------------------------------------------------------------------------------
# DB-MTL


def db_ref(js, losses, beta=0.9, sigma=0.5, eps=1e-8):
    ema = np.zeros_like(js[0])
    for t, (j, l) in enumerate(zip(js, losses, strict=True), start=1):
        b = beta / t**sigma
        ema = b * ema + (1 - b) * j / (l[:, None] + eps)
    norms = np.linalg.norm(ema, axis=1)
    return (norms.max() / norms) @ ema, ema


def test_db_mtl_every_task_contributes_the_largest_norm():
    js = [rand(90 + s, 3, scales=[1.0, 10.0, 0.1]) for s in range(3)]
    losses = [np.array([0.5, 2.0, 1.0]) * (s + 1) for s in range(3)]
    method = build("db_mtl")
    state = method.init(3)
    fn = aggregate_fn(method)
    for j, l in zip(js, losses, strict=True):
        d, state = fn(f32(j), f32(l), state)
    d_ref, ema_ref = db_ref(js, losses)
    np.testing.assert_allclose(d, d_ref, rtol=1e-4)
    np.testing.assert_allclose(state.ema, ema_ref, rtol=1e-4)
    assert int(state.step) == 3
    ema = np.asarray(state.ema, float)
    norms = np.linalg.norm(ema, axis=1)
    contrib = np.linalg.norm((norms.max() / norms)[:, None] * ema, axis=1)
    np.testing.assert_allclose(contrib, norms.max(), rtol=1e-5)


def test_db_mtl_ignores_the_scale_of_each_loss():
    # Multiplying Lᵢ by cᵢ multiplies ∇Lᵢ by cᵢ: the log-loss gradient does not change (up to
    # ε = 1e-8 inside the logarithm, relatively 1e-8 / cᵢLᵢ).
    c = np.array([1e-2, 1.0, 1e4])
    js = [rand(95 + s, 3) for s in range(2)]
    losses = [np.array([0.5, 2.0, 1.0]) + s for s in range(2)]
    method = build("db_mtl")
    fn = aggregate_fn(method)
    s1 = s2 = method.init(3)
    for j, l in zip(js, losses, strict=True):
        d1, s1 = fn(f32(j), f32(l), s1)
        d2, s2 = fn(f32(c[:, None] * j), f32(c * l), s2)
    np.testing.assert_allclose(d2, d1, rtol=1e-4)


def test_db_mtl_state_from_like_on_a_pytree_jacobian():
    tree = {"w": f32(rand(97, 3, p=6).reshape(3, 2, 3)), "b": f32(rand(98, 3, p=2))}
    flat = np.concatenate([np.asarray(tree["w"]).reshape(3, 6), np.asarray(tree["b"])], axis=1)
    losses = np.array([1.0, 2.0, 3.0])
    like = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jnp.zeros(2)}
    method = mtl.methods.db_mtl(like=like)
    d, state = agg(method, tree, f32(losses), method.init(3))
    d_ref, _ = db_ref([flat], [losses])
    np.testing.assert_allclose(np.concatenate([d["w"].reshape(-1), d["b"]]), d_ref, rtol=1e-5)
    assert jax.tree_util.tree_structure(state.ema) == jax.tree_util.tree_structure(tree)
    with pytest.raises(ValueError, match="structure"):
        agg(method, {"w": tree["w"]}, f32(losses), method.init(3))
    with pytest.raises(ValueError, match="like"):
        mtl.methods.db_mtl().init(3)


# ----------------------------------------------------------------------------------------------
# In the train step


def test_train_step_runs_graddrop_at_feature_level_and_db_mtl_with_skip():
    model, params = helpers.tiny_model(3)
    batch = helpers.tiny_batch(3)
    opt = optax.sgd(1e-2)
    for method, mode in [
        (mtl.methods.graddrop(batch_dims=1), "feature"),
        # like= gives DB-MTL's state a fixed structure, as nonfinite="skip" needs.
        (mtl.methods.db_mtl(like=params.shared), "parameter"),
    ]:
        step = mtl.make_train_step(model, method, opt, mode=mode)
        state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
        for _ in range(2):
            state, metrics = step(state, batch)
        assert bool(metrics["finite"]) and int(state.skipped) == 0, method.name
        assert np.all(np.isfinite(np.asarray(metrics["losses"])))
        assert step.jitted._cache_size() == 1
