"""Damped Newton for the potential equations ``(Gα)ᵢ = αᵢ^{-p}`` (Nash-MTL, FairGrad)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.solvers._linalg import (
    _BOUNDARY_FRACTION,
    _chol_solver,
    _dot,
    _max_step,
    _mm,
    correlation,
    default_ridge,
)

NEWTON_MAX_ITER = 100
_LINE_SEARCH_MAX = 40


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
