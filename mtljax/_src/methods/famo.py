"""Fast adaptive multitask optimization (Liu, Feng, Stone & Liu 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common


class FAMOState(NamedTuple):
    logits: jax.Array  # ξ, f32[T]; the task weights are z = softmax(ξ)
    opt_state: optax.OptState
    prev_losses: jax.Array  # ℓ(θ_{t−1}): the losses seen at the previous step, f32[T]
    count: jax.Array  # steps taken, i32


def _shifted(losses: jax.Array, min_losses: jax.Array, eps: float) -> jax.Array:
    """``max(ℓ − ℓ*, 0) + ε``: the losses above their floor, kept positive."""
    return jnp.maximum(losses - min_losses, 0.0) + eps


def logit_gradient(logits: jax.Array, delta: jax.Array, gamma: float) -> jax.Array:
    """FAMO's update direction for ξ: ``(∂z/∂ξ)ᵀ δ + γ ξ`` with ``z = softmax(ξ)``.

    ``(∂z/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ)`` (the softmax Jacobian is symmetric).
    """
    z = jax.nn.softmax(logits)
    return z * (delta - jnp.dot(z, delta)) + gamma * logits


def famo(
    *,
    learning_rate: float = 0.025,
    gamma: float = 1e-3,
    min_losses: float | Sequence[float] = 0.0,
    eps: float = 1e-8,
    optimizer: optax.GradientTransformation | None = None,
) -> Method:
    """FAMO: decrease all task losses at an equal rate, from the losses alone.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. With
    logits ``ξ`` in the state, ``z = softmax(ξ)`` and ``ℓ̃ᵢ = ℓᵢ − ℓᵢ*`` (the loss above its
    lower bound ``ℓᵢ*``), the update direction is

        d = Σᵢ c·zᵢ/ℓ̃ᵢ ∇ℓᵢ,   c = (Σⱼ zⱼ/ℓ̃ⱼ)⁻¹,

    i.e. the weights are ``wᵢ = (zᵢ/ℓ̃ᵢ) / Σⱼ (zⱼ/ℓ̃ⱼ)``: ``∇ Σᵢ zᵢ log ℓ̃ᵢ`` rescaled to a
    convex combination of the task gradients. After a model update ``θ_t → θ_{t+1}`` the
    change of the log-losses, ``δᵢ = log ℓ̃ᵢ(θ_t) − log ℓ̃ᵢ(θ_{t+1})``, estimates how fast each
    task improved; the logits then move by

        ξ ← ξ − β ((∂z/∂ξ)ᵀ δ + γ ξ),

    lowering the weight of tasks that improved faster than the others (the paper's Algorithm 1,
    with learning rate ``β`` and decay ``γ``). As in the paper's implementation this step is
    taken with Adam (learning rate ``β``), the decay ``γξ`` being added to the gradient.

    Inside a pure step: the loss ``ℓ(θ_{t+1})`` after an update is the loss the next step
    computes anyway, so the state keeps the previous step's losses, and each step (from the
    second on) first updates ``ξ`` with ``δ = log ℓ̃(prev) − log ℓ̃(current)`` and then returns
    the weights of the updated ``ξ``; this is the paper's order of operations. With mini-batches
    the two losses come from consecutive batches (the paper recomputes the loss on the same
    batch at the cost of an extra forward pass); on full-batch problems they coincide.

    Args:
      learning_rate: ``β``, the step size of the logits (paper: 0.025).
      gamma: ``γ ≥ 0``, the decay of the logits (paper's default 1e-3; its toy example uses 0).
      min_losses: ``ℓ*``, a lower bound of each loss (a number or one per task; paper: 0).
        Losses below their bound count as ``ℓ̃ = 0`` (then ``ε``).
      eps: ``ε > 0`` added to ``ℓ̃`` before the logarithm (paper: 1e-8).
      optimizer: an optax optimizer for ``ξ`` instead of Adam(``β``) (``optax.sgd(β)`` gives
        the plain update above); ``γξ`` is added to its input either way.

    Scale: ``Σᵢ wᵢ = 1`` (a convex combination, like ``ew(reduction="mean")``); equal losses
    and logits give ``wᵢ = 1/T``. Task-specific parameters get ``wᵢ∇ℓᵢ``. The paper's training
    scripts also clip the shared gradient's norm at 1; that is an optimizer setting
    (``optax.clip_by_global_norm``), not part of the method.
    """
    name = "famo"
    gamma = _common.check_positive(name, "gamma", gamma, allow_zero=True)
    eps = _common.check_positive(name, "eps", eps)
    opt = _common.weight_optimizer(optimizer, learning_rate, name)
    if isinstance(min_losses, int | float) and not isinstance(min_losses, bool):
        if not math.isfinite(min_losses):
            raise ValueError(f"{name}: min_losses must be finite, got {min_losses!r}")
        floor_values: float | tuple[float, ...] = float(min_losses)
    else:
        try:
            floor_values = tuple(float(v) for v in min_losses)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{name}: min_losses must be a number or a sequence of numbers, got {min_losses!r}"
            ) from e
        if not floor_values or not all(math.isfinite(v) for v in floor_values):
            raise ValueError(f"{name}: min_losses must be finite, got {min_losses!r}")

    def floors(num_tasks: int) -> jax.Array:
        if isinstance(floor_values, float):
            return jnp.full((num_tasks,), floor_values, jnp.float32)
        return _common.per_task_vector(name, "min_losses", floor_values, num_tasks)

    def init(num_tasks: int) -> FAMOState:
        floors(num_tasks)
        logits = jnp.zeros((num_tasks,), jnp.float32)
        return FAMOState(
            logits=logits,
            opt_state=opt.init(logits),
            prev_losses=jnp.zeros((num_tasks,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    def weights(losses, gramian, state: FAMOState, key):
        dtype = losses.dtype
        x = jax.lax.stop_gradient(losses).astype(state.logits.dtype)
        floor = floors(x.shape[0]).astype(x.dtype)
        log_cur = jnp.log(_shifted(x, floor, eps))

        # Logit update from the previous step's model update (skipped at the first step).
        delta = jnp.log(_shifted(state.prev_losses, floor, eps)) - log_cur
        grad = logit_gradient(state.logits, delta, gamma)
        updates, opt_state = opt.update(grad, state.opt_state, state.logits)
        stepped = optax.apply_updates(state.logits, updates)
        first = state.count == 0
        logits = jnp.where(first, state.logits, stepped)
        opt_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(first, old, new), state.opt_state, opt_state
        )

        # wᵢ ∝ zᵢ / ℓ̃ᵢ, normalised: softmax(ξ − log ℓ̃).
        w = jax.nn.softmax(logits - log_cur)
        new_state = FAMOState(logits, opt_state, x, state.count + 1)
        return w.astype(dtype), new_state

    return make_method(name, init, needs="losses", weights=weights)
