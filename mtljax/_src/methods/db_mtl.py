"""DB-MTL: dual-balancing multi-task learning (Lin et al. 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, combine, make_method
from mtljax._src.methods import _common

PyTree = Any


class DBMTLState(NamedTuple):
    ema: PyTree  # ĝᵢ, the jacobian's structure (leading task axis)
    step: jax.Array  # steps taken


def _task_norms(tree: PyTree, t: int) -> jax.Array:
    """``‖ĝᵢ‖`` over all leaves, scaled by the largest entry first so that squares stay finite."""
    rows = [
        e.reshape(t, -1).astype(jnp.promote_types(e.dtype, jnp.float32))
        for e in jax.tree_util.tree_leaves(tree)
    ]
    if not rows:  # no shared parameters: every gradient is empty
        return jnp.zeros((t,), jnp.float32)
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(r), axis=1) for r in rows]), axis=0)
    scale = jnp.where(top > 0, top, 1.0)
    sq = sum(jnp.sum((r / scale[:, None]) ** 2, axis=1) for r in rows)
    return top * jnp.sqrt(sq)


def db_mtl(
    beta: float = 0.9,
    beta_sigma: float = 0.5,
    *,
    eps: float = 1e-8,
    like: PyTree | None = None,
) -> Method:
    """DB-MTL: log-loss gradients, smoothed, rescaled to the largest task gradient norm.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing Multi-Task Learning",
    arXiv 2308.12029 (2023), Algorithm 1:

    * loss-scale balancing: each task's gradient is that of ``log(Lᵢ + ε)``,
      ``∇ log Lᵢ = ∇Lᵢ / (Lᵢ + ε)``, which does not change when ``Lᵢ`` is multiplied by a constant;
    * an exponential moving average per task, ``ĝᵢ ← βₜ ĝᵢ + (1 − βₜ) ∇ log Lᵢ`` with
      ``βₜ = β / t^σ`` at step ``t = 1, 2, …`` (``ĝᵢ = 0`` before the first step);
    * gradient-magnitude balancing: ``αᵢ = maxⱼ ‖ĝⱼ‖ / ‖ĝᵢ‖`` and the update
      ``Σᵢ αᵢ ĝᵢ``, in which every task contributes with the largest norm.

    The EMA keeps whole gradient vectors, so the method needs the Jacobian and its state has
    the Jacobian's shape (``T`` × the shared parameters). Use it at parameter level: at feature
    level the Jacobian's rows belong to different examples from one step to the next.

    Args:
      beta: ``β`` ∈ [0, 1), the EMA's decay (0.9 as in the paper's experiments; LibMTL's
        ``--DB_beta`` default).
      beta_sigma: ``σ`` ≥ 0, the decay's exponent in ``βₜ = β / t^σ``. The default 0.5 is this
        library's choice: ``βₜ`` then falls from ``β`` like ``t^{-1/2}``, so the average weights
        the current log-gradient more as training goes on; ``σ = 0`` keeps ``βₜ = β``, LibMTL's
        default (``--DB_beta_sigma``).
      eps: ``ε`` > 0 inside the logarithm (the method is defined for positive losses); 1e-8 as
        in LibMTL's DB-MTL (``torch.log(losses + 1e-8)``), a numerical guard for a zero loss.
      like: required by ``init``: the structure of the direction, i.e. the shared parameters
        (arrays or ``jax.ShapeDtypeStruct``; in the train step ``params.shared``), from which
        ``init(T)`` builds the zero EMA with a leading task axis. ``init`` receives ``T`` only,
        and a state whose structure changed at the first step would break ``lax.scan`` loops,
        ``nonfinite="skip"`` and checkpoints taken before it.

    Scale: every task contributes ``maxⱼ ‖ĝⱼ‖`` (gradients of log-losses, smoothed).
    Task-specific parameters get ``∇Lᵢ`` (the train step's rule for direction methods; the
    paper gives them ``∇ log Lᵢ``).
    """
    name = "db_mtl"
    beta = _common.check_in_range(name, "beta", beta, 0.0, 1.0)
    if beta >= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1), got {beta!r}")
    sigma = _common.check_positive(name, "beta_sigma", beta_sigma, allow_zero=True)
    eps = _common.check_positive(name, "eps", eps)
    if like is not None:
        for leaf in jax.tree_util.tree_leaves(like):
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise TypeError(
                    f"{name}: like must be a pytree of arrays or jax.ShapeDtypeStruct, "
                    f"got a leaf {leaf!r}"
                )

    def init(num_tasks: int) -> DBMTLState:
        if like is None:
            raise ValueError(
                f"{name} keeps a moving average of every task's gradient, so its state has the "
                "shape of the shared parameters: build it with db_mtl(like=params.shared) (or a "
                "pytree of jax.ShapeDtypeStruct with the direction's shapes)"
            )
        ema = jax.tree_util.tree_map(
            lambda x: jnp.zeros((num_tasks, *x.shape), jnp.promote_types(x.dtype, jnp.float32)),
            like,
        )
        return DBMTLState(ema, jnp.zeros((), jnp.int32))

    def direction(jacobian, losses, state: DBMTLState, key):
        t = losses.shape[0]
        ema = state.ema
        if jax.tree_util.tree_structure(ema) != jax.tree_util.tree_structure(jacobian):
            raise ValueError(
                f"{name}: the state's EMA has structure {jax.tree_util.tree_structure(ema)} "
                f"but the jacobian has {jax.tree_util.tree_structure(jacobian)}"
            )
        step = state.step + 1
        losses = jax.lax.stop_gradient(losses)

        def update(e, leaf):
            if e.shape != leaf.shape:
                raise ValueError(
                    f"{name}: an EMA leaf has shape {e.shape} but the jacobian's has {leaf.shape}"
                )
            # βₜ and 1/(L + ε) in the EMA's dtype (float64 for a float64 EMA).
            beta_t = beta / step.astype(e.dtype) ** sigma
            inv = 1.0 / (losses.astype(e.dtype) + eps)
            log_grad = leaf.astype(e.dtype) * inv.reshape((t,) + (1,) * (e.ndim - 1))
            return beta_t * e + (1.0 - beta_t) * log_grad

        ema = jax.tree_util.tree_map(update, ema, jacobian)
        norms = _task_norms(ema, t)
        # Σᵢ αᵢ ĝᵢ as maxⱼ‖ĝⱼ‖ · Σᵢ ĝᵢ/‖ĝᵢ‖, which stays finite for norms far apart.
        d = combine(_common.safe_div(jnp.ones_like(norms), norms), ema)
        top = jnp.max(norms)
        d = jax.tree_util.tree_map(lambda x, leaf: (top * x).astype(leaf.dtype), d, jacobian)
        return d, DBMTLState(ema, step)

    return make_method(name, init, needs="jacobian", direction=direction, head_grads="unit")
