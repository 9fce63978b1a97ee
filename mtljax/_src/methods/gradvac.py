"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common
from mtljax._src.methods import _gramian_tools as gt


class GradVacState(NamedTuple):
    targets: jax.Array  # φ̂ᵢⱼ, f32[T, T], the EMA of cos(gᵢ, gⱼ) (row i: as seen by task i)


@jax.jit
def vaccinate(
    cosines: jax.Array,
    nonzero: jax.Array,
    targets: jax.Array,
    orders: jax.Array,
    beta: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """GradVac's adjustments on unit vectors: ``(A, new_targets)``, ``A`` as in PCGrad's.

    Row ``i`` holds ``gᵢ' / ‖gᵢ‖ = Σₖ Aᵢₖ uₖ`` after task ``i`` has visited the other non-zero
    tasks in the order ``orders[i]``; ``new_targets`` are the EMA targets after the visits.
    """
    t = cosines.shape[0]
    dtype = cosines.dtype

    def one_row(i, order, target_row):
        def body(s, carry):
            a, tgt = carry
            j = order[s]
            valid = (j != i) & nonzero[i] & nonzero[j]
            norm_a = jnp.sqrt(jnp.clip(a @ cosines @ a, 0.0))
            phi = jnp.clip(_common.safe_div(a @ cosines[:, j], norm_a), -1.0, 1.0)
            goal = tgt[j]
            root_goal = jnp.sqrt(jnp.clip(1.0 - goal**2, 0.0))
            root_phi = jnp.sqrt(jnp.clip(1.0 - phi**2, 0.0))
            coef = norm_a * _common.safe_div(goal * root_phi - phi * root_goal, root_goal)
            adjust = valid & (phi < goal)
            a = a.at[j].add(jnp.where(adjust, coef, 0.0))
            tgt = tgt.at[j].set(jnp.where(valid, (1.0 - beta) * goal + beta * phi, goal))
            return a, tgt

        a0 = jax.nn.one_hot(i, t, dtype=dtype)
        return jax.lax.fori_loop(0, t, body, (a0, target_row))

    return jax.vmap(one_row)(jnp.arange(t), orders, targets.astype(dtype))


def gradvac(beta: float = 0.5) -> Method:
    """Gradient Vaccine: raise each pair's gradient cosine to an EMA target.

    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021 (Algorithm 1). The state keeps
    targets ``φ̂ᵢⱼ`` (initially 0). Each task gradient visits the other tasks ``j ≠ i`` in a
    random order; with ``φᵢⱼ = cos(gᵢ', gⱼ)`` (``gᵢ'`` as modified so far, ``gⱼ`` original):

    * if ``φᵢⱼ < φ̂ᵢⱼ``:
      ``gᵢ' ← gᵢ' + ‖gᵢ'‖ (φ̂ᵢⱼ √(1−φᵢⱼ²) − φᵢⱼ √(1−φ̂ᵢⱼ²)) / (‖gⱼ‖ √(1−φ̂ᵢⱼ²)) · gⱼ``,
      after which ``cos(gᵢ', gⱼ) = φ̂ᵢⱼ`` exactly;
    * ``φ̂ᵢⱼ ← (1−β) φ̂ᵢⱼ + β φᵢⱼ``;

    and the update is ``Σᵢ gᵢ'``. With ``φ̂ = 0`` this is PCGrad's projection; GradVac also
    raises positive but lower-than-usual similarities.

    Granularity: the whole shared gradient vector (the paper's coarsest granularity), so only
    the Gramian is needed: it runs on parameter- or feature-level Jacobians and on a Gramian
    through :func:`mtljax.weights_from_gramian`. The paper's per-layer variant would need one
    Gramian per layer and is not offered. Pairs involving a zero gradient (undefined cosine) are
    neither adjusted nor used to update their target; a target of ±1 (reached only in the
    limit) adjusts nothing.

    Args:
      beta: the EMA rate β ∈ [0, 1] of the targets, a hyper-parameter of the paper's eq. (3).
        Default 0.5: the default of LibMTL (``GradVac_beta``) and of torchjd's ``GradVac``
        (``beta``).

    The visiting orders are independent uniform permutations per task drawn from ``key``;
    without a key the order is ``0, 1, …, T−1``. Scale: the sum of the adjusted gradients
    (``w = 1`` when nothing is adjusted). Task-specific parameters get ``∇Lᵢ``
    (``head_grads="unit"``).
    """
    name = "gradvac"
    beta = _common.check_in_range(name, "beta", beta, 0.0, 1.0)

    def init(num_tasks: int) -> GradVacState:
        return GradVacState(jnp.zeros((num_tasks, num_tasks), jnp.float32))

    def weights(losses, gramian, state: GradVacState, key):
        t = gramian.shape[0]
        norms, k = gt.unit_gramian(gramian)
        coef, targets = vaccinate(k, norms > 0, state.targets, gt.task_orders(key, t), beta)
        w = gt.unit_to_gradient_weights(coef, norms)
        return w.astype(losses.dtype), GradVacState(targets.astype(state.targets.dtype))

    return make_method(name, init, needs="gramian", weights=weights, head_grads="unit")
