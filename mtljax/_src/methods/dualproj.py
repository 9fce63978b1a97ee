"""DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mtljax._src import solvers
from mtljax._src.base import Method, SolverInfo, SolverState, make_method
from mtljax._src.methods.upgrad import check_pref_vector, pref_weights


def dualproj(pref_vector: Sequence[float] | None = None) -> Method:
    """DualProj: project the mean gradient onto the dual cone of the task gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232
    (2024). With ``π_J`` the projection onto the dual cone ``{x : Jx ≥ 0}``,

        ``d = π_J(Jᵀu)``,   ``u = 1/T`` by default (the mean gradient).

    In Gramian terms ``d = Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv``, one box-constrained QP
    solved on device by :func:`mtljax._src.solvers.project_dual_cone`. Non-conflicting
    (``Jd ≥ 0``) and linear under scaling of ``J``; unlike UPGrad it is not invariant to the
    relative scales of the rows.

    Regularisation: as for :func:`mtljax.methods.upgrad`, a ridge at the rounding level of the
    correlation matrix (the dtype's eps) instead of the trace normalisation and ``10⁻⁴ I`` of
    the authors' library.

    State: ``SolverState`` holding the :class:`~mtljax.SolverInfo` of the last projection,
    reported by the train step. Task-specific parameters get their own gradients ``∇Lᵢ``
    (``head_grads="unit"``).

    Args:
      pref_vector: the combination ``u`` of the gradients that is projected (non-negative, one
        per task); ``None`` for the mean, as in the paper.

    Scale: with the default ``u = 1/T``, ``d`` is the mean gradient when it conflicts with no
    task.
    """
    return _dualproj(pref_vector, solvers.project_dual_cone)


def _dualproj(
    pref_vector: Sequence[float] | None, project: Callable[..., tuple[jax.Array, SolverInfo]]
) -> Method:
    """:func:`dualproj` with the projection ``project(gramian, u, return_info=True)`` given."""
    name = "dualproj"
    pref = check_pref_vector(name, pref_vector)

    def init(num_tasks: int):
        pref_weights(name, pref, num_tasks)
        return SolverState(SolverInfo.initial())

    def weights(losses, gramian, state, key):
        t = losses.shape[0]
        g = jnp.asarray(gramian)
        dtype = solvers.compute_dtype(g)
        u = pref_weights(name, pref, t, dtype)
        v, info = project(g.astype(dtype), u, return_info=True)
        return v, SolverState(info)

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
