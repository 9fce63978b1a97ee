"""Fixed, user-given task weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from mtljax._src.base import Method, make_method


def fixed(weights: Sequence[float]) -> Method:
    """Fixed weights: the shared update is ``∇ Σᵢ wᵢ Lᵢ`` with the given ``w``.

    Linear scalarization with hand-chosen weights, the classic grid-searched baseline (e.g.
    Kendall et al. 2018 compare against it). Needs the losses only. ``len(weights)`` must equal
    the number of tasks; weights must be finite and ≥ 0 with a positive sum.
    """
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise ValueError(f"fixed: weights must be a sequence of numbers, got {weights!r}") from e
    if not values or not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(
            f"fixed: weights must be finite, non-negative, with a positive sum; got {values}"
        )

    def init(num_tasks: int):
        if num_tasks != len(values):
            raise ValueError(
                f"fixed: {len(values)} weights were given but there are {num_tasks} tasks"
            )
        return ()

    def weights_fn(losses, gramian, state, key):
        if losses.shape[0] != len(values):
            raise ValueError(
                f"fixed: {len(values)} weights were given but there are {losses.shape[0]} tasks"
            )
        return jnp.asarray(values, losses.dtype), state

    return make_method("fixed", init, needs="losses", weights=weights_fn)
