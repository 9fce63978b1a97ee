"""Aligned-MTL: independent component alignment (Senushkin et al. 2023)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods import _gramian_tools as gt

_MAX_SWEEPS = 30
# Rank cut on the cosine matrix, in units of ε·λ_max (float32) and T·ε·λ_max (float64); see
# _rank_cut.
_CUT = {"float32": 4.0, "float64": 10.0}
_dot = functools.partial(jnp.dot, precision=lax.Precision.HIGHEST)


def _jacobi_rotations(y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One-sided Jacobi (Hestenes): an orthogonal ``V`` such that the columns of ``YV`` are
    mutually orthogonal, by plane rotations of pairs of columns, in sweeps until every pair is
    orthogonal to the dtype's ε relative to the product of their norms (at most
    :data:`_MAX_SWEEPS` sweeps). Returns ``(YV, V, sweeps)``. With ``YᵀY = G`` the columns of
    ``V`` are eigenvectors of ``G`` and the squared column norms of ``YV`` its eigenvalues, to
    a relative accuracy set by the conditioning of ``Y`` with its columns scaled to unit norm
    (Demmel & Veselić, SIAM J. Matrix Anal. Appl. 1992), whatever the columns' scales.

    Each sweep visits every pair once in a round-robin (parallel) ordering (Brent & Luk,
    "The solution of singular-value and symmetric eigenvalue problems on multiprocessor
    arrays", SIAM J. Sci. Stat. Comput. 1985): ``T − 1`` rounds of ``T/2`` rotations of disjoint
    pairs (an odd ``T`` gets a zero column, which no rotation touches), applied at once. The
    columns are kept in two halves, the pairs of a round side by side; between rounds they move
    by the circle method (the first column stays, the others turn by one place), which meets
    every pair once in ``T − 1`` rounds and restores the order at the end of a sweep. The
    rotations of a round commute, so a round is the cyclic method's rotations in another
    order, with its convergence and its accuracy; ``T − 1`` batched steps replace
    ``T(T − 1)/2`` sequential ones."""
    t = y.shape[1]
    dtype = y.dtype
    if t < 2:
        return y, jnp.eye(t, dtype=dtype), jnp.zeros((), jnp.int32)
    eps = float(jnp.finfo(dtype).eps)
    tiny = float(jnp.finfo(dtype).tiny)
    n = t + t % 2
    h = n // 2
    y = jnp.pad(y, ((0, 0), (0, n - t)))

    def turn(top, bot):
        # The circle method: top = [t₀, t₁, …], bot = [b₀, b₁, …] → [t₀, b₀, t₁, …], [b₁, …, t₋₁].
        if h == 1:
            return top, bot
        new_top = jnp.concatenate([top[:, :1], bot[:, :1], top[:, 1:-1]], axis=1)
        return new_top, jnp.concatenate([bot[:, 1:], top[:, -1:]], axis=1)

    def rotate(_, carry):
        yp, yq, vp, vq, rotated = carry
        a, b, c = (jnp.sum(u * w, axis=0) for u, w in ((yp, yp), (yq, yq), (yp, yq)))
        act = jnp.abs(c) > eps * jnp.sqrt(a) * jnp.sqrt(b) + tiny
        # tan θ of the rotation that makes the pair orthogonal: t = sgn(ζ)/(|ζ| + √(1 + ζ²)),
        # ζ = (b − a)/(2c), written so that a large |ζ| cannot overflow.
        zeta = (b - a) / (2.0 * jnp.where(act, c, 1.0))
        r = jnp.abs(zeta)
        root = jnp.where(
            r > 1.0, r * jnp.sqrt(1.0 + (1.0 / jnp.maximum(r, 1.0)) ** 2), jnp.sqrt(1.0 + r * r)
        )
        tan = jnp.where(zeta >= 0, 1.0, -1.0) / (r + root)
        tan = jnp.where(act, tan, 0.0)
        cs = 1.0 / jnp.sqrt(1.0 + tan * tan)
        sn = cs * tan
        yp, yq = turn(cs * yp - sn * yq, sn * yp + cs * yq)
        vp, vq = turn(cs * vp - sn * vq, sn * vp + cs * vq)
        return yp, yq, vp, vq, rotated | jnp.any(act)

    def sweep(state):
        yp, yq, vp, vq, _, n_sweeps = state
        out = lax.fori_loop(0, n - 1, rotate, (yp, yq, vp, vq, jnp.zeros((), bool)))
        return (*out, n_sweeps + 1)

    def cond(state):
        return state[4] & (state[5] < _MAX_SWEEPS)

    v = jnp.eye(n, dtype=dtype)
    init = (y[:, :h], y[:, h:], v[:, :h], v[:, h:], jnp.asarray(True), jnp.zeros((), jnp.int32))
    yp, yq, vp, vq, _, sweeps = lax.while_loop(cond, sweep, init)
    y = jnp.concatenate([yp, yq], axis=1)
    v = jnp.concatenate([vp, vq], axis=1)
    return y[:, :t], v[:t, :t], sweeps


@jax.jit
def alignment_matrix(gramian: jax.Array) -> jax.Array:
    """``B = σ_min V Σ⁻¹ Vᵀ`` from ``G = V Σ² Vᵀ`` (zero eigenvalues dropped), so that
    ``(BJ)(BJ)ᵀ = σ_min² V_r V_rᵀ``: the rows of ``BJ`` are orthogonal with norm ``σ_min``
    (``σ_min² I`` when ``G`` has full rank).

    Computed to relative accuracy also when the gradients' norms differ by many orders of
    magnitude: with ``G = DKD`` (``D = diag(‖gᵢ‖)``, ``K`` the cosine matrix) and ``K = FFᵀ``
    (``eigh``; eigenvalues of ``K`` at or below :func:`_rank_cut` count as zero and set the
    rank ``r``), ``G = YᵀY`` with ``Y = FᵀD``; one-sided Jacobi rotations give ``V`` and
    ``Σ`` (:func:`_jacobi_rotations`), and the ``r`` largest singular values are kept."""
    norms, k = gt.unit_gramian(gramian)
    dtype = k.dtype
    lam, vec = jnp.linalg.eigh(k)
    keep = lam > _rank_cut(lam)
    rank = jnp.sum(keep)
    f = vec * jnp.sqrt(jnp.where(keep, lam, 0.0))
    # B does not change when G is scaled: the norms relative to the largest keep Y in range.
    d = _common.safe_div(norms, jnp.max(norms))
    y = f.T * d[None, :]
    yv, v, _ = _jacobi_rotations(y)
    sigma = jnp.sqrt(jnp.sum(yv * yv, axis=0))
    position = jnp.argsort(jnp.argsort(-sigma))
    kept = (position < rank) & (sigma > 0)
    sigma_min = jnp.min(jnp.where(kept, sigma, jnp.inf))
    inv = jnp.where(kept, sigma_min / jnp.where(kept, sigma, 1.0), 0.0)
    b = (v * inv) @ v.T
    return jnp.where(jnp.any(kept), b, jnp.zeros_like(b)).astype(dtype)


def _rank_cut(lam: jax.Array) -> jax.Array:
    """Eigenvalues of the cosine matrix ``K`` at or below the cut count as zero: ``10·T·ε·λ_max(K)``
    in float64 (the rank tolerance ``T·ε·λ_max`` of Senushkin et al.'s code, applied to ``K``,
    scale free, instead of ``G``) and ``4·ε·λ_max(K)`` in float32, whatever T.

    In float32 the cut sits above what rounding leaves where gradients are exactly dependent:
    with one task the sum of two others and ``G = JJᵀ`` computed in float32, the float32
    eigensolver returns that zero eigenvalue at up to about ``2·ε·λ_max(K)`` (T = 6 to 100).
    A cut below it (``0.1·T·ε``, tried before) kept it in 9 of 30 draws at T = 6 and 7 of 30 at
    T = 10, and the update shrank about 2000-fold to the rounding's ``σ_min``. The cost: a
    genuine eigenvalue below the cut, which the float32 Gramian cannot tell from that noise,
    is dropped (nearly opposite pairs at δ = 1e-3 give 1.6–4.2·ε·λ_max(K)). Beyond 40 tasks
    the paper code's ``T·ε`` would drop eigenvalues of 7.5–8·ε·λ_max(K) that a float32
    eigensolver resolves (nearly opposite pairs among 100 tasks)."""
    t = lam.shape[-1]
    scale = _CUT["float64"] * t if lam.dtype == jnp.float64 else _CUT["float32"]
    return scale * float(jnp.finfo(lam.dtype).eps) * jnp.maximum(jnp.max(lam), 0.0)


def aligned_mtl(importance: Sequence[float] | None = None) -> Method:
    """Aligned-MTL: align the principal components of the task gradients.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023 (Algorithm 1). With the Gramian ``G = J Jᵀ = V Λ Vᵀ`` and singular
    values ``σ = √λ`` of ``J``, the aligned Jacobian ``Ĵ = B J`` with

    ``B = σ_min V Λ^{-1/2} Vᵀ``

    has orthogonal rows of equal norm ``σ_min`` (condition number 1), the smallest singular
    value setting the scale as in the paper. The update is ``Ĵᵀω = Jᵀ(Bω)``: the weights are
    ``w = B ω`` with the task importances ``ω``. A rank-deficient ``G`` keeps its non-zero
    eigenvalues only (rank from the cosine matrix, see :func:`alignment_matrix`): ``σ_min`` is
    the smallest non-zero singular value and ``Ĵ`` spans the same space as ``J``. ``G = 0``
    gives ``w = 0``. The eigen-decomposition is computed by one-sided Jacobi rotations on a
    factor of ``G`` scaled by the gradients' norms, which keeps ``σ_min`` and its direction
    accurate when the norms differ by many orders of magnitude.

    Only the Gramian is needed; on the Jacobian w.r.t. the shared representation
    (``mode="feature"``) this is the paper's Aligned-MTL-UB.

    Float32 limit: the rank is decided on the Gramian, whose float32 rounding cannot tell an
    eigenvalue of the cosine matrix below a few ``ε₃₂·λ_max`` from the zero of exactly dependent
    gradients. Such directions count as dependent (:func:`_rank_cut`: ``4·ε₃₂·λ_max(K)``), as
    the authors' code drops eigenvalues of ``G`` below ``T·ε·λ_max(G)`` in the working dtype:
    nearly opposite pairs at an angle ``π − δ`` with ``δ²/2 ≤ 4·ε₃₂·λ_max(K)`` (``δ ≤ 1.4·10⁻³``
    for two tasks), and cones as close to Pareto-stationarity, get the update of the reduced
    rank, where float64 keeps the direction.
    The README's solver-accuracy section lists the corpus cases this changes.

    Args:
      importance: ``ω``, one positive weight per task (default: ones).

    Scale: ``w = Bω``; ``B`` is unchanged when ``J`` is scaled, so the direction scales with
    ``J``. Task-specific parameters get ``∇Lᵢ`` (``head_grads="unit"``).
    """
    name = "aligned_mtl"
    if importance is not None:
        importance = tuple(_common.check_positive(name, "importance", x) for x in importance)

    def omega(num_tasks: int) -> jax.Array:
        if importance is None:
            return jnp.ones((num_tasks,), jnp.float32)
        return _common.per_task_vector(name, "importance", importance, num_tasks)

    def init(num_tasks: int):
        omega(num_tasks)
        return ()

    def weights(losses, gramian, state, key):
        b = alignment_matrix(gramian)
        w = b @ omega(gramian.shape[0]).astype(b.dtype)
        return w.astype(losses.dtype), state

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
