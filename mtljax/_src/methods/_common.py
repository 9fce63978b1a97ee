"""Helpers shared by method implementations: argument checks and learned-weight updates."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtljax._src.base import HeadGrads, Method, Needs, make_method


def check_positive(name: str, arg: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: {arg} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_in_range(name: str, arg: str, value: Any, lo: float, hi: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise ValueError(f"{name}: {arg} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_choice(name: str, arg: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name}: {arg} must be one of {tuple(choices)}, got {value!r}")
    return value


def per_task_vector(name: str, arg: str, values: Sequence[float], num_tasks: int) -> jax.Array:
    """``values`` as a ``[num_tasks]`` array in the default float dtype (:func:`float_dtype`,
    read when called), so that under ``jax_enable_x64`` a per-task argument reaches a float64
    computation without passing through float32."""
    arr = jnp.asarray(values, dtype=float_dtype())
    if arr.shape != (num_tasks,):
        raise ValueError(f"{name}: {arg} has {arr.size} entries but there are {num_tasks} tasks")
    return arr


def weight_optimizer(
    optimizer: optax.GradientTransformation | None, learning_rate: float, name: str
) -> optax.GradientTransformation:
    """The method's own optimizer for its learned weighting parameters (Adam by default)."""
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"{name}: optimizer must be an optax GradientTransformation")
        return optimizer
    return optax.adam(check_positive(name, "learning_rate", learning_rate))


# The optimizer of learned scales outside a train step, where no model optimizer is bound.
FALLBACK_LEARNING_RATE = 1e-3


def joint_optimizer(
    name: str,
    optimizer: optax.GradientTransformation | None,
    learning_rate: float | None,
) -> optax.GradientTransformation | None:
    """The optimizer of parameters that their paper trains jointly with the model (UW's
    log-variances, IMTL-L's and IMTL's log-scales): ``optimizer`` if given, else
    Adam(``learning_rate``) if that is given, else ``None``: the model's optimizer, bound by
    the train step (``Method.with_optimizer``)."""
    if optimizer is not None:
        if learning_rate is not None:
            raise ValueError(f"{name}: give optimizer or learning_rate, not both")
        return weight_optimizer(optimizer, 0.0, name)
    if learning_rate is not None:
        return optax.adam(check_positive(name, "learning_rate", learning_rate))
    return None


def check_model_optimizer(name: str, optimizer: Any) -> optax.GradientTransformation:
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{name}: the model's optimizer must be an optax GradientTransformation, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def init_joint(
    name: str, opt: optax.GradientTransformation, params: jax.Array, shared: bool
) -> optax.OptState:
    """``opt.init(params)``; when ``opt`` is the model's optimizer (``shared``), an optimizer
    built for the model's parameter tree (a mask or labels per parameter) is named as the
    problem."""
    if not shared:
        return opt.init(params)
    try:
        return opt.init(params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name}: the model's optimizer cannot be applied to the method's per-task "
            f"parameters (a vector of length {params.shape[0]}): {e}. Give the method its own "
            f"optimizer: {name}(optimizer=...)"
        ) from e


def float_dtype() -> jnp.dtype:
    """The default float dtype, ``jnp.result_type(float)``: float64 under ``jax_enable_x64``,
    float32 otherwise. Methods keep their learned parameters and running statistics in it
    (read when ``init`` runs), so that a float64 computation keeps them in float64 and a
    state's types never change from one step to the next."""
    return jnp.dtype(jnp.result_type(float))


def bounded_gradient(grad: jax.Array) -> jax.Array:
    """``grad`` clipped to ``±2⁻¹⁰√M`` (``M``: the largest finite number of its dtype; 1.8e16 in
    float32, 1.3e151 in float64), so that the squares an optimizer takes of it (Adam's second
    moment; a global norm over up to 2²⁰ entries) stay finite. An infinite gradient becomes the
    bound. Adam's step depends on the gradient's scale only through ``m̂/(√v̂ + ε)``: on a
    gradient at the bound it takes the step (``±`` its learning rate at the first step) that is
    the limit of its steps as the gradient grows."""
    bound = math.sqrt(float(jnp.finfo(grad.dtype).max)) * 2.0**-10
    return jnp.clip(grad, -bound, bound)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def jointly_trained(
    name: str,
    own: optax.GradientTransformation | None,
    make: Callable[[optax.GradientTransformation, bool], tuple[Callable, Callable]],
    *,
    needs: Needs = "losses",
    head_grads: HeadGrads = "weighted",
) -> Method:
    """A weights method whose parameters train jointly with the model (UW, IMTL-L, IMTL).

    ``make(opt, shared) -> (init, weights)`` builds the method around ``opt`` (``shared``:
    ``opt`` is the model's optimizer). With ``own`` (from :func:`joint_optimizer`) that is the
    method; without, the method uses Adam(:data:`FALLBACK_LEARNING_RATE`) until the train step
    binds the model's optimizer through ``Method.with_optimizer``. ``needs`` and
    ``head_grads`` are the method's (:func:`~mtljax._src.base.make_method`).
    """

    def build(opt: optax.GradientTransformation, shared: bool, bindable: bool) -> Method:
        init, weights = make(opt, shared)

        def with_optimizer(model_optimizer) -> Method:
            return build(check_model_optimizer(name, model_optimizer), True, False)

        return make_method(
            name,
            init,
            needs=needs,
            weights=weights,
            head_grads=head_grads,
            with_optimizer=with_optimizer if bindable else None,
        )

    if own is not None:
        return build(own, False, False)
    return build(optax.adam(FALLBACK_LEARNING_RATE), False, True)
