"""Projections onto the dual cone of the task gradients (UPGrad, DualProj)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.solvers._linalg import _dot, _mm, correlation, default_ridge
from mtljax._src.solvers.interior_point import IPM_MAX_ITER, _qp


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
