"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the task gradients' hull."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtljax._src import solvers
from mtljax._src.base import Method, SolverInfo, SolverState, make_method
from mtljax._src.methods import _common

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(normalization: str = "none") -> Method:
    """MGDA: the min-norm element of the convex hull of the task gradients.

    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
    Comptes Rendus Mathematique 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018. The shared update is ``d = Σᵢ αᵢ gᵢ`` with

        ``α = argmin_{α ≥ 0, Σα = 1} ‖Σᵢ αᵢ gᵢ‖² = argmin_{α ∈ Δ} αᵀGα``,

    a common descent direction of all tasks (``gᵢ · d ≥ ‖d‖²`` for every ``i``), zero exactly at
    Pareto-stationary points. Solved on device by :func:`mtljax._src.solvers.min_norm_simplex`
    (interior point, then an exact active-set polish) instead of the paper's Frank-Wolfe
    iterations.

    Gradient normalisation, an option of Sener & Koltun's code (not part of the paper; their
    sample configuration uses ``"loss+"``): each ``gᵢ`` is divided by ``dᵢ`` = 1 (``"none"``),
    ``‖gᵢ‖`` (``"l2"``), ``Lᵢ`` (``"loss"``) or ``Lᵢ‖gᵢ‖`` (``"loss+"``) before the min-norm
    problem; in Gramian terms ``G' = D⁻¹GD⁻¹``, and the weights on the original gradients are
    ``wᵢ = αᵢ/dᵢ``, so that ``d = Σᵢ αᵢ gᵢ/dᵢ`` is the min-norm point of the normalised
    gradients (with ``"l2"`` it is invariant to the scale of each gradient). Their code instead
    applies ``αᵢ`` to the unnormalised losses. ``"loss"`` and ``"loss+"`` need positive losses.
    A zero gradient (or loss) gets weight 0.

    MGDA-UB, the paper's upper bound, is this method applied to the Jacobian w.r.t. the shared
    representation: ``make_train_step(..., mode="feature")``. State: ``SolverState`` holding
    the :class:`~mtljax.SolverInfo` of the last solve (iterations, converged, residual; see
    :func:`~mtljax._src.solvers.min_norm_simplex`), reported by the train step. Task-specific
    parameters get their own gradients ``∇Lᵢ`` (``head_grads="unit"``), as in the paper's
    Algorithm 2 (the released code back-propagates ``Σᵢ αᵢLᵢ`` through the heads too:
    ``head_grads="weighted"``).

    Args:
      normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.

    Scale: ``Σᵢ αᵢ = 1`` (``wᵢ = αᵢ`` without normalisation); ``d`` is the min-norm point
    itself, so its norm shrinks to 0 near Pareto-stationary points.
    """
    return _mgda(normalization, solvers.min_norm_simplex)


def _mgda(normalization: str, solve: Callable[..., tuple[jax.Array, SolverInfo]]) -> Method:
    """:func:`mgda` with the min-norm solver ``solve(gramian, return_info=True)`` given."""
    name = "mgda"
    _common.check_choice(name, "normalization", normalization, _NORMALIZATIONS)

    def init(num_tasks: int):
        return SolverState(SolverInfo.initial())

    def weights(losses, gramian, state, key):
        g = jnp.asarray(gramian)
        g = g.astype(solvers.compute_dtype(g))
        if normalization == "none":
            alpha, info = solve(g, return_info=True)
            return alpha, SolverState(info)
        norms = jnp.sqrt(jnp.clip(jnp.diagonal(g), 0.0))
        loss = jax.lax.stop_gradient(losses).astype(g.dtype)
        scale = {"l2": norms, "loss": loss, "loss+": loss * norms}[normalization]
        inv = _common.safe_div(jnp.ones_like(scale), scale)
        alpha, info = solve(g * inv[:, None] * inv[None, :], return_info=True)
        return alpha * inv, SolverState(info)

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
