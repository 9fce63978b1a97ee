"""MGDA's min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import SolverInfo
from mtljax._src.solvers._linalg import normalize_gramian, regularize
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

    ``Jᵀα`` is the point of smallest norm in the convex hull of the rows of ``J``. Solved on
    :func:`regularize` ``(G/s)`` to relative accuracy, also when the gradients' norms differ by
    orders of magnitude; scale invariant. If some gradients are zero, the min-norm point is 0
    and ``α`` is uniform over them. Returns ``α`` (on the simplex), and with ``return_info``
    ``(α, SolverInfo)``.

    The :class:`~mtljax._src.base.SolverInfo` of the solve (interior point, at most
    ``max_iter`` iterations, then the active-set polish): ``converged`` when the interior point
    met its stopping test, the polish certified the exact KKT point, or the residual is at
    most ``10³ ε_dtype`` (the KKT conditions hold to rounding); ``residual`` is
    :func:`~mtljax._src.solvers.interior_point.qp_residual` of ``α`` for the problem solved
    (``Q`` the regularised ``G/s``, ``c = 0``): ``maxᵢ |min(αᵢ/‖α‖∞, gᵢ/mᵢ)|`` with
    ``g = Qα − (αᵀQα)1`` and ``m = |Q|α + αᵀQα``. One task, or zero gradients, take no
    iterations.
    """
    g, _ = normalize_gramian(gramian)
    n = g.shape[0]
    if n == 1:
        one = jnp.ones((1,), g.dtype)
        return (one, SolverInfo.initial()) if return_info else one
    # A zero gradient makes the min-norm point 0: the weight is spread over the zero rows
    # (the interior point is then given a trivial problem).
    zero = jnp.diagonal(g) <= 0
    has_zero = jnp.any(zero)
    q = jnp.where(has_zero, jnp.eye(n, dtype=g.dtype), regularize(g, ridge))
    alpha, info = _qp(
        q,
        jnp.zeros((n,), g.dtype),
        simplex=True,
        tol=tol,
        max_iter=max_iter,
        return_info=True,
        exact_q=jnp.where(has_zero, q, g),
    )
    zero = zero.astype(g.dtype)
    alpha = jnp.where(has_zero, zero / jnp.maximum(jnp.sum(zero), 1.0), alpha)
    if not return_info:
        return alpha
    # With a zero gradient the answer is exact without a solve.
    info = jax.tree_util.tree_map(
        lambda a, b: jnp.where(has_zero, a, b), SolverInfo.initial(), info
    )
    return alpha, info
