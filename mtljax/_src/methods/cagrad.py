"""CAGrad (Liu et al. 2021): conflict-averse gradient descent."""

from __future__ import annotations

from mtljax._src.base import Method, SolverInfo, SolverState, make_method
from mtljax._src.methods import _common
from mtljax._src.solvers.cagrad import cagrad_solve


def cagrad(c: float = 0.4, *, rescale: bool = False) -> Method:
    """CAGrad: the best worst-case improvement within a ball around the mean gradient.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021. With ``g₀ = (1/T) Σᵢ gᵢ`` the mean gradient, the update solves

        ``max_d minᵢ gᵢ · d``   s.t.   ``‖d − g₀‖ ≤ c‖g₀‖``.

    Its dual is ``min_{w ∈ Δ} g_wᵀg₀ + √φ ‖g_w‖`` with ``g_w = Σᵢ wᵢgᵢ`` and ``φ = c²‖g₀‖²``,
    and ``d = g₀ + (√φ/‖g_w‖) g_w`` (the paper's Algorithm 1). Only the Gramian is needed:
    ``g_wᵀg₀ = wᵀGu``, ``‖g_w‖² = wᵀGw`` with ``u = 1/T``; the weights on the gradients are
    ``λ = u + (√φ/‖g_w‖) w``. The dual, a second-order cone program, is solved on device by
    :func:`mtljax._src.solvers.cagrad.cagrad_solve`: a barrier method whose Newton steps are
    globalised by a line search, with ``‖g_w‖`` replaced along the way by the barrier's
    ``s ≥ ‖g_w‖`` (so the direction stays in the ball and is defined when ``g_w`` vanishes).
    It stops on the duality gap between ``F(w)`` and the worst-task progress ``minᵢ gᵢ·d`` of
    the returned direction (relative to ``‖g₀‖·maxᵢ‖gᵢ‖``), which certifies how far ``d`` is
    from the best in the ball; the reported residual is that gap relative to the magnitude of
    the terms of its evaluation (about ``ε`` at the rounding level). A converged answer is then
    solved exactly on its support (in variables scaled by the gradients' norms) and replaced
    when the KKT conditions certify that solution, so that gradients whose norms differ by many
    orders of magnitude get the exact direction. ``c = 0`` gives the mean
    gradient; a large ``c``
    approaches MGDA's direction; the paper's convergence guarantee to a minimum of the average
    loss needs ``0 ≤ c < 1``.

    Args:
      c: the radius of the ball relative to ``‖g₀‖`` (0.4, the paper's value for NYU-v2 and
        Cityscapes; its toy example uses 0.5).
      rescale: divide ``d`` by ``1 + c²``, as the authors' released code does (off by default:
        the paper's formula).

    State: :class:`mtljax.SolverState`, the last solve's :class:`mtljax.SolverInfo` (the
    train step reports it and can act on an unconverged solve). Task-specific parameters get
    their own gradients ``∇Lᵢ`` (``head_grads="unit"``), as in the authors' code.

    Scale: the paper's, ``d = g₀ + c‖g₀‖ g_w/‖g_w‖`` with ``g₀`` the *mean* gradient, so
    ``‖d‖ ≤ (1 + c)‖g₀‖`` (``(1+c)/(1+c²)`` times that with ``rescale``). The authors' code also
    multiplies the shared update by ``T`` ("to match the sum loss"); use a ``T``-fold learning
    rate for the same effect.
    """
    name = "cagrad"
    c = _common.check_positive(name, "c", c, allow_zero=True)
    if not isinstance(rescale, bool):
        raise ValueError(f"{name}: rescale must be True or False, got {rescale!r}")
    factor = 1.0 / (1.0 + c * c) if rescale else 1.0

    def init(num_tasks: int) -> SolverState:
        return SolverState(solver=SolverInfo.initial())

    def weights(losses, gramian, state, key):
        sol = cagrad_solve(gramian, c)
        return sol.lam * factor, SolverState(solver=sol.info)

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
