"""Gradient sign dropout (Chen et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, combine, make_method
from mtljax._src.methods import _common


def graddrop(leak: float | Sequence[float] = 0.0, *, batch_dims: int = 0) -> Method:
    """GradDrop: keep, element by element, only the task gradients of one randomly chosen sign.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1). For every element
    of the shared gradient (or of the representation's gradient), with task gradients ``∇ᵢ``:

    * sign purity ``P = ½ (1 + Σᵢ ∇ᵢ / Σᵢ |∇ᵢ|)`` ∈ [0, 1] (½ where every ``∇ᵢ`` is 0);
    * ``U ~ Uniform(0, 1)``, one draw per element, shared by the tasks;
    * masks ``Mᵢ = 𝟙[P > U] 𝟙[∇ᵢ > 0] + 𝟙[P < U] 𝟙[∇ᵢ < 0]``: the positive components are
      kept with probability ``P``, the negative ones otherwise;
    * output ``Σᵢ (ℓᵢ + (1 − ℓᵢ) Mᵢ) ∇ᵢ`` with leak parameters ``ℓᵢ`` ∈ [0, 1]; ``ℓ = 0`` is pure
      GradDrop, ``ℓ = 1`` the plain sum.

    The paper applies GradDrop at an activation layer, whose gradients are *batch-separated*:
    ``P`` and ``U`` are then computed from the gradients summed over the batch, and the mask of
    each unit is applied to every example's gradient. Use ``mode="feature"`` in the train step
    (the Jacobian's leaves are ``(T, batch, …)``) with ``batch_dims=1``; with ``batch_dims=0``
    (the default, for parameter-level Jacobians) every element has its own draw. The paper also
    multiplies the gradients by the sign of the layer's input before the batch sum; the method
    only sees the Jacobian, so that factor is 1 here (exact for positive activations).
    ``f`` of the paper is the identity.

    Args:
      leak: ``ℓ``, one value for every task or one per task, each in [0, 1].
      batch_dims: how many leading axes of each leaf (after the task axis) are batch axes.

    Needs a ``key`` (the train step passes one each step). Stateless. Scale: a masked sum of the
    task gradients (the sum when all gradients agree in sign). Task-specific parameters get
    ``∇Lᵢ`` (the train step's rule for direction methods; GradDrop only changes the gradient
    that flows into the shared part).
    """
    name = "graddrop"
    if isinstance(leak, int | float) and not isinstance(leak, bool):
        leaks: float | tuple[float, ...] = _common.check_in_range(name, "leak", leak, 0.0, 1.0)
    else:
        leaks = tuple(_common.check_in_range(name, "leak", x, 0.0, 1.0) for x in leak)
    if not isinstance(batch_dims, int) or isinstance(batch_dims, bool) or batch_dims < 0:
        raise ValueError(f"{name}: batch_dims must be an int ≥ 0, got {batch_dims!r}")

    def leak_vector(num_tasks: int) -> jax.Array:
        if isinstance(leaks, float):
            return jnp.full((num_tasks,), leaks, jnp.float32)
        if len(leaks) != num_tasks:
            raise ValueError(
                f"{name}: {len(leaks)} leak values were given but there are {num_tasks} tasks"
            )
        return jnp.asarray(leaks, jnp.float32)

    def init(num_tasks: int):
        leak_vector(num_tasks)
        return ()

    def drop(leaf: jax.Array, key: jax.Array, lk: jax.Array) -> jax.Array:
        if leaf.ndim < 1 + batch_dims:
            raise ValueError(
                f"{name}: batch_dims={batch_dims} but a jacobian leaf has shape {leaf.shape}"
            )
        dtype = jnp.promote_types(leaf.dtype, jnp.float32)
        g = leaf.astype(dtype)
        s = jnp.sum(g, axis=tuple(range(1, 1 + batch_dims)), keepdims=True) if batch_dims else g
        ones = jnp.ones((leaf.shape[0],), dtype)
        purity = 0.5 * (1.0 + _common.safe_div(combine(ones, s), combine(ones, jnp.abs(s))))
        u = jax.random.uniform(key, purity.shape, dtype)
        mask = ((purity > u) & (s > 0)) | ((purity < u) & (s < 0))
        lk = lk.astype(dtype).reshape((-1,) + (1,) * (leaf.ndim - 1))
        scale = lk + (1.0 - lk) * mask.astype(dtype)
        return combine(ones, scale * g).astype(leaf.dtype)

    def direction(jacobian, losses, state, key):
        if key is None:
            raise ValueError(f"{name} draws a random mask: pass key=... to mtljax.aggregate")
        leaves, treedef = jax.tree_util.tree_flatten(jacobian)
        lk = leak_vector(losses.shape[0])
        keys = jax.random.split(key, len(leaves))
        out = [drop(leaf, keys[n], lk) for n, leaf in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return make_method(name, init, needs="jacobian", direction=direction, head_grads="unit")
