"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution of the tasks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src import solvers
from mtljax._src.base import Method, SolverInfo, make_method


class NashMTLState(NamedTuple):
    """Nash-MTL's state.

    Attributes:
      alpha: the last weights computed (warm start, reused between updates), ``[T]`` in the
        default float dtype (float32, or float64 under ``jax_enable_x64``).
      step: the steps taken, int32.
      solver: the last solve's :class:`~mtljax.SolverInfo` (kept through the steps that reuse
        ``alpha``).
    """

    alpha: jax.Array
    step: jax.Array
    solver: SolverInfo


def nash_mtl(update_weights_every: int = 1) -> Method:
    """Nash-MTL: the tasks bargain over the update direction; the Nash bargaining solution.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022. Over directions ``d`` in a ball, the bargaining solution
    maximises ``Σᵢ log(gᵢ · d)``; it is ``d = Σᵢ αᵢ gᵢ`` with ``α > 0`` solving

        ``(Gα)ᵢ = 1/αᵢ``   for every task ``i``   (i.e. ``αᵢ (gᵢ · d) = 1``).

    These are the stationarity conditions of the strictly convex ``½αᵀGα − Σᵢ log αᵢ`` on
    ``α > 0``, minimised on device by damped Newton steps
    (:func:`mtljax._src.solvers.solve_potential` with ``p = 1``), warm-started from the
    previous ``α`` kept in the state, as the authors' implementation warm-starts its sequence
    of convex problems. The solution is exact up to rounding and the ridge, where that
    implementation stops at ``‖Gα − 1/α‖ < 10⁻³`` (on ``G/‖G‖_F``).

    The solution exists iff no convex combination of the gradients vanishes (the paper assumes
    linearly independent gradients). Otherwise, e.g. for two opposite gradients, the relative
    ridge of the solver (at the rounding level, ``4·eps``: ``4.8·10⁻⁷`` in float32) gives large
    but finite weights to the tasks involved (about ``1.4·10³`` times their well-posed scale in
    float32, ``3·10⁷`` in float64) while the direction stays the
    bargaining solution of the others; a task with an exactly zero gradient gets ``αᵢ = 0``.
    The weights are invariant to the scale of each task's gradient: ``gᵢ → kgᵢ`` gives
    ``αᵢ → αᵢ/k`` and the same ``d``.

    Args:
      update_weights_every: recompute ``α`` every this many steps and reuse it in between (a
        speed-up offered by the authors' code; their default, 1, recomputes it every step).

    State: the last ``α`` (initialised to ones, as in the authors' code), the step count and
    the last solve's :class:`~mtljax.SolverInfo` (its residual is the relative residual of the
    equations above, see :func:`~mtljax._src.solvers.solve_potential`). ``α`` is kept in the
    default float dtype, ``jnp.result_type(float)``: float32, or float64 under
    ``jax_enable_x64`` (so that a float64 computation keeps its weights in float64); the
    returned weights have that dtype too, whatever the Gramian's, so the state's type never
    changes between steps.
    Task-specific parameters get ``αᵢ∇Lᵢ`` (``head_grads="weighted"``), the gradient of the
    weighted loss, as in the authors' code.

    Scale: the paper's, ``αᵢ (gᵢ · d) = 1``; so ``‖d‖² = Σᵢ αᵢ gᵢ·d = T`` whatever the scale of
    the gradients. The authors' code also clips the norm of the shared update to 1
    (``max_norm``); compose with ``optax.clip_by_global_norm(1.0)`` for the same effect (it
    clips all parameters, not only the shared ones).
    """
    name = "nash_mtl"
    ok = isinstance(update_weights_every, int) and not isinstance(update_weights_every, bool)
    if not ok or update_weights_every < 1:
        raise ValueError(
            f"{name}: update_weights_every must be an integer ≥ 1, got {update_weights_every!r}"
        )
    every = int(update_weights_every)

    def init(num_tasks: int) -> NashMTLState:
        dtype = jnp.result_type(float)
        return NashMTLState(
            jnp.ones((num_tasks,), dtype), jnp.zeros((), jnp.int32), SolverInfo.initial()
        )

    def weights(losses, gramian, state: NashMTLState, key):
        prev = state.alpha

        def solve(_):
            alpha, info = solvers.solve_potential(gramian, 1.0, prev, return_info=True)
            return alpha.astype(prev.dtype), info

        if every == 1:
            alpha, info = solve(None)
        else:
            keep = lambda _: (prev, state.solver)  # noqa: E731
            alpha, info = jax.lax.cond(state.step % every == 0, solve, keep, None)
        return alpha, NashMTLState(alpha, state.step + 1, info)

    return make_method(name, init, needs="gramian", weights=weights)
