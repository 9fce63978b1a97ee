"""FairGrad (Ban & Ji 2024): α-fair resource allocation among tasks."""

from __future__ import annotations

from mtljax._src import solvers
from mtljax._src.base import Method, SolverInfo, SolverState, make_method
from mtljax._src.methods import _common


def fairgrad(alpha: float = 1.0) -> Method:
    """FairGrad: the update direction that maximises the tasks' total α-fair utility.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024. Each task's
    utility is the α-fair function of its loss decrease ``gᵢ · d``,
    ``(gᵢ·d)^{1−α}/(1−α)`` (``log(gᵢ·d)`` for ``α = 1``), summed over the tasks and maximised
    over a ball of directions. The optimum is ``d = Σᵢ wᵢ gᵢ`` with ``w > 0`` solving

        ``Gw = w^{−1/α}``   (element-wise:  ``(Gw)ᵢ = wᵢ^{−1/α}``, i.e. ``gᵢ · d = wᵢ^{−1/α}``),

    the stationarity conditions of the strictly convex potential
    ``½wᵀGw + Σᵢ h(wᵢ)`` with ``h' = −w^{−1/α}``, minimised on device by damped Newton steps
    (:func:`mtljax._src.solvers.solve_potential` with ``p = 1/α``; the paper's code calls a
    least-squares solver on the equations). ``α = 1`` is proportional fairness, Nash-MTL's
    equation; ``α → ∞`` tends to max-min fairness (equal loss decreases); small ``α`` favours the
    total decrease. Where no solution exists (some convex combination of the gradients
    vanishes) the solver's relative ridge (``4·eps``, at the rounding level) keeps the weights
    finite; a task with an exactly zero gradient gets ``wᵢ = 0``.

    Args:
      alpha: the fairness parameter ``α > 0`` (1.0, the default of the authors' code; their
        experiment scripts use 2.0 on QM9 and CelebA).

    State: the last solve's :class:`~mtljax.SolverInfo` (:class:`~mtljax.SolverState`; its
    residual is the relative residual of the equations above, see
    :func:`~mtljax._src.solvers.solve_potential`); each step solves from scratch, as in the
    paper's code. Task-specific parameters get their own gradients ``∇Lᵢ``
    (``head_grads="unit"``), as in the authors' code.

    Scale: the paper's, ``d = Σᵢ wᵢgᵢ`` with ``gᵢ · d = wᵢ^{−1/α}``: ``w`` scales as
    ``‖g‖^{−2α/(1+α)}``. The authors' code multiplies the shared update by ``T`` and clips its
    norm to 1; use a ``T``-fold learning rate and ``optax.clip_by_global_norm(1.0)`` for a
    similar effect.
    """
    name = "fairgrad"
    alpha = _common.check_positive(name, "alpha", alpha)
    p = 1.0 / alpha

    def init(num_tasks: int) -> SolverState:
        return SolverState(SolverInfo.initial())

    def weights(losses, gramian, state: SolverState, key):
        w, info = solvers.solve_potential(gramian, p, return_info=True)
        return w, SolverState(info)

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
