"""Shared pieces of the solvers: dtypes, scaling of the Gramian, ridge, Cholesky solves."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

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


def rounding_ridge(dtype, multiple: float = 1.0) -> float:
    """``multiple·eps`` of ``dtype``: a relative ridge at the rounding level of a correlation
    matrix (its unit diagonal is resolved to ``eps``, its entries are rounded to ``eps/2``), which
    moves a solution about as much as rounding the input does, unlike :func:`default_ridge`
    where nearly conflicting gradients make the problem ill-conditioned."""
    return multiple * float(jnp.finfo(dtype).eps)
