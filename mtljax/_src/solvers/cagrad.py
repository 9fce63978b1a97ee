"""CAGrad's conflict-averse direction."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.solvers._linalg import _dot, _is_f64, _mm, default_tol, normalize_gramian
from mtljax._src.solvers.interior_point import IPM_MAX_ITER, _interior_point


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
