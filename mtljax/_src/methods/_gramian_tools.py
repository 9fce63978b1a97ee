"""Gramian-space helpers shared by the gradient-manipulation methods.

These methods work on the task gradients ``gᵢ`` through their Gramian ``G = J Jᵀ`` only. To stay
accurate when the rows have very different scales (1e-10 next to 1e10), they work with the
norms ``nᵢ = ‖gᵢ‖`` and the cosine matrix ``K = N⁻¹ G N⁻¹`` (the Gramian of the unit vectors
``uᵢ = gᵢ / nᵢ``), and convert coefficients on the ``uᵢ`` back to weights on the ``gᵢ`` at the end.
A zero row has ``nᵢ = 0`` and a zero row and column in ``K``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.methods._common import safe_div


def compute_dtype(g: jax.Array) -> jnp.dtype:
    return jnp.promote_types(g.dtype, jnp.float32)


def unit_gramian(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(n, K)``: the row norms and the cosine matrix, with ``Kᵢᵢ = 1`` for non-zero rows."""
    g = jnp.asarray(gramian)
    g = g.astype(compute_dtype(g))
    g = 0.5 * (g + g.T)
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(g), 0.0))
    nonzero = norms > 0
    k = safe_div(g, norms[:, None] * norms[None, :])
    k = jnp.clip(k, -1.0, 1.0)
    eye = jnp.eye(g.shape[0], dtype=bool)
    k = jnp.where(eye, nonzero.astype(g.dtype), k)
    return norms, k


def unit_to_gradient_weights(coef: jax.Array, norms: jax.Array) -> jax.Array:
    """Weights ``w`` on the ``gₖ`` of ``Σᵢ nᵢ Σₖ coefᵢₖ uₖ`` (rows scaled by their own norms).

    ``coef[i]`` holds the coefficients of a modified gradient of task ``i`` on the unit vectors,
    relative to ``nᵢ``, with ``coefᵢᵢ = 1``; the off-diagonal ``coefᵢₖ`` are non-zero only where
    ``nₖ > 0``. Then ``wₖ = coefₖₖ + Σ_{i≠k} coefᵢₖ nᵢ / nₖ`` (so a zero row keeps weight 1).
    """
    diag = jnp.diagonal(coef)
    off = coef - jnp.diag(diag)
    return diag + safe_div(off.T @ norms, norms)


def task_orders(key: jax.Array | None, num_tasks: int) -> jax.Array:
    """``(T, T)`` int32: row ``i`` is the order in which task ``i`` visits the tasks.

    Independent uniform permutations per row when ``key`` is given; ``0, 1, …, T−1`` otherwise.
    """
    if key is None:
        return jnp.tile(jnp.arange(num_tasks, dtype=jnp.int32), (num_tasks, 1))
    # The ranks of i.i.d. uniform draws: a uniform random permutation per row.
    draws = jax.random.uniform(key, (num_tasks, num_tasks))
    return jnp.argsort(draws, axis=1).astype(jnp.int32)


def rank_tolerance(eigenvalues: jax.Array) -> jax.Array:
    """Eigenvalues at or below this count as zero: ``λ_max · T · ε`` (ε of the dtype), ×10."""
    t = eigenvalues.shape[-1]
    eps = jnp.finfo(eigenvalues.dtype).eps
    return 10.0 * t * eps * jnp.maximum(jnp.max(eigenvalues), 0.0)
