"""IMTL-L: impartial loss scaling (Liu et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import Method
from mtljax._src.methods import _common


class IMTLLState(NamedTuple):
    log_scales: jax.Array  # sᵢ, [T] in the default float dtype; the loss scale is e^{sᵢ}
    opt_state: optax.OptState


def scale_update(
    opt: optax.GradientTransformation, log_scales: jax.Array, opt_state, losses: jax.Array
) -> tuple[jax.Array, optax.OptState]:
    """One step of ``opt`` on ``s`` for the objective ``Σᵢ e^{sᵢ} Lᵢ − sᵢ``, in ``s``'s dtype.

    The gradient ``e^{sᵢ} Lᵢ − 1`` is clipped to ``±2⁻¹⁰√M`` (``M``: the dtype's largest number;
    :func:`~mtljax._src.methods._common.bounded_gradient`): for a loss far above ``e^{−sᵢ}``
    (1e30 at ``s = 0``) its square, which Adam keeps, would overflow float32, and for a loss
    near the largest number the product itself would. Adam's step on the clipped gradient is
    the limit of its steps for ever larger losses (``s`` moves by the learning rate towards
    ``−log Lᵢ``), so the state stays finite for any finite losses.
    """
    losses = jax.lax.stop_gradient(losses).astype(log_scales.dtype)
    grad_s = _common.bounded_gradient(jnp.exp(log_scales) * losses - 1.0)
    updates, opt_state = opt.update(grad_s, opt_state, log_scales)
    return optax.apply_updates(log_scales, updates), opt_state


def scale_init(
    name: str, opt: optax.GradientTransformation, shared: bool, init_log_scale: float
) -> Callable[[int], IMTLLState]:
    """``init`` of a method that learns IMTL's log-scales: ``s = init_log_scale`` for every
    task, in the default float dtype, with ``opt``'s state (``shared``: ``opt`` is the
    model's optimizer, see :func:`~mtljax._src.methods._common.init_joint`)."""

    def init(num_tasks: int) -> IMTLLState:
        s = jnp.full((num_tasks,), init_log_scale, _common.float_dtype())
        return IMTLLState(s, _common.init_joint(name, opt, s, shared))

    return init


def imtl_l(
    *,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    init_log_scale: float = 0.0,
) -> Method:
    """IMTL-L: learned loss scales that make the scaled losses equal.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Section 3.1). Each task's loss is replaced by ``e^{sᵢ} Lᵢ − sᵢ`` with a learned
    ``sᵢ`` (the exponential keeps the scale positive, the ``−sᵢ`` term keeps it from
    collapsing to 0). ``∂/∂sᵢ = e^{sᵢ} Lᵢ − 1``, so at stationarity ``e^{sᵢ} Lᵢ = 1`` for every
    task: the scaled losses are equal, whatever the raw loss scales.

    The paper trains ``s`` jointly with the model on ``Σᵢ e^{sᵢ} Lᵢ − sᵢ``. Each step here is one
    step of that joint training: the model's update uses the weights ``wᵢ = e^{sᵢ}`` at the
    current ``s``, and ``s`` takes one step in the same train step with the gradient at the same
    point. Needs the losses only.

    Optimizer of ``s``: by default the model's own (``make_train_step``'s ``optimizer``, with
    its own state for ``s``), which equals the joint training for any optimizer that treats
    parameters coordinate-wise (SGD, momentum, Adam…). Outside a train step
    (:func:`mtljax.aggregate`, :func:`mtljax.gradients`) there is no model optimizer to share and
    ``s`` takes Adam(1e-3) steps, a fallback of this library (the paper trains ``s`` with the
    model's optimizer, which is not available there): 10⁻³ is the step size Kingma & Ba suggest as
    Adam's default (ICLR 2015, Algorithm 1). ``optimizer`` or ``learning_rate`` replace it.

    Args:
      optimizer: an optax optimizer of its own for ``s`` instead of the model's.
      learning_rate: give ``s`` its own Adam with this learning rate instead of the model's
        optimizer.
      init_log_scale: the initial ``sᵢ`` (default 0: every scale starts at 1).

    State: ``s`` and its optimizer's state, in the default float dtype (float64 under
    ``jax_enable_x64``, float32 otherwise). For losses far from ``e^{−sᵢ}`` the gradient of
    ``s`` is clipped (see :func:`scale_update`) so that it stays finite.

    Scale: ``wᵢ = e^{sᵢ}`` (1 at initialisation). Task-specific parameters get ``wᵢ∇Lᵢ``, the
    gradient of the scaled loss, as in the paper.
    """
    name = "imtl_l"
    own = _common.joint_optimizer(name, optimizer, learning_rate)
    s0 = float(init_log_scale)

    def make(opt: optax.GradientTransformation, shared: bool):
        def weights(losses, gramian, state: IMTLLState, key):
            w = jnp.exp(state.log_scales)
            s, opt_state = scale_update(opt, state.log_scales, state.opt_state, losses)
            return w.astype(losses.dtype), IMTLLState(s, opt_state)

        return scale_init(name, opt, shared, s0), weights

    return _common.jointly_trained(name, own, make)
