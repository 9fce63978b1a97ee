"""Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common


class DWAState(NamedTuple):
    last: jax.Array  # Lᵢ(t−1): the mean loss of the last completed epoch, [T]
    before_last: jax.Array  # Lᵢ(t−2), [T]
    completed: jax.Array  # number of completed epochs (saturates at 2), i32
    window_sum: jax.Array  # Σ of the losses seen in the current epoch, [T]
    window_count: jax.Array  # steps seen in the current epoch, i32


def dwa(temperature: float = 2.0, *, steps_per_epoch: int = 1) -> Method:
    """Dynamic Weight Average: weights from the relative rate of descent of each loss.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019:

        rᵢ(t−1) = Lᵢ(t−1) / Lᵢ(t−2),    wᵢ(t) = T · exp(rᵢ(t−1)/τ) / Σⱼ exp(rⱼ(t−1)/τ),

    where ``Lᵢ(t)`` is task ``i``'s loss averaged over the iterations of epoch ``t``; the weights
    of epoch ``t`` come from the two previous epochs and stay fixed within the epoch;
    ``wᵢ = 1`` for the first two epochs, when no ratio exists yet. A task whose loss fell slowly
    (large ``rᵢ``) gets more weight. The temperature is ``τ = 2`` in the paper.

    An epoch here is ``steps_per_epoch`` consecutive train steps (the state holds the running
    sum of the current epoch and the means of the last two). Give the number of steps that
    make one pass over the training data for the paper's rule: the benchmark runner and
    :func:`mtljax.bench.run_problem` pass their problem's ``steps_per_epoch``. The default
    ``steps_per_epoch=1`` is the per-step special case: the ratio of the previous two steps'
    (mini-batch) losses, recomputed every step.

    Guards: a ratio with ``Lᵢ(t−2) = 0`` is taken as 1, and ratios are clipped to a finite range
    so that the softmax stays finite for any finite losses.

    Args:
      temperature: the softmax temperature ``τ > 0`` (paper: 2).
      steps_per_epoch: train steps per epoch (≥ 1); 1 (default) is the per-step rule.

    State: the last two epochs' mean losses and the current epoch's running sum in the default
    float dtype (float64 under ``jax_enable_x64``, float32 otherwise), and two counters.

    Scale: ``Σᵢ wᵢ = T`` (equal weights are all 1, as for ``ew()``), as in the paper.
    Task-specific parameters get ``wᵢ∇Lᵢ``.
    """
    name = "dwa"
    tau = _common.check_positive(name, "temperature", temperature)
    period = steps_per_epoch
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"{name}: steps_per_epoch must be an int ≥ 1, got {period!r}")

    def init(num_tasks: int) -> DWAState:
        zeros = jnp.zeros((num_tasks,), _common.float_dtype())
        zero = jnp.zeros((), jnp.int32)
        return DWAState(zeros, zeros, zero, zeros, zero)

    def weights(losses, gramian, state: DWAState, key):
        t, dtype = losses.shape[0], losses.dtype
        losses = jax.lax.stop_gradient(losses).astype(state.last.dtype)
        big = jnp.finfo(state.last.dtype).max / 4
        ratio = _common.safe_div(state.last, state.before_last)
        ratio = jnp.where(state.before_last == 0, 1.0, ratio)
        ratio = jnp.clip(jnp.nan_to_num(ratio, nan=1.0, posinf=big, neginf=-big), -big, big)
        w_dwa = t * jax.nn.softmax(ratio / tau)
        w = jnp.where(state.completed >= 2, w_dwa, jnp.ones_like(w_dwa))

        window_sum = state.window_sum + losses
        window_count = state.window_count + 1
        done = window_count >= period
        mean = window_sum / window_count.astype(window_sum.dtype)
        new_state = DWAState(
            last=jnp.where(done, mean, state.last),
            before_last=jnp.where(done, state.last, state.before_last),
            completed=jnp.where(done, jnp.minimum(state.completed + 1, 2), state.completed),
            window_sum=jnp.where(done, jnp.zeros_like(window_sum), window_sum),
            window_count=jnp.where(done, jnp.zeros_like(window_count), window_count),
        )
        return w.astype(dtype), new_state

    return make_method(name, init, needs="losses", weights=weights)
