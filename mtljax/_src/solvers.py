"""On-device solvers for the Gramian-based aggregation methods.

Every solver is pure JAX (``lax.while_loop`` with a bounded number of iterations), jittable and
vmappable, and works on the ``T×T`` Gramian ``G = J Jᵀ`` in float32 or wider (the input's dtype
promoted to at least float32; products at full precision, never TF32). Inputs are treated as
constants for differentiation (``stop_gradient``): the solvers are not differentiated through.

Solvers:

* :func:`min_norm_simplex`: ``min_{α ∈ Δ} αᵀGα`` (MGDA's min-norm point);
* :func:`project_dual_cone`: ``min_{v ≥ u} vᵀGv`` (the projection of ``Jᵀu`` onto the dual cone
  ``{x : Jx ≥ 0}`` is ``Jᵀv``; UPGrad and DualProj);
* :func:`solve_potential`: ``α > 0`` with ``(Gα)ᵢ = αᵢ^{-p}`` (Nash-MTL: ``p = 1``; FairGrad:
  ``p = 1/α``), the minimiser of the convex potential ``½αᵀGα + Σᵢ h_p(αᵢ)``;
* :func:`cagrad_simplex`: ``min_{w ∈ Δ} wᵀGb + r ‖Jᵀw‖`` (CAGrad's dual problem).

Scaling and regularisation. ``G`` is first rescaled by its largest diagonal entry
``s = maxᵢ ‖gᵢ‖²`` (``s = 1`` when ``G = 0``), or, for the projections and the potential
equations, brought to the :func:`correlation` matrix of the unit gradients, whose diagonal is 1
whatever the gradients' scales. A ridge proportional to each task's own squared gradient norm
is added, ``G + ε·diag(G)`` (:func:`regularize`; ``ε = 10⁻⁶`` in float32 and ``10⁻¹⁰`` in
float64, :func:`default_ridge`): each gradient gets a private component of relative squared norm
``ε``. The problems are then strongly convex with unique, finite solutions, also for identical or
opposite gradients; per-task scale invariances stay exact; well-conditioned solutions move by
``O(ε)``. Zero gradients are handled explicitly by each solver (see their docstrings).

Algorithms. The two QPs and CAGrad's problem are solved by a primal-dual interior-point method
with Mehrotra's predictor-corrector: one Cholesky factorisation of a ``T×T`` matrix per
iteration, at most :data:`IPM_MAX_ITER` iterations, typically 8 to 18. It stops when the
duality gap is small relative to the objective (``xᵀz ≤ tol·size``, ``tol`` =
:func:`default_tol`: ``10⁻¹²`` in float32, ``10⁻¹⁵`` in float64) and the KKT residuals are at
rounding level relative to the magnitudes of their terms, so that gradients of very different
norms are resolved. The QP solutions are then polished: the KKT system is solved on the active
set the interior point identified, and the result is kept when it is feasible and stationary to
rounding, which makes it exact. The potential equations are solved by damped Newton steps with
an Armijo line search over ``2^{-k}`` step sizes evaluated at once (at most
:data:`NEWTON_MAX_ITER` iterations, typically 4 to 12; stops when the Newton decrement reaches
rounding level or the iterate stops changing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

IPM_MAX_ITER = 60
NEWTON_MAX_ITER = 100
_LINE_SEARCH_MAX = 40
_BOUNDARY_FRACTION = 0.99


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """The dtype the solvers work in: ``x``'s floating dtype promoted to at least float32."""
    dtype = jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.promote_types(dtype, jnp.float32)


def _is_f64(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float64


# Products at full precision: accelerators may otherwise round float32 matrix products (TF32).
_mm = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)
_dot = functools.partial(jnp.dot, precision=lax.Precision.HIGHEST)


def default_ridge(dtype) -> float:
    """The relative ridge ``ε`` of :func:`regularize`: ``1e-6`` (float32), ``1e-10`` (float64)."""
    return 1e-10 if _is_f64(dtype) else 1e-6


def default_tol(dtype) -> float:
    """The interior point's gap tolerance: ``1e-12`` (float32), ``1e-15`` (float64)."""
    return 1e-15 if _is_f64(dtype) else 1e-12


def _as_gramian(gramian: jax.Array) -> jax.Array:
    g = lax.stop_gradient(jnp.asarray(gramian))
    g = g.astype(compute_dtype(g))
    return 0.5 * (g + g.T)


def normalize_gramian(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(G/s, s)`` with ``s`` the largest diagonal entry (``s = 1`` if it is not positive).

    The result is symmetrised, in :func:`compute_dtype`, and treated as a constant.
    """
    g = _as_gramian(gramian)
    s = jnp.max(jnp.diagonal(g))
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    return g / s, s


def regularize(g: jax.Array, ridge: float | None = None) -> jax.Array:
    """``G + ε·diag(G)``: each gradient gets a private component of relative squared norm ``ε``."""
    eps = default_ridge(g.dtype) if ridge is None else float(ridge)
    return g + jnp.diag(eps * jnp.clip(jnp.diagonal(g), 0.0))


def correlation(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(C, d)``: ``dᵢ = ‖gᵢ‖`` and ``Cᵢⱼ = Gᵢⱼ/(dᵢdⱼ)``, the Gramian of the normalised gradients.

    Rows and columns of zero gradients are zero in ``C``.
    """
    g = _as_gramian(gramian)
    d = jnp.sqrt(jnp.clip(jnp.diagonal(g), 0.0))
    nz = d > 0
    inv = jnp.where(nz, 1.0 / jnp.where(nz, d, 1.0), 0.0)
    c = jnp.clip(g * inv[:, None] * inv[None, :], -1.0, 1.0)
    c = jnp.where(nz[:, None] & nz[None, :], c, 0.0)
    c = c.at[jnp.diag_indices(c.shape[0])].set(jnp.where(nz, 1.0, 0.0))
    return c, d


def _max_step(v: jax.Array, dv: jax.Array) -> jax.Array:
    """The largest ``t`` with ``v + t dv ≥ 0`` (``inf`` when ``dv ≥ 0``)."""
    neg = dv < 0
    return jnp.min(jnp.where(neg, -v / jnp.where(neg, dv, -1.0), jnp.inf))


def _chol_solver(m: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``b ↦ M⁻¹b`` (``b``: ``(n,)`` or ``(n, k)``) for a symmetric positive definite ``M``."""
    low = lax.linalg.cholesky(m, symmetrize_input=False)

    def solve(b):
        col = b[:, None] if b.ndim == 1 else b
        y = lax.linalg.triangular_solve(low, col, left_side=True, lower=True)
        x = lax.linalg.triangular_solve(low, y, left_side=True, lower=True, transpose_a=True)
        return x[:, 0] if b.ndim == 1 else x

    return solve


# ----------------------------------------------------------------------------------------------
# Primal-dual interior point for  min f(x)  s.t.  x ≥ 0  (and 1ᵀx = 1 when `simplex`)

Oracle = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


def _interior_point(
    oracle: Oracle,
    x0: jax.Array,
    *,
    simplex: bool,
    tol: float,
    max_iter: int = IPM_MAX_ITER,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Mehrotra predictor-corrector for a smooth convex ``f`` over the orthant or the simplex.

    ``oracle(x) -> (∇f(x), ∇²f(x), m, S)`` with ``m ≥ 0`` the magnitudes of the terms that
    make up ``∇f`` (its rounding scale, per coordinate) and ``S ≥ 0`` the size of the
    objective. KKT conditions: ``∇f(x) − z − ν1 = 0``, ``x ∘ z = 0``, ``x, z ≥ 0`` (``ν = 0``
    without the simplex constraint). Stops when the gap is relatively small, ``xᵀz ≤ tol·S``,
    and the residuals are at rounding level relative to ``m`` (so graded problems, with
    gradients of very different scales, are solved to relative accuracy), when a step would
    leave the interior (rounding), or after ``max_iter`` iterations.
    Returns ``(x, z, ν, iterations)``.
    """
    n = x0.shape[0]
    dtype = x0.dtype
    res_tol = max(tol, 100.0 * float(jnp.finfo(dtype).eps))
    floor = 1e3 * float(jnp.finfo(dtype).tiny)

    def body(state):
        x, z, nu, it, _ = state
        grad, hess, mag, size = oracle(x)
        r_d = grad - z - nu
        r_p = jnp.sum(x) - 1.0 if simplex else 0.0
        mu = _dot(x, z) / n
        done = jnp.all(jnp.abs(r_d) <= res_tol * (mag + z + jnp.abs(nu)))
        done = done & (n * mu <= tol * size + floor)
        if simplex:
            done = done & (jnp.abs(r_p) <= res_tol)
        solve = _chol_solver(hess + jnp.diag(z / x))

        def direction(r_c, pre):
            # (H + Z/X) dx − 1 dν = −r_d + r_c/x,  1ᵀdx = −r_p,  dz = (r_c − z dx)/x.
            rhs = r_c / x - r_d
            if simplex:
                a = solve(rhs)
                dnu = (-r_p - jnp.sum(a)) / jnp.sum(pre)
                dx = a + pre * dnu
            else:
                dnu, dx = 0.0, solve(rhs)
            return dx, (r_c - z * dx) / x, dnu

        ones_inv = solve(jnp.ones((n,), dtype)) if simplex else None
        # Predictor (affine scaling), then the corrector centred at σμ, σ = (μ_aff/μ)³.
        dx, dz, _ = direction(-x * z, ones_inv)
        t_aff = jnp.minimum(1.0, jnp.minimum(_max_step(x, dx), _max_step(z, dz)))
        mu_aff = _dot(x + t_aff * dx, z + t_aff * dz) / n
        sigma = jnp.clip(mu_aff / jnp.maximum(mu, jnp.finfo(dtype).tiny), 0.0, 1.0) ** 3
        dx, dz, dnu = direction(sigma * mu - x * z - dx * dz, ones_inv)
        t = jnp.minimum(1.0, _BOUNDARY_FRACTION * jnp.minimum(_max_step(x, dx), _max_step(z, dz)))
        x_new, z_new, nu_new = x + t * dx, z + t * dz, nu + t * dnu
        ok = jnp.all((x_new > 0) & (z_new > 0) & jnp.isfinite(x_new * z_new)) & jnp.isfinite(nu_new)
        keep = done | ~ok
        return (
            jnp.where(keep, x, x_new),
            jnp.where(keep, z, z_new),
            jnp.where(keep, nu, nu_new),
            it + 1,
            keep,
        )

    def cond(state):
        return (state[3] < max_iter) & ~state[4]

    grad0 = oracle(x0)[0]
    if simplex:
        nu0 = jnp.min(grad0) - 1.0
        z0 = grad0 - nu0
    else:
        nu0 = jnp.zeros((), dtype)
        z0 = jnp.maximum(grad0, 0.0) + 1.0
    init = (x0, z0, nu0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    x, z, nu, iters, _ = lax.while_loop(cond, body, init)
    return x, z, nu, iters


def _qp_oracle(q: jax.Array, c: jax.Array, const: jax.Array | float = 0.0) -> Oracle:
    """``f = ½xᵀQx + cᵀx``: gradient, Hessian, magnitudes ``|Q||x| + |c|`` and the size
    ``xᵀQx + 2cᵀx + const`` (``const`` makes it ``‖Jᵀ(x + u)‖²`` when ``c = Qu``)."""
    abs_q, abs_c = jnp.abs(q), jnp.abs(c)

    def oracle(x):
        qx = _mm(q, x)
        size = jnp.maximum(_dot(x, qx) + 2.0 * _dot(c, x) + const, 0.0)
        return qx + c, q, _mm(abs_q, jnp.abs(x)) + abs_c, size

    return oracle


def _polish_qp(q: jax.Array, c: jax.Array, x: jax.Array, z: jax.Array, *, simplex: bool):
    """Solves the KKT system of ``min ½xᵀQx + cᵀx`` on the active set guessed from ``(x, z)``.

    With ``F`` the coordinates where ``x > z``: ``x_F = Q_FF⁻¹(ν1 − c_F)``, ``x_A = 0`` (``ν``
    fixed by ``1ᵀx = 1`` on the simplex, else 0). The polished point replaces ``x`` when it is
    primal and dual feasible and stationary to rounding (relative to the magnitudes of the
    terms): it is then the exact solution.
    """
    dtype = x.dtype
    free = x > z
    ff = free[:, None] & free[None, :]
    # A relative shift of the free block by the dtype's ε keeps the factorisation defined when
    # Q_FF is singular; the checks below judge the result.
    shift = jnp.finfo(dtype).eps * jnp.maximum(jnp.max(jnp.diagonal(q)), 1.0)
    m = jnp.where(ff, q, 0.0) + jnp.diag(jnp.where(free, shift, 1.0))
    solve = _chol_solver(m)
    ind = jnp.where(free, 1.0, 0.0)
    if simplex:
        both = solve(jnp.stack([-c * ind, ind], axis=1))
        a, e = both[:, 0], both[:, 1]
        nu = (1.0 - jnp.sum(a * ind)) / jnp.sum(e * ind)
        xp = (a + nu * e) * ind
    else:
        nu = 0.0
        xp = solve(-c * ind) * ind
    grad = _mm(q, xp) + c - nu
    zp = grad * (1.0 - ind)
    k = 1e3 * jnp.finfo(dtype).eps
    mag = _mm(jnp.abs(q), jnp.abs(xp)) + jnp.abs(c) + jnp.abs(nu)
    ok = jnp.all(xp >= -k * jnp.max(jnp.abs(xp))) & jnp.all(zp >= -k * mag)
    ok = ok & jnp.all(jnp.abs(grad * ind) <= k * mag) & jnp.all(jnp.isfinite(xp * zp))
    if simplex:
        ok = ok & (jnp.abs(jnp.sum(xp) - 1.0) <= k)
    return jnp.where(ok, jnp.maximum(xp, 0.0), x)


def _qp(q, c, *, simplex: bool, tol: float | None, max_iter: int, const=0.0):
    """``min ½xᵀQx + cᵀx`` over ``x ≥ 0`` (and ``1ᵀx = 1``): interior point, then polish."""
    n = q.shape[0]
    dtype = q.dtype
    tol = default_tol(dtype) if tol is None else float(tol)
    x0 = jnp.full((n,), 1.0 / n if simplex else 1.0, dtype)
    oracle = _qp_oracle(q, c, const)
    x, z, _, iters = _interior_point(oracle, x0, simplex=simplex, tol=tol, max_iter=max_iter)
    x = _polish_qp(q, c, x, z, simplex=simplex)
    if simplex:
        x = jnp.maximum(x, 0.0)
        x = x / jnp.sum(x)
    return x, iters


# ----------------------------------------------------------------------------------------------
# Damped Newton for the potential  ½yᵀQy + Σᵢ cᵢ h_p(yᵢ)  on  y > 0


def _potential_terms(p: float, log_coef: jax.Array):
    """``cᵢh_p(y)`` and its first two derivatives, ``c = exp(log_coef)``, ``h_p' = −y^{-p}``.

    Computed as exponentials of sums of logarithms so that no intermediate power overflows.
    """
    if p == 1.0:
        return (
            lambda y: -jnp.exp(log_coef) * jnp.log(y),
            lambda y: -jnp.exp(log_coef - jnp.log(y)),
            lambda y: jnp.exp(log_coef - 2.0 * jnp.log(y)),
        )
    return (
        lambda y: -jnp.exp(log_coef + (1.0 - p) * jnp.log(y)) / (1.0 - p),
        lambda y: -jnp.exp(log_coef - p * jnp.log(y)),
        lambda y: p * jnp.exp(log_coef - (p + 1.0) * jnp.log(y)),
    )


def _newton_potential(q, log_coef, p: float, y0, *, max_iter: int):
    """Minimises ``Φ(y) = ½yᵀQy + Σᵢ cᵢ h_p(yᵢ)`` on ``y > 0`` (Q positive definite, c > 0).

    Its stationarity conditions are ``(Qy)ᵢ = cᵢ yᵢ^{-p}``. Damped Newton: the step ``Δ`` is
    cut to stay inside ``y > 0``, then the largest ``t`` among ``t₀2^{-k}``
    (``k < _LINE_SEARCH_MAX``, all evaluated at once) with the Armijo decrease
    ``Φ(y + tΔ) ≤ Φ(y) + t∇Φ·Δ/4`` (up to the rounding level of Φ) is taken. Stops when ``λ²``
    reaches rounding level or the iterate no longer changes. Returns ``(y, iterations)``.
    """
    dtype = q.dtype
    eps = float(jnp.finfo(dtype).eps)
    h, dh, d2h = _potential_terms(p, log_coef)
    halvings = 0.5 ** jnp.arange(_LINE_SEARCH_MAX, dtype=dtype)

    def phi(y):
        return 0.5 * jnp.sum(y * _mm(y, q), axis=-1) + jnp.sum(h(y), axis=-1)

    def body(state):
        y, it, _ = state
        grad = _mm(q, y) + dh(y)
        step = -_chol_solver(q + jnp.diag(d2h(y)))(grad)
        slope = _dot(grad, step)
        ts = jnp.minimum(1.0, _BOUNDARY_FRACTION * _max_step(y, step)) * halvings
        trials = y + ts[:, None] * step
        valid = jnp.all(trials > 0, axis=1)
        f0 = phi(y)
        # Armijo, with a slack at the rounding level of Φ so that the last steps of the
        # quadratically convergent phase, whose decrease is below rounding, are accepted.
        slack = 16.0 * eps * (jnp.abs(f0) + jnp.sum(jnp.abs(h(y))))
        f_trials = phi(jnp.where(valid[:, None], trials, 1.0))
        armijo = valid & (f_trials <= f0 + 0.25 * ts * slope + slack)
        t = jnp.max(jnp.where(armijo, ts, 0.0))
        y_new = y + t * step
        ok = jnp.all((y_new > 0) & jnp.isfinite(y_new))
        moved = jnp.max(jnp.abs(y_new - y)) > 4.0 * eps * jnp.max(jnp.abs(y))
        done = (-slope <= eps * eps) | ~ok | ~moved
        return jnp.where(ok, y_new, y), it + 1, done

    def cond(state):
        return (state[1] < max_iter) & ~state[2]

    init = (y0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    y, iters, _ = lax.while_loop(cond, body, init)
    return y, iters


# ----------------------------------------------------------------------------------------------
# Public solvers


def min_norm_simplex(
    gramian: jax.Array,
    *,
    ridge: float | None = None,
    tol: float | None = None,
    max_iter: int = IPM_MAX_ITER,
) -> jax.Array:
    """MGDA's min-norm point: ``α = argmin_{α ≥ 0, Σα = 1} αᵀGα``.

    ``Jᵀα`` is the point of smallest norm in the convex hull of the rows of ``J``. Solved on
    :func:`regularize` ``(G/s)`` to relative accuracy, also when the gradients' norms differ by
    orders of magnitude; scale invariant. If some gradients are zero, the min-norm point is 0
    and ``α`` is uniform over them. Returns ``α`` (on the simplex).
    """
    g, _ = normalize_gramian(gramian)
    n = g.shape[0]
    if n == 1:
        return jnp.ones((1,), g.dtype)
    # A zero gradient makes the min-norm point 0: the weight is spread over the zero rows
    # (the interior point is then given a trivial problem).
    zero = jnp.diagonal(g) <= 0
    has_zero = jnp.any(zero)
    q = jnp.where(has_zero, jnp.eye(n, dtype=g.dtype), regularize(g, ridge))
    alpha, _ = _qp(q, jnp.zeros((n,), g.dtype), simplex=True, tol=tol, max_iter=max_iter)
    zero = zero.astype(g.dtype)
    return jnp.where(has_zero, zero / jnp.maximum(jnp.sum(zero), 1.0), alpha)


def project_dual_cone(
    gramian: jax.Array,
    u: jax.Array,
    *,
    ridge: float | None = None,
    tol: float | None = None,
    max_iter: int = IPM_MAX_ITER,
) -> jax.Array:
    """``v = argmin_{v ≥ u} vᵀGv``: ``Jᵀv`` is the projection of ``Jᵀu`` onto ``{x : Jx ≥ 0}``.

    (The projection is ``Jᵀu + Jᵀλ`` with ``λ = argmin_{λ ≥ 0} ‖Jᵀ(u + λ)‖²``: the dual of
    ``min ‖x − Jᵀu‖²`` s.t. ``Jx ≥ 0``.) ``u`` has shape ``(T,)`` or ``(K, T)`` (``K``
    projections, solved as one batch). The QP is solved in the variables ``yᵢ = rᵢvᵢ``
    (``rᵢ = ‖gᵢ‖/maxⱼ‖gⱼ‖``), where its matrix is the :func:`correlation` matrix plus ``εI``
    (the relative ridge of :func:`regularize`) whatever the gradients' scales. ``v`` does not
    depend on the scale of ``G``, so ``Jᵀv`` is linear in ``J``. The coordinate of a zero
    gradient is free; it is set to ``vᵢ = uᵢ``.
    """
    corr, d = correlation(gramian)
    dtype = corr.dtype
    u = lax.stop_gradient(jnp.asarray(u)).astype(dtype)
    if corr.shape[0] == 1:
        return jnp.where(d[0] > 0, jnp.maximum(u, 0.0), u)
    eps = default_ridge(dtype) if ridge is None else float(ridge)
    nz = d > 0
    dmax = jnp.max(d)
    r = jnp.where(nz, d / jnp.where(dmax > 0, dmax, 1.0), 0.0)
    q = corr + jnp.diag(jnp.where(nz, eps, 1.0))

    def one(ui):
        # y = r∘u + x with x ≥ 0: min ½xᵀQx + (Q r∘u)ᵀx. The solution is positively
        # homogeneous in r∘u, which is rescaled to unit size for the solver's tolerances.
        y0 = r * ui
        size = jnp.max(jnp.abs(y0))
        size = jnp.where(size > 0, size, 1.0)
        y0 = y0 / size
        qy0 = _mm(q, y0)
        x, _ = _qp(q, qy0, simplex=False, tol=tol, max_iter=max_iter, const=_dot(y0, qy0))
        y0 = y0 * size
        return jnp.where(nz, (y0 + size * x) / jnp.where(nz, r, 1.0), ui)

    if u.ndim == 1:
        return one(u)
    return jax.vmap(one)(u)


def solve_potential(
    gramian: jax.Array,
    p: float = 1.0,
    x0: jax.Array | None = None,
    *,
    ridge: float | None = None,
    max_iter: int = NEWTON_MAX_ITER,
) -> jax.Array:
    """The ``α > 0`` with ``(Gα)ᵢ = αᵢ^{-p}`` for every task ``i`` (``p > 0``).

    These are the stationarity conditions of the strictly convex potential
    ``Φ(α) = ½αᵀGα + Σᵢ h_p(αᵢ)`` on ``α > 0``, with ``h_1 = −log`` and
    ``h_p(a) = −a^{1−p}/(1−p)`` otherwise (``h_p' = −a^{-p}``, ``h_p'' > 0``). The problem is
    solved in the variables ``yᵢ = rᵢ s^{1/(1+p)} αᵢ`` (``rᵢ = ‖gᵢ‖/√s``) where it reads
    ``((C + εI)y)ᵢ = rᵢ^{p−1} yᵢ^{-p}`` with ``C`` the :func:`correlation` matrix: unit
    diagonal, whatever the gradients' scales. The ridge ``ε`` (:func:`default_ridge`) is the
    relative one of :func:`regularize`; for ``p = 1`` the solution is exactly invariant to the
    scale of each gradient (``gᵢ → kgᵢ`` gives ``αᵢ → αᵢ/k``).

    A solution of the unregularised equations exists iff no convex combination of the
    gradients vanishes (it does not for two opposite gradients, say). The ridge always gives
    one: the tasks in such a combination get large but bounded weights (about ``ε^{-1/(1+p)}``
    times a well-posed weight). A task whose gradient is exactly zero plays no part and gets
    ``αᵢ = 0``.

    Args:
      gramian: ``G`` (T×T).
      p: the exponent (Nash-MTL: 1; FairGrad with fairness ``α``: ``1/α``); a Python float.
      x0: a warm start for ``α``, at the original scale; ignored unless finite and positive.
      ridge: the relative ridge ``ε``.
      max_iter: the most Newton iterations.
    """
    p = float(p)
    if not p > 0:
        raise ValueError(f"solve_potential: p must be > 0, got {p}")
    corr, d = correlation(gramian)
    dtype = corr.dtype
    n = corr.shape[0]
    nz = d > 0
    if n == 1:  # α^{1+p} = 1/G
        return jnp.where(nz, jnp.where(nz, d, 1.0) ** (-2.0 / (1.0 + p)), 0.0)
    eps = default_ridge(dtype) if ridge is None else float(ridge)
    # Zero gradients are decoupled (a unit private gradient) and get weight 0 at the end.
    corr = corr + jnp.diag(jnp.where(nz, 0.0, 1.0))
    q = corr + eps * jnp.eye(n, dtype=dtype)
    dmax = jnp.max(d)
    root_s = jnp.where(dmax > 0, dmax, 1.0)
    r = jnp.where(nz, d / root_s, 1.0)
    log_coef = (p - 1.0) * jnp.log(r)
    expo = 1.0 / (1.0 + p)
    scale = root_s ** (2.0 * expo)  # s^{1/(1+p)}
    h, _, _ = _potential_terms(p, log_coef)

    def phi(y):
        return 0.5 * _dot(y, _mm(q, y)) + jnp.sum(h(y))

    # Start: the best multiple of 1 (c^{1+p} = Σᵢcᵢ / 1ᵀQ1), or the warm start where it is
    # valid and has the lower potential.
    log_start = (jax.nn.logsumexp(log_coef) - jnp.log(jnp.sum(q))) * expo
    start = jnp.full((n,), jnp.exp(log_start), dtype)
    if x0 is not None:
        warm = lax.stop_gradient(jnp.asarray(x0)).astype(dtype) * scale * r
        warm = jnp.where(nz, warm, 1.0)
        usable = jnp.all(jnp.isfinite(warm) & (warm > 0))
        safe = jnp.where(usable, warm, start)
        start = jnp.where(usable & (phi(safe) < phi(start)), safe, start)
    y, _ = _newton_potential(q, log_coef, p, start, max_iter=max_iter)
    alpha = y / (r * scale)
    return jnp.where(nz, alpha, 0.0)


def cagrad_simplex(
    gramian: jax.Array,
    c: float | jax.Array,
    *,
    smoothing: float | None = None,
    tol: float | None = None,
    max_iter: int = IPM_MAX_ITER,
) -> tuple[jax.Array, jax.Array]:
    """CAGrad's dual problem and the weights of its direction.

    With ``b = 1/T``, ``g₀ = Jᵀb`` (the mean gradient) and ``r = c‖g₀‖``, solves
    ``w = argmin_{w ∈ Δ} wᵀGb + r ‖Jᵀw‖`` and returns ``(w, λ)`` with
    ``λ = b + (r/‖Jᵀw‖) w``, so that ``Jᵀλ = g₀ + r Jᵀw/‖Jᵀw‖``: the direction that maximises
    ``minᵢ gᵢ·d`` over the ball ``‖d − g₀‖ ≤ r``.

    ``‖Jᵀw‖`` is smoothed as ``(wᵀGw + δs)^{1/2}`` with ``δ = smoothing`` (default ``1e-12`` in
    float64, ``1e-10`` in float32). The direction then stays in the ball, is continuous, and
    equals ``g₀`` when ``Jᵀw`` vanishes at the optimum; its max-min value is within ``O(r√δ)``
    of the optimum. Solved by the interior point on ``G/s`` (no ridge needed); scale invariant.
    ``c ≥ 0`` may be a traced scalar. When ``r = 0`` (``c = 0`` or ``g₀ = 0``) ``λ = b``; mass
    of ``w`` on zero gradients, which does not change the direction, is left out of ``λ``.
    """
    g, _ = normalize_gramian(gramian)
    n = g.shape[0]
    dtype = g.dtype
    if n == 1:  # d = (1 + c) g
        one = jnp.ones((1,), dtype)
        return one, jnp.where(g[0, 0] > 0, 1.0 + jnp.asarray(c, dtype), 1.0) * one
    tol = default_tol(dtype) if tol is None else float(tol)
    if smoothing is None:
        smoothing = 1e-12 if _is_f64(dtype) else 1e-10
    delta = float(smoothing)
    b = jnp.full((n,), 1.0 / n, dtype)
    a_vec = _mm(g, b)
    r = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(_dot(b, a_vec), 0.0))

    # With r = 0 any w gives λ = b; the interior point then gets a well-posed linear problem.
    a_vec = jnp.where(r > 0, a_vec, jnp.ones_like(a_vec))
    abs_g, abs_a = jnp.abs(g), jnp.abs(a_vec)

    def oracle(w):
        gw = _mm(g, w)
        qn = jnp.sqrt(jnp.maximum(_dot(w, gw), 0.0) + delta)
        grad = a_vec + r * gw / qn
        hess = r * (g / qn - jnp.outer(gw, gw) / qn**3)
        mag = abs_a + r * _mm(abs_g, jnp.abs(w)) / qn
        return grad, hess, mag, _dot(abs_a, w) + r * qn

    x0 = jnp.full((n,), 1.0 / n, dtype)
    w, _, _, _ = _interior_point(oracle, x0, simplex=True, tol=tol, max_iter=max_iter)
    w = jnp.maximum(w, 0.0)
    w = w / jnp.sum(w)
    qn = jnp.sqrt(jnp.maximum(_dot(w, _mm(g, w)), 0.0) + delta)
    return w, b + (r / qn) * jnp.where(jnp.diagonal(g) > 0, w, 0.0)
