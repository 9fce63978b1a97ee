"""IMTL: impartial loss scaling and gradient weighting together (Liu et al. 2021)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods.imtl_g import impartial_weights
from mtljax._src.methods.imtl_l import IMTLLState, scale_update


def imtl(
    *,
    learning_rate: float = 1e-3,
    optimizer: optax.GradientTransformation | None = None,
    init_log_scale: float = 0.0,
) -> Method:
    """IMTL: IMTL-L's learned loss scales, then IMTL-G's impartial weights on the scaled losses.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Algorithm 1, the hybrid). The losses are scaled as in IMTL-L,
    ``L̃ᵢ = e^{sᵢ} Lᵢ − sᵢ``; IMTL-G runs on the gradients of the scaled losses,
    ``g̃ᵢ = e^{sᵢ} gᵢ`` (Gramian ``G̃ = D G D``, ``D = diag(e^{s})``), giving ``α`` with
    ``Σα = 1``; the shared update is ``Σᵢ αᵢ g̃ᵢ``, i.e. the weights on the raw gradients are
    ``wᵢ = αᵢ e^{sᵢ}``. ``s`` takes one step of the method's own optimizer (Adam,
    ``learning_rate``) on ``Σᵢ e^{sᵢ} Lᵢ − sᵢ`` (stationary where ``e^{sᵢ} Lᵢ = 1``). The
    direction is that of IMTL-G (its equal-projection direction does not depend on the row
    scales); the scales change its length and the weights reported.

    Args:
      learning_rate: Adam's learning rate for ``s`` (ignored when ``optimizer`` is given).
      optimizer: an optax optimizer for ``s``.
      init_log_scale: the initial ``sᵢ``.

    State: ``s`` and its optimizer's state in the default float dtype (float64 under
    ``jax_enable_x64``, float32 otherwise); ``s``'s step is IMTL-L's
    (:func:`~mtljax._src.methods.imtl_l.scale_update`, its gradient clipped so that it stays
    finite for any finite losses).

    Scale: ``wᵢ = αᵢ e^{sᵢ}`` with ``Σα = 1``. Task-specific parameters get ``∇Lᵢ``
    (``head_grads="unit"``); the paper gives them ``e^{sᵢ}∇Lᵢ``, which neither rule of the
    train step expresses (``"weighted"`` would give ``αᵢ e^{sᵢ}∇Lᵢ``, with ``αᵢ`` possibly
    negative).
    """
    name = "imtl"
    opt = _common.weight_optimizer(optimizer, learning_rate, name)
    s0 = float(init_log_scale)

    def init(num_tasks: int) -> IMTLLState:
        s = jnp.full((num_tasks,), s0, _common.float_dtype())
        return IMTLLState(s, opt.init(s))

    def weights(losses, gramian, state: IMTLLState, key):
        c = jnp.exp(state.log_scales)
        g = gramian.astype(jnp.promote_types(gramian.dtype, jnp.float32))
        scaled = c[:, None] * g * c[None, :]
        w = impartial_weights(scaled) * c
        s, opt_state = scale_update(opt, state.log_scales, state.opt_state, losses)
        return w.astype(losses.dtype), IMTLLState(s, opt_state)

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
