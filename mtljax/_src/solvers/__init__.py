"""On-device solvers for the Gramian-based aggregation methods.

Every solver is pure JAX (``lax.while_loop`` with a bounded number of iterations), jittable and
vmappable, and works on the ``T×T`` Gramian ``G = J Jᵀ`` in float32 or wider (the input's dtype
promoted to at least float32; products at full precision, never TF32). Inputs are treated as
constants for differentiation (``stop_gradient``): the solvers are not differentiated through.

Solvers:

* :func:`min_norm_simplex`: ``min_{α ∈ Δ} αᵀGα`` (MGDA's min-norm point);
* :func:`project_dual_cone`: ``min_{v ≥ u} vᵀGv`` (the projection of ``Jᵀu`` onto the dual cone
  ``{x : Jx ≥ 0}`` is ``Jᵀv``; UPGrad and DualProj);
* :func:`solve_potential`: ``α > 0`` with ``(Gα)ᵢ = αᵢ^{-p}`` (Nash-MTL: ``p = 1``; FairGrad:
  ``p = 1/α``), the minimiser of the convex potential ``½αᵀGα + Σᵢ h_p(αᵢ)``;
* :func:`cagrad_simplex`: ``min_{w ∈ Δ} wᵀGb + r ‖Jᵀw‖`` (CAGrad's dual problem).

Scaling and regularisation. ``G`` is first rescaled by its largest diagonal entry
``s = maxᵢ ‖gᵢ‖²`` (``s = 1`` when ``G = 0``), or, for the projections and the potential
equations, brought to the :func:`correlation` matrix of the unit gradients, whose diagonal is 1
whatever the gradients' scales. A ridge proportional to each task's own squared gradient norm
is added, ``G + ε·diag(G)`` (:func:`regularize`; ``ε = 10⁻⁶`` in float32 and ``10⁻¹⁰`` in
float64, :func:`default_ridge`): each gradient gets a private component of relative squared norm
``ε``. The projections onto the dual cone and the potential equations use instead the ridge
``εI`` on the correlation matrix with ``ε`` at its rounding level (:func:`rounding_ridge`:
``eps`` and ``4·eps``), so that their solutions move no more than rounding the input moves
them, also where the gradients nearly conflict. The problems are then strongly convex with
unique, finite solutions, also for identical or opposite gradients; per-task scale invariances
stay exact; well-conditioned solutions move by ``O(ε)``. Zero gradients are handled explicitly
by each solver (see their docstrings).

Algorithms. The min-norm QP and CAGrad's problem are solved by a primal-dual interior-point
method with Mehrotra's predictor-corrector: one Cholesky factorisation of a ``T×T`` matrix per
iteration, at most :data:`IPM_MAX_ITER` iterations, typically 8 to 18. It stops when the
duality gap is small relative to the objective (``xᵀz ≤ tol·size``, ``tol`` =
:func:`default_tol`: ``10⁻¹²`` in float32, ``10⁻¹⁵`` in float64) and the KKT residuals are at
rounding level relative to the magnitudes of their terms, so that gradients of very different
norms are resolved. The QP solutions are then polished: the KKT system is solved on the active
set the interior point identified, and the result is kept when it is feasible and stationary to
rounding, which makes it exact. The projections are solved by principal pivoting from
``v = u`` (rank-one updates of a ``T×(T+1)`` tableau, one per coordinate that becomes free),
certified exact the same way; the interior point is their fallback (see
:func:`project_dual_cone`). The potential equations are solved by damped Newton steps with
a line search over ``2^k`` step sizes evaluated at once, on cancellation-free differences of the
potential (at most :data:`NEWTON_MAX_ITER` iterations, typically 3 to 15; stops when every
equation holds to a few eps relative to the magnitudes of its terms). With ``return_info=True``
every solver also returns a :class:`~mtljax.SolverInfo` (iterations, converged, relative
residual).
"""

from __future__ import annotations

from mtljax._src.solvers._linalg import (
    compute_dtype,
    correlation,
    default_ridge,
    default_tol,
    normalize_gramian,
    regularize,
    rounding_ridge,
)
from mtljax._src.solvers.cagrad import cagrad_simplex
from mtljax._src.solvers.dual_cone import project_dual_cone
from mtljax._src.solvers.interior_point import IPM_MAX_ITER
from mtljax._src.solvers.min_norm import min_norm_simplex
from mtljax._src.solvers.potential import NEWTON_MAX_ITER, solve_potential

__all__ = [
    "IPM_MAX_ITER",
    "NEWTON_MAX_ITER",
    "cagrad_simplex",
    "compute_dtype",
    "correlation",
    "default_ridge",
    "default_tol",
    "min_norm_simplex",
    "normalize_gramian",
    "project_dual_cone",
    "regularize",
    "rounding_ridge",
    "solve_potential",
]
