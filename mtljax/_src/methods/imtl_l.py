"""IMTL-L: impartial loss scaling (Liu et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common


class IMTLLState(NamedTuple):
    log_scales: jax.Array  # sᵢ, f32[T]; the loss scale is e^{sᵢ}
    opt_state: optax.OptState


def scale_update(
    opt: optax.GradientTransformation, log_scales: jax.Array, opt_state, losses: jax.Array
) -> tuple[jax.Array, optax.OptState]:
    """One step of ``opt`` on ``s`` for the objective ``Σᵢ e^{sᵢ} Lᵢ − sᵢ``."""
    losses = jax.lax.stop_gradient(losses).astype(log_scales.dtype)
    grad_s = jnp.exp(log_scales) * losses - 1.0
    updates, opt_state = opt.update(grad_s, opt_state, log_scales)
    return optax.apply_updates(log_scales, updates), opt_state


def imtl_l(
    *,
    learning_rate: float = 1e-3,
    optimizer: optax.GradientTransformation | None = None,
    init_log_scale: float = 0.0,
) -> Method:
    """IMTL-L: learned loss scales that make the scaled losses equal.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Section 3.1). Each task's loss is replaced by ``e^{sᵢ} Lᵢ − sᵢ`` with a learned
    ``sᵢ`` (the exponential keeps the scale positive, the ``−sᵢ`` term keeps it from
    collapsing to 0). ``∂/∂sᵢ = e^{sᵢ} Lᵢ − 1``, so at stationarity ``e^{sᵢ} Lᵢ = 1`` for every
    task: the scaled losses are equal, whatever the raw loss scales.

    The model's update uses the weights ``wᵢ = e^{sᵢ}`` at the current ``s``; ``s`` takes one
    step of the method's own optimizer (Adam, ``learning_rate``) in the same step. Needs the
    losses only.

    Args:
      learning_rate: Adam's learning rate for ``s`` (ignored when ``optimizer`` is given).
      optimizer: an optax optimizer for ``s``.
      init_log_scale: the initial ``sᵢ`` (0: every scale starts at 1).

    Scale: ``wᵢ = e^{sᵢ}`` (1 at initialisation). Task-specific parameters get ``wᵢ∇Lᵢ``, the
    gradient of the scaled loss, as in the paper.
    """
    name = "imtl_l"
    opt = _common.weight_optimizer(optimizer, learning_rate, name)
    s0 = float(init_log_scale)

    def init(num_tasks: int) -> IMTLLState:
        s = jnp.full((num_tasks,), s0, jnp.float32)
        return IMTLLState(s, opt.init(s))

    def weights(losses, gramian, state: IMTLLState, key):
        w = jnp.exp(state.log_scales)
        s, opt_state = scale_update(opt, state.log_scales, state.opt_state, losses)
        return w.astype(losses.dtype), IMTLLState(s, opt_state)

    return make_method(name, init, needs="losses", weights=weights)
