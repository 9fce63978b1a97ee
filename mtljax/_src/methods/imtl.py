"""IMTL: impartial loss scaling and gradient weighting together (Liu et al. 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import Method
from mtljax._src.methods import _common
from mtljax._src.methods.imtl_g import impartial_weights
from mtljax._src.methods.imtl_l import IMTLLState, scale_init, scale_update


def scaled_impartial_weights(gramian: jax.Array, scales: jax.Array) -> jax.Array:
    """``w = α̃ ∘ c``: IMTL-G's ``α̃`` (``Σα̃ = 1``) for the gradients ``cᵢgᵢ`` (``c > 0``).

    The unit gradients of ``cᵢgᵢ`` are those of ``gᵢ``, so the equal-projection direction is
    the same line: with ``α`` IMTL-G's weights for ``G``, ``α̃ ∘ c = α / Σⱼ(αⱼ/cⱼ)``. That
    form is used: it rounds ``G`` no further, where forming ``DGD`` (``D = diag(c)``) rounds
    every entry again, an error that near-opposite gradients amplify as much as the rounding
    of ``G`` itself. Where it does not apply, IMTL-G runs on ``DGD`` as the paper writes it:
    when IMTL-G on ``G`` returns its fallback (uniform weights over the non-zero tasks: no
    ``α`` with ``Σα = 1`` exists for ``G``, which may exist for ``DGD``) or when ``Σⱼ αⱼ/cⱼ``
    vanishes (to ``10·T·ε`` relative).
    """
    t = gramian.shape[0]
    eps = jnp.finfo(gramian.dtype).eps
    alpha = impartial_weights(gramian)
    ratio = alpha / scales
    total = jnp.sum(ratio)
    nonzero = jnp.diagonal(gramian) > 0
    m = nonzero.astype(alpha.dtype)
    count = jnp.sum(m)
    uniform = jnp.where(count > 0, m / jnp.maximum(count, 1.0), jnp.full_like(m, 1.0 / t))
    direct = (jnp.abs(total) > 10.0 * t * eps * jnp.sum(jnp.abs(ratio))) & ~jnp.all(
        alpha == uniform
    )

    def on_scaled(_):
        scaled = scales[:, None] * gramian * scales[None, :]
        return impartial_weights(scaled) * scales

    def rescaled(_):
        return alpha / jnp.where(direct, total, 1.0)

    return jax.lax.cond(direct, rescaled, on_scaled, None)


def imtl(
    *,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    init_log_scale: float = 0.0,
) -> Method:
    """IMTL: IMTL-L's learned loss scales, then IMTL-G's impartial weights on the scaled losses.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Algorithm 1, the hybrid). The losses are scaled as in IMTL-L,
    ``L̃ᵢ = e^{sᵢ} Lᵢ − sᵢ``; IMTL-G runs on the gradients of the scaled losses,
    ``g̃ᵢ = e^{sᵢ} gᵢ`` (Gramian ``G̃ = D G D``, ``D = diag(e^{s})``), giving ``α`` with
    ``Σα = 1``; the shared update is ``Σᵢ αᵢ g̃ᵢ``, i.e. the weights on the raw gradients are
    ``wᵢ = αᵢ e^{sᵢ}``. The direction is that of IMTL-G (its equal-projection direction does
    not depend on the row scales); the scales change its length and the weights reported.

    The paper trains ``s`` jointly with the model, by gradient steps on
    ``Σᵢ e^{sᵢ} Lᵢ − sᵢ`` (stationary where ``e^{sᵢ} Lᵢ = 1``) taken with the model's. Each step
    here is one step of that joint training: the weights use the current ``s``, and ``s`` takes
    one step in the same train step with the gradient at the same point.

    Optimizer of ``s``: by default the model's own (``make_train_step``'s ``optimizer``, with
    its own state for ``s``), as for IMTL-L; this equals the joint training for any optimizer
    that treats parameters coordinate-wise (SGD, momentum, Adam…). Outside a train step
    (:func:`mtljax.aggregate`, :func:`mtljax.gradients`) there is no model optimizer to share and
    ``s`` takes Adam(1e-3) steps, a fallback of this library (the paper trains ``s`` with the
    model's optimizer, which is not available there): 10⁻³ is the step size Kingma & Ba suggest as
    Adam's default (ICLR 2015, Algorithm 1). ``optimizer`` or ``learning_rate`` replace it.

    Args:
      optimizer: an optax optimizer of its own for ``s`` instead of the model's.
      learning_rate: give ``s`` its own Adam with this learning rate instead of the model's
        optimizer.
      init_log_scale: the initial ``sᵢ`` (default 0: every scale starts at 1).

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
    own = _common.joint_optimizer(name, optimizer, learning_rate)
    s0 = float(init_log_scale)

    def make(opt: optax.GradientTransformation, shared: bool):
        def weights(losses, gramian, state: IMTLLState, key):
            c = jnp.exp(state.log_scales)
            g = gramian.astype(jnp.promote_types(gramian.dtype, jnp.float32))
            c = c.astype(jnp.promote_types(c.dtype, g.dtype))
            w = scaled_impartial_weights(g.astype(c.dtype), c)
            s, opt_state = scale_update(opt, state.log_scales, state.opt_state, losses)
            return w.astype(losses.dtype), IMTLLState(s, opt_state)

        return scale_init(name, opt, shared, s0), weights

    return _common.jointly_trained(name, own, make, needs="gramian", head_grads="unit")
