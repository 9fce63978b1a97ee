"""The on-device solvers against their optimality conditions, with scipy as the judge.

All problems of a dtype go through one vmapped, jitted batch (one compilation): random problems
with their scipy references (SLSQP, L-BFGS-B and root finding, in float64), known closed forms,
and degenerate Gramians.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtljax._src import solvers
from mtljax._src.solvers import cagrad as solvers_cagrad
from mtljax._src.solvers.cagrad import cagrad_solve
from mtljax._src.solvers.potential import POTENTIAL_RIDGE, RESIDUAL_TOL_FACTOR

# `--dist loadgroup` keeps this module on one worker: the solved corpora and their scipy references
# are cached per process.
pytestmark = pytest.mark.xdist_group("solvers")

T, P = 5, 12
C_VALUES = (0.0, 0.4, 0.9)
FAIR_P = 0.5  # p = 1/α for FairGrad's α = 2
# Tolerances relative to the largest squared gradient norm: float32 results carry the 1e-6
# relative ridge and float32 rounding; float64 results the 1e-10 ridge.
TOL = {"float32": 2e-5, "float64": 1e-8}
N_RANDOM = 6
ROW_SCALES = np.array([1e-3, 0.1, 1.0, 10.0, 1e3])
ORTHO_NORMS = np.array([1e-4, 0.5, 3.0, 0.0, 1.0])
GRADED = np.array([1e-3, 1e-2, 1.0, 1e2, 1e3])


def jacobians(seed, n=N_RANDOM, t=T, p=P):
    """Random Jacobians: independent rows, and rows sharing a common component (less
    conflict), with row scales spread over two decades."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        j = rng.normal(size=(t, p))
        if k % 2:
            j = j + 1.5 * rng.normal(size=(1, p))
        out.append(j * 10.0 ** rng.uniform(-1, 1, size=(t, 1)))
    return np.stack(out)


def degenerate_jacobians():
    scales = np.diag(10.0 ** np.array([-10, -5, 0, 5, 10]))
    return {
        "zero": np.zeros((T, P)),
        "identical": np.tile(np.arange(1.0, P + 1), (T, 1)),
        "opposite": np.concatenate([np.ones((2, P)), -np.ones((3, P))]),
        "collinear_scaled": scales @ np.ones((T, P)),
        "scaled": scales @ jacobians(7, n=1)[0],
        "tiny": 1e-30 * jacobians(8, n=1)[0],
        "huge": 1e17 * jacobians(9, n=1)[0],
    }


def _all_solvers(g):
    """Every solver on one Gramian; the projections of UPGrad (u = eᵢ) and DualProj (u = 1/T)
    as one batch, CAGrad for every c as one batch (c is traced)."""
    us = jnp.concatenate([jnp.eye(T, dtype=g.dtype), jnp.full((1, T), 1.0 / T, g.dtype)])
    cs = jnp.asarray(C_VALUES, g.dtype)
    return {
        "mgda": solvers.min_norm_simplex(g),
        "proj": solvers.project_dual_cone(g, us),
        "nash": solvers.solve_potential(g, 1.0),
        "fair": solvers.solve_potential(g, FAIR_P),
        "cagrad": jax.vmap(lambda c: solvers.cagrad_simplex(g, c)[1])(cs),
    }


@functools.cache
def _batched():
    return jax.jit(jax.vmap(_all_solvers))


@functools.cache
def solved(dtype_name):
    """Everything solved in ``dtype_name``: ``{group: (jacobians, gramians, outputs)}``, all
    float64 numpy (the Gramians computed in float64 from the Jacobians)."""
    random = jacobians(0)
    extra = [
        random[0] * ROW_SCALES[:, None],
        np.diag(ORTHO_NORMS) @ np.eye(T, P),
        random[1] * GRADED[:, None],
        random[2] * GRADED[::-1, None],
    ]
    degenerate = list(degenerate_jacobians().values())
    js = np.stack([*random, *extra, *degenerate])
    if dtype_name == "float32":
        j32 = js.astype(np.float32)
        gs_in = np.einsum("bip,bjp->bij", j32, j32)
    else:
        gs_in = np.einsum("bip,bjp->bij", js, js)
    with jax.enable_x64(dtype_name == "float64"):
        out = _batched()(jnp.asarray(gs_in, dtype=dtype_name))
        out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    gs = np.einsum("bip,bjp->bij", js, js)
    groups = {"random": slice(0, N_RANDOM), "extra": slice(N_RANDOM, N_RANDOM + len(extra))}
    groups["degenerate"] = slice(N_RANDOM + len(extra), len(js))
    return {
        name: (js[sl], gs[sl], {k: v[sl] for k, v in out.items()}) for name, sl in groups.items()
    }


DTYPES = ["float32", "float64"]


# ----------------------------------------------------------------------------------------------
# MGDA: min over the simplex of αᵀGα


def _slsqp_min_norm(g):
    t = g.shape[0]
    res = optimize.minimize(
        lambda a: a @ g @ a,
        np.full(t, 1.0 / t),
        jac=lambda a: 2 * g @ a,
        bounds=[(0, 1)] * t,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(t)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    # SLSQP ends about 1e-8 from the solution (where it ends depends on the BLAS's summation
    # order, e.g. on its thread count): solve the KKT system on its support exactly,
    # [G_SS 𝟙; 𝟙ᵀ 0][α_S; −λ] = [0; 1], in float64, and keep that solution where it satisfies
    # the KKT conditions (α ≥ 0, (Gα)ᵢ ≥ αᵀGα), i.e. where SLSQP found the support.
    support = np.flatnonzero(res.x > 1e-7 * res.x.max())
    s = support.size
    kkt = np.zeros((s + 1, s + 1))
    kkt[:s, :s] = g[np.ix_(support, support)]
    kkt[:s, s] = kkt[s, :s] = 1.0
    sol = np.linalg.solve(kkt, np.concatenate([np.zeros(s), [1.0]]))
    alpha = np.zeros(t)
    alpha[support] = sol[:s]
    kkt_holds = np.all(alpha >= 0) and np.all(g @ alpha >= (alpha @ g @ alpha) * (1 - 1e-9))
    return alpha if kkt_holds else res.x


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_norm_kkt_and_scipy(dtype):
    _, gs, out = solved(dtype)["random"]
    tol = TOL[dtype]
    for g, a in zip(gs, out["mgda"], strict=True):
        s = np.max(np.diag(g))
        ga, val = g @ a, a @ g @ a
        assert np.all(a >= 0) and abs(a.sum() - 1) < 1e-6
        # KKT: (Gα)ᵢ ≥ αᵀGα, with equality on the support.
        assert np.all(ga >= val - tol * s)
        np.testing.assert_allclose(ga[a > 1e-4], val, atol=tol * s)
        ref = _slsqp_min_norm(g)
        assert val <= ref @ g @ ref + tol * s


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_norm_graded_rows(dtype):
    # Gradient norms from 1e-4 to 1e4 (squared: 8 decades): the KKT conditions hold relative
    # to the magnitudes of the terms, so the small gradients are resolved, not swamped.
    js, gs, out = solved(dtype)["extra"]
    for k in (2, 3):
        g, a = gs[k], out["mgda"][k]
        ga, val = g @ a, a @ g @ a
        mag = np.abs(g) @ a + val
        assert np.all(ga >= val - TOL[dtype] * mag)
        np.testing.assert_allclose(ga[a > 1e-4], val, atol=TOL[dtype] * val)
        assert val <= (lambda r: r @ g @ r)(_slsqp_min_norm(g)) * (1 + 1e-3)


@functools.cache
def _two_task_batch():
    """MGDA and CAGrad (every c) on a batch of two-task Gramians (float32)."""
    rng = np.random.default_rng(3)
    js = [rng.normal(size=(2, 4)) for _ in range(4)]
    js += [
        np.array([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0]]),
        np.array([[1.0, 2, 0, 0], [-1, -2, 0, 0]]),
        np.array([[3.0, 0, 0, 0], [0, 4.0, 0, 0]]),
        np.array([[1.0, 1, 0, 0], [2, 2, 0, 0]]),
        np.array([[0.0, 2, 0, 0], [2.0, 0, 0, 0]]),  # orthogonal, equal norms
    ]
    gs = np.stack([j @ j.T for j in js])
    cs = jnp.asarray(C_VALUES, jnp.float32)

    def both(g):
        cagrad = jax.vmap(lambda c: solvers.cagrad_simplex(g, c))(cs)
        return solvers.min_norm_simplex(g), cagrad

    mgda, (w, lam) = jax.jit(jax.vmap(both))(jnp.asarray(gs, jnp.float32))
    return gs, np.asarray(mgda, np.float64), np.asarray(w, np.float64), np.asarray(lam, np.float64)


def test_min_norm_two_tasks_closed_form():
    # α₁ = clip((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1) for two gradients.
    gs, got, _, _ = _two_task_batch()
    for g, a in zip(gs, got, strict=True):
        den = g[0, 0] + g[1, 1] - 2 * g[0, 1]
        a1 = np.clip((g[1, 1] - g[0, 1]) / den, 0, 1)
        np.testing.assert_allclose(a, [a1, 1 - a1], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Dual-cone projections: min_{v ≥ u} vᵀGv


def _slsqp_projection(j, x):
    """The projection of ``x`` onto ``{y : Jy ≥ 0}``, solved in parameter space."""
    res = optimize.minimize(
        lambda y: 0.5 * np.sum((y - x) ** 2),
        x.copy(),
        jac=lambda y: y - x,
        constraints=[{"type": "ineq", "fun": lambda y: j @ y, "jac": lambda y: j}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return res.x


@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_cone_projections_match_scipy(dtype):
    js, _, out = solved(dtype)["random"]
    tol = TOL[dtype]
    us = np.concatenate([np.eye(T), np.full((1, T), 1.0 / T)])
    for j, vs in zip(js, out["proj"], strict=True):
        scale = np.max(np.linalg.norm(j, axis=1))
        for u, v in zip(us, vs, strict=True):
            assert np.all(v >= u - 1e-6)
            d = j.T @ v
            # The dual-cone property, and the projection itself.
            assert np.all(j @ d >= -tol * scale * np.linalg.norm(d))
            np.testing.assert_allclose(d, _slsqp_projection(j, j.T @ u), atol=10 * tol * scale)


def test_projection_linear_under_row_scaling():
    # π(cᵢgᵢ) = cᵢ π(gᵢ): scaling the rows by c > 0 does not change the dual cone.
    j = jacobians(0)[0]
    v = solved("float32")["random"][2]["proj"][0]
    v_scaled = solved("float32")["extra"][2]["proj"][0]
    for i in range(T):
        d = j.T @ v[i]
        d_scaled = (ROW_SCALES[:, None] * j).T @ v_scaled[i]
        atol = 1e-5 * ROW_SCALES[i] * np.abs(d).max()
        np.testing.assert_allclose(d_scaled, ROW_SCALES[i] * d, rtol=1e-4, atol=atol)


# ----------------------------------------------------------------------------------------------
# Convergence reports of MGDA's solver and of the projections

# A converged solve's residual is at rounding level (each solver certifies ≤ 10³ ε).
RESIDUAL = {"float32": 1e3 * np.finfo(np.float32).eps, "float64": 1e3 * np.finfo(np.float64).eps}


def _qp_infos(g):
    """The SolverInfo of MGDA and of the projections (pivoting and interior point), with the
    default iteration caps, and of the projections with one iteration."""
    t = g.shape[0]
    us = jnp.concatenate([jnp.eye(t, dtype=g.dtype), jnp.full((1, t), 1.0 / t, g.dtype)])
    out = {"mgda": solvers.min_norm_simplex(g, return_info=True)[1]}
    for cap, kw in (("", {}), ("_1", {"max_iter": 1})):
        out["proj" + cap] = solvers.project_dual_cone(g, us, return_info=True, **kw)[1]
    v, out["proj_ipm"] = solvers.project_dual_cone(
        g, us, algorithm="interior_point", return_info=True
    )
    return out, v


GROUPS = ("random", "extra", "degenerate")


@functools.cache
def qp_infos(dtype_name):
    """``_qp_infos`` on the Gramians of every group of ``solved(dtype_name)``, in one batch:
    ``{group: (infos, v_interior_point)}`` (numpy)."""
    js = [solved(dtype_name)[group][0] for group in GROUPS]
    j = np.concatenate(js).astype(dtype_name)
    gs = np.einsum("bip,bjp->bij", j, j)
    with jax.enable_x64(dtype_name == "float64"):
        infos, v = jax.jit(jax.vmap(_qp_infos))(jnp.asarray(gs, dtype=dtype_name))
        infos = jax.tree_util.tree_map(np.asarray, infos)
        v = np.asarray(v, np.float64)
    ends = np.cumsum([len(x) for x in js])
    out = {}
    for group, end, n in zip(GROUPS, ends, (len(x) for x in js), strict=True):
        sl = slice(end - n, end)
        out[group] = (jax.tree_util.tree_map(lambda a, sl=sl: a[sl], infos), v[sl])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
def test_qp_solver_info_converged_with_small_residual(dtype, group):
    infos, _ = qp_infos(dtype)[group]
    for key in ("mgda", "proj", "proj_ipm"):
        info = infos[key]
        assert info.iterations.dtype == np.int32 and info.residual.dtype == np.float32, key
        assert np.all(info.converged), (key, info)
        assert np.all((info.residual >= 0) & (info.residual <= RESIDUAL[dtype])), (key, info)
    # The pivots of the projections are bounded by 2T when no interior point is needed; the
    # interior point takes a few iterations, at most its cap.
    assert np.all(infos["proj"].iterations <= 2 * T + solvers.IPM_MAX_ITER)
    assert np.all((infos["mgda"].iterations >= 0) & (infos["mgda"].iterations <= 60))
    if group == "random":
        assert np.all(infos["mgda"].iterations > 1)
        assert np.any(infos["proj"].iterations > 1)  # the random gradients conflict


MIN_NORM_CAPS = (1, 2)


def _decoy_jacobian(seed, s, t=20, p=40, margin=1e-3):
    """``s`` orthonormal gradients, whose mean ``d`` is the min-norm point (``α = 1/s`` on
    them, 0 elsewhere), two decoys ``(1 + margin)d + 0.1‖d‖uⱼ`` and ``t − s − 2`` gradients
    ``cⱼd + wⱼ`` (``cⱼ ∈ [1.5, 3]``; ``uⱼ``, ``wⱼ`` orthogonal to the first ``s``). The KKT
    conditions hold for that ``α``: ``gⱼ·d ≥ ‖d‖²``, for the decoys by a relative margin of
    only ``margin``, while their norms are within 1% of ``‖d‖``. Returns ``(J, α)``."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(p, p)))[0].T
    d = basis[:s].mean(axis=0)
    decoys = (1.0 + margin) * d + 0.1 * np.linalg.norm(d) * basis[s : s + 2]
    far = rng.uniform(1.5, 3.0, size=(t - s - 2, 1)) * d
    far = far + rng.normal(size=(t - s - 2, p - s)) @ basis[s:]
    alpha = np.concatenate([np.full(s, 1.0 / s), np.zeros(t - s)])
    return np.concatenate([basis[:s], decoys, far]), alpha


@functools.cache
def capped_min_norm(dtype_name):
    """MGDA's solve capped at each of ``MIN_NORM_CAPS`` iterations and with the default cap, on
    problems that need several iterations: two decoy problems (closed-form α) and three of 20
    independent random gradients with norms over two decades (min-norm supports of 13 to 15
    tasks; SLSQP references in float64). Returns ``(js, references, [(α, info) per cap],
    (α, info) default)``, numpy."""
    cases = [_decoy_jacobian(0, 3), _decoy_jacobian(1, 2)]
    wide = []
    for seed in (0, 2, 3):
        rng = np.random.default_rng(seed)
        wide.append(rng.normal(size=(20, 40)) * 10.0 ** rng.uniform(-1, 1, size=(20, 1)))
    js = np.stack([j for j, _ in cases] + wide)
    refs = np.stack([a for _, a in cases] + [_slsqp_min_norm(j @ j.T) for j in wide])
    j_in = js.astype(dtype_name)

    def run(g):
        capped = [solvers.min_norm_simplex(g, return_info=True, max_iter=c) for c in MIN_NORM_CAPS]
        return capped, solvers.min_norm_simplex(g, return_info=True)

    with jax.enable_x64(dtype_name == "float64"):
        g = jnp.asarray(np.einsum("bip,bjp->bij", j_in, j_in), dtype=dtype_name)
        capped, full = jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(run))(g))
    return js, refs, capped, full


@pytest.mark.parametrize("dtype", DTYPES)
def test_qp_solver_info_reports_an_iteration_cap(dtype):
    # MGDA capped at 1 and 2 iterations on problems that need more: the capped α is far from
    # the float64 reference (checked here, independently of the report), and the info says
    # so: iterations at the cap, not converged, a residual above a converged solve's. With
    # the default cap the same problems converge to the reference.
    js, refs, capped, (alpha, info) = capped_min_norm(dtype)
    for k in range(len(js)):
        g = js[k] @ js[k].T
        ref = refs[k]
        # The references satisfy the KKT conditions: (Gα)ᵢ ≥ αᵀGα, equality on the support.
        val = ref @ g @ ref
        assert np.all(g @ ref >= val * (1 - 1e-6)), k
        np.testing.assert_allclose((g @ ref)[ref > 1e-6], val, rtol=1e-6)
        for cap, (a_cap, i_cap) in zip(MIN_NORM_CAPS, capped, strict=True):
            assert np.abs(a_cap[k] - ref).max() > 1e-2, (k, cap)
            assert i_cap.iterations[k] == cap and not i_cap.converged[k], (k, cap, i_cap)
            # Above the threshold of a converged solve; after one iteration far above it.
            floor = 1e3 * RESIDUAL[dtype] if cap == 1 else RESIDUAL[dtype]
            assert i_cap.residual[k] > floor, (k, cap, i_cap)
        assert info.converged[k] and info.residual[k] <= RESIDUAL[dtype], (k, info)
        assert max(MIN_NORM_CAPS) < info.iterations[k] <= solvers.IPM_MAX_ITER, (k, info)
        # SLSQP's references are accurate to about 1e-8.
        np.testing.assert_allclose(alpha[k], ref, atol=max(TOL[dtype], 1e-6), err_msg=str(k))
    # The projections whose full solve needed several pivots are not solved by one pivot and
    # one interior-point iteration.
    infos, _ = qp_infos(dtype)["random"]
    hard = infos["proj"].iterations > 1
    assert np.any(hard)
    assert not np.any(infos["proj_1"].converged[hard])
    assert np.all(infos["proj_1"].residual[hard] > 1e3 * RESIDUAL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_projection_algorithms_agree(dtype):
    # Principal pivoting and the interior point give the same projections (both certified).
    for group in GROUPS:
        js, _, out = solved(dtype)[group]
        _, v_ipm = qp_infos(dtype)[group]
        for j, v, w in zip(js, out["proj"], v_ipm, strict=True):
            scale = np.max(np.linalg.norm(j, axis=1)) * max(np.abs(v).max(), 1.0)
            np.testing.assert_allclose(v @ j, w @ j, atol=TOL[dtype] * scale, err_msg=group)


def _nnls_projection(j, i):
    """``vᵢ = eᵢ + x`` with ``x = argmin_{x ≥ 0} ‖Jᵀ(eᵢ + x)‖²`` (scipy's NNLS, float64)."""
    x, _ = optimize.nnls(j.T, -j[i], maxiter=50 * j.shape[0])
    return np.eye(j.shape[0])[i] + x


@pytest.mark.parametrize("dtype", DTYPES)
def test_upgrad_projections_at_40_tasks_kkt_and_nnls(dtype):
    # UPGrad's 40 projections vᵢ = argmin_{v ≥ eᵢ} vᵀGv on conflicting gradients (independent
    # rows with norms over two decades), against their KKT conditions and scipy's NNLS.
    t, p = 40, 96
    rng = np.random.default_rng(40)
    j = rng.normal(size=(t, p)) * 10.0 ** rng.uniform(-1, 1, size=(t, 1))
    j_in = j.astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        fn = jax.jit(
            lambda g: solvers.project_dual_cone(g, jnp.eye(t, dtype=g.dtype), return_info=True)
        )
        v, info = fn(jnp.asarray(j_in @ j_in.T))
        v = np.asarray(v, np.float64)
    assert bool(info.converged) and 0 < int(info.iterations) <= 2 * t
    assert float(info.residual) <= RESIDUAL[dtype]
    norms = np.linalg.norm(j, axis=1)
    tol = TOL[dtype]
    moved = 0
    for i in range(t):
        d = j.T @ v[i]
        jd = j @ d
        lam = v[i] - np.eye(t)[i]
        terms = norms * (np.abs(v[i]) @ norms)  # the size of the terms of gⱼ·d = Σₖ vₖ gⱼ·gₖ
        # v ≥ eᵢ; gⱼ·d ≥ 0 (the dual cone); gⱼ·d = 0 where vⱼ > δᵢⱼ (complementarity).
        assert np.all(lam >= -1e-6 * np.abs(v[i]).max())
        assert np.all(jd >= -tol * terms)
        free = lam > 1e-6 * np.abs(v[i]).max()
        assert np.all(np.abs(jd[free]) <= tol * terms[free])
        ref = j.T @ _nnls_projection(j, i)
        np.testing.assert_allclose(d, ref, atol=tol * norms[i])
        moved += np.any(free)
    assert moved >= t // 2  # most projections are not the gradient itself


def test_pivoting_certifies_nearly_orthogonal_tasks():
    # 40 random gradients in 131072 dimensions: correlations of about 0.003, the feature-level
    # Gramian of many independent heads. Principal pivoting alone must find every projection's
    # active set (a fixed wⱼ is judged against its own scale (|Q||x| + |c|)ⱼ, not against
    # the row's Σ|Qⱼₖ|, whose unit diagonal would hide a wⱼ < 0 far above its rounding), so
    # the batch never falls back to the Cholesky or interior-point stages.
    from mtljax._src.solvers import dual_cone
    from mtljax._src.solvers._linalg import correlation

    t = 40
    pivot = jax.jit(
        jax.vmap(lambda q, c: dual_cone._pivoting(q, c, max_iter=2 * t), in_axes=(None, 0))
    )
    for seed in range(10):
        j = jax.random.normal(jax.random.PRNGKey(seed), (t, 131072))
        corr, d = correlation(j @ j.T)
        q = corr + jnp.finfo(jnp.float32).eps * jnp.eye(t)
        y0 = (d / jnp.max(d)) * jnp.eye(t)
        y0 = y0 / jnp.max(y0, axis=1, keepdims=True)
        _, _, pivots, certified = pivot(q, y0 @ q)
        assert bool(jnp.all(certified)), (seed, int(jnp.sum(~certified)))
        assert int(jnp.max(pivots)) <= 2 * t


# ----------------------------------------------------------------------------------------------
# Potential equations: (Gα)ᵢ = αᵢ^{-p}  (Nash-MTL: p = 1; FairGrad: p = 1/α)


def _scipy_potential(g, p):
    """Minimises ½wᵀGw + Σ h_p(w) (L-BFGS-B), then solves Gw = w^{-p} from there (hybr)."""
    t = g.shape[0]

    def value(w):
        h = -np.log(w) if p == 1 else -(w ** (1 - p)) / (1 - p)
        return 0.5 * w @ g @ w + np.sum(h), g @ w - w ** (-p)

    res = optimize.minimize(
        value,
        np.ones(t),
        jac=True,
        method="L-BFGS-B",
        bounds=[(1e-12, None)] * t,
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
    )
    root = optimize.root(lambda w: (g @ w) * w**p - 1.0, res.x, method="hybr", tol=1e-14)
    return root.x


@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_bargaining_equations(dtype):
    js, gs, out = solved(dtype)["random"]
    for j, g, alpha in zip(js, gs, out["nash"], strict=True):
        d = j.T @ alpha
        assert np.all(alpha > 0)
        # αᵢ (gᵢ · d) = 1, hence ‖d‖² = T.
        np.testing.assert_allclose(alpha * (j @ d), 1.0, atol=TOL[dtype])
        np.testing.assert_allclose(d @ d, T, rtol=TOL[dtype])
        np.testing.assert_allclose(alpha, _scipy_potential(g, 1.0), rtol=10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fairgrad_equations_and_scipy(dtype):
    _, gs, out = solved(dtype)["random"]
    for g, w in zip(gs, out["fair"], strict=True):
        assert np.all(w > 0)
        np.testing.assert_allclose((g @ w) * w**FAIR_P, 1.0, atol=TOL[dtype])
        np.testing.assert_allclose(w, _scipy_potential(g, FAIR_P), rtol=10 * TOL[dtype])


def test_potential_orthogonal_closed_form():
    # Orthogonal gradients: αᵢ = ‖gᵢ‖^{-2/(1+p)}; a zero gradient takes no part: αᵢ = 0.
    out = solved("float32")["extra"][2]
    safe = np.where(ORTHO_NORMS > 0, ORTHO_NORMS, 1.0)
    for key, p in (("nash", 1.0), ("fair", FAIR_P)):
        want = np.where(ORTHO_NORMS > 0, safe ** (-2 / (1 + p)), 0.0)
        np.testing.assert_allclose(out[key][1], want, rtol=1e-5)


def test_potential_warm_start_and_one_task():
    js, gs, out = solved("float32")["random"]
    g = jnp.asarray(gs[0], jnp.float32)
    starts = np.stack([out["nash"][0] * 1.3, np.full(T, 1e4), np.full(T, np.nan)])
    fn = jax.jit(jax.vmap(lambda x0: solvers.solve_potential(g, 1.0, x0)))
    got = fn(jnp.asarray(starts, jnp.float32))
    np.testing.assert_allclose(got, np.tile(out["nash"][0], (3, 1)), rtol=1e-5)
    # One task: α^{1+p} = 1/G, without iterations.
    for p in (1.0, FAIR_P):
        one = solvers.solve_potential(jnp.asarray([[4.0]]), p)
        np.testing.assert_allclose(one, [4.0 ** (-1 / (1 + p))], rtol=1e-6)
    with pytest.raises(ValueError, match="p must be > 0"):
        solvers.solve_potential(jnp.eye(2), 0.0)


def _potential_corpus(t, n, seed):
    """Seeded Jacobians ``(5n, t, 2t + 4)``: random rows with norms over two decades, rows
    sharing a common component, graded norms over eight decades, nearly ill-posed (a convex
    combination of the rows nearly vanishes, to 10⁻⁶…10⁻¹ of its terms) and rank-deficient
    (``t`` rows in ``⌈t/2⌉`` dimensions: a combination vanishes, the ridge decides)."""
    rng = np.random.default_rng(seed)
    p = 2 * t + 4
    out = []
    for _ in range(n):
        scales = 10.0 ** rng.uniform(-1, 1, size=(t, 1))
        out.append(rng.normal(size=(t, p)) * scales)
        out.append((rng.normal(size=(t, p)) + 1.5 * rng.normal(size=(1, p))) * scales)
        out.append(rng.normal(size=(t, p)) * 10.0 ** rng.uniform(-4, 4, size=(t, 1)))
        j = rng.normal(size=(t, p))
        last = -(rng.uniform(0.2, 1.0, size=t - 1) @ j[:-1]) / rng.uniform(0.5, 2.0)
        noise = 10.0 ** rng.uniform(-6, -1) * np.linalg.norm(last) / np.sqrt(p)
        j[-1] = last + noise * rng.normal(size=p)
        out.append(j * scales)
        j = np.zeros((t, p))
        j[:, : -(-t // 2)] = rng.normal(size=(t, -(-t // 2)))
        out.append(j * scales)
    return np.stack(out)


def _relative_residual(g, w, p, ridge):
    """``maxᵢ |wᵢ^p (G_ε w)ᵢ − 1| / (1 + wᵢ^p (|G_ε| w)ᵢ)`` in float64, ``G_ε = G + ε diag G``."""
    g = g + ridge * np.diag(np.diag(g))
    wp = w**p
    return np.max(np.abs(wp * (g @ w) - 1.0) / (1.0 + wp * (np.abs(g) @ w)))


POTENTIAL_PS = (1.0, 0.5, 2.0)  # Nash-MTL; FairGrad with α = 2 and α = 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", POTENTIAL_PS)
def test_potential_corpus_converges_at_rounding_level(dtype, p):
    # Random, graded, nearly ill-posed and rank-deficient Gramians: every solve meets its
    # stopping test in a few iterations (none runs to the cap, as solves whose stopping tests
    # lay below rounding did), and the reported residual is the equations' relative residual,
    # at rounding level.
    eps = float(np.finfo(dtype).eps)
    ridge = solvers.rounding_ridge(dtype, POTENTIAL_RIDGE)
    for t, seed in ((2, 11), (6, 12)):
        js = _potential_corpus(t, 8, seed).astype(dtype)
        gs = np.einsum("bip,bjp->bij", js, js)
        with jax.enable_x64(dtype == "float64"):
            fn = jax.jit(jax.vmap(lambda g: solvers.solve_potential(g, p, return_info=True)))
            w, info = fn(jnp.asarray(gs))
            w = np.asarray(w, np.float64)
        iters = np.asarray(info.iterations)
        assert np.all(np.asarray(info.converged)), (t, iters)
        assert iters.max() <= 25 and np.median(iters) <= 12, (t, iters)
        assert np.all(np.asarray(info.residual) <= RESIDUAL_TOL_FACTOR * eps)
        for g, wk, reported in zip(gs, w, np.asarray(info.residual), strict=True):
            assert np.all(wk > 0)
            # Recomputed in float64 from the returned weights (rounded to the dtype).
            res = _relative_residual(g.astype(np.float64), wk, p, ridge)
            assert res <= 8 * (1 + p) * eps, (t, res)
            assert abs(res - reported) <= 8 * (1 + p) * eps


def _potential_reference(g, p, ridge):
    """``w > 0`` with ``wᵢ^p (G_ε w)ᵢ = 1``, ``G_ε = G + ε diag G``, in float64 (scipy).

    In the variables ``uᵢ = log(wᵢ ‖gᵢ‖^{2/(1+p)})``: the potential ``½wᵀG_εw + Σ h_p(wᵢ)``
    minimised by L-BFGS-B, then the equations ``wᵢ^p (G_ε w)ᵢ − 1 = 0`` by Newton's method
    with backtracking on their largest residual relative to the magnitudes of their terms.
    """
    g = g + ridge * np.diag(np.diag(g))
    scale = np.diag(g) ** (-1.0 / (1.0 + p))

    def weights(u):
        return scale * np.exp(u)

    def potential(u):
        w = weights(u)
        h = -np.log(w) if p == 1 else -(w ** (1 - p)) / (1 - p)
        return 0.5 * w @ g @ w + h.sum(), w * (g @ w - w ** (-p))

    def equations(u):
        w = weights(u)
        return w**p * (g @ w) - 1.0

    def size(u):  # the largest residual relative to the magnitudes of the terms
        with np.errstate(all="ignore"):
            w = weights(u)
            r = np.abs(equations(u)) / (1.0 + w**p * (np.abs(g) @ w))
        return np.max(r) if np.all(np.isfinite(r)) else np.inf

    t = len(g)
    bounds = [(-60.0, 60.0)] * t
    res = optimize.minimize(
        potential, np.zeros(t), jac=True, method="L-BFGS-B", bounds=bounds,
        options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 20_000},
    )  # fmt: skip
    u = res.x
    for _ in range(60):
        w = weights(u)
        jac = np.diag(p * w**p * (g @ w)) + (w**p)[:, None] * g * w[None, :]
        du = np.linalg.solve(jac, -equations(u))
        step, now = 1.0, size(u)
        while step > 1e-12 and size(u + step * du) >= now:
            step /= 2
        if step <= 1e-12:
            break
        u = u + step * du
    assert size(u) < 1e-15
    return weights(u)


def _graded_jacobians():
    """Gradients whose norms span eight decades (1 to 10⁸, the others in between)."""
    rng = np.random.default_rng(5)
    out = []
    for t in (2, 3, 5):
        for k in range(4):
            j = rng.normal(size=(t, 2 * t + 2))
            if k % 2:
                j = j + 1.5 * rng.normal(size=(1, j.shape[1]))
            norms = 10.0 ** np.concatenate([[0.0, 8.0], rng.uniform(0, 8, size=t - 2)])
            rng.shuffle(norms)
            out.append(j / np.linalg.norm(j, axis=1, keepdims=True) * norms[:, None])
    return out


WEIGHT_RTOL = {"float32": 2e-5, "float64": 1e-11}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", POTENTIAL_PS)
def test_potential_graded_norms_match_reference(dtype, p):
    # FairGrad (α = 2, 0.5) and Nash-MTL with gradient norms 10⁸ apart, against float64
    # references. A weight may miss the tolerance only where the rounding of the input
    # Gramian to the dtype alone moves the reference by a tenth of that error.
    ridge = solvers.rounding_ridge(dtype, POTENTIAL_RIDGE)
    fn = jax.jit(lambda g: solvers.solve_potential(g, p, return_info=True))
    for j in _graded_jacobians():
        g = j @ j.T
        g_in = g.astype(dtype)
        with jax.enable_x64(dtype == "float64"):
            w, info = fn(jnp.asarray(g_in))
            w = np.asarray(w, np.float64)
        assert bool(info.converged)
        ref = _potential_reference(g, p, ridge)
        ref_in = _potential_reference(g_in.astype(np.float64), p, ridge)
        err = np.max(np.abs(w - ref) / ref)
        from_input = np.max(np.abs(ref_in - ref) / ref)
        assert err <= max(WEIGHT_RTOL[dtype], 10 * from_input), (j.shape[0], err, from_input)


def test_potential_reports_unconverged_solves():
    # `converged` means the stopping test was met: not when the iteration cap ends the solve;
    # the residual is the equations' relative residual wherever the solve stopped.
    js = _potential_corpus(6, 1, 3)
    gs = np.einsum("bip,bjp->bij", js, js).astype(np.float32)
    fn = jax.jit(jax.vmap(lambda g: solvers.solve_potential(g, 0.5, max_iter=1, return_info=True)))
    w, info = fn(jnp.asarray(gs))
    w = np.asarray(w, np.float64)
    assert np.all(np.asarray(info.iterations) == 1)
    assert not np.any(np.asarray(info.converged))
    for g, wk, reported in zip(gs, w, np.asarray(info.residual), strict=True):
        ridge = solvers.rounding_ridge("float32", POTENTIAL_RIDGE)
        res = _relative_residual(g.astype(np.float64), wk, 0.5, ridge)
        assert res > 1e-4
        np.testing.assert_allclose(reported, res, rtol=1e-3)
    # One task: the closed form, no iteration.
    _, one = solvers.solve_potential(jnp.asarray([[4.0]]), 0.5, return_info=True)
    assert int(one.iterations) == 0 and bool(one.converged) and float(one.residual) == 0.0


def test_potential_excess_and_powers_are_accurate():
    # The line search's remainder ψ(L) = expm1(L) − expm1(qL)/q and the powers x^e, in
    # float32, against float64: a few eps relative, also where the direct float32 formulas
    # lose everything (ψ for small L) or |e·log x| eps (powers of numbers far from 1).
    from mtljax._src.solvers.potential import _excess, _pow_parts

    eps = float(np.finfo(np.float32).eps)
    ls = np.concatenate([-np.logspace(-7, 0.5, 60), np.logspace(-7, 0.5, 60)])
    for p in (1.0, 0.5, 2.0, 0.1, 10.0):
        q = 1.0 - p
        with jax.enable_x64(True):
            l64 = jnp.asarray(ls.astype(np.float32), jnp.float64)
            want = np.asarray(_excess(p, l64))
        got = np.asarray(_excess(p, jnp.asarray(ls, jnp.float32)), np.float64)
        assert np.all(want > 0)
        np.testing.assert_allclose(got, want, rtol=200 * eps / min(p, 1.0))
        if q != 0:  # the direct formula cancels for small L
            x = jnp.asarray(ls[ls > 0][:5], jnp.float32)
            direct = np.asarray(jnp.expm1(x) - jnp.expm1(q * x) / q, np.float64)
            assert np.max(np.abs(direct / want[60:65] - 1)) > 0.1
    xs = 10.0 ** np.linspace(-30, 30, 301)
    for e in (-0.5, 1 / 3, -2.0, 9.0, 2.0 / 3.0):
        want = xs.astype(np.float32).astype(np.float64) ** e
        keep = (want > 1e-35) & (want < 1e35)
        m, n = _pow_parts(jnp.asarray(xs, jnp.float32), e)
        got = np.asarray(m, np.float64) * 2.0 ** np.asarray(n, np.float64)
        np.testing.assert_allclose(got[keep], want[keep], rtol=4 * eps)


# ----------------------------------------------------------------------------------------------
# CAGrad: max_d minᵢ gᵢ·d over the ball ‖d − g₀‖ ≤ c‖g₀‖


def _slsqp_cagrad(j, c):
    """The max-min value, solved in parameter space over (d, t): max t, Jd ≥ t, in the ball."""
    t, p = j.shape
    g0 = j.mean(0)
    r = c * np.linalg.norm(g0)
    cons = [
        {
            "type": "ineq",
            "fun": lambda x: j @ x[:p] - x[p],
            "jac": lambda x: np.hstack([j, -np.ones((t, 1))]),
        },
        {
            "type": "ineq",
            "fun": lambda x: r**2 - np.sum((x[:p] - g0) ** 2),
            "jac": lambda x: np.concatenate([-2 * (x[:p] - g0), [0.0]]),
        },
    ]
    res = optimize.minimize(
        lambda x: -x[p],
        np.concatenate([g0, [np.min(j @ g0)]]),
        jac=lambda x: np.concatenate([np.zeros(p), [-1.0]]),
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return np.min(j @ res.x[:p])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_max_min_property(dtype):
    js, gs, out = solved(dtype)["random"]
    for j, g, lams in zip(js, gs, out["cagrad"], strict=True):
        s = np.max(np.diag(g))
        g0 = j.mean(0)
        for c, lam in zip(C_VALUES, lams, strict=True):
            d = j.T @ lam
            # In the ball, and no direction of the ball does better for the worst task.
            assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-5) + 1e-7 * s**0.5
            assert np.min(j @ d) >= _slsqp_cagrad(j, c) - TOL[dtype] * s


def test_cagrad_two_task_cases():
    gs, _, ws, lams = _two_task_batch()
    # Orthogonal gradients of equal norm: w = (½, ½) and d = (1 + c) g₀.
    for c, w, lam in zip(C_VALUES, ws[-1], lams[-1], strict=True):
        np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-6)
        np.testing.assert_allclose(lam, [(1 + c) / 2] * 2, rtol=1e-5)
    # Opposite gradients: g₀ = 0, so d = g₀ = 0 whatever c.
    np.testing.assert_allclose(lams[5] @ np.array([[1.0, 2], [-1, -2]]), 0.0, atol=1e-5)


# CAGrad on strongly conflicting tasks: nearly opposite pairs and low-rank-plus-noise Jacobians,
# judged by the worst-task progress minᵢ gᵢ·d of the returned direction against the scipy
# optimum of the primal, in units of ‖g₀‖·maxᵢ‖gᵢ‖ (the scale of the progress).

CAGRAD_CS = (0.4, 0.9)
# float64: the accuracy of the SLSQP reference; float32: the rounding level of the products.
CAGRAD_TOL = {"float32": 1e-5, "float64": 1e-8}


def _cagrad_reproducer():
    """T = 3: g₁ = e₁, g₂ = −0.999e₁ + sin·e₂ (equal norms), g₃ random (P = 5)."""
    cos = -0.999
    j = np.zeros((3, 5))
    j[0, 0], j[1, 0], j[1, 1] = 1.0, cos, np.sqrt(1.0 - cos**2)
    j[2] = np.random.default_rng(0).normal(size=5)
    return j


def _cagrad_pairs(seed=11, n=16):
    """T = 3: the reproducer, then nearly opposite pairs at angle π − δ (δ from 1e-4 to 1e-1,
    norms within a factor 2) with a third random task."""
    rng = np.random.default_rng(seed)
    out = [_cagrad_reproducer()]
    for delta in np.geomspace(1e-4, 1e-1, n):
        q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
        j = rng.normal(size=(3, 5))
        j[0] = q[:, 0]
        j[1] = 10.0 ** rng.uniform(-0.3, 0.3) * (-np.cos(delta) * q[:, 0] + np.sin(delta) * q[:, 1])
        out.append(j)
    return np.stack(out)


def _cagrad_low_rank(seed=12, n=20, t=6, p=16):
    """Low-rank-plus-noise Jacobians: rank 1 to 3, relative noise 10⁻³ to 10^{-1/2}, row
    scales spread over a decade."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        rank = 1 + k % 3
        j = rng.normal(size=(t, rank)) @ rng.normal(size=(rank, p))
        j = j + 10.0 ** rng.uniform(-3, -0.5) * rng.normal(size=(t, p))
        out.append(j * 10.0 ** rng.uniform(-0.5, 0.5, size=(t, 1)))
    return np.stack(out)


@functools.cache
def _cagrad_batched():
    return jax.jit(jax.vmap(jax.vmap(cagrad_solve, in_axes=(None, 0)), in_axes=(0, None)))


def _cagrad_run(gs, dtype_name):
    """``(λ, converged, residual)`` for every Gramian and every c in ``CAGRAD_CS``."""
    with jax.enable_x64(dtype_name == "float64"):
        sol = _cagrad_batched()(jnp.asarray(gs, dtype_name), jnp.asarray(CAGRAD_CS, dtype_name))
        info = sol.info
        return (
            np.asarray(sol.lam, np.float64),
            np.asarray(info.converged),
            np.asarray(info.residual, np.float64),
        )


def _gram32(js):
    """The Gramians a float32 train step would compute: float32 Jacobians, float32 products."""
    j32 = js.astype(np.float32)
    return np.einsum("bip,bjp->bij", j32, j32)


def _progress(j, lam):
    """The worst-task progress of ``d = Jᵀλ`` in units of ‖g₀‖·maxᵢ‖gᵢ‖."""
    scale = np.linalg.norm(j.mean(0)) * np.max(np.linalg.norm(j, axis=1))
    return np.min(j @ (j.T @ lam)) / scale


@functools.cache
def _cagrad_corpus(group):
    """Jacobians and their scipy optima (per c, in units of ‖g₀‖·maxᵢ‖gᵢ‖)."""
    js = _cagrad_pairs() if group == "pairs" else _cagrad_low_rank()
    scales = [np.linalg.norm(j.mean(0)) * np.max(np.linalg.norm(j, axis=1)) for j in js]
    refs = [[_slsqp_cagrad(j, c) / s for c in CAGRAD_CS] for j, s in zip(js, scales, strict=True)]
    return js, np.array(refs)


def _shortfall(js, refs, lam):
    """How far each direction's worst-task progress is below the optimum."""
    got = [[_progress(j, lk) for lk in lj] for j, lj in zip(js, lam, strict=True)]
    return refs - np.array(got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_reproducer_improves_every_task(dtype):
    # Nearly opposite, equal-norm pair: the optimum improves every task (+0.006 and +0.018
    # here); the returned direction must too, within rounding of the float64 optimum.
    j = _cagrad_reproducer()
    ref = np.array([[_slsqp_cagrad(j, c) for c in CAGRAD_CS]])
    ref = ref / (np.linalg.norm(j.mean(0)) * np.max(np.linalg.norm(j, axis=1)))
    gs = _gram32(j[None]) if dtype == "float32" else (j @ j.T)[None]
    lam, converged, residual = _cagrad_run(gs, dtype)
    assert np.all(ref > 0.005)
    assert np.all(_shortfall(j[None], ref, lam) <= CAGRAD_TOL[dtype])
    assert np.all([_progress(j, lk) > 0 for lk in lam[0]])
    assert np.all(converged) and np.all(residual <= 10 * solvers_cagrad.cagrad_tol(dtype))


@pytest.mark.parametrize("group", ["pairs", "low_rank"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_conflicting_corpus_matches_scipy(group, dtype):
    js, refs = _cagrad_corpus(group)
    if dtype == "float64":
        lam, converged, residual = _cagrad_run(np.einsum("bip,bjp->bij", js, js), dtype)
        allowed = np.full(refs.shape, CAGRAD_TOL[dtype])
        # Certified near rounding; the certificate bounds the shortfall; in the ball.
        assert np.all(residual <= 1e-10), residual.max()
        assert np.all(_shortfall(js, refs, lam) <= residual + CAGRAD_TOL[dtype])
        for j, lj in zip(js, lam, strict=True):
            r = np.array(CAGRAD_CS) * np.linalg.norm(j.mean(0))
            assert np.all(np.linalg.norm(lj @ j - j.mean(0), axis=1) <= r * (1 + 1e-8))
    else:
        lam, converged, residual = _cagrad_run(_gram32(js), dtype)
        # What float32 rounding alone causes. Of the input: the float64 solution of the
        # rounded problem (the float64 solver is checked against scipy above), judged on the
        # exact Jacobian; a case may fail only if its error exceeds 10 times that. Of the
        # weights themselves, which are large (r/‖g_w‖) for nearly opposite gradients: their
        # last float32 digit moves the progress by up to eps·maxₖ Σᵢ|λᵢ||gₖ·gᵢ| (twice that
        # is allowed).
        lam_in, converged_in, _ = _cagrad_run(_gram32(js).astype(np.float64), "float64")
        assert np.all(converged_in)
        e_in = np.abs(_shortfall(js, refs, lam_in))
        gs = np.abs(np.einsum("bip,bjp->bij", js, js))
        scales = np.linalg.norm(js.mean(1), axis=1) * np.linalg.norm(js, axis=2).max(1)
        e_lam = np.finfo(np.float32).eps * np.max(
            np.einsum("bki,bci->bck", gs, np.abs(lam_in)), axis=2
        )
        e_lam = e_lam / scales[:, None]
        allowed = np.maximum(CAGRAD_TOL[dtype], np.maximum(10.0 * e_in, 2.0 * e_lam))
    assert np.all(converged)
    err = _shortfall(js, refs, lam)
    bad = np.argwhere(err > allowed)
    assert bad.size == 0, [(tuple(k), err[tuple(k)], allowed[tuple(k)]) for k in bad]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_solver_info(dtype):
    j = _cagrad_reproducer()
    tol = solvers_cagrad.cagrad_tol(dtype)
    with jax.enable_x64(dtype == "float64"):
        g = jnp.asarray(j @ j.T, dtype)
        solve = jax.jit(lambda g, c, cap: cagrad_solve(g, c, max_iter=cap))
        # Capped at one or two iterations the solve is far from optimal and says so.
        for cap in (1, 2):
            info = solve(g, 0.4, cap).info
            assert int(info.iterations) == cap and not bool(info.converged)
            assert float(info.residual) > 1e3 * tol
        info = solve(g, 0.4, solvers_cagrad.CAGRAD_MAX_ITER).info
        assert bool(info.converged) and 0 < int(info.iterations) < solvers_cagrad.CAGRAD_MAX_ITER
        # Non-finite input: reported as not converged.
        info = solve(g.at[0, 1].set(jnp.nan), 0.4, solvers_cagrad.CAGRAD_MAX_ITER).info
        assert not bool(info.converged)
        # Exact cases: c = 0 or g₀ = 0 (λ = 1/T), one task (λ = 1 + c).
        for gram, c, lam in (
            (g, 0.0, np.full(3, 1 / 3)),
            (jnp.asarray([[1.0, -1.0], [-1.0, 1.0]], dtype), 0.4, np.full(2, 0.5)),
            (jnp.asarray([[4.0]], dtype), 0.5, np.array([1.5])),
        ):
            sol = solve(gram, c, solvers_cagrad.CAGRAD_MAX_ITER)
            np.testing.assert_allclose(np.asarray(sol.lam), lam, rtol=1e-6)
            assert bool(sol.info.converged) and int(sol.info.iterations) == 0


def _cagrad_degenerate():
    """Degenerate Jacobians for CAGrad, with T = 5: those of the shared set, zero rows, row
    scales 1e±8, and exactly opposite pairs (then the optimum's g_w vanishes: the cone's tip)."""
    rng = np.random.default_rng(13)
    cases = {k: v for k, v in degenerate_jacobians().items() if k != "tiny"}
    other = rng.normal(size=(T, P))
    cases["zero_rows"] = other * np.array([1.0, 0.0, 1.0, 0.0, 1.0])[:, None]
    cases["scales_1e8"] = np.diag([1e-8, 1e-4, 1.0, 1e4, 1e8]) @ other
    cases["tip"] = np.concatenate([other[:1], -other[:1], other[2:]])
    cases["tip_scaled"] = np.concatenate([other[:1], -other[:1], other[2:]]) * 1e3
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_degenerate_inputs(dtype):
    cases = _cagrad_degenerate()
    js = np.stack(list(cases.values()))
    gs = _gram32(js) if dtype == "float32" else np.einsum("bip,bjp->bij", js, js)
    lam, converged, residual = _cagrad_run(gs, dtype)
    assert np.all(np.isfinite(lam)) and np.all(converged), dict(zip(cases, converged, strict=True))
    # Within the resolution of the cone's tip, 4c√ε (relative to ‖g₀‖·maxᵢ‖gᵢ‖), of scipy's
    # optimum (on the Jacobian with unit largest row: the row scales span 16 decades).
    eps = np.finfo(dtype).eps
    for name, j, lj in zip(cases, js, lam, strict=True):
        if np.linalg.norm(j.mean(0)) == 0:  # d = g₀ = 0
            np.testing.assert_allclose(lj @ j, 0.0, atol=1e-6 * np.abs(j).max(), err_msg=name)
            continue
        jn = j / np.max(np.linalg.norm(j, axis=1))
        for c, lk in zip(CAGRAD_CS, lj, strict=True):
            ref = _slsqp_cagrad(jn, c) / np.linalg.norm(jn.mean(0))
            assert _progress(jn, lk) >= ref - 4 * c * np.sqrt(eps), (name, c)


# ----------------------------------------------------------------------------------------------
# Degenerate inputs


def test_degenerate_gramians_give_finite_sensible_outputs():
    js, _, out = solved("float32")["degenerate"]
    for name, value in out.items():
        assert np.all(np.isfinite(value)), name
    cases = dict(zip(degenerate_jacobians(), range(len(js)), strict=True))
    mgda = out["mgda"]
    # Zero gradients: uniform MGDA, UPGrad and DualProj weights; Nash/FairGrad weights 0.
    np.testing.assert_allclose(mgda[cases["zero"]], np.full(T, 1 / T), atol=1e-6)
    np.testing.assert_allclose(out["proj"][cases["zero"]][-1], np.full(T, 1 / T), atol=1e-6)
    np.testing.assert_array_equal(out["nash"][cases["zero"]], 0.0)
    # Identical rows: the min-norm point is that row; opposite rows: 0, and the dual cone is
    # the orthogonal complement, so both projections vanish.
    k = cases["identical"]
    np.testing.assert_allclose(js[k].T @ mgda[k], js[k][0], rtol=1e-5)
    k = cases["opposite"]
    assert np.linalg.norm(js[k].T @ mgda[k]) < 1e-5 * np.linalg.norm(js[k][0])
    assert np.abs(js[k].T @ out["proj"][k].T).max() < 1e-5 * np.abs(js[k]).max()
    # Collinear rows scaled from 1e-10 to 1e10: MGDA picks the smallest.
    k = cases["collinear_scaled"]
    np.testing.assert_allclose(mgda[k], np.eye(T)[0], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_norm_norms_spanning_twenty_decades(dtype):
    # Gradient norms from 1e-10 to 1e10: Gᵢᵢ/max G reaches 1e-40, below float32's normal
    # range, yet no gradient is zero. The KKT conditions of min_{α ∈ Δ} αᵀGα, checked in
    # float64 on the exact Gramian relative to the magnitudes of the terms, and gᵢ·d ≥ 0.
    rng = np.random.default_rng(31)
    rows = rng.normal(size=(5, 12))
    j = np.logspace(-10, 10, 5)[:, None] * rows / np.linalg.norm(rows, axis=1, keepdims=True)
    g = j @ j.T
    with jax.enable_x64(dtype == "float64"):
        a = np.asarray(solvers.min_norm_simplex(jnp.asarray(g, dtype)), np.float64)
    assert np.all(np.isfinite(a)) and np.all(a >= 0) and abs(a.sum() - 1) < 1e-6
    ga, val = g @ a, a @ g @ a
    mag = np.abs(g) @ a + val
    assert np.all(ga >= val - TOL[dtype] * mag), (ga - val) / mag
    np.testing.assert_allclose(ga[a > 1e-4], val, atol=TOL[dtype] * val)
    # The vertex of the smallest gradient is feasible: ‖d‖² ≤ ‖g₀‖².
    assert val <= g[0, 0] * (1 + TOL[dtype])


class _ExhaustiveCandidates:
    """``jax.lax`` whose ``cond`` always takes its second branch: CAGrad's refinement then
    skips its four guessed supports and solves the 2T prefix supports (and active-set steps)."""

    def __getattr__(self, name):
        return getattr(jax.lax, name)

    @staticmethod
    def cond(pred, true_fun, false_fun, *operands):
        return false_fun(*operands)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_guessed_supports_agree_with_the_exhaustive_candidates(dtype, monkeypatch):
    """The refinement's first four candidate supports (from the barrier's weights and slacks)
    give the answer of the 2T prefix supports and active-set steps they short-cut, to the
    certificate's tolerance, on conflicting, low-rank and badly scaled Gramians (T = 10)."""
    rng = np.random.default_rng(5)
    js = rng.normal(size=(24, 10, 3)) @ rng.normal(size=(24, 3, 40))  # rank 3
    js = js + 0.1 * rng.normal(size=js.shape)
    js[:8, 1] = -js[:8, 0] + 1e-3 * rng.normal(size=(8, 40))  # nearly opposite pairs
    js[8:16] *= np.exp(rng.uniform(-9.0, 9.0, size=(8, 10, 1)))  # norms over 1e±4
    grams = np.einsum("bip,bjp->bij", js, js)
    with jax.enable_x64(dtype == "float64"):
        g = jnp.asarray(grams, dtype)
        fast = jax.jit(jax.vmap(lambda x: cagrad_solve(x, 0.4)))(g)
        monkeypatch.setattr(solvers_cagrad, "lax", _ExhaustiveCandidates())
        slow = jax.jit(jax.vmap(lambda x: cagrad_solve(x, 0.4)))(g)
    assert np.all(np.asarray(fast.info.converged)) and np.all(np.asarray(slow.info.converged))
    d_fast = np.einsum("bi,bip->bp", np.asarray(fast.lam, float), js)
    d_slow = np.einsum("bi,bip->bp", np.asarray(slow.lam, float), js)
    err = np.linalg.norm(d_fast - d_slow, axis=1) / np.linalg.norm(d_slow, axis=1)
    assert np.all(err <= {"float32": 1e-4, "float64": 1e-10}[dtype]), err.max()


def test_projections_reaching_the_interior_point_are_solved_alone(monkeypatch):
    """The interior-point stage of ``project_dual_cone`` solves only the projections the
    earlier stages left uncertified, ``IPM_CHUNK`` at a time (the last chunk clamped to the
    batch's end, repeating earlier ones): the same answers and iteration counts as one batch
    of all of them, with chunks of 1 and 4. ``max_iter=1`` (one pivot, one interior-point
    iteration) sends all seven projections there: each counts 3 iterations (a repeated one
    counted twice would count 4)."""
    from mtljax._src.solvers import dual_cone

    rng = np.random.default_rng(3)
    j = rng.normal(size=(7, 9))
    j[1] = -j[0] + 0.1 * rng.normal(size=9)  # conflicting pairs: pivots are needed
    j[3] = -0.5 * j[2] + 0.1 * rng.normal(size=9)
    g = jnp.asarray(j @ j.T, jnp.float32)
    us = jnp.asarray(rng.uniform(0.1, 1.0, size=(7, 7)), jnp.float32)

    def solve(chunk):
        monkeypatch.setattr(dual_cone, "IPM_CHUNK", chunk)
        return jax.jit(
            lambda g, u: dual_cone.project_dual_cone(g, u, max_iter=1, return_info=True)
        )(g, us)

    v_all, info_all = solve(1000)
    assert int(info_all.iterations) == 3
    for chunk in (1, 4):
        v, info = solve(chunk)
        np.testing.assert_allclose(v, v_all, rtol=1e-6, atol=1e-7)
        assert int(info.iterations) == 3, chunk
