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
* :func:`cagrad_simplex`: ``min_{w ∈ Δ} wᵀGb + r ‖Jᵀw‖`` (CAGrad's dual problem) and the
  weights ``λ`` of its direction.

Scaling and regularisation. The min-norm problem, the projections and the potential equations are
posed on the :func:`correlation` matrix ``C`` of the unit gradients, whose diagonal is 1 whatever
the gradients' scales; CAGrad's problem on ``G`` divided by its largest diagonal entry
(:func:`normalize_gramian`). The min-norm interior point runs on :func:`regularize` ``(C) = C + εI``
(``ε`` = :func:`default_ridge`: ``10⁻⁶`` in float32, ``10⁻¹⁰`` in float64), and the active set it
finds is then solved on ``C`` itself. The projections and the potential equations keep a ridge
``εI`` at the rounding level of ``C`` (:func:`rounding_ridge`: ``eps`` for the projections,
``4·eps`` for the potential), so that their solutions move no more than rounding the input moves
them, also where the gradients nearly conflict. CAGrad's solve takes ``‖Jᵀw‖²`` from ``G + ε'ddᵀ``
(``dᵢ`` the normalised gradient norms; ``ε' = 4ε²``, raised to at least ``ε`` for a new pass when
one ends unconverged near the cone's tip or meets ``wᵀ(G + ε'ddᵀ)w < 0``). Per-task scale
invariances stay exact. Zero gradients are handled explicitly by each solver (see their docstrings).

Algorithms.

* Min-norm point: a primal-dual interior point with Mehrotra's predictor-corrector over the
  weighted simplex (one Cholesky factorisation of a ``T×T`` matrix per iteration, at most
  :data:`IPM_MAX_ITER` iterations; it stops when the duality gap is small relative to the
  objective, ``xᵀz ≤ tol·size`` with ``tol`` = :func:`default_tol`, ``10⁻¹²`` in float32 and
  ``10⁻¹⁵`` in float64, and the KKT residuals are at rounding level relative to the magnitudes
  of their terms). Its active set is then solved on the unregularised problem and refined, and
  the candidate with the smaller KKT residual is kept. In float32, near Pareto-stationarity,
  steps of Wolfe's primal active-set method in double-float follow (see
  :func:`min_norm_simplex`).
* Projections onto the dual cone: principal pivoting from ``v = u`` (rank-one updates of a
  ``T×(T+1)`` tableau, one per pivot; Murty's least-index rule after ``T`` pivots), the result
  kept where it is certified exact to rounding; elsewhere the KKT systems on the active sets
  found are solved by Cholesky factorisations, and where one is still not certified, by the
  same interior point over the orthant, then polished (``algorithm="interior_point"`` uses it
  from the start). In float32, up to 16 tasks, projections near Pareto-stationarity are solved
  again in double-float.
* Potential equations: damped Newton on the potential (one Cholesky factorisation per
  iteration), with a line search over ``2^k`` step sizes evaluated at once, on
  cancellation-free differences of the potential (at most :data:`NEWTON_MAX_ITER` iterations,
  typically 3 to 15; it stops when every equation holds to ``16·eps`` relative to the
  magnitudes of its terms).
* CAGrad's problem: a barrier method on its second-order cone form (Newton steps globalised by
  an Armijo line search, ``μ`` divided by 30 once the iterate is centred, ``Gw`` and ``wᵀGw``
  evaluated with error-free transformations), stopped by a duality-gap certificate (at most 100
  iterations, typically 10 to 25); a converged answer is then solved exactly on candidate
  supports, and that solution replaces it where its KKT conditions hold to ``64ε`` of their
  terms (:func:`mtljax._src.solvers.cagrad.cagrad_solve`).

Reports. With ``return_info=True``, :func:`min_norm_simplex`, :func:`project_dual_cone` and
:func:`solve_potential` also return a :class:`~mtljax.SolverInfo` (iterations, converged,
relative residual). :func:`cagrad_simplex` returns ``(w, λ)`` only; the
:class:`~mtljax.SolverInfo` of that solve is the ``info`` of
:func:`~mtljax._src.solvers.cagrad.cagrad_solve`'s result, which the CAGrad method uses.
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
