"""ConFIG: conflict-free updates (Liu, Chu & Thuerey 2024)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtljax._src import base
from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods import _gramian_tools as gt

PyTree = Any


def _rows(jacobian: PyTree, t: int) -> list[jax.Array]:
    """The Jacobian's leaves as ``(T, ·)`` matrices in float32 or wider."""
    return [
        leaf.reshape(t, -1).astype(gt.compute_dtype(leaf))
        for leaf in jax.tree_util.tree_leaves(jacobian)
    ]


def _cholesky_dropping(c: jax.Array, d: jax.Array, tol: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cholesky ``C ≈ L Lᵀ`` of a cosine matrix, rows taken in order, dropping dependent rows.

    Row ``k`` of the vectors ``yₖ = dₖ ŷₖ`` (``ŷ`` unit, ``C`` their cosines) is kept when its
    distance to the span of the kept rows before it, ``dₖ √(Schur pivot)``, exceeds ``tol``;
    otherwise its column of ``L`` is 0. Returns ``(L, keep)``; ``L`` has 1 on the diagonal of the
    dropped rows (so that it stays invertible) and no other entry in their rows or columns.
    """
    t = c.shape[0]
    idx = jnp.arange(t)

    def step(k, carry):
        schur, low, keep = carry
        pivot = schur[k, k]
        ok = d[k] * jnp.sqrt(jnp.maximum(pivot, 0.0)) > tol
        root = jnp.sqrt(jnp.where(ok, pivot, 1.0))
        col = jnp.where(ok & (idx >= k), schur[:, k] / root, 0.0)
        schur = schur - jnp.outer(col, col)
        col = jnp.where(ok, col, (idx == k).astype(c.dtype))
        return schur, low.at[:, k].set(col), keep.at[k].set(ok)

    init = (c, jnp.zeros_like(c), jnp.zeros((t,), bool))
    _, low, keep = jax.lax.fori_loop(0, t, step, init)
    # A dropped row takes no part: its entries under kept columns go too.
    low = jnp.where(keep[:, None] | (idx[:, None] == idx[None, :]), low, 0.0)
    return low, keep


def conflict_free_direction(jacobian: PyTree, num_tasks: int) -> PyTree:
    """ConFIG's update ``g_ConFIG`` from the Jacobian (a pytree with a leading task axis).

    ``g_c = U⁺𝟙`` for the unit gradients ``U = N⁻¹J`` (``N = diag(n)``, ``n`` the row norms),
    without squaring ``U``'s condition number (which the Gramian ``UUᵀ`` in float32 would do):

    1. ``K = UUᵀ = V Λ Vᵀ`` from the Gramian. The eigenvectors of its larger eigenvalues are
       accurate; those of eigenvalues near rounding level (``λ ≲ ε λ_max``) may mix.
    2. The rotated rows ``Y = VᵀU`` are formed from the Jacobian and their Gramian ``M = YYᵀ``
       is taken again: its entries are accurate relative to the rows' own norms ``dₖ = ‖yₖ‖``
       (≈ the singular values of ``U``), and their cosines ``C`` are nearly the identity,
       mixing only rows whose singular values are both below ``√ε σ_max``.
    3. ``C = L Lᵀ`` by Cholesky, rows by decreasing ``dₖ``, dropping a row whose distance to the
       span of the rows before it is ``≤ min(T, 4√T)·ε·d_max`` (``d_max ≈ σ_max``): the
       rounding of forming ``Y`` is below ``√T·ε·d_max``, so this is ``U``'s numerical rank at
       the precision of ``Y``, never above ``numpy.linalg.matrix_rank``'s ``T·ε·σ_max``
       (which beyond T = 16 is larger, and at T = 100 dropped genuine singular values:
       ``σ_min/σ_max = 9e-6`` for nearly opposite gradients).
       The kept rows give ``Y_κ = D L Q`` with orthonormal rows ``Q``, so ``U⁺𝟙 = Qᵀc`` with
       ``c = L⁻¹ D⁻¹ V_κᵀ 𝟙`` (the least-squares solution when the gradients are dependent:
       ``V_κᵀ𝟙`` projects ``𝟙`` on the range of ``U``).

    ``g_c = Σₖ γₖ yₖ / dₖ`` (``γ = L⁻ᵀc``) is summed from the formed rows ``yₖ``, not from the
    task gradients: their combination ``Jᵀw`` would cancel terms ``κ(U)`` times larger than
    ``g_c`` and lose the equal projections ``U g_c = 𝟙`` (and with them the sign of the
    smallest cosines) once ``ε κ(U)² ≳ 1``. Then ``‖g_c‖ = ‖c‖``, ``U g_c = V_κ V_κᵀ 𝟙``
    (``= 𝟙`` for independent gradients) and ``g_ConFIG = (nᵀ V_κ V_κᵀ 𝟙 / ‖c‖²) g_c``. Zero
    gradients take no part; all-zero gradients give 0.
    """
    t = num_tasks
    leaves, treedef = jax.tree_util.tree_flatten(jacobian)
    if not leaves:  # no shared parameters: nothing to combine
        return jacobian
    rows = _rows(jacobian, t)
    dtype = rows[0].dtype
    hi = jax.lax.Precision.HIGHEST
    norms, k = gt.unit_gramian(base.gramian(jacobian, t))
    nonzero = norms > 0
    inv_n = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
    _, v = jnp.linalg.eigh(k)
    ys = [jnp.matmul(v.T * inv_n[None, :], r, precision=hi) for r in rows]  # Y = VᵀN⁻¹J
    m = sum(jnp.matmul(y, y.T, precision=hi) for y in ys)
    m = 0.5 * (m + m.T)
    d = jnp.sqrt(jnp.clip(jnp.diagonal(m), 0.0))
    order = jnp.argsort(-d)
    d, m, v = d[order], m[order][:, order], v[:, order]
    cos = _common.safe_div(m, d[:, None] * d[None, :])
    cos = jnp.where(jnp.eye(t, dtype=bool), (d > 0).astype(dtype), cos)
    low, keep = _cholesky_dropping(cos, d, min(t, 4.0 * t**0.5) * jnp.finfo(dtype).eps * d[0])
    ones = v.T @ nonzero.astype(dtype)  # Vᵀ𝟙 over the non-zero tasks
    c = jax.scipy.linalg.solve_triangular(
        low, jnp.where(keep, _common.safe_div(ones, d), 0.0), lower=True
    )
    gamma = jax.scipy.linalg.solve_triangular(low.T, c, lower=False)
    projected = v @ jnp.where(keep, ones, 0.0)  # U g_c
    scale = _common.safe_div(norms @ projected, c @ c)
    coef = scale * jnp.where(keep, _common.safe_div(gamma, d), 0.0)
    coef = jnp.zeros_like(coef).at[order].set(coef)  # back to the rows of Y as formed
    out = [
        jnp.matmul(coef, y, precision=hi).reshape(leaf.shape[1:]).astype(leaf.dtype)
        for y, leaf in zip(ys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def config() -> Method:
    """ConFIG: the direction with equal cosines to every task gradient.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv 2408.11104). With unit gradients ``uᵢ = gᵢ / ‖gᵢ‖`` stacked as
    the rows of ``U``:

    * ``g_u = g_c / ‖g_c‖`` with ``g_c = U⁺ 𝟙`` (pseudo-inverse): ``uᵢ · g_c = 1`` for every
      task when the gradients are linearly independent, so ``g_u`` has the same cosine with
      every gradient (and ``gᵢ · g_u > 0``: no conflict);
    * length: ``g_ConFIG = (Σᵢ gᵢ · g_u) g_u``, the sum of the projections.

    The method needs the Jacobian, not only its Gramian: ``U⁺𝟙`` is as ill-conditioned as
    ``U`` (near Pareto-stationarity, or with nearly dependent gradients), and the Gramian
    squares that condition number, so that in float32 an update computed from ``UUᵀ`` alone
    can conflict with a task once ``σ_min/σ_max`` of ``U`` falls below ~1e-3. The update is
    computed from the Gramian refined by one more pass over the Jacobian
    (:func:`conflict_free_direction`; about three times the work of the Gramian), whose error
    stays within what rounding the gradients and unit gradients to the working precision
    changes in the answer (``≈ ε κ(U)`` rather than ``ε κ(U)²``), and whose cosines stay
    positive and equal far below that limit (tested in float32 down to ``σ_min/σ_max = 1e-5``;
    ``U``'s numerical rank is cut at ``min(T, 4√T)·ε``); it runs on parameter- or feature-level
    Jacobians. With linearly
    dependent gradients ``U⁺`` gives the least-squares ``g_c`` (the cosines are then equal
    only where they can be); opposite gradients give 0; zero gradients take no part.

    No hyper-parameters; no state. Scale: ``‖g_ConFIG‖ = Σᵢ gᵢ · g_u``, as in the paper.
    Task-specific parameters get ``∇Lᵢ`` (``head_grads="unit"``).
    """

    def init(num_tasks: int):
        return ()

    def direction(jacobian, losses, state, key):
        return conflict_free_direction(jacobian, losses.shape[0]), state

    return make_method("config", init, needs="jacobian", direction=direction, head_grads="unit")
