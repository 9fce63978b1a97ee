"""IMTL-G: impartial gradient weighting (Liu et al. 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _gramian_tools as gt
from mtljax._src.solvers import double_float as df

# The double-float solve (:func:`_double_float_equal_projections`) runs up to 16 tasks, as the
# solvers' double-float stages: it factors K once, about T³/3 double-float operations.
DOUBLE_FLOAT_MAX_TASKS = 16


def _null_space_projection(
    a: jax.Array, b: jax.Array, size: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The orthogonal projection of ``b`` on the numerical null space of ``a`` (T×T, entries
    accurate to a few ε relative to ``size``): the right singular vectors with singular value
    ``≤ 4·ε·size``, and always the last one (``a`` is singular by construction). Returns the
    projection and the null space's dimension."""
    _, s, vt = jnp.linalg.svd(a)
    t = s.shape[0]
    tol = 4.0 * jnp.finfo(a.dtype).eps * size
    null = (s <= tol) | (jnp.arange(t) == t - 1)
    return vt.T @ jnp.where(null, vt @ b, 0.0), jnp.sum(null)


def _double_float_equal_projections(k: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``β = K⁻¹𝟙`` on the non-zero tasks (``m``), with ``K`` taken as exact: a double-float
    signed Cholesky factorisation and solve (:mod:`~mtljax._src.solvers.double_float`), whose
    error is about ``κ(K)·ε²``. Returns ``(β, ok)``: ``ok`` where ``K`` is positive definite to
    that factorisation (every pivot positive) and ``β`` is finite. For a positive definite
    ``K`` the null space of the centred ``K`` is exactly the line of ``K⁻¹𝟙``."""
    low, signs = df.signed_cholesky_on(k, m > 0)
    hi, lo = df.cholesky_solve(low, (m, jnp.zeros_like(m)), signs)
    beta = hi + lo
    return beta, jnp.all(signs > 0) & jnp.all(jnp.isfinite(beta))


@jax.jit
def impartial_weights(gramian: jax.Array) -> jax.Array:
    """IMTL-G's ``α`` (``Σα = 1``) from a Gramian: equal projections ``uᵢ · Jᵀα`` for all ``i``.

    In coefficients on the unit gradients, ``β = Nα`` (``N = diag(n)``, ``n`` the row norms), the
    direction is ``d = Σₖ βₖ uₖ`` and its projections are ``Kβ`` (``K`` the cosine matrix). They
    are equal iff ``(I − 𝟙𝟙ᵀ/T) K β = 0``: ``β`` spans the null space of the centred cosine
    matrix ``A = (I − 𝟙𝟙ᵀ/T) K``. This is the paper's system: its rows ``K₁ − Kᵢ`` (``i ≥ 2``)
    span the same row space as ``A`` (``Aβ = 0`` iff all ``(Kβ)ᵢ`` are equal), and eliminating
    ``α₁ = 1 − Σα₂:T`` turns ``(K₁ − Kᵢ)β = 0`` into ``α₂:T (DUᵀ) = g₁Uᵀ``. Unlike ``K``, ``A`` is
    well conditioned near Pareto-stationarity (there ``K`` nearly annihilates ``𝟙`` but the
    direction ``β`` with equal projections is well determined), and it treats every task alike,
    so no reference task is singled out (any choice gives the same null space).

    ``A`` is factored by an SVD; singular values ``≤ 4·ε·‖K‖_∞`` count as zero, and the
    smallest always does. Rounding the cosines (``|δKᵢⱼ| ≲ ε|Kᵢⱼ|``) and the norms (which scales
    ``K`` to ``diag(1 + δ) K diag(1 + δ)``, ``|δ| ≲ ε``) moves ``A``'s singular values by up to
    about ``ε‖|K|‖₂ + 2ε‖K‖₂ ≤ 3ε‖K‖_∞`` (``K`` symmetric): ``4·T·ε`` for exactly collinear
    gradients (``‖K‖_∞ = T``), far less where the cosines are small or of both signs. (A cut of
    ``4·T·ε·σ_max(A)`` dropped genuine singular values of near-stationary cones of 100 tasks.)
    ``β`` is the projection of ``𝟙`` on that null space. When it is one-dimensional (the
    paper's ``DUᵀ`` is invertible) this is the unique solution; otherwise it is the
    solution nearest ``𝟙``: with ``𝟙`` in the range of ``K`` it is ``∝ K⁺𝟙``, the direction
    ``U⁺𝟙`` with equal projections; with ``𝟙`` outside it (e.g. two opposite gradients, or more
    tasks than dimensions) only a zero direction has equal projections, and ``β`` lies in the
    null space of ``K``, so ``d = Σβₖuₖ = 0``. Then ``α = (β/n) / Σ(β/n)``.

    In float32, from 3 up to :data:`DOUBLE_FLOAT_MAX_TASKS` tasks, where the cut leaves a null space
    of two or more dimensions, the float32 SVD cannot tell a genuine singular value near
    ``ε‖A‖`` from zero (a Gramian of condition 1e8 at T = 8: K's smallest eigenvalue 1e-7 and
    a direction 9–155× the float64 answer on the same K). There ``β = K⁻¹𝟙`` is solved with
    ``K`` taken as exact by a double-float signed Cholesky factorisation, error about
    ``κ(K)·ε²``; it replaces the SVD's answer where ``K`` is positive definite to that
    factorisation (then ``K⁻¹𝟙`` spans the null space of ``A``). Where it is not (e.g.
    exactly dependent gradients, whose rounded ``K`` is indefinite) the SVD's answer stays.

    Zero gradients take no part (``αᵢ = 0``): the centring runs over the non-zero tasks and
    ``βᵢ = 0`` is imposed for the others. If ``Σ βᵢ/nᵢ`` vanishes (to ``10·T·ε`` relative), every
    direction with equal projections has ``Σα = 0`` and the paper's ``DUᵀ`` is singular: no
    ``α`` with ``Σα = 1`` exists, and the weights are uniform over the non-zero tasks.
    """
    norms, k = gt.unit_gramian(gramian)
    t = k.shape[0]
    eps = jnp.finfo(k.dtype).eps
    nonzero = norms > 0
    m = nonzero.astype(k.dtype)
    count = jnp.sum(m)
    centre = jnp.diag(m) - jnp.outer(m, m) / jnp.maximum(count, 1.0)
    a = centre @ k + jnp.diag(1.0 - m)
    beta, null = _null_space_projection(a, m, jnp.max(jnp.sum(jnp.abs(k), axis=1)))
    # Not at T = 2, where K⁻¹𝟙 ∝ 𝟙 for every K with a unit diagonal, as the SVD's answer.
    if k.dtype == jnp.float32 and 2 < t <= DOUBLE_FLOAT_MAX_TASKS:
        # A second singular value under the cut: float32 cannot tell a genuine one from zero.
        def solve(beta):
            beta_df, ok = _double_float_equal_projections(k, m)
            return jnp.where(ok, beta_df, beta)

        beta = lax.cond(null >= 2, solve, lambda beta: beta, beta)
    beta = jnp.where(nonzero, beta, 0.0)
    # β/n, scaled by the smallest non-zero norm so that norms far apart stay finite.
    low = jnp.min(jnp.where(nonzero, norms, jnp.inf))
    low = jnp.where(jnp.isfinite(low), low, 1.0)
    q = jnp.where(nonzero, beta * (low / jnp.where(nonzero, norms, 1.0)), 0.0)
    total = jnp.sum(q)
    ok = jnp.abs(total) > 10.0 * t * eps * jnp.sum(jnp.abs(q))
    fallback = jnp.where(count > 0, m / jnp.maximum(count, 1.0), jnp.full_like(m, 1.0 / t))
    return jnp.where(ok, q / jnp.where(ok, total, 1.0), fallback)


def imtl_g() -> Method:
    """IMTL-G: the combination of the task gradients with equal projections on every task.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Section 3.2). With unit gradients ``uᵢ = gᵢ / ‖gᵢ‖``, the aggregated gradient
    ``g = Σᵢ αᵢ gᵢ`` with ``Σᵢ αᵢ = 1`` is the one whose projections ``g · uᵢ`` are equal for all
    tasks. The paper's closed form ``α₂:T = g₁Uᵀ(DUᵀ)⁻¹``, ``α₁ = 1 − Σ α₂:T`` (``D``, ``U``: the
    rows ``g₁ − gᵢ``, ``u₁ − uᵢ``) states the equal projections relative to task 1; here the
    same conditions are solved in cosine coordinates for the null space of the centred cosine
    matrix, by an SVD that is well conditioned near Pareto-stationarity (where the direction is
    small but the system is not singular) and that also handles collinear, opposite and zero
    gradients (see :func:`impartial_weights`). Only the Gramian is needed: the paper computes it
    w.r.t. the shared representation, i.e. ``mode="feature"`` of the train step. A Gramian
    formed in float32 carries the cosines to ``ε`` only: for nearly collinear or otherwise
    ill-conditioned unit gradients the weights are then as uncertain as that rounding makes
    them.

    No hyper-parameters; no state. Scale: ``Σᵢ αᵢ = 1`` as in the paper. The common projection
    is ``1 / Σᵢ βᵢ/nᵢ`` (``β ∝ K⁻¹𝟙`` for independent gradients), which is negative for some
    inputs with three or more tasks: the paper's normalization then yields a direction that
    opposes every task gradient (equal, negative projections). Where only the zero direction
    has equal projections (opposite gradients, more tasks than dimensions) the weights give
    ``d = 0`` with ``Σα = 1``; where the equal-projection directions all have ``Σα = 0`` (the
    paper's ``DUᵀ`` singular) they are uniform. Task-specific parameters get ``∇Lᵢ``
    (``head_grads="unit"``), as in the paper.
    """

    def init(num_tasks: int):
        return ()

    def weights(losses, gramian, state, key):
        return impartial_weights(gramian).astype(losses.dtype), state

    return make_method("imtl_g", init, needs="gramian", weights=weights, head_grads="unit")
