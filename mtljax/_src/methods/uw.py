"""Uncertainty weighting (Kendall, Gal & Cipolla 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import Method
from mtljax._src.methods import _common

_KINDS = ("regression", "classification")


class UWState(NamedTuple):
    log_vars: jax.Array  # sᵢ = log σᵢ², [T] in the default float dtype
    opt_state: optax.OptState


def uw(
    kinds: str | Sequence[str] = "regression",
    *,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    init_log_var: float = 0.0,
) -> Method:
    """Homoscedastic uncertainty weighting.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. With ``sᵢ = log σᵢ²`` learned per task, the objective is

    * regression tasks (Gaussian likelihood, eq. 7): ``½ e^{-sᵢ} Lᵢ + ½ sᵢ``;
    * classification tasks (scaled softmax, eq. 10): ``e^{-sᵢ} Lᵢ + ½ sᵢ``.

    The paper minimises this objective jointly over the model's parameters ``θ`` and ``s``.
    Each step here is one step of that joint training: the model's update uses the weights
    ``wᵢ = ½e^{-sᵢ}`` (regression) or ``e^{-sᵢ}`` (classification) at the current ``s``, and
    ``s`` takes one step in the same train step with the gradient of the objective at the same
    point, ``∂/∂sᵢ = ½ − cᵢ e^{-sᵢ} Lᵢ`` (``cᵢ`` = ½ or 1). At stationarity ``e^{sᵢ} = Lᵢ`` for
    a regression task and ``e^{sᵢ} = 2Lᵢ`` for a classification task.

    Far from that point (a loss of 1e30 at ``s = 0``) the gradient's size is that of the loss,
    and its square, which Adam keeps, overflows float32; the gradient is clipped to
    ``±2⁻¹⁰√M`` (``M`` the dtype's largest number, 1.8e16 in float32), which leaves Adam's
    step the limit of its steps for ever larger losses (``s`` moves by the learning rate
    towards ``log Lᵢ``) and keeps the state finite for any finite losses.

    Optimizer of ``s``: by default the model's own (``make_train_step``'s ``optimizer``, with
    its own state for ``s``), so that training equals the paper's joint training of ``(θ, s)``
    for any optimizer that treats parameters coordinate-wise (SGD, momentum, Adam, AdamW…; a
    transformation that couples parameters, like global-norm clipping, sees ``s`` apart from
    ``θ``). Outside a train step (:func:`mtljax.aggregate`, :func:`mtljax.gradients`) there is no
    model optimizer to share and ``s`` takes Adam(1e-3) steps, a fallback of this library (the paper
    trains ``s`` with the model's optimizer, which is not available there): 10⁻³ is the step size
    Kingma & Ba suggest as Adam's default (ICLR 2015, Algorithm 1). ``optimizer`` or
    ``learning_rate`` replace it.

    Args:
      kinds: ``"regression"``, ``"classification"``, or one of these per task.
      optimizer: an optax optimizer of its own for ``s`` instead of the model's.
      learning_rate: give ``s`` its own Adam with this learning rate instead of the model's
        optimizer.
      init_log_var: the initial ``sᵢ`` (default 0: ``σᵢ² = 1``).

    State: ``s`` and its optimizer's state, in the default float dtype (float64 under
    ``jax_enable_x64``, float32 otherwise).

    Scale: weights are ``½e^{-s}`` or ``e^{-s}`` (1/2 or 1 at initialisation). Task-specific
    parameters get ``wᵢ∇Lᵢ``, the gradient of the objective above.
    """
    name = "uw"
    own = _common.joint_optimizer(name, optimizer, learning_rate)
    if isinstance(kinds, str):
        _common.check_choice(name, "kinds", kinds, _KINDS)
    else:
        kinds = tuple(kinds)
        for k in kinds:
            _common.check_choice(name, "kinds", k, _KINDS)
    s0 = float(init_log_var)

    def coefficients(num_tasks: int) -> jax.Array:
        if isinstance(kinds, str):
            return jnp.full((num_tasks,), 0.5 if kinds == "regression" else 1.0)
        if len(kinds) != num_tasks:
            raise ValueError(f"uw: {len(kinds)} kinds were given but there are {num_tasks} tasks")
        return jnp.asarray([0.5 if k == "regression" else 1.0 for k in kinds])

    def make(opt: optax.GradientTransformation, shared: bool):
        def init(num_tasks: int) -> UWState:
            coefficients(num_tasks)
            log_vars = jnp.full((num_tasks,), s0, _common.float_dtype())
            return UWState(log_vars, _common.init_joint(name, opt, log_vars, shared))

        def weights(losses, gramian, state: UWState, key):
            c = coefficients(losses.shape[0]).astype(state.log_vars.dtype)
            w = c * jnp.exp(-state.log_vars)
            grad_s = _common.bounded_gradient(
                0.5 - w * jax.lax.stop_gradient(losses).astype(w.dtype)
            )
            updates, opt_state = opt.update(grad_s, state.opt_state, state.log_vars)
            new_state = UWState(optax.apply_updates(state.log_vars, updates), opt_state)
            return w.astype(losses.dtype), new_state

        return init, weights

    return _common.jointly_trained(name, own, make)
