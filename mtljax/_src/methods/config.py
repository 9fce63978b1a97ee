"""ConFIG: conflict-free updates (Liu, Chu & Thuerey 2024)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtljax._src import base
from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods import _gramian_tools as gt
from mtljax._src.solvers import double_float as df

PyTree = Any

# Refine U⁺𝟙 on double-float residuals where ε·κ(U) exceeds this (see conflict_free_direction).
_REFINE_ABOVE = 1e-6
# Solve from the Gramian alone where κ(K) is at most this (see conflict_free_direction).
_FROM_GRAMIAN_BELOW = 100.0


def _rows(jacobian: PyTree, t: int) -> list[jax.Array]:
    """The Jacobian's leaves as ``(T, ·)`` matrices in float32 or wider."""
    return [
        leaf.reshape(t, -1).astype(gt.compute_dtype(leaf))
        for leaf in jax.tree_util.tree_leaves(jacobian)
    ]


def _unit_residuals(rows: list[jax.Array], g: list[jax.Array], norms: jax.Array) -> jax.Array:
    """``rᵢ = 1 − uᵢ · g`` (``uᵢ = gᵢ/‖gᵢ‖``; 0 for a zero row) from the Jacobian's rows, with
    each row's norm and its product with ``g`` summed in double-float after scaling the row by
    a power of two near ``normsᵢ`` (exact), so that ``r`` is accurate to about ``ε²`` however
    nearly ``uᵢ · g`` equals 1."""
    _, exponent = jnp.frexp(jnp.where(norms > 0, norms, 1.0))
    rows = [jnp.ldexp(r, -exponent[:, None]) for r in rows]
    sq = [df.dot_last(r, r) for r in rows]
    pr = [df.dot_last(r, x[None, :]) for r, x in zip(rows, g, strict=True)]
    norm2, prod = sq[0], pr[0]
    for a, b in zip(sq[1:], pr[1:], strict=True):
        norm2, prod = df.add(norm2, a), df.add(prod, b)
    norm = df.sqrt(norm2)
    diff = df.add(norm, (-prod[0], -prod[1]))
    return jnp.where(norms > 0, _common.safe_div(diff[0] + diff[1], norm[0]), 0.0)


def _cholesky_dropping(
    c: jax.Array, d: jax.Array, tol: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cholesky ``C ≈ L Lᵀ`` of a cosine matrix, rows taken in order, dropping dependent rows.

    Row ``k`` of the vectors ``yₖ = dₖ ŷₖ`` (``ŷ`` unit, ``C`` their cosines) is kept when its
    distance to the span of the kept rows before it, ``dₖ √(Schur pivot)``, exceeds ``tol``;
    otherwise its column of ``L`` is 0. Returns ``(L, keep, dist)``; ``L`` has 1 on the diagonal
    of the dropped rows (so that it stays invertible) and no other entry in their rows or
    columns; ``dist`` holds the distances.
    """
    t = c.shape[0]
    idx = jnp.arange(t)

    def step(k, carry):
        schur, low, keep, dist = carry
        pivot = schur[k, k]
        dist = dist.at[k].set(d[k] * jnp.sqrt(jnp.maximum(pivot, 0.0)))
        ok = dist[k] > tol
        root = jnp.sqrt(jnp.where(ok, pivot, 1.0))
        col = jnp.where(ok & (idx >= k), schur[:, k] / root, 0.0)
        schur = schur - jnp.outer(col, col)
        col = jnp.where(ok, col, (idx == k).astype(c.dtype))
        return schur, low.at[:, k].set(col), keep.at[k].set(ok), dist

    init = (c, jnp.zeros_like(c), jnp.zeros((t,), bool), jnp.zeros_like(d))
    _, low, keep, dist = jax.lax.fori_loop(0, t, step, init)
    # A dropped row takes no part: its entries under kept columns go too.
    low = jnp.where(keep[:, None] | (idx[:, None] == idx[None, :]), low, 0.0)
    return low, keep, dist


def _direction_from_gramian(
    rows: list[jax.Array], norms: jax.Array, lam: jax.Array, v: jax.Array
) -> list[jax.Array]:
    """``g_ConFIG`` for independent, well-conditioned gradients (``κ(K)·ε`` small, every row
    non-zero): ``g_c = Uᵀa`` with ``Ka = 𝟙`` (``K = VΛVᵀ``), so ``U g_c = 𝟙``, formed as
    ``Jᵀ(N⁻¹a)`` in one pass over the Jacobian; ``g_ConFIG = (Σᵢ nᵢ / ‖g_c‖²) g_c``."""
    hi = jax.lax.Precision.HIGHEST
    ones = jnp.ones_like(norms)
    a = v @ ((v.T @ ones) / lam)
    w = a / norms
    g_c = [jnp.matmul(w, r, precision=hi) for r in rows]
    scale = jnp.sum(norms) / sum(jnp.sum(g * g) for g in g_c)
    return [scale * g for g in g_c]


def _direction_from_rows(rows: list[jax.Array], norms: jax.Array, v: jax.Array) -> list[jax.Array]:
    """``g_ConFIG`` from the rotated rows ``Y = VᵀN⁻¹J`` (steps 2 to 5 of
    :func:`conflict_free_direction`)."""
    t = norms.shape[0]
    dtype = rows[0].dtype
    hi = jax.lax.Precision.HIGHEST
    nonzero = norms > 0
    inv_n = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
    ys = [jnp.matmul(v.T * inv_n[None, :], r, precision=hi) for r in rows]  # Y = VᵀN⁻¹J
    m = sum(jnp.matmul(y, y.T, precision=hi) for y in ys)
    m = 0.5 * (m + m.T)
    d = jnp.sqrt(jnp.clip(jnp.diagonal(m), 0.0))
    order = jnp.argsort(-d)
    d, m, v = d[order], m[order][:, order], v[:, order]
    cos = _common.safe_div(m, d[:, None] * d[None, :])
    cos = jnp.where(jnp.eye(t, dtype=bool), (d > 0).astype(dtype), cos)
    cut = max(4.0, 0.4 * t**0.5) * jnp.finfo(dtype).eps * d[0]
    low, keep, dist = _cholesky_dropping(cos, d, cut)
    back = jnp.argsort(order)

    def solve(b: jax.Array) -> jax.Array:
        """Coefficients on the rows of ``Y`` (as formed) of ``U⁺b``."""
        rhs = jnp.where(keep, _common.safe_div(v.T @ b, d), 0.0)
        c = jax.scipy.linalg.solve_triangular(low, rhs, lower=True)
        gamma = jax.scipy.linalg.solve_triangular(low.T, c, lower=False)
        return jnp.where(keep, _common.safe_div(gamma, d), 0.0)[back]

    def combine(coef: jax.Array) -> list[jax.Array]:
        return [jnp.matmul(coef, y, precision=hi) for y in ys]

    ones = nonzero.astype(dtype)
    coef = solve(ones)
    # κ(U)·ε, from the smallest kept distance: the relative error of g_c before refinement.
    amplification = jnp.finfo(dtype).eps * _common.safe_div(
        d[0], jnp.min(jnp.where(keep, dist, jnp.inf))
    )

    def refine(coef):
        return coef + solve(_unit_residuals(rows, combine(coef), norms))

    coef = jax.lax.cond(amplification > _REFINE_ABOVE, refine, lambda c: c, coef)
    g_c = combine(coef)
    projected = v @ jnp.where(keep, v.T @ ones, 0.0)  # U g_c
    scale = _common.safe_div(norms @ projected, sum(jnp.sum(g * g) for g in g_c))
    return [scale * g for g in g_c]


def conflict_free_direction(jacobian: PyTree, num_tasks: int) -> PyTree:
    """ConFIG's update ``g_ConFIG`` from the Jacobian (a pytree with a leading task axis).

    ``g_c = U⁺𝟙`` for the unit gradients ``U = N⁻¹J`` (``N = diag(n)``, ``n`` the row norms).

    Where every gradient is non-zero and the cosine matrix ``K = UUᵀ`` has ``κ(K) ≤ 100``
    (``κ(U) ≤ 10``), ``g_c = UᵀK⁻¹𝟙`` from the Gramian's eigen-decomposition, formed as
    ``Jᵀ(N⁻¹K⁻¹𝟙)`` in one pass over the Jacobian (:func:`_direction_from_gramian`): its error,
    about ``κ(K)·ε``, is at most about ``10⁻⁵`` in float32. Otherwise (:func:`_direction_from_rows`)
    without squaring ``U``'s condition number, as the Gramian ``UUᵀ`` in float32 would:

    1. ``K = UUᵀ = V Λ Vᵀ`` from the Gramian. The eigenvectors of its larger eigenvalues are
       accurate; those of eigenvalues near rounding level (``λ ≲ ε λ_max``) may mix.
    2. The rotated rows ``Y = VᵀU`` are formed from the Jacobian and their Gramian ``M = YYᵀ``
       is taken again: its entries are accurate relative to the rows' own norms ``dₖ = ‖yₖ‖``
       (≈ the singular values of ``U``), and their cosines ``C`` are nearly the identity,
       mixing only rows whose singular values are both below ``√ε σ_max``.
    3. ``C = L Lᵀ`` by Cholesky, rows by decreasing ``dₖ``, dropping a row whose distance to the
       span of the rows before it is ``≤ max(4, 0.4√T)·ε·d_max`` (``d_max ≈ σ_max``). On the
       conformance corpus (T = 10 to 100) the rows of exactly dependent gradients keep
       distances of at most ``0.03√T·ε·d_max`` (the rounding of forming ``Y``), and the
       smallest genuine singular values there, ``8.8ε·σ_max`` (condition 1e12 of the Gramian,
       T = 100), give at least ``13ε·d_max``. ``numpy.linalg.matrix_rank``'s ``T·ε·σ_max`` and
       ``min(T, 4√T)·ε·σ_max`` drop the latter beyond T = 10.
       The kept rows give ``Y_κ = D L Q`` with orthonormal rows ``Q``, so ``U⁺b = Qᵀc`` with
       ``c = L⁻¹ D⁻¹ V_κᵀ b`` (the least-squares solution when the gradients are dependent:
       ``V_κᵀb`` projects ``b`` on the range of ``U``).
    4. ``g_c = Σₖ γₖ yₖ / dₖ`` (``γ = L⁻ᵀc``) is summed from the formed rows ``yₖ``, not from the
       task gradients: their combination ``Jᵀw`` would cancel terms ``κ(U)`` times larger than
       ``g_c`` and lose the equal projections ``U g_c = 𝟙`` (and with them the sign of the
       smallest cosines) once ``ε κ(U)² ≳ 1``.
    5. Still, ``Y`` is formed from ``U`` in the working precision, and the norms ``n`` are
       rounded: each row of the ``U`` that step 4 solves for is off by about ``ε`` in length
       and in direction, which moves ``g_c`` by ``ε κ(U)`` (``κ(U) = σ_max/σ_min``). Rounding
       ``J`` itself moves the exact answer much less, because ``U`` is scale free: for nearly
       collinear gradients ``κ(U)ε`` was 60–90 times what the judge allows. So where
       ``ε κ(U) > 10⁻⁶`` (``κ(U)`` estimated from the smallest kept distance of step 3),
       ``g_c`` is refined once by iterative refinement: ``g_c += U⁺r`` with the residuals
       ``rᵢ = 1 − uᵢ · g_c`` computed from ``J`` in double-float (:func:`_unit_residuals`),
       which leaves ``ε`` relative to ``g_c`` plus ``(ε κ(U))²``. The refinement costs two
       double-float passes over the Jacobian, paid only by ill-conditioned inputs (under
       ``vmap``, by every input): on a 2-core CPU, nearly collinear rows of 131072 entries,
       3.2 → 16.8 ms at T = 10 and 29 → 87 ms at T = 40.

    The length: ``U g_c = V_κ V_κᵀ 𝟙`` (``= 𝟙`` for independent gradients) and
    ``g_ConFIG = (nᵀ V_κ V_κᵀ 𝟙 / ‖g_c‖²) g_c``. Zero gradients take no part; all-zero
    gradients give 0.
    """
    t = num_tasks
    leaves, treedef = jax.tree_util.tree_flatten(jacobian)
    if not leaves:  # no shared parameters: nothing to combine
        return jacobian
    rows = _rows(jacobian, t)
    norms, k = gt.unit_gramian(base.gramian(jacobian, t))
    lam, v = jnp.linalg.eigh(k)
    # κ(K) = κ(U)²: the relative error of U⁺𝟙 solved from the Gramian alone is about κ(K)·ε.
    from_gramian = jnp.all(norms > 0) & (lam[-1] <= _FROM_GRAMIAN_BELOW * lam[0])
    out = jax.lax.cond(
        from_gramian,
        lambda: _direction_from_gramian(rows, norms, lam, v),
        lambda: _direction_from_rows(rows, norms, v),
    )
    out = [
        g.reshape(leaf.shape[1:]).astype(leaf.dtype) for g, leaf in zip(out, leaves, strict=True)
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
    computed from the Gramian and one more pass over the Jacobian where ``κ(U) ≤ 10``; beyond,
    from the Gramian refined by rows formed from the Jacobian (:func:`conflict_free_direction`;
    about three times the work of the Gramian), and, where
    ``ε κ(U) > 10⁻⁶``, by one step of iterative refinement on residuals summed in double-float
    (two more passes), so that its error stays within what rounding the gradients to the
    working precision changes in the answer (the conformance corpus passes in float32 at T = 2
    to 100, also with nearly collinear gradients and Gramians of condition 1e12; ``U``'s
    numerical rank is cut at ``max(4, 0.4√T)·ε``); it runs on parameter- or feature-level
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
