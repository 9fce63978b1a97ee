"""PCGrad: projecting conflicting gradients (Yu et al. 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _gramian_tools as gt


@jax.jit
def project_conflicting(cosines: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad's projections on unit vectors: ``(T, T)`` coefficients ``A`` with ``Aᵢᵢ = 1``.

    Row ``i`` holds ``gᵢᴾᶜ / ‖gᵢ‖ = Σₖ Aᵢₖ uₖ`` after task ``i`` has visited the other tasks in
    the order ``orders[i]`` (task ``i`` itself is skipped), projecting whenever
    ``gᵢᴾᶜ · uⱼ < 0``: ``gᵢᴾᶜ ← gᵢᴾᶜ − (gᵢᴾᶜ · uⱼ) uⱼ``. ``cosines`` is ``K`` of
    :func:`_gramian_tools.unit_gramian` (zero rows never project).
    """
    t = cosines.shape[0]

    def one_row(i, order):
        def body(s, a):
            j = order[s]
            dot = a @ cosines[:, j]
            conflict = (j != i) & (dot < 0)
            return a.at[j].add(jnp.where(conflict, -dot, 0.0))

        a0 = jax.nn.one_hot(i, t, dtype=cosines.dtype)
        return jax.lax.fori_loop(0, t, body, a0)

    return jax.vmap(one_row)(jnp.arange(t), orders)


def pcgrad() -> Method:
    """PCGrad (projecting conflicting gradients, "gradient surgery").

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (Algorithm 1). Each task gradient ``gᵢ`` visits the other tasks ``j ≠ i`` in a
    random order and, whenever it conflicts with the *original* ``gⱼ``, loses its component
    along it:

    ``gᵢᴾᶜ ← gᵢᴾᶜ − (gᵢᴾᶜ · gⱼ / ‖gⱼ‖²) gⱼ``  if  ``gᵢᴾᶜ · gⱼ < 0``;

    the update is ``Σᵢ gᵢᴾᶜ``. Every ``gᵢᴾᶜ`` stays a linear combination of the ``gₖ``, so the
    method tracks those coefficients on the Gramian alone (in cosine coordinates, which keeps
    rows of very different scales accurate) and returns the weights ``w`` with
    ``Σᵢ gᵢᴾᶜ = Jᵀw``: it runs on parameter- or feature-level Jacobians and on a Gramian through
    :func:`mtljax.weights_from_gramian`.

    The visiting orders are independent uniform permutations per task drawn from ``key``
    (the train step passes a fresh key each step); without a key the order is ``0, 1, …, T−1``.
    No hyper-parameters; no state.

    Scale: the sum of the projected gradients (``w = 1`` when no pair conflicts, i.e. equal
    weighting with sum reduction). Task-specific parameters get their own gradient ``∇Lᵢ``
    (``head_grads="unit"``), as in the paper, where surgery applies to shared parameters only.
    """

    def init(num_tasks: int):
        return ()

    def weights(losses, gramian, state, key):
        t = gramian.shape[0]
        norms, k = gt.unit_gramian(gramian)
        coef = project_conflicting(k, gt.task_orders(key, t))
        w = gt.unit_to_gradient_weights(coef, norms)
        return w.astype(losses.dtype), state

    return make_method("pcgrad", init, needs="gramian", weights=weights, head_grads="unit")
