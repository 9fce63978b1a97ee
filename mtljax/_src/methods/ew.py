"""Equal weighting (linear scalarization with equal weights)."""

from __future__ import annotations

import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods._common import check_choice


def ew(reduction: str = "sum") -> Method:
    """Equal weighting: the shared update is ``∇ Σᵢ Lᵢ`` (``reduction="sum"``, ``wᵢ = 1``) or
    ``∇ (1/T) Σᵢ Lᵢ`` (``reduction="mean"``, ``wᵢ = 1/T``).

    The usual baseline of every MTL paper (e.g. Caruana 1997, "Multitask Learning"). Needs the
    losses only: one backward pass. Task-specific parameters get ``wᵢ∇Lᵢ``.
    """
    check_choice("ew", "reduction", reduction, ("sum", "mean"))

    def init(num_tasks: int):
        return ()

    def weights(losses, gramian, state, key):
        t = losses.shape[0]
        scale = 1.0 if reduction == "sum" else 1.0 / t
        return jnp.full((t,), scale, losses.dtype), state

    return make_method("ew", init, needs="losses", weights=weights)
