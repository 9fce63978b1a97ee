"""Geometric loss strategy (Chennupati et al. 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common


def geometric_mean(losses: jax.Array, eps: float = 1e-8) -> jax.Array:
    """GLS's objective ``(Πᵢ max(Lᵢ, ε))^{1/T}``, computed in log space (``ε`` as in
    :func:`gls`)."""
    clamped = jnp.maximum(losses, eps)
    return jnp.exp(jnp.mean(jnp.log(clamped)))


def gls(*, eps: float = 1e-8) -> Method:
    """Geometric loss strategy: minimise the geometric mean of the task losses.

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019. The objective is

        G = (Πᵢ Lᵢ)^{1/T},   ∇G = Σᵢ (G / (T·Lᵢ)) ∇Lᵢ,

    so the weights are ``wᵢ = G / (T·Lᵢ)``: a task with a small loss gets a large weight, and
    the objective is invariant to a rescaling of any one loss (only the scale of ``∇G``
    changes). The method has no hyper-parameter in the paper.

    Non-positive losses: the geometric mean is defined for positive losses only. Each loss is
    clamped from below at ``eps``, so the objective is ``(Πᵢ max(Lᵢ, ε))^{1/T}`` and the
    weights are exactly its gradient: a task with ``Lᵢ ≤ ε`` (solved, or a negative loss) gets
    weight 0 and enters the product as ``ε``; the others get ``G/(T·Lᵢ)`` with that ``G``. The
    weights are computed in log space, ``wᵢ = exp(meanⱼ log L̃ⱼ − log L̃ᵢ) / T``, and are finite
    for any finite losses.

    Args:
      eps: the loss floor ``ε > 0``. The default 1e-8 is this library's numerical guard, not in
        the paper (LibMTL's GLS, ``torch.pow(losses.prod(), 1./T)``, has no floor either): it
        keeps ``log Lᵢ`` finite for a zero loss and changes nothing when every loss exceeds it.

    Scale: the gradient of the geometric mean (weights ``1/T`` each when all losses are equal).
    Task-specific parameters get ``wᵢ∇Lᵢ``.
    """
    name = "gls"
    eps = _common.check_positive(name, "eps", eps)

    def init(num_tasks: int):
        return ()

    def weights(losses, gramian, state, key):
        dtype = losses.dtype
        x = jax.lax.stop_gradient(losses).astype(jnp.promote_types(dtype, jnp.float32))
        t = x.shape[0]
        log_x = jnp.log(jnp.maximum(x, eps))
        w = jnp.exp(jnp.mean(log_x) - log_x) / t
        w = jnp.where(x > eps, w, 0.0)
        return w.astype(dtype), state

    return make_method(name, init, needs="losses", weights=weights)
