"""Aligned-MTL: independent component alignment (Senushkin et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods import _gramian_tools as gt


@jax.jit
def alignment_matrix(gramian: jax.Array) -> jax.Array:
    """``B = σ_min V Σ⁻¹ Vᵀ`` from ``G = V Σ² Vᵀ`` (zero eigenvalues dropped), so that
    ``(BJ)(BJ)ᵀ = σ_min² V_r V_rᵀ``: the rows of ``BJ`` are orthogonal with norm ``σ_min``
    (``σ_min² I`` when ``G`` has full rank)."""
    g = jnp.asarray(gramian)
    g = g.astype(gt.compute_dtype(g))
    g = 0.5 * (g + g.T)
    # B does not change when G is scaled; normalizing first keeps eigh in range.
    top = jnp.max(jnp.abs(jnp.diagonal(g)))
    g = _common.safe_div(g, top)
    lam, vec = jnp.linalg.eigh(g)
    keep = lam > gt.rank_tolerance(lam)
    sigma_min = jnp.sqrt(jnp.min(jnp.where(keep, lam, jnp.inf)))
    inv_sigma = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    b = sigma_min * (vec * inv_sigma) @ vec.T
    return jnp.where(jnp.any(keep), b, jnp.zeros_like(b))


def aligned_mtl(importance: Sequence[float] | None = None) -> Method:
    """Aligned-MTL: align the principal components of the task gradients.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023 (Algorithm 1). With the Gramian ``G = J Jᵀ = V Λ Vᵀ`` and singular
    values ``σ = √λ`` of ``J``, the aligned Jacobian ``Ĵ = B J`` with

    ``B = σ_min V Λ^{-1/2} Vᵀ``

    has orthogonal rows of equal norm ``σ_min`` (condition number 1), the smallest singular
    value setting the scale as in the paper. The update is ``Ĵᵀω = Jᵀ(Bω)``: the weights are
    ``w = B ω`` with the task importances ``ω``. A rank-deficient ``G`` keeps its non-zero
    eigenvalues only (those above ``λ_max · T · ε`` ×10, ε of the dtype): ``σ_min`` is the
    smallest non-zero singular value and ``Ĵ`` spans the same space as ``J``. ``G = 0`` gives
    ``w = 0``.

    Only the Gramian is needed; on the Jacobian w.r.t. the shared representation
    (``mode="feature"``) this is the paper's Aligned-MTL-UB.

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
