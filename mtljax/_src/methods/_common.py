"""Helpers shared by method implementations: argument checks and learned-weight updates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


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
    arr = jnp.asarray(values, dtype=jnp.float32)
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


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)
