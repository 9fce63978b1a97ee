"""Tests of mtljax.regularizers: values on hand-computed cases, proximal operators against their
definition (scipy), exact row sparsity of ℓ1/ℓ2 proximal gradient, and agreement with
scikit-learn's MultiTaskLasso."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax import regularizers as reg

W = jnp.array([[3.0, 0.0, -1.0], [4.0, 0.0, 2.0]])  # (T=2, d=3)


def test_group_norm_values():
    # Columns (features) across the 2 tasks: (3,4) -> 5, (0,0) -> 0, (-1,2) -> √5.
    np.testing.assert_allclose(reg.l1_l2(W), 5.0 + np.sqrt(5.0), rtol=1e-6)
    np.testing.assert_allclose(reg.l1_linf(W), 4.0 + 0.0 + 2.0, rtol=1e-6)
    # Groups along the other axis: rows -> ‖(3,0,-1)‖ + ‖(4,0,2)‖.
    np.testing.assert_allclose(reg.l1_l2(W, axes=1), np.sqrt(10) + np.sqrt(20), rtol=1e-6)
    # Several axes: (T, in, out) kernels grouped by input feature.
    k = jnp.arange(12.0).reshape(2, 3, 2)
    want = sum(np.linalg.norm(np.asarray(k)[:, j, :]) for j in range(3))
    np.testing.assert_allclose(reg.l1_l2(k, axes=(0, 2)), want, rtol=1e-6)


def test_trace_norm_mean_and_clustering_values():
    np.testing.assert_allclose(reg.trace_norm(jnp.diag(jnp.array([3.0, -2.0]))), 5.0, rtol=1e-6)
    np.testing.assert_allclose(
        reg.trace_norm(W), np.linalg.svd(np.asarray(W), compute_uv=False).sum(), rtol=1e-6
    )
    # Mean-regularized: w̄ = (3.5, 0, 0.5); deviations ±(0.5, 0, 1.5) -> 2 × 2.5 = 5.
    np.testing.assert_allclose(reg.mean_regularized(W), 5.0, rtol=1e-6)
    np.testing.assert_allclose(
        reg.mean_regularized(W, mean_weight=2.0), 5.0 + 2.0 * (3.5**2 + 0.5**2), rtol=1e-6
    )
    # Clusters {0, 1} and {2} on 1-D task weights 0, 2, 10.
    w = jnp.array([[0.0], [2.0], [10.0]])
    a = jnp.array([0, 0, 1])
    mean = 4.0
    within = 1.0 + 1.0
    between = 2 * (1.0 - mean) ** 2 + 1 * (10.0 - mean) ** 2
    got = reg.task_clustering(
        w, a, num_clusters=2, mean_weight=0.5, between_weight=0.25, within_weight=2.0
    )
    np.testing.assert_allclose(got, 0.5 * 3 * mean**2 + 0.25 * between + 2.0 * within, rtol=1e-6)
    # A soft one-hot assignment gives the same value; between + within = total variance.
    soft = jax.nn.one_hot(a, 2)
    np.testing.assert_allclose(
        reg.task_clustering(w, soft, between_weight=1.0, within_weight=1.0),
        reg.mean_regularized(w),
        rtol=1e-6,
    )


def test_assign_clusters_finds_the_groups():
    key = jax.random.key(0)
    centers = jnp.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    labels = jnp.array([0, 1, 2, 0, 1, 2, 2, 0])
    w = centers[labels] + 0.1 * jax.random.normal(key, (8, 3))
    got = np.asarray(jax.jit(lambda x: reg.assign_clusters(x, 3))(w))
    # Same partition up to relabelling.
    same = np.equal.outer(got, got)
    want = np.equal.outer(np.asarray(labels), np.asarray(labels))
    np.testing.assert_array_equal(same, want)
    # It minimises the clustering penalty (ε_W > ε_B) over a few other partitions.
    best = reg.task_clustering(w, got, num_clusters=3, between_weight=0.1, within_weight=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = jnp.asarray(rng.integers(0, 3, size=8))
        assert (
            best
            <= reg.task_clustering(w, other, num_clusters=3, between_weight=0.1, within_weight=1.0)
            + 1e-5
        )


def test_task_relationship_prior():
    key = jax.random.key(1)
    w = jax.random.normal(key, (4, 6))  # T = 4 tasks, d = 6
    omega = reg.update_task_covariance(w)
    np.testing.assert_allclose(jnp.trace(omega), 1.0, rtol=1e-5)
    np.testing.assert_allclose(omega, omega.T, atol=1e-6)
    assert np.all(np.linalg.eigvalsh(np.asarray(omega)) > 0)
    # Closed form: (WᵀW)^{1/2}/tr(·) with WᵀW the task Gram matrix.
    gram = np.asarray(w @ w.T, np.float64)
    vals, vecs = np.linalg.eigh(gram)
    root = vecs @ np.diag(np.sqrt(vals)) @ vecs.T
    np.testing.assert_allclose(omega, root / np.trace(root), rtol=1e-4, atol=1e-6)
    # At the update, the penalty equals the squared trace norm, and it is the minimum over Ω.
    best = reg.task_relationship_penalty(w, omega)
    np.testing.assert_allclose(best, reg.trace_norm(w) ** 2, rtol=1e-4)
    for s in range(5):
        a = jax.random.normal(jax.random.key(10 + s), (4, 4))
        other = a @ a.T + 0.1 * jnp.eye(4)
        other = other / jnp.trace(other)
        assert best <= reg.task_relationship_penalty(w, other) * (1 + 1e-5)
    # Penalty value on a hand case: Ω = I/2, W rows e1, 2e2 -> tr(2 WWᵀ) = 2(1 + 4).
    w2 = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(reg.task_relationship_penalty(w2, jnp.eye(2) / 2), 10.0)


def _np_l1_l2(w, axes=(0,)):
    return np.sum(np.sqrt(np.sum(w * w, axis=axes)))


def _np_l1_linf(w, axes=(0,)):
    return np.sum(np.max(np.abs(w), axis=axes))


def _np_trace(w):
    return np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False).sum()


@pytest.mark.parametrize(
    "norm, prox, step, shape",
    [
        (_np_l1_l2, reg.prox_l1_l2, 0.7, (3, 4)),
        (_np_l1_linf, reg.prox_l1_linf, 0.7, (3, 4)),
        (_np_trace, reg.prox_trace_norm, 0.9, (3, 4)),
        (
            lambda w: _np_l1_l2(w, (0, 2)),
            lambda w, s: reg.prox_l1_l2(w, s, axes=(0, 2)),
            0.8,
            (3, 2, 2),
        ),
        (
            lambda w: _np_l1_linf(w, (0, 2)),
            lambda w, s: reg.prox_l1_linf(w, s, axes=(0, 2)),
            0.5,
            (3, 2, 2),
        ),
    ],
)
def test_proximal_operators_match_their_definition(norm, prox, step, shape):
    """prox(v) = argmin_x ½‖x − v‖² + step·R(x), with R written independently in numpy."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    v = rng.normal(size=shape)
    v[:, 0] *= 0.2  # a group close to the threshold
    p = np.asarray(prox(jnp.asarray(v, jnp.float32), step), np.float64)

    def objective(x):
        x = x.reshape(v.shape)
        return 0.5 * np.sum((x - v) ** 2) + step * norm(x)

    best = None
    for x0 in (v.ravel(), p.ravel() + 0.05 * rng.normal(size=p.size), np.zeros(v.size)):
        res = minimize(
            objective, x0, method="Powell", options={"xtol": 1e-9, "ftol": 1e-13, "maxiter": 50000}
        )
        best = res if best is None or res.fun < best.fun else best
    # The objective is 1-strongly convex: F(x) − F(prox) ≥ ½‖x − prox‖². The prox must be at
    # least as good as scipy's minimiser, and scipy's near-minimiser must lie close to it.
    assert objective(p.ravel()) <= best.fun + 1e-5
    gap = max(best.fun - objective(p.ravel()), 0.0)
    assert np.linalg.norm(best.x - p.ravel()) <= np.sqrt(2 * gap + 1e-5) + 1e-3


def test_prox_edge_cases():
    np.testing.assert_array_equal(reg.prox_l1_l2(W, 0.0), W)
    np.testing.assert_allclose(reg.prox_l1_linf(W, 0.0), W, atol=1e-7)
    assert float(jnp.abs(reg.prox_l1_l2(W, 100.0)).max()) == 0.0
    assert float(jnp.abs(reg.prox_l1_linf(W, 100.0)).max()) == 0.0
    np.testing.assert_allclose(reg.prox_trace_norm(W, 0.0), W, atol=1e-5)
    # ℓ1 ball projection: inside points stay; the result has ℓ1 norm = radius otherwise.
    v = jnp.array([[0.1, -0.2, 0.3], [3.0, -1.0, 0.5]])
    pr = reg.project_l1_ball(v, 1.0)
    np.testing.assert_allclose(pr[0], v[0])
    np.testing.assert_allclose(jnp.abs(pr[1]).sum(), 1.0, rtol=1e-6)
    # Jittable.
    jax.jit(reg.prox_l1_linf, static_argnums=2)(W, 0.5, 0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="step"):
        reg.prox_l1_l2(W, -1.0)
    with pytest.raises(ValueError, match="axis"):
        reg.l1_l2(W, axes=2)
    with pytest.raises(ValueError, match="at least 2 dims"):
        reg.trace_norm(jnp.ones(3))
    with pytest.raises(ValueError, match="omega"):
        reg.task_relationship_penalty(W, jnp.eye(3))
    with pytest.raises(ValueError, match="3 entries for 2 tasks"):
        reg.task_clustering(W, jnp.array([0, 1, 0]), num_clusters=2)
    with pytest.raises(ValueError, match="num_clusters"):
        reg.task_clustering(W, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="clusters for only"):
        reg.assign_clusters(W, 3)


def _multitask_data(seed: int, n: int = 60, d: int = 12, t: int = 3, relevant: int = 4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    coef = np.zeros((t, d))
    coef[:, :relevant] = rng.normal(size=(t, relevant)) * 2.0
    y = x @ coef.T + 0.1 * rng.normal(size=(n, t))
    return x.astype(np.float32), y.astype(np.float32), coef


def _proximal_gradient(x, y, alpha, iters=3000):
    """FISTA on (1/(2n))‖Y − XWᵀ‖² + α‖W‖₁,₂ with W: (T, d) (groups = features)."""
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    n = x.shape[0]
    lip = float(np.linalg.eigvalsh(np.asarray(x.T @ x, np.float64) / n).max())
    step = 1.0 / lip

    def grad(w):
        return ((x @ w.T - y).T @ x) / n

    def body(_, carry):
        w, z, tk = carry
        w_new = reg.prox_l1_l2(z - step * grad(z), step * alpha, axes=0)
        t_new = (1 + jnp.sqrt(1 + 4 * tk**2)) / 2
        z = w_new + ((tk - 1) / t_new) * (w_new - w)
        return w_new, z, t_new

    w0 = jnp.zeros((y.shape[1], x.shape[1]), jnp.float64)
    w, _, _ = jax.lax.fori_loop(0, iters, body, (w0, w0, jnp.asarray(1.0, jnp.float64)))
    return np.asarray(w)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_l1_l2_selects_shared_features_exactly(x64):
    x, y, coef = _multitask_data(0)
    w = _proximal_gradient(x, y, alpha=0.3)
    row_norms = np.linalg.norm(w, axis=0)  # one per feature, across tasks
    assert np.all(row_norms[:4] > 0.5)
    # Irrelevant features are exactly zero for every task (not merely small).
    assert np.all(w[:, 4:] == 0.0)


def test_l1_l2_matches_sklearn_multitask_lasso(x64):
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y, _ = _multitask_data(1)
    alpha = 0.2
    ours = _proximal_gradient(x, y, alpha=alpha, iters=5000)
    lasso = sklearn.MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100000)
    lasso.fit(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(ours, lasso.coef_, atol=1e-5)
    np.testing.assert_array_equal(
        np.linalg.norm(ours, axis=0) == 0, np.linalg.norm(lasso.coef_, axis=0) == 0
    )


def test_prox_on_selects_leaves_and_names_bad_paths():
    params = mtl.Params({"enc": jnp.ones((2, 3))}, {"w": jnp.full((2, 3), 2.0), "b": jnp.ones(2)})
    out = reg.prox_on(lambda x: 0.5 * x, "specific/w")(params)
    np.testing.assert_allclose(out.specific["w"], 1.0)
    np.testing.assert_allclose(out.specific["b"], 1.0)
    np.testing.assert_allclose(out.shared["enc"], 1.0)
    with pytest.raises(ValueError, match="selects no parameter.*specific/w"):
        reg.prox_on(lambda x: x, "specific/W")(params)
    with pytest.raises(ValueError, match="path"):
        reg.prox_on(lambda x: x)
    with pytest.raises(TypeError, match="prox"):
        reg.prox_on("l1", "specific/w")


def test_train_step_with_prox_is_proximal_gradient_descent():
    """Linear multi-task least squares, ``Σₜ (1/2n)‖yₜ − X wₜ‖² + α‖W‖₁,₂`` (sklearn's
    MultiTaskLasso objective), trained by the train step with ``optax.sgd(η)`` and the prox of
    ``ηα‖·‖₁,₂`` inside ``.scan``: ISTA. No parameter is shared (each row of W is one task's)."""
    x, y, _ = _multitask_data(1)
    n, d = x.shape
    t = y.shape[1]
    alpha = 0.2
    eta = 1.0 / float(np.linalg.eigvalsh(x.T.astype(np.float64) @ x / n).max())

    def losses(shared, specific, batch):
        r = batch["x"] @ specific["w"].T - batch["y"]  # (n, T)
        return 0.5 * jnp.mean(r * r, axis=0)

    model = mtl.Model(tuple(f"t{i}" for i in range(t)), losses)
    params = mtl.Params({}, {"w": jnp.zeros((t, d), jnp.float32)})
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    prox = reg.prox_on(lambda w: reg.prox_l1_l2(w, eta * alpha, axes=0), "specific/w")
    method, opt = mtl.methods.ew(), optax.sgd(eta)
    step = mtl.make_train_step(model, method, opt, prox=prox)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    state, metrics = step.scan(state, lambda k: batch, jax.random.split(jax.random.key(1), 1500))
    assert bool(np.all(metrics["finite"]))
    w = np.asarray(state.params.specific["w"])
    # The proximal-gradient fixed point: W = prox_{ηα}(W − η∇f(W)).
    grad = jax.grad(lambda w_: jnp.sum(losses({}, {"w": w_}, batch)))(jnp.asarray(w))
    fixed = reg.prox_l1_l2(jnp.asarray(w) - eta * grad, eta * alpha, axes=0)
    np.testing.assert_allclose(fixed, w, atol=1e-6)
    # Irrelevant features are exactly zero for every task, the relevant ones are kept.
    norms = np.linalg.norm(w, axis=0)
    assert np.all(w[:, 4:] == 0.0) and np.all(norms[:4] > 0.1)
    sklearn = pytest.importorskip("sklearn.linear_model")
    lasso = sklearn.MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100000)
    lasso.fit(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(w, lasso.coef_, atol=1e-4)
    np.testing.assert_array_equal(norms == 0, np.linalg.norm(lasso.coef_, axis=0) == 0)


# -- gradients, dtypes, edge cases --------------------------------------------------------------


def test_group_norm_gradient_is_a_subgradient_at_zero_groups():
    """∇‖·‖₁,₂ is W_g/‖W_g‖ on non-zero groups and 0 (not NaN) on zero ones, e.g. on rows that
    the prox has zeroed or on zero-initialised heads."""
    g = jax.grad(reg.l1_l2)(W)
    want = np.array([[0.6, 0.0, -1 / np.sqrt(5)], [0.8, 0.0, 2 / np.sqrt(5)]])
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(jax.grad(reg.l1_l2)(jnp.zeros((2, 3))), 0.0)
    g = jax.grad(lambda w: jnp.sum(reg.prox_l1_l2(w, 0.5)))(W)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_prox_keeps_the_weights_dtype(x64):
    w = jnp.asarray(W, jnp.float32)
    for prox in (reg.prox_l1_l2, reg.prox_l1_linf, reg.prox_trace_norm):
        assert prox(w, np.float64(0.5)).dtype == jnp.float32
    assert reg.project_l1_ball(w, np.float64(1.0)).dtype == jnp.float32


def _np_project_l1_ball(v, radius):
    """Reference: bisection on the threshold θ of sign(v)·max(|v| − θ, 0)."""
    a = np.abs(v)
    if a.sum() <= radius:
        return v
    lo, hi = 0.0, a.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(a - mid, 0).sum() > radius else (lo, mid)
    return np.sign(v) * np.maximum(a - 0.5 * (lo + hi), 0)


def test_project_l1_ball_matches_a_bisection_reference(x64):
    rng = np.random.default_rng(3)
    for n in (1, 7, 30):
        v = rng.normal(size=(20, n)) * rng.uniform(0.1, 5, size=(20, 1))
        for r in (0.0, 0.4, 2.5):
            want = np.stack([_np_project_l1_ball(row, r) for row in v])
            np.testing.assert_allclose(reg.project_l1_ball(jnp.asarray(v), r), want, atol=1e-10)
    # 16-bit inputs are projected in float32: the result is the float32 projection, rounded.
    v = rng.normal(size=2000)
    got = reg.project_l1_ball(jnp.asarray(v, jnp.bfloat16), 10.0)
    assert got.dtype == jnp.bfloat16
    ref = _np_project_l1_ball(np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64), 10.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=4e-3)
    assert abs(float(jnp.sum(jnp.abs(got.astype(jnp.float32)))) - 10.0) < 0.1


def test_soft_cluster_memberships_match_the_matrix_form():
    """With memberships A (rows on the simplex), M = A D⁻¹ Aᵀ (D = diag of cluster sizes):
    between = tr(W(M − U)Wᵀ), within = tr(W(I − M)Wᵀ), as for hard assignments."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 3))
    a = rng.dirichlet(np.ones(3), size=6)
    m = a @ np.diag(1 / a.sum(0)) @ a.T
    u = np.full((6, 6), 1 / 6)
    want = 0.7 * np.trace(w.T @ u @ w) * 1.0 + 0.2 * np.trace(w.T @ (m - u) @ w)
    want += 1.5 * np.trace(w.T @ (np.eye(6) - m) @ w)
    got = reg.task_clustering(
        jnp.asarray(w, jnp.float32),
        jnp.asarray(a, jnp.float32),
        mean_weight=0.7,
        between_weight=0.2,
        within_weight=1.5,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _within(w, labels):
    """The within-cluster sum of squares of partitions ``labels (..., T)`` into 3 clusters."""
    a = np.eye(3)[labels]  # (..., T, 3)
    sizes = a.sum(-2)  # (..., 3)
    sums = np.einsum("...tc,td->...cd", a, w)
    return np.sum(w * w) - np.sum(np.sum(sums**2, -1) / np.maximum(sizes, 1), -1)


def test_assign_clusters_is_near_the_brute_force_optimum():
    """k-means from T starts: the partition with the lowest within-cluster sum of squares, a
    local optimum. On 30 random 7-task problems it is the global one in most cases."""
    import itertools

    rng = np.random.default_rng(5)
    partitions = np.array(
        [lab for lab in itertools.product(range(3), repeat=7) if len(set(lab)) == 3]
    )
    assign = jax.jit(lambda x: reg.assign_clusters(x, 3))
    optimal = 0
    for _ in range(30):
        w = rng.normal(size=(7, 2))
        best = _within(w, partitions).min()
        got = _within(w, np.asarray(assign(jnp.asarray(w, jnp.float32))))
        assert got <= 1.25 * best + 1e-5
        optimal += got <= best * (1 + 1e-4) + 1e-6
    assert optimal >= 25


def test_task_covariance_update_with_dependent_or_zero_tasks():
    # More tasks than weights per task: WᵀW is singular, Ω stays invertible by default.
    w = jax.random.normal(jax.random.key(2), (5, 2))
    omega = reg.update_task_covariance(w)
    assert np.linalg.eigvalsh(np.asarray(omega, np.float64)).min() > 0
    pen = reg.task_relationship_penalty(w, omega)
    assert bool(jnp.isfinite(pen))
    np.testing.assert_allclose(pen, reg.trace_norm(w) ** 2, rtol=2e-3)
    # Many more tasks than weights: the floor's share of Ω stays 10⁻³ (it grew with T when it
    # was a multiple of λmax(WᵀW) added to WᵀW: half of Ω at T = 2000).
    for t, d in ((500, 2), (2000, 3)):
        w = jax.random.normal(jax.random.key(t), (t, d))
        omega = np.asarray(reg.update_task_covariance(w), np.float64)
        assert np.linalg.eigvalsh(omega).min() > 0
        u = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)[0]
        np.testing.assert_allclose(np.trace(u.T @ omega @ u), 1 / (1 + 1e-3), rtol=2e-3)
    # eps = 0: the exact closed form, Ω² tr((WᵀW)^{1/2})² = WᵀW.
    exact = reg.update_task_covariance(W, eps=0.0)
    np.testing.assert_allclose(exact @ exact * reg.trace_norm(W) ** 2, W @ W.T, rtol=1e-4)
    # All-zero weights: every Ω minimises; the update returns I/T.
    np.testing.assert_allclose(reg.update_task_covariance(jnp.zeros((4, 3))), jnp.eye(4) / 4)
    # Ω is a constant of the alternating scheme: no gradient (and no NaN) through it.
    g = jax.grad(lambda x: jnp.sum(reg.update_task_covariance(x)))(jnp.eye(3))
    np.testing.assert_array_equal(g, 0.0)
    with pytest.raises(ValueError, match="positive definite"):
        reg.task_relationship_penalty(W, jnp.diag(jnp.array([1.0, -1.0])))
    with pytest.raises(ValueError, match="symmetric"):
        reg.task_relationship_penalty(W, jnp.array([[1.0, 0.5], [0.0, 1.0]]))


def test_integer_weights_are_refused_not_truncated():
    w = jnp.array([[1, 2], [3, 4]])
    for name, f in [
        ("trace_norm", lambda: reg.trace_norm(w)),
        ("prox_trace_norm", lambda: reg.prox_trace_norm(w, 0.5)),
        ("prox_l1_linf", lambda: reg.prox_l1_linf(w, 1.0)),
        ("project_l1_ball", lambda: reg.project_l1_ball(w, 1.0)),
        (
            "task_clustering_convex",
            lambda: reg.task_clustering_convex(w, 2, between_weight=0.1, within_weight=1.0),
        ),
        ("update_task_covariance", lambda: reg.update_task_covariance(w)),
    ]:
        with pytest.raises(TypeError, match=f"{name}: weights must be floating point"):
            f()


def test_more_bad_inputs_raise():
    for step in (np.float32(-1.0), jnp.array(-1.0), float("nan")):
        with pytest.raises(ValueError, match="step"):
            reg.prox_l1_l2(W, step)
    np.testing.assert_allclose(reg.l1_l2(W, axes=np.int64(0)), reg.l1_l2(W, axes=0))
    with pytest.raises(TypeError, match="int"):
        reg.l1_l2(W, axes=True)
    with pytest.raises(TypeError, match="task_axis"):
        reg.trace_norm(W, task_axis=0.5)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\)"):
        reg.task_clustering(W, jnp.array([0, 2]), num_clusters=2)
    with pytest.raises(ValueError, match="rows summing to 1"):
        reg.task_clustering(W, jnp.array([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        reg.task_clustering(W, jnp.array([[1.5, -0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="iters"):
        reg.assign_clusters(W, 2, iters=-1)
    assert reg.assign_clusters(W, np.int64(2)).shape == (2,)


# -- the convex relaxation of task clustering (Jacob, Bach & Vert 2008) ---------------------------


def _convex_by_scipy(w, r, eb, ew, seed=0):
    """min over Σ = V diag(λ) Vᵀ of tr(Σ⁻¹ ΠWWᵀΠ), λ ∈ [α, β]ᵀ, Σλ = γ, with V orthogonal
    (Cayley transform of a free skew-symmetric matrix), by SLSQP from several random starts:
    nothing assumes that Σ shares the eigenvectors of ΠWWᵀΠ."""
    from scipy.optimize import minimize

    t = w.shape[0]
    pi = np.eye(t) - 1 / t
    gram = pi @ w @ w.T @ pi
    lo, hi = 1 / ew, 1 / eb
    total = (t - r + 1) * lo + (r - 1) * hi
    iu = np.triu_indices(t, 1)

    def sigma_inv(x):
        skew = np.zeros((t, t))
        skew[iu] = x[t:]
        skew = skew - skew.T
        v = (np.eye(t) - skew) @ np.linalg.inv(np.eye(t) + skew)
        return v @ np.diag(1 / x[:t]) @ v.T

    rng = np.random.default_rng(seed)
    best = np.inf
    for _ in range(8):
        lam0 = rng.dirichlet(np.ones(t)) * (total - t * lo) + lo
        lam0 = np.clip(lam0, lo, hi)
        x0 = np.concatenate([lam0 * total / lam0.sum(), rng.normal(size=len(iu[0]))])
        res = minimize(
            lambda x: np.trace(sigma_inv(x) @ gram),
            x0,
            method="SLSQP",
            bounds=[(lo, hi)] * t + [(None, None)] * len(iu[0]),
            constraints=[{"type": "eq", "fun": lambda x: np.sum(x[:t]) - total}],
            options={"maxiter": 2000, "ftol": 1e-14},
        )
        if abs(np.sum(res.x[:t]) - total) < 1e-8:
            best = min(best, res.fun)
    return best


def test_convex_clustering_matches_scipy_and_bounds_every_partition(x64):
    import itertools

    rng = np.random.default_rng(6)
    eb, ew = 0.2, 1.0
    for t, d, r in ((4, 3, 2), (5, 2, 3), (5, 4, 2)):
        w = rng.normal(size=(t, d))
        got = float(
            reg.task_clustering_convex(jnp.asarray(w), r, between_weight=eb, within_weight=ew)
        )
        judge = _convex_by_scipy(w, r, eb, ew)
        assert got <= judge + 1e-9  # no feasible Σ does better than the closed form
        np.testing.assert_allclose(got, judge, rtol=1e-5)  # and scipy reaches it
        for labels in itertools.product(range(r), repeat=t):
            if len(set(labels)) == r:
                hard = reg.task_clustering(
                    jnp.asarray(w),
                    jnp.asarray(labels),
                    num_clusters=r,
                    between_weight=eb,
                    within_weight=ew,
                )
                assert got <= float(hard) + 1e-9
    # One cluster: Σ = I/ε_W, the within-cluster (total) variance.
    w = jnp.asarray(rng.normal(size=(4, 3)))
    np.testing.assert_allclose(
        reg.task_clustering_convex(w, 1, between_weight=0.1, within_weight=2.0, mean_weight=0.5),
        2.0 * reg.mean_regularized(w) + 0.5 * 4 * jnp.sum(jnp.mean(w, 0) ** 2),
        rtol=1e-10,
    )


def test_convex_clustering_gradient_and_learned_clusters(x64):
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.normal(size=(5, 3)))

    def f(x):
        return reg.task_clustering_convex(
            x, 2, between_weight=0.2, within_weight=1.0, mean_weight=0.3
        )

    g = jax.jit(jax.grad(f))(w)
    h = 1e-6
    fd = np.zeros(w.shape)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            e = jnp.zeros(w.shape).at[i, j].set(h)
            fd[i, j] = (f(w + e) - f(w - e)) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=1e-6)
    # Three well-separated clusters of tasks: Σ's top r − 1 = 2 eigenvectors span the
    # between-cluster directions, i.e. their projector is M − U of the true partition.
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    centers = np.array([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 8.0]])
    w = jnp.asarray(centers[labels] + 0.05 * rng.normal(size=(7, 3)))
    sigma = np.asarray(reg.cluster_covariance(w, 3, between_weight=0.1, within_weight=1.0))
    np.testing.assert_allclose(np.trace(sigma), 5 * 1.0 + 2 * 10.0, rtol=1e-10)
    vecs = np.linalg.eigh(sigma)[1][:, -2:]
    a = np.eye(3)[labels]
    m = a @ np.diag(1 / a.sum(0)) @ a.T
    np.testing.assert_allclose(vecs @ vecs.T, m - 1 / 7, atol=1e-2)


def test_convex_clustering_bad_inputs():
    with pytest.raises(ValueError, match="between_weight < within_weight"):
        reg.task_clustering_convex(W, 2, between_weight=1.0, within_weight=1.0)
    with pytest.raises(ValueError, match="between_weight < within_weight"):
        reg.cluster_covariance(W, 2, between_weight=0.0, within_weight=1.0)
    with pytest.raises(ValueError, match=r"num_clusters must lie in \[1, 2\]"):
        reg.task_clustering_convex(W, 3, between_weight=0.1, within_weight=1.0)
