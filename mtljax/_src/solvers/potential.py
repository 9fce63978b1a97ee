"""Damped Newton for the potential equations ``(Gα)ᵢ = αᵢ^{-p}`` (Nash-MTL, FairGrad)."""

from __future__ import annotations

import math
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.base import SolverInfo
from mtljax._src.solvers._linalg import (
    _chol_solver,
    _dot,
    _max_step,
    _mm,
    correlation,
    rounding_ridge,
)

NEWTON_MAX_ITER = 100
# The default ridge, in eps of the dtype: the correlation matrix's rounding moves its
# eigenvalues by about T·eps/2; with 4 eps the regularised matrix stays safely positive
# definite, and Newton's steps on an ill-posed problem (whose solution the ridge bounds at
# about ε^{-1/(1+p)}) do not meet an almost singular Hessian.
POTENTIAL_RIDGE = 4.0
# The stopping test: every equation holds to RESIDUAL_TOL_FACTOR·eps relative to the sum of the
# magnitudes of its terms (see :func:`solve_potential`).
RESIDUAL_TOL_FACTOR = 16.0
# Below _FLOOR_FACTOR·eps, _STALLS steps in a row that do not halve the residual end the
# solve (the rounding floor, a few eps, has been reached).
_FLOOR_FACTOR = 64.0
_STALLS = 3
# A solve whose residual meets the test but exceeds _POLISH·tol takes one more Newton step
# (which, converging quadratically, lands at the rounding floor); the better iterate is kept.
_POLISH = 0.125
_ARMIJO = 0.25
# A step shrinks no yᵢ by more than this fraction (the solution's components can be orders of
# magnitude apart; a component pushed close to 0 climbs back slowly).
_BOUNDARY_FRACTION = 0.9
# Step sizes tried at once: t₀·2^k for k = _LINE_SEARCH_UP, ..., 1 − _LINE_SEARCH_DOWN.
_LINE_SEARCH_UP = 6
_LINE_SEARCH_DOWN = 40
# ψ(L) is summed as a power series for |L|·max(1, |1 − p|) below _SERIES_RADIUS.
_SERIES_RADIUS = 0.1
_SERIES_TERMS = 14


def _excess_coefficients(p: float) -> tuple[float, ...]:
    """``a_k = (1 − q^{k−1})/k!`` (``q = 1 − p``, ``k = 2..``): ``ψ(L) = Σ_k a_k L^k``.

    ``1 − q^{k−1} = p(1 + q + … + q^{k−2})``, summed so that no constant loses digits for
    ``p`` near 0.
    """
    q = 1.0 - p
    return tuple(
        p * sum(q**j for j in range(k - 1)) / math.factorial(k) for k in range(2, _SERIES_TERMS + 2)
    )


def _excess(p: float, log1p_u: jax.Array) -> jax.Array:
    """``ψ(L) = [h_p(y e^L) − h_p(y) − h_p'(y)·y(e^L − 1)] / y^{1−p}``, ``L = log(1 + u)``.

    The remainder of ``h_p`` after its tangent at ``y``, for a relative move ``u`` of ``y``:
    ``ψ = expm1(L) − expm1(qL)/q`` (``q = 1 − p``; ``expm1(L) − L`` for ``p = 1``), which is
    ``≥ 0`` and ``≈ pL²/2`` for small ``L``. Both differences cancel for small ``L``, where the
    power series ``Σ_{k≥2} (1 − q^{k−1}) L^k/k!`` is used instead: ``ψ`` has a small relative
    error for every ``L``, so that a potential's decrease near the optimum is not lost in the
    rounding of the potential's value.
    """
    q = 1.0 - p
    radius = _SERIES_RADIUS / max(1.0, abs(q))
    small = jnp.abs(log1p_u) < radius
    x = jnp.where(small, log1p_u, 0.0)
    series = jnp.zeros_like(x)
    for a in reversed(_excess_coefficients(p)):  # Horner, from the highest power
        series = (series + a) * x
    series = series * x
    big = jnp.where(small, radius, log1p_u)
    direct = jnp.expm1(big) - (big if q == 0.0 else jnp.expm1(q * big) / q)
    return jnp.where(small, series, direct)


def _pow_parts(x: jax.Array, e: float) -> tuple[jax.Array, jax.Array]:
    """``(m, n)`` with ``x^e = m·2^n`` (``x > 0``; ``n`` int32, ``m`` within a few powers of 2).

    ``exp(e·log x)`` has a relative error of about ``eps·|e·log x|``: ``10⁻⁶`` in float32 for
    ``x = 10⁻⁸``. Here ``x = x̂·2^k`` (``x̂ ∈ [1/√2, √2)``) and ``e·k`` is split exactly into an
    integer and a fraction (integer arithmetic on ``e ≈ E/2^b``), so that the argument of the
    one exponential stays small: a relative error of a few eps, whatever the scale of ``x``,
    and no overflow or underflow before the parts are combined.
    """
    if e == 0.0:
        return jnp.ones_like(x), jnp.zeros(x.shape, jnp.int32)
    if e == -1.0:
        return 1.0 / x, jnp.zeros(x.shape, jnp.int32)
    mant, k = jnp.frexp(x)
    low = mant < math.sqrt(0.5)
    mant = jnp.where(low, 2.0 * mant, mant)
    k = k.astype(jnp.int32) - low.astype(jnp.int32)
    bits = max(0, 19 - math.ceil(math.log2(max(abs(e), 1.0))))  # |k·E| < 2^31
    split = 2**bits
    big = round(e * split)
    rest = e - big / split
    prod = k * big
    n = jnp.floor_divide(prod, split)
    frac = (prod - n * split).astype(x.dtype) / split
    m = jnp.exp(e * jnp.log(mant) + math.log(2.0) * (frac + rest * k.astype(x.dtype)))
    return m, n


def _times_pow(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``m_a m_b 2^{n_a + n_b}`` for two :func:`_pow_parts`."""
    return jnp.ldexp(a[0] * b[0], a[1] + b[1])


class _Terms:
    """The pieces of ``Φ(y) = ½yᵀQy + Σᵢ cᵢ h_p(yᵢ)`` at one point ``y > 0``; ``coef`` is ``c``
    as :func:`_pow_parts`."""

    def __init__(self, q: jax.Array, coef: tuple[jax.Array, jax.Array], p: float, y: jax.Array):
        self.y = y
        self.qy = _mm(q, y)
        self.pull = _times_pow(coef, _pow_parts(y, -p))  # cᵢ yᵢ^{-p} = −cᵢ h_p'(yᵢ)
        self.grad = self.qy - self.pull
        self.curvature = p * self.pull / y  # cᵢ h_p''(yᵢ)
        self.weight = self.pull * y  # cᵢ yᵢ^{1−p}: the scale of ψ's term
        # The sum of the magnitudes of the terms of each equation (Qy)ᵢ = cᵢyᵢ^{-p}.
        self.magnitude = _mm(jnp.abs(q), y) + self.pull

    def residual(self) -> jax.Array:
        """``maxᵢ |(Qy)ᵢ − cᵢyᵢ^{-p}| / ((|Q|y)ᵢ + cᵢyᵢ^{-p})``."""
        return jnp.max(jnp.abs(self.grad) / self.magnitude)

    def decrease(self, q: jax.Array, p: float, step: jax.Array, ts: jax.Array) -> jax.Array:
        """``Φ(y + tΔ) − Φ(y)`` for every ``t`` in ``ts`` (``+inf`` where ``y + tΔ ≯ 0``).

        Expanded without cancellation: ``t∇Φ·Δ + ½t²ΔᵀQΔ + Σᵢ cᵢyᵢ^{1−p} ψ(log(1 + tΔᵢ/yᵢ))``,
        every term of which is small when the step is: its rounding error is relative to the
        decrease, not to ``|Φ|``.
        """
        slope = _dot(self.grad, step)
        quad = _dot(step, _mm(q, step))
        u = ts[:, None] * (step / self.y)
        valid = jnp.all(u > -1.0, axis=1)
        log1p_u = jnp.log1p(jnp.where(valid[:, None], u, 0.0))
        rest = jnp.sum(self.weight * _excess(p, log1p_u), axis=1)
        value = ts * slope + 0.5 * ts * ts * quad + rest
        return jnp.where(valid & jnp.isfinite(value), value, jnp.inf)


def _newton_step(q: jax.Array, terms: _Terms) -> jax.Array:
    """``Δ = −(Q + diag(c h_p''(y)))⁻¹ ∇Φ``, the Hessian equilibrated to a unit diagonal (its
    diagonal spans the orders of magnitude of the ``yᵢ``)."""
    hess = q + jnp.diag(terms.curvature)
    s = lax.rsqrt(jnp.diagonal(hess))
    return -s * _chol_solver(hess * s[:, None] * s[None, :])(s * terms.grad)


def _newton_potential(q, coef, p: float, y0, *, max_iter: int, tol: float):
    """Minimises ``Φ(y) = ½yᵀQy + Σᵢ cᵢ h_p(yᵢ)`` on ``y > 0`` (Q positive definite, c > 0).

    Its stationarity conditions are ``(Qy)ᵢ = cᵢ yᵢ^{-p}``. Damped Newton. Step size: the full
    step when it moves every ``yᵢ`` by at most ``1/(2(1+p))`` of itself (then it satisfies
    the Armijo condition below in exact arithmetic, and converges quadratically); otherwise,
    among ``t = t₀2^k`` (``t₀ = min(1, t_max)``, ``k = _LINE_SEARCH_UP, …,
    1 − _LINE_SEARCH_DOWN``, all evaluated at once; ``t ≤ t_max``, the step that shrinks some
    ``yᵢ`` by the fraction ``_BOUNDARY_FRACTION``) those with the Armijo decrease
    ``Φ(y + tΔ) − Φ(y) ≤ t∇Φ·Δ/4``, computed without cancellation
    (:meth:`_Terms.decrease`), are candidates and the one with the lowest potential is taken
    (steps longer than the Newton step help where the solution is far, e.g. large on nearly
    ill-posed inputs).

    Stops when the relative residual :meth:`_Terms.residual` is at most ``tol`` (after one
    more step if it is above ``_POLISH·tol``: the converged result is at the rounding floor,
    not merely under ``tol``); or, not converged unless that test holds, when no step makes
    progress (``∇Φ·Δ ≥ 0`` or no step size decreases ``Φ``, the step moves no ``yᵢ`` by more
    than rounding, or, below ``_FLOOR_FACTOR·eps``, ``_STALLS`` steps in a row do not halve
    the best residual), or after ``max_iter`` iterations. An iteration evaluates the stopping
    test and then steps unless the solve ends: a solve counts at least one, also when its start
    already meets the test. Returns the best iterate seen, by residual:
    ``(y, iterations, converged, residual)``.
    """
    dtype = q.dtype
    eps = float(jnp.finfo(dtype).eps)
    floor_level = _FLOOR_FACTOR * eps
    # |Δᵢ/yᵢ| ≤ 1/(2(1+p)): h_p's cubic Taylor term is then at most 1/6 of its quadratic one,
    # so the full Newton step decreases Φ by at least λ²/2 − λ²/12 > λ²/4 (λ² = −∇Φ·Δ).
    full_step = 1.0 / (2.0 * (1.0 + p))
    ks = jnp.arange(_LINE_SEARCH_UP, -_LINE_SEARCH_DOWN, -1)
    powers = jnp.exp2(ks.astype(dtype))

    def body(state):
        y, it, _, y_best, best, stalls, polished = state
        terms = _Terms(q, coef, p, y)
        residual = terms.residual()
        # Met: one more step (a polish) unless the residual is already well below tol.
        met = (residual <= tol) & (polished | (residual <= _POLISH * tol))
        polish = (residual <= tol) & ~met
        step = _newton_step(q, terms)

        def search(_):
            slope = _dot(terms.grad, step)
            t_max = _BOUNDARY_FRACTION * _max_step(y, step)
            ts = jnp.minimum(1.0, t_max) * powers
            change = terms.decrease(q, p, step, ts)
            armijo = (ts <= t_max) & (change <= _ARMIJO * ts * slope)
            pick = jnp.argmin(jnp.where(armijo, change, jnp.inf))
            found = jnp.any(armijo) & (slope < 0)
            return jnp.where(found, ts[pick], 0.0), found

        # A full step that moves every yᵢ by a small fraction satisfies Armijo in exact
        # arithmetic (see below); it is taken without the test, whose terms can be lost in
        # rounding near the solution of a nearly ill-posed problem.
        full = jnp.max(jnp.abs(step) / y) <= full_step
        t, searched = lax.cond(full, lambda _: (jnp.ones((), dtype), full), search, None)
        y_new = y + t * step
        ok = jnp.all((y_new > 0) & jnp.isfinite(y_new))
        moved = jnp.any(jnp.abs(t * step) > eps * y)
        # Near the solution Newton steps decrease the residual: when _STALLS steps in a row do
        # not halve the best one, the rounding floor has been reached.
        stalled = (residual <= floor_level) & (residual > 0.5 * best)
        stalls = jnp.where(stalled, stalls + 1, 0)
        floor = stalls >= _STALLS
        stuck = ~(full | searched) | ~ok | ~moved | floor
        y_next = jnp.where(met | floor | ~ok, y, y_new)
        steps = it + 1  # an iteration tests the residual, then steps unless it stops
        improved = residual < best
        y_best = jnp.where(improved, y, y_best)
        best = jnp.where(improved, residual, best)
        return y_next, steps, met | stuck, y_best, best, stalls, polished | polish

    def cond(state):
        return (state[1] < max_iter) & ~state[2]

    int0 = jnp.zeros((), jnp.int32)
    false = jnp.zeros((), bool)
    init = (y0, int0, false, y0, jnp.asarray(jnp.inf, dtype), int0, false)
    y, iters, _, y_best, best, _, _ = lax.while_loop(cond, body, init)
    # The last iterate, or the best one seen if that is better (at the rounding floor).
    residual = _Terms(q, coef, p, y).residual()
    better = best < residual
    y = jnp.where(better, y_best, y)
    residual = jnp.where(better, best, residual)
    return y, iters, residual <= tol, residual


@overload
def solve_potential(
    gramian: jax.Array,
    p: float = ...,
    x0: jax.Array | None = ...,
    *,
    ridge: float | None = ...,
    max_iter: int = ...,
    tol: float | None = ...,
    return_info: Literal[False] = ...,
) -> jax.Array: ...


@overload
def solve_potential(
    gramian: jax.Array,
    p: float = ...,
    x0: jax.Array | None = ...,
    *,
    ridge: float | None = ...,
    max_iter: int = ...,
    tol: float | None = ...,
    return_info: Literal[True],
) -> tuple[jax.Array, SolverInfo]: ...


def solve_potential(
    gramian: jax.Array,
    p: float = 1.0,
    x0: jax.Array | None = None,
    *,
    ridge: float | None = None,
    max_iter: int = NEWTON_MAX_ITER,
    tol: float | None = None,
    return_info: bool = False,
) -> jax.Array | tuple[jax.Array, SolverInfo]:
    """The ``α > 0`` with ``(Gα)ᵢ = αᵢ^{-p}`` for every task ``i`` (``p > 0``).

    These are the stationarity conditions of the strictly convex potential
    ``Φ(α) = ½αᵀGα + Σᵢ h_p(αᵢ)`` on ``α > 0``, with ``h_1 = −log`` and
    ``h_p(a) = −a^{1−p}/(1−p)`` otherwise (``h_p' = −a^{-p}``, ``h_p'' > 0``). The problem is
    solved in the variables ``yᵢ = rᵢ s^{1/(1+p)} αᵢ`` (``rᵢ = ‖gᵢ‖/√s``) where it reads
    ``((C + εI)y)ᵢ = cᵢ yᵢ^{-p}``, ``cᵢ = rᵢ^{p−1}``, with ``C`` the :func:`correlation`
    matrix: unit diagonal, whatever the gradients' scales. The ridge ``ε`` is
    relative (as in :func:`regularize`), by default at the rounding level of ``C``
    (:data:`POTENTIAL_RIDGE` eps, :func:`rounding_ridge`), so that it moves the solution of a
    nearly ill-posed problem about as much as rounding the Gramian does; for ``p = 1`` the
    solution is exactly invariant to the scale of each gradient (``gᵢ → kgᵢ`` gives
    ``αᵢ → αᵢ/k``).

    A solution of the unregularised equations exists iff no convex combination of the
    gradients vanishes (it does not for two opposite gradients, say). The ridge always gives
    one: the tasks in such a combination get large but bounded weights (about ``ε^{-1/(1+p)}``
    times a well-posed weight). A task whose gradient is exactly zero plays no part and gets
    ``αᵢ = 0``.

    Algorithm: damped Newton on ``Φ`` (one residual test and ``T×T`` Cholesky factorisation
    per iteration, at most ``max_iter``; typically 3 to 15, up to about 25 on nearly
    ill-posed inputs in float64; the iteration that meets the test counts too), started from
    the best multiple of the solution for orthogonal gradients
    (``yᵢ ∝ cᵢ^{1/(1+p)}``, which spans the orders of magnitude of the ``cᵢ``), or from the
    warm start ``x0`` where that has the lower potential. The line search compares potentials
    through their difference expanded without cancellation, so it keeps working down to
    rounding level, whatever the scale of ``Φ``. The powers ``rᵢ^{p−1}`` and ``yᵢ^{-p}`` are
    computed to a few eps however far from 1 their arguments are (``exp(p·log y)`` would lose
    ``|p·log y|`` eps), so that graded problems are solved to the accuracy of their inputs.

    Stopping test and residual: the relative residual of the (regularised) equations,

        ``ρ = maxᵢ |αᵢ^p (G_ε α)ᵢ − 1| / (1 + αᵢ^p (|G_ε| α)ᵢ)``,  ``G_ε = G + ε·diag(G)``,

    each equation measured against the sum of the magnitudes of its terms (so that tasks of
    very different gradient norms, or weights that cancel in ``G_εα``, are judged at their own
    scale; computed in the solver's variables, where it is the same ratio). Converged means
    ``ρ ≤ tol`` (default :data:`RESIDUAL_TOL_FACTOR`·eps of the dtype: ``≈ 1.9·10⁻⁶`` in
    float32, ``3.6·10⁻¹⁵`` in float64); a solve that meets it above ``tol/8`` takes one more
    step, so converged solves end at the rounding floor (about one eps). The solve also ends,
    not converged, when no step makes progress (at the rounding floor of a problem whose
    residual cannot reach ``tol``) or after ``max_iter`` iterations.

    Args:
      gramian: ``G`` (T×T).
      p: the exponent (Nash-MTL: 1; FairGrad with fairness ``α``: ``1/α``); a Python float.
      x0: a warm start for ``α``, at the original scale; ignored unless finite and positive.
      ridge: the relative ridge ``ε``.
      max_iter: the most Newton iterations.
      tol: the residual ``ρ`` to reach (default above).
      return_info: also return the solve's :class:`~mtljax.SolverInfo` (``residual`` is
        ``ρ``; one task is solved in closed form: 0 iterations, residual 0).

    Returns:
      ``α`` (zero for zero gradients), or ``(α, info)`` with ``return_info=True``.
    """
    p = float(p)
    if not p > 0:
        raise ValueError(f"solve_potential: p must be > 0, got {p}")
    corr, d = correlation(gramian)
    dtype = corr.dtype
    n = corr.shape[0]
    nz = d > 0
    if n == 1:  # α^{1+p} = 1/G
        alpha = jnp.where(nz, jnp.where(nz, d, 1.0) ** (-2.0 / (1.0 + p)), 0.0)
        info = SolverInfo.of(0, True, 0.0)
        return (alpha, info) if return_info else alpha
    eps = rounding_ridge(dtype, POTENTIAL_RIDGE) if ridge is None else float(ridge)
    tol = RESIDUAL_TOL_FACTOR * float(jnp.finfo(dtype).eps) if tol is None else float(tol)
    # Zero gradients are decoupled (a unit private gradient) and get weight 0 at the end.
    corr = corr + jnp.diag(jnp.where(nz, 0.0, 1.0))
    q = corr + eps * jnp.eye(n, dtype=dtype)
    dmax = jnp.max(d)
    root_s = jnp.where(dmax > 0, dmax, 1.0)
    r = jnp.where(nz, d / root_s, 1.0)
    coef = _pow_parts(r, p - 1.0)  # c = r^{p−1}, accurate whatever the spread of the norms
    log_coef = (p - 1.0) * jnp.log(r)
    expo = 1.0 / (1.0 + p)

    # Start: the best multiple κv of v = c^{1/(1+p)}, the shape of the solution for orthogonal
    # gradients: κ^{1+p} = ‖v‖²/vᵀQv (exact for orthogonal gradients).
    v = jnp.exp((log_coef - jnp.max(log_coef)) * expo)
    log_kappa = (jnp.log(_dot(v, v)) - jnp.log(_dot(v, _mm(q, v)))) * expo
    start = jnp.exp(log_coef * expo + log_kappa)
    scale = _pow_parts(root_s, 2.0 * expo)  # s^{1/(1+p)}
    if x0 is not None:
        warm = lax.stop_gradient(jnp.asarray(x0)).astype(dtype) * r
        warm = jnp.where(nz, _times_pow((warm, jnp.zeros_like(scale[1])), scale), start)
        usable = jnp.all(jnp.isfinite(warm) & (warm > 0))
        safe = jnp.where(usable, warm, start)
        # Φ(warm) < Φ(start), compared through the difference (no cancellation).
        lower = _Terms(q, coef, p, start).decrease(q, p, safe - start, jnp.ones((1,), dtype))
        start = jnp.where(usable & (lower[0] < 0), safe, start)
    y, iters, converged, residual = _newton_potential(q, coef, p, start, max_iter=max_iter, tol=tol)
    inv_scale = (1.0 / scale[0], -scale[1])
    alpha = jnp.where(nz, _times_pow((y / r, jnp.zeros_like(scale[1])), inv_scale), 0.0)
    if return_info:
        return alpha, SolverInfo.of(iters, converged, residual)
    return alpha
