"""ConFIG: conflict-free updates (Liu, Chu & Thuerey 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods import _gramian_tools as gt


@jax.jit
def conflict_free_weights(gramian: jax.Array) -> jax.Array:
    """ConFIG's weights ``w`` (``Jᵀw = g_ConFIG``) from a Gramian.

    ``g_c = U⁺𝟙 = Uᵀ K⁺ 𝟙 = Σₖ βₖ uₖ`` with ``β = K⁺𝟙`` (``U``: the unit gradients as rows,
    ``K = UUᵀ``); ``‖g_c‖² = βᵀKβ`` and ``Σᵢ gᵢ · g_c = nᵀKβ``. So
    ``g_ConFIG = (nᵀKβ / βᵀKβ) Σₖ βₖ uₖ``, i.e. ``wₖ = (nᵀKβ / βᵀKβ) βₖ / nₖ``.
    """
    norms, k = gt.unit_gramian(gramian)
    nonzero = norms > 0
    beta = gt.psd_pinv_apply(k, nonzero.astype(k.dtype))
    k_beta = k @ beta
    length_sq = beta @ k_beta
    proj = norms @ k_beta
    q = jnp.where(nonzero, beta / jnp.where(nonzero, norms, 1.0), 0.0)
    return _common.safe_div(proj, jnp.where(length_sq > 0, length_sq, 0.0)) * q


def config() -> Method:
    """ConFIG: the direction with equal cosines to every task gradient.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv 2024). With unit gradients ``uᵢ = gᵢ / ‖gᵢ‖`` stacked as the
    rows of ``U``:

    * ``g_u = g_c / ‖g_c‖`` with ``g_c = U⁺ 𝟙`` (pseudo-inverse): ``uᵢ · g_c = 1`` for every
      task when the gradients are linearly independent, so ``g_u`` has the same cosine with
      every gradient (and ``gᵢ · g_u > 0``: no conflict);
    * length: ``g_ConFIG = (Σᵢ gᵢ · g_u) g_u``, the sum of the projections.

    Computed from the Gramian alone (``U⁺ = Uᵀ(UUᵀ)⁺``; :func:`conflict_free_weights`), so it
    runs on parameter- or feature-level Jacobians. With linearly dependent gradients the
    pseudo-inverse gives the least-squares ``g_c`` (the cosines are then equal only where they
    can be); opposite gradients give 0; zero gradients take no part.

    No hyper-parameters; no state. Scale: ``‖g_ConFIG‖ = Σᵢ gᵢ · g_u``, as in the paper.
    Task-specific parameters get ``∇Lᵢ`` (``head_grads="unit"``).
    """

    def init(num_tasks: int):
        return ()

    def weights(losses, gramian, state, key):
        return conflict_free_weights(gramian).astype(losses.dtype), state

    return make_method("config", init, needs="gramian", weights=weights, head_grads="unit")
