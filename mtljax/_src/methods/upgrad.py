"""UPGrad (Quinton & Rey 2024): the mean of the task gradients projected onto the dual cone."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mtljax._src import solvers
from mtljax._src.base import Method, SolverInfo, SolverState, make_method
from mtljax._src.methods import _common


def check_pref_vector(name: str, pref_vector: Sequence[float] | None) -> tuple[float, ...] | None:
    """Validates a preference vector: finite, non-negative entries, not all zero."""
    if pref_vector is None:
        return None
    try:
        values = tuple(float(v) for v in pref_vector)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: pref_vector must be a sequence of numbers, got {pref_vector!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) == 0:
        raise ValueError(
            f"{name}: pref_vector must hold finite, non-negative numbers, not all zero; "
            f"got {pref_vector!r}"
        )
    return values


def pref_weights(
    name: str, pref: tuple[float, ...] | None, num_tasks: int, dtype=jnp.float32
) -> jnp.ndarray:
    """The preference vector ``u`` (``1/T`` by default), rounded once to ``dtype`` (never
    through float32 on the way to float64)."""
    if pref is None:
        return jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    _common.per_task_vector(name, "pref_vector", pref, num_tasks)  # validates the length
    return jnp.asarray(pref, dtype)


def upgrad(pref_vector: Sequence[float] | None = None) -> Method:
    """UPGrad: project each task gradient onto the dual cone of all of them, then average.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232
    (2024). With ``π_J`` the projection onto the dual cone ``{x : Jx ≥ 0}`` (the directions
    that conflict with no task), the aggregation is

        ``d = Σᵢ uᵢ π_J(gᵢ)``,   ``u = 1/T`` by default (the mean of the projections).

    In Gramian terms ``π_J(Jᵀeᵢ) = Jᵀvᵢ`` with ``vᵢ = argmin_{v ≥ eᵢ} vᵀGv`` (Proposition 1 of
    the paper), so ``d = Jᵀw`` with ``w = Σᵢ uᵢ vᵢ``: T box-constrained QPs, solved as one batch
    on device by :func:`mtljax._src.solvers.project_dual_cone` (principal pivoting from
    ``vᵢ = eᵢ``, which is the solution when no gradient conflicts with ``gᵢ``, then an exact
    active-set solve). Properties (paper, Section 3):
    non-conflicting (``Jd ≥ 0``); linear under scaling (scaling the rows by ``c > 0`` gives
    ``d = Σᵢ cᵢuᵢ π_J(gᵢ)``, linear in ``c``; in particular ``d`` scales linearly with ``J``);
    weighted (``d = Jᵀw``).

    Regularisation: the paper projects exactly; its authors' library (torchjd) normalises ``G``
    by its trace and adds ``10⁻⁴ I`` before calling a QP solver. Here ``G`` is brought to the
    correlation matrix and given a ridge at its rounding level, the dtype's eps
    (:func:`mtljax._src.solvers.rounding_ridge`: ``1.2·10⁻⁷`` in float32, ``2.2·10⁻¹⁶`` in
    float64), so the projection is exact to about the precision of its input.

    State: ``SolverState`` holding the :class:`~mtljax.SolverInfo` of the last batch of
    projections (the most iterations, all converged, the largest residual), reported by the
    train step. Task-specific parameters get their own gradients ``∇Lᵢ``
    (``head_grads="unit"``), as with Jacobian descent's multi-task backward.

    Args:
      pref_vector: the weights ``u`` combining the projected gradients (non-negative, one per
        task); ``None`` for the mean, as in the paper.

    Scale: with the default ``u = 1/T``, ``d`` equals the mean gradient when no two gradients
    conflict (each ``gᵢ`` is then its own projection).
    """
    return _upgrad(pref_vector, solvers.project_dual_cone)


def _upgrad(
    pref_vector: Sequence[float] | None, project: Callable[..., tuple[jax.Array, SolverInfo]]
) -> Method:
    """:func:`upgrad` with the projection ``project(gramian, u, return_info=True)`` given."""
    name = "upgrad"
    pref = check_pref_vector(name, pref_vector)

    def init(num_tasks: int):
        pref_weights(name, pref, num_tasks)
        return SolverState(SolverInfo.initial())

    def weights(losses, gramian, state, key):
        t = losses.shape[0]
        g = jnp.asarray(gramian)
        dtype = solvers.compute_dtype(g)
        u = pref_weights(name, pref, t, dtype)
        v, info = project(g.astype(dtype), jnp.eye(t, dtype=dtype), return_info=True)
        return jnp.sum(u[:, None] * v, axis=0), SolverState(info)

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
