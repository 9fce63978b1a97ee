"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common


class GradNormState(NamedTuple):
    weights: jax.Array  # wᵢ, f32[T], Σ wᵢ = T
    initial_losses: jax.Array  # Lᵢ(0), set at the first step
    opt_state: optax.OptState
    count: jax.Array  # steps taken


def gradnorm(
    alpha: float = 1.5,
    *,
    learning_rate: float = 0.025,
    optimizer: optax.GradientTransformation | None = None,
    params: str = "last",
) -> Method:
    """GradNorm: learned task weights that balance the tasks' gradient norms.

    Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
    Multitask Networks", ICML 2018. With ``gᵢ = ∇_W Lᵢ`` on a subset ``W`` of the shared
    parameters (the last shared layer by default, as in the paper; ``params="all"`` takes all
    shared parameters):

    * ``G_W⁽ⁱ⁾ = ‖wᵢ gᵢ‖``, ``Ḡ_W = meanᵢ G_W⁽ⁱ⁾``;
    * ``L̃ᵢ = Lᵢ(t) / Lᵢ(0)`` (``Lᵢ(0)``: the first step's losses, kept in the state),
      ``rᵢ = L̃ᵢ / meanⱼ L̃ⱼ``;
    * ``L_grad = Σᵢ |G_W⁽ⁱ⁾ − Ḡ_W · rᵢ^α|`` with the target ``Ḡ_W rᵢ^α`` held constant, so
      ``∂L_grad/∂wᵢ = sign(G_W⁽ⁱ⁾ − Ḡ_W rᵢ^α) ‖gᵢ‖``;
    * ``w`` takes one step of the method's own optimizer (Adam, ``learning_rate``), is clipped
      at 0 and renormalized so that ``Σᵢ wᵢ = T``.

    The model's update in a step uses the weights held at its start, ``∇ Σᵢ wᵢ Lᵢ``; task-specific
    parameters get ``wᵢ∇Lᵢ``. Only the Gramian of ``∇_W L`` is needed (``‖gᵢ‖² = Gᵢᵢ``), so
    with ``params="last"`` the per-task backward passes stop at the last shared layer.

    Args:
      alpha: the asymmetry α ≥ 0 (the paper uses 0.12 to 3.0; 1.5 is a common default).
      learning_rate: Adam's learning rate for ``w`` (ignored when ``optimizer`` is given).
      optimizer: an optax optimizer for ``w``.
      params: ``"last"`` (the model's ``last_shared`` layer) or ``"all"`` shared parameters.
    """
    name = "gradnorm"
    alpha = _common.check_positive(name, "alpha", alpha, allow_zero=True)
    opt = _common.weight_optimizer(optimizer, learning_rate, name)
    _common.check_choice(name, "params", params, ("last", "all"))

    def init(num_tasks: int) -> GradNormState:
        w = jnp.ones((num_tasks,), jnp.float32)
        return GradNormState(
            w, jnp.ones((num_tasks,), jnp.float32), opt.init(w), jnp.zeros((), jnp.int32)
        )

    def weights(losses, gramian, state: GradNormState, key):
        t = losses.shape[0]
        w = state.weights
        losses = jax.lax.stop_gradient(losses).astype(w.dtype)
        l0 = jnp.where(state.count == 0, losses, state.initial_losses)
        norms = jnp.sqrt(jnp.clip(jnp.diagonal(gramian), 0.0)).astype(w.dtype)
        g = w * norms
        ratio = _common.safe_div(losses, l0)
        r = _common.safe_div(ratio, jnp.mean(ratio))
        target = jnp.mean(g) * r**alpha
        grad_w = jnp.sign(g - target) * norms
        updates, opt_state = opt.update(grad_w, state.opt_state, w)
        new_w = jnp.clip(optax.apply_updates(w, updates), 0.0)
        total = jnp.sum(new_w)
        new_w = jnp.where(total > 0, t * new_w / jnp.where(total > 0, total, 1.0), jnp.ones_like(w))
        new_state = GradNormState(new_w, l0, opt_state, state.count + 1)
        return w.astype(losses.dtype), new_state

    return make_method(name, init, needs="gramian", weights=weights, params=params, min_tasks=2)
