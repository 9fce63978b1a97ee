"""MGDA's min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.solvers._linalg import normalize_gramian, regularize
from mtljax._src.solvers.interior_point import IPM_MAX_ITER, _qp


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
