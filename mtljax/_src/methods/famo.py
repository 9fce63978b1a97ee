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

_UPDATES = ("same_batch", "next_batch")


class FAMOState(NamedTuple):
    logits: jax.Array  # ξ, [T] in the default float dtype; the task weights are z = softmax(ξ)
    opt_state: optax.OptState
    prev_losses: jax.Array  # ℓ(θ_t): the losses the last weights were computed from, [T]
    count: jax.Array  # steps taken (calls of weights), i32
    awaiting: jax.Array  # bool: the last update's effect has not been observed yet


def _shifted(losses: jax.Array, min_losses: jax.Array, eps: float) -> jax.Array:
    """``max(ℓ − ℓ*, 0) + ε``: the losses above their floor, kept positive."""
    return jnp.maximum(losses - min_losses, 0.0) + eps


def log_decrease(
    before: jax.Array, after: jax.Array, min_losses: jax.Array, eps: float
) -> jax.Array:
    """``δ = log ℓ̃(before) − log ℓ̃(after)`` with ``ℓ̃ = max(ℓ − ℓ*, 0) + ε``, without
    cancellation.

    Where the two shifted losses are within a factor 1.5 of each other,
    ``δ = log1p((a − b)/(b + ε))`` with ``a``, ``b`` the losses above their floor: their
    difference is formed before ``ε`` is added, so a change far below ``ε`` (losses of 1e-20
    with ``ε = 1e-8``) or below the rounding of ``ℓ̃`` keeps its relative accuracy, where the
    difference of the two rounded logarithms would be 0 or a rounding error. Elsewhere the
    logarithms differ by more than ``log 1.5`` and are subtracted directly.
    """
    a = jnp.maximum(before - min_losses, 0.0)
    b = jnp.maximum(after - min_losses, 0.0)
    den = b + eps
    diff = a - b
    near = jnp.abs(diff) <= 0.5 * den
    return jnp.where(
        near,
        jnp.log1p(jnp.where(near, diff / den, 0.0)),
        jnp.log(a + eps) - jnp.log(den),
    )


def logit_gradient(logits: jax.Array, delta: jax.Array, gamma: float) -> jax.Array:
    """FAMO's update direction for ξ: ``(∂z/∂ξ)ᵀ δ + γ ξ`` with ``z = softmax(ξ)``.

    ``(∂z/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ)`` (the softmax Jacobian is symmetric).
    """
    z = jax.nn.softmax(logits)
    return z * (delta - jnp.dot(z, delta)) + gamma * logits


def _logit_step(opt, state: FAMOState, delta: jax.Array, gamma: float):
    """One step of ``opt`` on ``ξ`` along ``(∂z/∂ξ)ᵀ δ + γ ξ``: ``(logits, opt_state)``."""
    grad = logit_gradient(state.logits, delta, gamma)
    updates, opt_state = opt.update(grad, state.opt_state, state.logits)
    return optax.apply_updates(state.logits, updates), opt_state


def famo(
    *,
    learning_rate: float = 0.025,
    gamma: float = 1e-3,
    min_losses: float | Sequence[float] = 0.0,
    eps: float = 1e-8,
    optimizer: optax.GradientTransformation | None = None,
    update: str = "same_batch",
) -> Method:
    """FAMO: decrease all task losses at an equal rate, from the losses alone.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. With
    logits ``ξ`` in the state, ``z = softmax(ξ)`` and ``ℓ̃ᵢ = ℓᵢ − ℓᵢ*`` (the loss above its
    lower bound ``ℓᵢ*``), the update direction is

        d = Σᵢ c·zᵢ/ℓ̃ᵢ ∇ℓᵢ,   c = (Σⱼ zⱼ/ℓ̃ⱼ)⁻¹,

    i.e. the weights are ``wᵢ = (zᵢ/ℓ̃ᵢ) / Σⱼ (zⱼ/ℓ̃ⱼ)``: ``∇ Σᵢ zᵢ log ℓ̃ᵢ`` rescaled to a
    convex combination of the task gradients. After the model update ``θ_t → θ_{t+1}`` on batch
    ``b_t``, the change of the log-losses on that batch,

        δᵢ = log ℓ̃ᵢ(θ_t; b_t) − log ℓ̃ᵢ(θ_{t+1}; b_t),

    estimates how fast each task improved; the logits then move by

        ξ ← ξ − β ((∂z/∂ξ)ᵀ δ + γ ξ),

    lowering the weight of tasks that improved faster than the others (the paper's Algorithm 1,
    with learning rate ``β`` and decay ``γ``). As in the paper's implementation this step is
    taken with Adam (learning rate ``β``), the decay ``γξ`` being added to the gradient.

    ``update`` chooses where ``ℓ(θ_{t+1})`` comes from:

    * ``"same_batch"`` (default, the paper's rule): the train step re-evaluates the losses on
      ``b_t`` after its update (one more forward pass, no backward) and hands them to the
      method's ``after_update`` hook, which moves ``ξ`` within the same step.
    * ``"next_batch"``: no extra forward pass; the next step's losses, on the next batch
      ``b_{t+1}``, stand in for ``ℓ(θ_{t+1}; b_t)``, and each step first moves ``ξ`` with
      ``δ = log ℓ̃(θ_t; b_t) − log ℓ̃(θ_{t+1}; b_{t+1})`` and then returns the weights. On a full
      batch this gives the same weights at every step (``ξ`` lags one update behind); on fresh
      mini-batches ``δ`` mixes in the difference between batches and most of the reweighting
      is lost (the logits stay several times smaller).

    Where no update is applied by the library (:func:`mtljax.aggregate`,
    :func:`mtljax.gradients`, a hand-written loop), ``after_update`` is not called; the default
    method then follows the ``"next_batch"`` rule on its own (each call first moves ``ξ`` for
    the previous call whose result was not observed), or a loop can call
    ``method.after_update(losses, losses_after_update, state)`` itself after its update.

    ``δ`` is computed without cancellation (:func:`log_decrease`), so that changes of the
    losses far below ``ε`` or below the rounding of ``ℓ̃`` are not lost. The state (``ξ``, its
    optimizer's state and the last losses) is kept in the default float dtype (float64 under
    ``jax_enable_x64``, float32 otherwise).

    Args:
      learning_rate: ``β``, the step size of the logits (paper: 0.025).
      gamma: ``γ ≥ 0``, the decay of the logits (paper's default 1e-3; its toy example uses 0).
      min_losses: ``ℓ*``, a lower bound of each loss (a number or one per task; paper: 0).
        Losses below their bound count as ``ℓ̃ = 0`` (then ``ε``).
      eps: ``ε > 0`` added to ``ℓ̃`` before the logarithm (paper: 1e-8).
      optimizer: an optax optimizer for ``ξ`` instead of Adam(``β``) (``optax.sgd(β)`` gives
        the plain update above); ``γξ`` is added to its input either way.
      update: ``"same_batch"`` (the paper's rule) or ``"next_batch"`` (see above).

    Scale: ``Σᵢ wᵢ = 1`` (a convex combination, like ``ew(reduction="mean")``); equal losses
    and logits give ``wᵢ = 1/T``. Task-specific parameters get ``wᵢ∇ℓᵢ``. The paper's training
    scripts also clip the shared gradient's norm at 1; that is an optimizer setting
    (``optax.clip_by_global_norm``), not part of the method. A non-finite loss after the
    update makes ``ξ`` non-finite, so the train step does not apply that step.
    """
    name = "famo"
    gamma = _common.check_positive(name, "gamma", gamma, allow_zero=True)
    eps = _common.check_positive(name, "eps", eps)
    _common.check_choice(name, "update", update, _UPDATES)
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
            return jnp.full((num_tasks,), floor_values, _common.float_dtype())
        return _common.per_task_vector(name, "min_losses", floor_values, num_tasks)

    def log_shifted(losses: jax.Array, dtype) -> jax.Array:
        x = jax.lax.stop_gradient(losses).astype(dtype)
        return jnp.log(_shifted(x, floors(x.shape[0]).astype(dtype), eps))

    def decrease(before: jax.Array, after: jax.Array, dtype) -> jax.Array:
        before = jax.lax.stop_gradient(before).astype(dtype)
        after = jax.lax.stop_gradient(after).astype(dtype)
        return log_decrease(before, after, floors(before.shape[0]).astype(dtype), eps)

    def init(num_tasks: int) -> FAMOState:
        floors(num_tasks)
        logits = jnp.zeros((num_tasks,), _common.float_dtype())
        return FAMOState(
            logits=logits,
            opt_state=opt.init(logits),
            prev_losses=jnp.zeros_like(logits),
            count=jnp.zeros((), jnp.int32),
            awaiting=jnp.zeros((), bool),
        )

    def weights(losses, gramian, state: FAMOState, key):
        dtype = losses.dtype
        x = jax.lax.stop_gradient(losses).astype(state.logits.dtype)
        log_cur = log_shifted(x, x.dtype)

        # The previous update's effect, if not observed on its own batch: from this batch.
        delta = decrease(state.prev_losses, x, x.dtype)
        stepped, stepped_opt = _logit_step(opt, state, delta, gamma)
        logits = jnp.where(state.awaiting, stepped, state.logits)
        opt_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(state.awaiting, new, old), stepped_opt, state.opt_state
        )

        # wᵢ ∝ zᵢ / ℓ̃ᵢ, normalised: softmax(ξ − log ℓ̃).
        w = jax.nn.softmax(logits - log_cur)
        new_state = FAMOState(logits, opt_state, x, state.count + 1, jnp.ones((), bool))
        return w.astype(dtype), new_state

    def after_update(losses_before, losses_after, state: FAMOState) -> FAMOState:
        dtype = state.logits.dtype
        delta = decrease(losses_before, losses_after, dtype)
        logits, opt_state = _logit_step(opt, state, delta, gamma)
        return state._replace(logits=logits, opt_state=opt_state, awaiting=jnp.zeros((), bool))

    return make_method(
        name,
        init,
        needs="losses",
        weights=weights,
        after_update=after_update if update == "same_batch" else None,
    )
