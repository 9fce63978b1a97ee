"""Smooth Tchebycheff scalarization (Lin et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common

_TINY = 1e-20  # floor of a loss before its logarithm (log_losses=True)


class STCHState(NamedTuple):
    count: jax.Array  # steps taken, i32
    warmup_sum: jax.Array  # Σ of the losses seen during the warm-up, [T], default float dtype


def smooth_tchebycheff(
    values: jax.Array, mu: float, preference: jax.Array, ideal: jax.Array
) -> jax.Array:
    """``μ log Σᵢ exp(λᵢ (fᵢ − zᵢ*) / μ)``, computed stably (log-sum-exp)."""
    return mu * jax.nn.logsumexp(preference * (values - ideal) / mu)


def _transform(losses: jax.Array, log_losses: bool) -> jax.Array:
    return jnp.log(jnp.maximum(losses, _TINY)) if log_losses else losses


def stch(
    mu: float = 1.0,
    preference: Sequence[float] | None = None,
    ideal: float | Sequence[float] | None = None,
    *,
    log_losses: bool = False,
    warmup_steps: int = 0,
) -> Method:
    """Smooth Tchebycheff scalarization: a smooth surrogate of minimising the worst task.

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024. With preference ``λ``, ideal point ``z*`` and smoothing ``μ > 0``,

        g_μ(f | λ) = μ log Σᵢ exp(λᵢ (fᵢ − zᵢ*) / μ),

    which tends to the Tchebycheff value ``maxᵢ λᵢ(fᵢ − zᵢ*)`` as ``μ → 0``. The objective
    minimised here is ``T · g_μ(f | λ)`` (``T`` tasks), the scale of the authors' multi-task
    code, which multiplies the smooth Tchebycheff loss by the number of tasks. Its gradient is
    ``T Σᵢ λᵢ pᵢ ∇fᵢ`` with ``p = softmax(λ ⊙ (f − z*) / μ)``, so the weights are
    ``wᵢ = T λᵢ pᵢ`` (times ``∂fᵢ/∂Lᵢ`` below): most of the weight goes to the task furthest
    above its ideal value.

    Objectives ``fᵢ``: the losses ``Lᵢ`` (default), or ``log Lᵢ`` with ``log_losses=True``
    (then ``wᵢ = T λᵢ pᵢ / Lᵢ``). Ideal point ``z*``: ``ideal`` if given (a number or one per
    task), else 0, or — with ``warmup_steps > 0`` — ``fᵢ`` of each loss averaged over the first
    ``warmup_steps`` steps, during which the weights are those of the linear scalarization
    ``Σᵢ λᵢ fᵢ`` (the authors' warm-up objective with a unit ``λ``). The factor ``T`` makes the
    step continuous at the end of the warm-up: when the losses sit at their warm-up mean,
    ``p = 1/T`` and ``T λᵢ pᵢ = λᵢ``, the warm-up weights. The paper's multi-task experiments use
    log-losses normalised by their mean over a warm-up period (``log(Lᵢ / L̄ᵢ)``, i.e.
    ``z* = log L̄``), ``μ = 1`` and a unit preference:
    ``stch(log_losses=True, warmup_steps=<steps in the paper's warm-up>)``. (The authors'
    code averages over the last warm-up epoch; here the mean is over the whole warm-up.)

    Args:
      mu: the smoothing ``μ > 0`` (default 1, the authors' multi-task configuration).
      preference: ``λ``, positive, one per task; default all ones (the authors' multi-task
        code). The paper writes ``λ`` on the simplex; since ``g_μ(f | cλ) = c·g_{μ/c}(f | λ)``,
        a unit ``λ`` with ``μ`` is the simplex's uniform ``λ = 1/T`` with ``μ/T``, scaled by
        ``T``.
      ideal: ``z*``; default 0 (or the warm-up estimate). Not allowed with ``warmup_steps``.
      log_losses: scalarize ``log Lᵢ`` instead of ``Lᵢ`` (losses floored at 1e-20 before the
        logarithm; the authors add 1e-20).
      warmup_steps: length of the warm-up that estimates ``z*`` (0: no warm-up).

    State: the step count and the warm-up's sum of the losses, in the default float dtype
    (float64 under ``jax_enable_x64``, float32 otherwise).

    Scale: with the default unit preference the weights ``T λᵢ pᵢ`` sum to ``T``, like
    ``ew()``'s unit weights and like the warm-up's; with ``log_losses`` each is further divided
    by ``Lᵢ``. Task-specific parameters get ``wᵢ∇Lᵢ``.
    """
    name = "stch"
    mu = _common.check_positive(name, "mu", mu)
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"{name}: warmup_steps must be an int ≥ 0, got {warmup_steps!r}")
    if not isinstance(log_losses, bool):
        raise ValueError(f"{name}: log_losses must be True or False, got {log_losses!r}")
    if ideal is not None and warmup_steps > 0:
        raise ValueError(
            f"{name}: give either ideal (a fixed ideal point) or warmup_steps (estimate it), "
            "not both"
        )
    pref_values = None
    if preference is not None:
        try:
            pref_values = tuple(float(v) for v in preference)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{name}: preference must be a sequence of positive numbers, got {preference!r}"
            ) from e
        if not pref_values or not all(math.isfinite(v) and v > 0 for v in pref_values):
            raise ValueError(f"{name}: preference must be positive and finite, got {preference!r}")
    ideal_values: float | tuple[float, ...] = 0.0
    if ideal is not None:
        if isinstance(ideal, int | float) and not isinstance(ideal, bool):
            ideal_values = float(ideal)
        else:
            try:
                ideal_values = tuple(float(v) for v in ideal)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"{name}: ideal must be a number or a sequence of numbers, got {ideal!r}"
                ) from e
        vals = (ideal_values,) if isinstance(ideal_values, float) else ideal_values
        if not vals or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{name}: ideal must be finite, got {ideal!r}")

    def preference_vector(num_tasks: int) -> jax.Array:
        if pref_values is None:
            return jnp.ones((num_tasks,), jnp.float32)
        return _common.per_task_vector(name, "preference", pref_values, num_tasks)

    def ideal_vector(num_tasks: int) -> jax.Array:
        if isinstance(ideal_values, float):
            return jnp.full((num_tasks,), ideal_values, _common.float_dtype())
        return _common.per_task_vector(name, "ideal", ideal_values, num_tasks)

    def init(num_tasks: int) -> STCHState:
        preference_vector(num_tasks)
        ideal_vector(num_tasks)
        return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), _common.float_dtype()))

    def weights(losses, gramian, state: STCHState, key):
        dtype = losses.dtype
        x = jax.lax.stop_gradient(losses).astype(jnp.promote_types(dtype, jnp.float32))
        t = x.shape[0]
        lam = preference_vector(t).astype(x.dtype)
        f = _transform(x, log_losses)
        # ∂fᵢ/∂Lᵢ: 1, or 1/Lᵢ for log-losses (0 below the floor, where f is constant).
        df = jnp.where(x > _TINY, 1.0 / jnp.maximum(x, _TINY), 0.0) if log_losses else 1.0
        if warmup_steps > 0:
            mean = state.warmup_sum / warmup_steps
            z = _transform(mean.astype(x.dtype), log_losses)
            in_warmup = state.count < warmup_steps
        else:
            z = ideal_vector(t).astype(x.dtype)
            in_warmup = jnp.asarray(False)
        # pᵢ = softmax(λ(f − z)/μ) = ∂g/∂(λᵢfᵢ); guard infinities so the softmax stays finite.
        big = jnp.finfo(x.dtype).max / 4
        scores = jnp.clip(jnp.nan_to_num(lam * (f - z) / mu, posinf=big, neginf=-big), -big, big)
        p = jax.nn.softmax(scores)
        w = jnp.where(in_warmup, lam, t * lam * p) * df
        new_state = STCHState(
            state.count + 1,
            jnp.where(in_warmup, state.warmup_sum + x, state.warmup_sum).astype(
                state.warmup_sum.dtype
            ),
        )
        return w.astype(dtype), new_state

    return make_method(name, init, needs="losses", weights=weights)
