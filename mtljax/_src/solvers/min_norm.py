"""MGDA's min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import SolverInfo
from mtljax._src.solvers._linalg import correlation, regularize
from mtljax._src.solvers.interior_point import IPM_MAX_ITER, _qp


def min_norm_simplex(
    gramian: jax.Array,
    *,
    ridge: float | None = None,
    tol: float | None = None,
    max_iter: int = IPM_MAX_ITER,
    return_info: bool = False,
) -> jax.Array | tuple[jax.Array, SolverInfo]:
    """MGDA's min-norm point: ``α = argmin_{α ≥ 0, Σα = 1} αᵀGα``.

    ``Jᵀα`` is the point of smallest norm in the convex hull of the rows of ``J``. With
    ``nᵢ = ‖gᵢ‖ = √Gᵢᵢ``, the unit gradients' Gramian ``K = D⁻¹GD⁻¹`` (``D = diag(n)``,
    :func:`~mtljax._src.solvers._linalg.correlation`), ``n₀ = minᵢ nᵢ`` and
    ``βᵢ = αᵢnᵢ/n₀``, the problem is

        ``min_β βᵀKβ``  over  ``{β ≥ 0, Σᵢ aᵢβᵢ = 1}``,  ``aᵢ = n₀/nᵢ ∈ (0, 1]``

    (``αᵀGα = n₀²βᵀKβ``), then ``αᵢ = aᵢβᵢ``. ``K`` has a unit diagonal and the solution
    ``β`` is of order 1 (``β = e_{argmin n}`` is feasible with ``βᵀKβ = 1``), so that the
    problem stays well scaled when the gradients' norms differ by many orders of magnitude
    (no ``Gᵢᵢ/max G`` underflows); scale invariant. Solved on :func:`regularize` ``(K)`` by the
    interior point with the weighted simplex constraint, its active set then solved on ``K``
    itself. If some gradients are zero (``Gᵢᵢ ≤ 0``), the min-norm point is 0 and ``α`` is
    uniform over them. Returns ``α`` (on the simplex), and with ``return_info``
    ``(α, SolverInfo)``.

    The :class:`~mtljax._src.base.SolverInfo` of the solve (interior point, at most
    ``max_iter`` iterations, then the active-set polish): ``converged`` when the residual is
    at most ``10³ ε_dtype`` (the KKT conditions hold to rounding); ``residual`` is
    :func:`~mtljax._src.solvers.interior_point.qp_residual` of ``β`` for the problem solved
    (``Q = K``, ``c = 0``, ``aᵀβ = 1``): ``maxᵢ |min(βᵢ/‖β‖∞, gᵢ/mᵢ)|`` with
    ``g = Kβ − (βᵀKβ)a`` and ``m = |K|β + (βᵀKβ)a``. One task, or zero gradients, take no
    iterations.
    """
    k, norms = correlation(gramian)
    n = k.shape[0]
    if n == 1:
        one = jnp.ones((1,), k.dtype)
        return (one, SolverInfo.initial()) if return_info else one
    # A zero gradient makes the min-norm point 0: the weight is spread over the zero rows
    # (the interior point is then given a trivial problem).
    zero = norms <= 0
    has_zero = jnp.any(zero)
    safe = jnp.where(zero, 1.0, norms)
    n_min = jnp.min(jnp.where(zero, jnp.inf, norms))
    # aᵢ = n₀/nᵢ, kept positive when the norms span more than the dtype's range.
    a = jnp.maximum(jnp.where(has_zero, 1.0, n_min) / safe, jnp.finfo(k.dtype).tiny)
    a = jnp.where(has_zero, 1.0, a)
    eye = jnp.eye(n, dtype=k.dtype)
    q = jnp.where(has_zero, eye, regularize(k, ridge))
    beta, info = _qp(
        q,
        jnp.zeros((n,), k.dtype),
        simplex=True,
        tol=tol,
        max_iter=max_iter,
        return_info=True,
        exact_q=jnp.where(has_zero, eye, k),
        weight=a,
    )
    alpha = a * beta
    alpha = alpha / jnp.sum(alpha)
    zero = zero.astype(k.dtype)
    alpha = jnp.where(has_zero, zero / jnp.maximum(jnp.sum(zero), 1.0), alpha)
    if not return_info:
        return alpha
    # With a zero gradient the answer is exact without a solve.
    info = jax.tree_util.tree_map(
        lambda u, v: jnp.where(has_zero, u, v), SolverInfo.initial(), info
    )
    return alpha, info
