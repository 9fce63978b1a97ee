"""IMTL-G: impartial gradient weighting (Liu et al. 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _gramian_tools as gt

# Relative squared residual above which 1 counts as outside the range of K (see below).
_RANGE_TOL = 1e-4


@jax.jit
def impartial_weights(gramian: jax.Array) -> jax.Array:
    """IMTL-G's ``α`` (``Σα = 1``) from a Gramian: equal projections ``uᵢ · Jᵀα`` for all ``i``.

    With ``n`` the row norms and ``K`` the cosine matrix, ``uᵢ · Jᵀα = (Gα)ᵢ / nᵢ``, so the
    condition reads ``K (N α) = c 𝟙``: ``α = N⁻¹ K⁺ 𝟙 / 𝟙ᵀN⁻¹K⁺𝟙``, one T×T eigen-solve. When
    ``𝟙`` is not in the range of ``K`` (e.g. two opposite gradients) only ``c = 0`` is possible;
    ``β`` is then the component of ``𝟙`` in the null space of ``K`` (``Σβᵢuᵢ = 0``) and the
    direction is 0. Zero gradients take no part (``αᵢ = 0``). If ``Σᵢ βᵢ/nᵢ`` vanishes the
    weights are uniform over the non-zero tasks.
    """
    norms, k = gt.unit_gramian(gramian)
    nonzero = norms > 0
    b = nonzero.astype(k.dtype)
    beta_range = gt.psd_pinv_apply(k, b)
    residual = b - k @ beta_range
    in_range = jnp.sum(residual**2) <= _RANGE_TOL * jnp.maximum(jnp.sum(b), 1.0)
    beta = jnp.where(in_range, beta_range, residual)
    q = jnp.where(nonzero, beta / jnp.where(nonzero, norms, 1.0), 0.0)
    total = jnp.sum(q)
    ok = jnp.abs(total) > 1e-6 * jnp.sum(jnp.abs(q))
    count = jnp.sum(b)
    fallback = jnp.where(count > 0, b / jnp.maximum(count, 1.0), jnp.full_like(b, 1.0 / b.size))
    return jnp.where(ok, q / jnp.where(ok, total, 1.0), fallback)


def imtl_g() -> Method:
    """IMTL-G: the combination of the task gradients with equal projections on every task.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Section 3.2). With unit gradients ``uᵢ = gᵢ / ‖gᵢ‖``, the aggregated gradient
    ``g = Σᵢ αᵢ gᵢ`` with ``Σᵢ αᵢ = 1`` is the one whose projections ``g · uᵢ`` are equal for all
    tasks. The paper's closed form ``α₂:T = g₁Uᵀ(DUᵀ)⁻¹``, ``α₁ = 1 − Σ α₂:T`` (``D``, ``U``: the
    rows ``g₁ − gᵢ``, ``u₁ − uᵢ``) is solved here as ``G α ∝ n`` (``nᵢ = ‖gᵢ‖``) in cosine
    coordinates, a T×T symmetric eigen-solve that also handles collinear and zero gradients
    (see :func:`impartial_weights`). Only the Gramian is needed: the paper computes it w.r.t. the
    shared representation, i.e. ``mode="feature"`` of the train step.

    No hyper-parameters; no state. Scale: ``Σᵢ αᵢ = 1`` as in the paper. The common projection
    is ``1 / Σᵢ βᵢ/nᵢ`` (``β = K⁺𝟙``), which is negative for some inputs with three or more
    tasks: the paper's normalization then yields a direction that opposes every task gradient
    (equal, negative projections). Task-specific parameters get ``∇Lᵢ`` (``head_grads="unit"``),
    as in the paper.
    """

    def init(num_tasks: int):
        return ()

    def weights(losses, gramian, state, key):
        return impartial_weights(gramian).astype(losses.dtype), state

    return make_method("imtl_g", init, needs="gramian", weights=weights, head_grads="unit")
