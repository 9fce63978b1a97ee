"""A primal-dual interior point (Mehrotra predictor-corrector) for ``min f(x)`` over the orthant
or the simplex, and the quadratic programs solved with it (then polished on the active set)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.base import SolverInfo
from mtljax._src.solvers._linalg import (
    _BOUNDARY_FRACTION,
    _chol_solver,
    _dot,
    _max_step,
    _mm,
    default_tol,
)

IPM_MAX_ITER = 60
# The shift (in multiples of ε_dtype) of a free block's retried factorisation in
# :func:`_refine_active_set`: 10× below certify_tol's 10³.
_SINGULAR_SHIFT = 100.0


def certify_tol(dtype) -> float:
    """``k = 10³ ε_dtype``: the relative tolerance of the exact-solution checks
    (:func:`_kkt_certified`) and the residual of a converged solve (:func:`qp_residual`)."""
    return 1e3 * float(jnp.finfo(dtype).eps)


Oracle = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


def _wsum(v: jax.Array, weight: jax.Array | None) -> jax.Array:
    """``aᵀv``: the left side of the simplex constraint ``aᵀx = 1`` (``a = 1`` when ``None``)."""
    return jnp.sum(v) if weight is None else _dot(weight, v)


def _wmul(v: jax.Array | float, weight: jax.Array | None) -> jax.Array | float:
    """``v·a`` (``v`` when ``a = 1``, given as ``None``)."""
    return v if weight is None else v * weight


def _interior_point(
    oracle: Oracle,
    x0: jax.Array,
    *,
    simplex: bool,
    tol: float,
    max_iter: int = IPM_MAX_ITER,
    return_converged: bool = False,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Mehrotra predictor-corrector for a smooth convex ``f`` over the orthant or the simplex.

    ``oracle(x) -> (∇f(x), ∇²f(x), m, S)`` with ``m ≥ 0`` the magnitudes of the terms that
    make up ``∇f`` (its rounding scale, per coordinate) and ``S ≥ 0`` the size of the
    objective. KKT conditions: ``∇f(x) − z − νa = 0``, ``x ∘ z = 0``, ``x, z ≥ 0`` (``ν = 0``
    without the simplex constraint). The simplex is ``{x ≥ 0, aᵀx = 1}`` with ``a = weight``
    (positive; all ones when ``None``). Stops when the gap is relatively small, ``xᵀz ≤ tol·S``,
    and the residuals are at rounding level relative to ``m`` (so graded problems, with
    gradients of very different scales, are solved to relative accuracy), when a step would
    leave the interior (rounding), or after ``max_iter`` iterations.
    Returns ``(x, z, ν, iterations)``, and with ``return_converged`` also whether the stopping
    test (gap and residuals) was met: ``(x, z, ν, iterations, converged)``.
    """
    n = x0.shape[0]
    dtype = x0.dtype
    res_tol = max(tol, 100.0 * float(jnp.finfo(dtype).eps))
    floor = 1e3 * float(jnp.finfo(dtype).tiny)

    def body(state):
        x, z, nu, it, _, _ = state
        grad, hess, mag, size = oracle(x)
        r_d = grad - z - _wmul(nu, weight)
        r_p = _wsum(x, weight) - 1.0 if simplex else 0.0
        mu = _dot(x, z) / n
        done = jnp.all(jnp.abs(r_d) <= res_tol * (mag + z + _wmul(jnp.abs(nu), weight)))
        done = done & (n * mu <= tol * size + floor)
        if simplex:
            done = done & (jnp.abs(r_p) <= res_tol)
        solve = _chol_solver(hess + jnp.diag(z / x))

        def direction(r_c, pre):
            # (H + Z/X) dx − a dν = −r_d + r_c/x,  aᵀdx = −r_p,  dz = (r_c − z dx)/x.
            rhs = r_c / x - r_d
            if simplex:
                a = solve(rhs)
                dnu = (-r_p - _wsum(a, weight)) / _wsum(pre, weight)
                dx = a + pre * dnu
            else:
                dnu, dx = 0.0, solve(rhs)
            return dx, (r_c - z * dx) / x, dnu

        ones_inv = solve(_wmul(jnp.ones((n,), dtype), weight)) if simplex else None
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
            done,
        )

    def cond(state):
        return (state[3] < max_iter) & ~state[4]

    grad0 = oracle(x0)[0]
    if simplex:
        nu0 = jnp.min(grad0) - 1.0
        if weight is None:
            z0 = grad0 - nu0
        else:
            # With small aᵢ no moderate ν makes the dual residual 0: an infeasible start.
            z0 = jnp.maximum(grad0 - nu0 * weight, 1.0)
    else:
        nu0 = jnp.zeros((), dtype)
        z0 = jnp.maximum(grad0, 0.0) + 1.0
    false = jnp.zeros((), bool)
    init = (x0, z0, nu0, jnp.zeros((), jnp.int32), false, false)
    x, z, nu, iters, _, converged = lax.while_loop(cond, body, init)
    if return_converged:
        return x, z, nu, iters, converged
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


def _solve_on_active_set(
    q: jax.Array,
    c: jax.Array,
    free: jax.Array,
    *,
    simplex: bool,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Solves the KKT system of ``min ½xᵀQx + cᵀx`` with the coordinates ``F = free`` free.

    ``x_F = Q_FF⁻¹(νa_F − c_F)``, ``x_A = 0`` (``ν`` fixed by ``aᵀx = 1`` on the simplex, else
    0; ``a = weight``, all ones when ``None``),
    by one Cholesky factorisation (backward stable). Returns ``(x, ok)``: ``ok`` when ``x`` is
    primal and dual feasible and stationary to rounding, relative to the magnitudes of the
    terms (``x ≥ −k‖x‖∞``, ``(∇f − νa)_A ≥ −k m_A``, ``|∇f − νa|_F ≤ k m_F`` with
    ``m = |Q||x| + |c| + |ν|a`` and ``k = 10³ ε_dtype``): ``x`` is then the exact solution.
    """
    dtype = c.dtype
    ff = free[:, None] & free[None, :]
    # A relative shift of the free block by the dtype's ε keeps the factorisation defined when
    # Q_FF is singular; the checks below judge the result.
    shift = jnp.finfo(dtype).eps * jnp.maximum(jnp.max(jnp.diagonal(q)), 1.0)
    m = jnp.where(ff, q, 0.0) + jnp.diag(jnp.where(free, shift, 1.0))
    solve = _chol_solver(m)
    ind = jnp.where(free, 1.0, 0.0)
    if simplex:
        both = solve(jnp.stack([-c * ind, _wmul(ind, weight)], axis=1))
        a, e = both[:, 0], both[:, 1]
        nu = (1.0 - _wsum(a * ind, weight)) / _wsum(e * ind, weight)
        xp = (a + nu * e) * ind
    else:
        nu = 0.0
        xp = solve(-c * ind) * ind
    ok = _kkt_certified(q, c, xp, free, nu, simplex=simplex, weight=weight)
    return jnp.maximum(xp, 0.0), ok


def _kkt_certified(
    q: jax.Array,
    c: jax.Array,
    x: jax.Array,
    free: jax.Array,
    nu: jax.Array | float = 0.0,
    *,
    simplex: bool,
    weight: jax.Array | None = None,
) -> jax.Array:
    """Whether ``x`` (zero off ``free``) solves ``min ½xᵀQx + cᵀx`` exactly to rounding.

    With ``g = Qx + c − νa``, ``m = |Q||x| + |c| + |ν|a`` (``a = weight``, all ones when
    ``None``) and ``k = 10³ ε_dtype``: ``x ≥ −k‖x‖∞``, ``g_A ≥ −k m_A`` off ``free``,
    ``|g_F| ≤ k m_F`` on it, everything finite (and ``|aᵀx − 1| ≤ k`` on the simplex).
    """
    grad = _mm(q, x) + c - _wmul(nu, weight)
    k = certify_tol(c.dtype)
    mag = _mm(jnp.abs(q), jnp.abs(x)) + jnp.abs(c) + _wmul(jnp.abs(nu), weight)
    ok = jnp.all(x >= -k * jnp.max(jnp.abs(x))) & jnp.all(jnp.where(free, 0.0, grad) >= -k * mag)
    ok = ok & jnp.all(jnp.where(free, jnp.abs(grad), 0.0) <= k * mag)
    ok = ok & jnp.all(jnp.isfinite(x * grad))
    if simplex:
        ok = ok & (jnp.abs(_wsum(x, weight) - 1.0) <= k)
    return ok


def _polish_qp(
    q: jax.Array,
    c: jax.Array,
    x: jax.Array,
    z: jax.Array,
    *,
    simplex: bool,
    return_ok: bool = False,
    weight: jax.Array | None = None,
):
    """Polishes an approximate solution ``(x, z)`` of ``min ½xᵀQx + cᵀx`` on its active set.

    :func:`_solve_on_active_set` with ``F`` the coordinates where ``x > z``; the result replaces
    ``x`` when it passes that function's checks (it is then the exact solution). With
    ``return_ok`` returns ``(x, ok)``.
    """
    xp, ok = _solve_on_active_set(q, c, x > z, simplex=simplex, weight=weight)
    out = jnp.where(ok, xp, x)
    return (out, ok) if return_ok else out


def _scaled_active_set_solve(
    q: jax.Array,
    c: jax.Array,
    free: jax.Array,
    *,
    simplex: bool,
    weight: jax.Array | None = None,
    shift: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The KKT system of :func:`_solve_on_active_set` solved on the free block scaled to unit
    diagonal (``Q_FF = D M D``, ``D = diag(√Qᵢᵢ)``): one Cholesky factorisation of
    ``M + shift·ε_dtype·I``, so that graded blocks (gradients of very different norms) keep
    their relative accuracy, plus one step of iterative refinement. Returns ``(x, ν, ok)`` with
    ``x`` unclipped and ``ok`` from :func:`_kkt_certified`."""
    dtype = c.dtype
    ind = jnp.where(free, 1.0, 0.0).astype(dtype)
    diag = jnp.diagonal(q)
    d = jnp.where(free & (diag > 0), jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    m = q / (d[:, None] * d[None, :])
    ff = free[:, None] & free[None, :]
    m = jnp.where(ff, m, 0.0) + jnp.diag(jnp.where(free, shift * jnp.finfo(dtype).eps, 1.0))
    solve = _chol_solver(m)
    inv_d = ind / d

    def kkt(rhs, total):
        # Q_FF x − νa_F = rhs_F, aᵀx = total (simplex), else ν = 0.
        if simplex:
            both = solve(jnp.stack([rhs * inv_d, _wmul(inv_d, weight)], axis=1))
            a, e = both[:, 0] * inv_d, both[:, 1] * inv_d
            nu = (total - _wsum(a, weight)) / _wsum(e, weight)
            return a + nu * e, nu
        return solve(rhs * inv_d) * inv_d, jnp.zeros((), dtype)

    x, nu = kkt(-c, 1.0)
    dx, dnu = kkt(-(_mm(q, x) + c - _wmul(nu, weight)), 1.0 - _wsum(x, weight))
    x, nu = x + dx, nu + dnu
    ok = _kkt_certified(q, c, x, free, nu, simplex=simplex, weight=weight)
    return x, nu, ok


def _refine_active_set(
    q: jax.Array,
    c: jax.Array,
    free: jax.Array,
    *,
    simplex: bool,
    correct: jax.Array | bool = True,
    steps: int = 3,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`_scaled_active_set_solve` on ``free``, then (where ``correct``) up to ``steps``
    corrections of the set while the result is not certified (each solve retried at a larger
    shift when the free block fails to factorise or certify): coordinates that come out
    negative leave it, inactive ones whose reduced gradient is negative join it (steps of a
    primal-dual active-set method, for a set guessed from a nearby, regularised problem).
    Returns ``(x, ok)``, ``x`` clipped at 0."""
    k = certify_tol(c.dtype)

    def body(i, carry):
        free, x, ok = carry
        xp, nu, okp = _scaled_active_set_solve(q, c, free, simplex=simplex, weight=weight)
        # A singular free block (more free gradients than their rank, as when the min-norm
        # point is 0) can fail to factorise at a shift of ε: retried at _SINGULAR_SHIFT·ε,
        # which moves the solution by a relative ~_SINGULAR_SHIFT·ε, below certify_tol.
        xs, nus, oks = _scaled_active_set_solve(
            q, c, free, simplex=simplex, weight=weight, shift=_SINGULAR_SHIFT
        )
        xp, nu, okp = (jnp.where(okp, u, v) for u, v in ((xp, xs), (nu, nus), (okp, oks)))
        grad = _mm(q, xp) + c - _wmul(nu, weight)
        mag = _mm(jnp.abs(q), jnp.abs(xp)) + jnp.abs(c) + _wmul(jnp.abs(nu), weight)
        new_free = (free & (xp > 0)) | (~free & (grad < -k * mag))
        take = ~ok & ((i == 0) | correct)
        return (
            jnp.where(take, new_free, free),
            jnp.where(take, xp, x),
            ok | (take & okp),
        )

    x0 = jnp.zeros_like(c)
    _, x, ok = lax.fori_loop(0, steps + 1, body, (free, x0, jnp.zeros((), bool)))
    return jnp.maximum(x, 0.0), ok


def qp_residual(
    q: jax.Array,
    c: jax.Array,
    x: jax.Array,
    *,
    simplex: bool,
    weight: jax.Array | None = None,
) -> jax.Array:
    """The KKT residual of ``x`` for ``min ½xᵀQx + cᵀx`` over ``x ≥ 0`` (and ``aᵀx = 1``,
    ``a = weight``, all ones when ``None``).

    With ``g = Qx + c − νa`` (``ν = xᵀ(Qx + c)`` on the simplex, the multiplier of ``aᵀx = 1``
    that makes ``xᵀg = 0``; else ``ν = 0``) and ``m = |Q||x| + |c| + |ν|a`` the magnitudes of
    the terms of ``g``, the residual is

        ``maxᵢ |min(xᵢ/‖x‖∞, gᵢ/mᵢ)|``

    (a ratio ``0/0`` counts as 0): the natural residual of the complementarity conditions
    ``x ≥ 0``, ``g ≥ 0``, ``xᵢgᵢ = 0``, each side relative to its own scale. It is 0 at the
    exact solution, of the order of the rounding error of ``g`` (``ε_dtype`` times a small
    factor) at a solution exact to rounding, and of order 1 at a point far from optimal.
    ``x`` is taken as given (non-negative, on the simplex when ``simplex``).
    """
    grad = _mm(q, x) + c
    nu = _dot(x, grad) if simplex else jnp.zeros((), x.dtype)
    g = grad - _wmul(nu, weight)
    mag = _mm(jnp.abs(q), jnp.abs(x)) + jnp.abs(c) + _wmul(jnp.abs(nu), weight)
    xmax = jnp.max(jnp.abs(x))
    rel_x = jnp.where(xmax > 0, x / jnp.where(xmax > 0, xmax, 1.0), 0.0)
    rel_g = jnp.where(mag > 0, g / jnp.where(mag > 0, mag, 1.0), 0.0)
    res = jnp.max(jnp.abs(jnp.minimum(rel_x, rel_g)))
    return jnp.where(jnp.isfinite(res), res, jnp.inf)


def _qp(
    q,
    c,
    *,
    simplex: bool,
    tol: float | None,
    max_iter: int,
    const=0.0,
    return_info: bool = False,
    exact_q=None,
    weight=None,
):
    """``min ½xᵀQx + cᵀx`` over ``x ≥ 0`` (and ``aᵀx = 1``): interior point, then polish.

    ``weight``: the positive ``a`` of the simplex constraint (all ones when ``None``); the
    interior point starts from ``x = 1/Σaᵢ``.

    Returns ``(x, iterations)``, or with ``return_info`` ``(x, SolverInfo)``: converged when the
    interior point met its stopping test, the polish certified the exact solution, or the
    returned ``x`` satisfies the KKT conditions to rounding (:func:`qp_residual` at most
    :func:`certify_tol`); the residual is :func:`qp_residual` of the returned ``x``.

    ``exact_q``: when given (``q`` being a regularised ``exact_q``), the problem to solve is
    ``min ½xᵀ(exact_q)x + cᵀx``: the active set found on ``q`` is solved on it and refined
    (:func:`_refine_active_set`), the candidate (that one, or the solution on ``q``) with the
    smaller :func:`qp_residual` for ``exact_q`` is returned, and the solve counts as converged
    only when that residual is at most :func:`certify_tol` (the interior point's stopping
    test on ``q`` does not bound it: the ridge moves the solution).
    """
    n = q.shape[0]
    dtype = q.dtype
    tol = default_tol(dtype) if tol is None else float(tol)
    if weight is None:
        x0 = jnp.full((n,), 1.0 / n if simplex else 1.0, dtype)
    else:
        x0 = jnp.full((n,), 1.0, dtype) / jnp.sum(weight)
    oracle = _qp_oracle(q, c, const)
    x, z, _, iters, done = _interior_point(
        oracle,
        x0,
        simplex=simplex,
        tol=tol,
        max_iter=max_iter,
        return_converged=True,
        weight=weight,
    )
    x, polished = _polish_qp(q, c, x, z, simplex=simplex, return_ok=True, weight=weight)
    if exact_q is not None:
        # The active set found on the regularised ``q``, solved on the unregularised problem
        # (no ridge bias); of the two candidates the one with the smaller residual for the
        # unregularised problem is kept, and only that residual decides convergence.
        xe, exact = _refine_active_set(
            exact_q, c, x > z, simplex=simplex, correct=done, weight=weight
        )
        cands = jnp.stack([xe, x])
        if simplex:
            cands = jnp.maximum(cands, 0.0)
            total = jnp.sum(cands, axis=1) if weight is None else _mm(cands, weight)
            cands = cands / total[:, None]
        res = jax.vmap(lambda v: qp_residual(exact_q, c, v, simplex=simplex, weight=weight))(cands)
        res = res.at[0].set(jnp.where(exact, res[0], jnp.inf))
        pick = jnp.argmin(res)
        x = cands[pick]
        residual = res[pick]
        if not return_info:
            return x, iters
        converged = residual <= certify_tol(dtype)
        return x, SolverInfo(iters, converged, residual.astype(jnp.float32))
    if simplex:
        x = jnp.maximum(x, 0.0)
        x = x / _wsum(x, weight)
    if not return_info:
        return x, iters
    residual = qp_residual(q, c, jnp.maximum(x, 0.0), simplex=simplex, weight=weight)
    converged = done | polished | (residual <= certify_tol(dtype))
    return x, SolverInfo(iters, converged, residual.astype(jnp.float32))
