"""Homogeneous per-task (or per-expert) MLPs stacked along a leading axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mtljax._src.nn.stacked import StackedLinear


def is_count(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool: a size or an index.

    Floats and bools are refused rather than truncated (``int(2.5) == 2``, ``True == 1``)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def count_tuple(values: Any, *, min_len: int) -> tuple[int, ...] | None:
    """``values`` as a tuple of Python ints when it lists at least ``min_len`` positive integers
    (NumPy ones included), else ``None``, for the caller to raise with its own message."""
    out = int_tuple(values)
    return out if len(out) >= min_len and all(is_count(v) and v >= 1 for v in out) else None


def check_features(owner: str, features: Sequence[int], *, min_len: int = 2) -> tuple[int, ...]:
    """Validates a ``(in, hidden…, out)`` size list; returns it as a tuple of ints."""
    feats = count_tuple(features, min_len=min_len)
    if feats is None:
        raise ValueError(
            f"{owner}: features must list ≥ {min_len} positive integer sizes (input, …, output), "
            f"got {tuple(features)}"
        )
    return feats


def int_tuple(values: Any) -> tuple:
    """``values`` as a tuple with NumPy integers turned into Python ints (anything else is
    kept as it is, for the caller's check to name)."""
    return tuple(int(v) if isinstance(v, np.integer) else v for v in values)


def check_positive(owner: str, **values: int) -> None:
    for name, v in values.items():
        if not is_count(v) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")


class StackedMLP(nnx.Module):
    """``n`` MLPs of identical shape stacked along a leading axis, applied as batched matmuls.

    Layer ``l`` is a :class:`StackedLinear` with kernel ``(n, f_l, f_{l+1})`` at path
    ``layers/l``. Applied to a shared input ``x: (..., f_0)`` it returns ``(n, ..., f_L)``;
    applied to stacked inputs ``x: (n, ..., f_0)`` with ``per_task=True`` each stack member
    maps its own input. No activation after the last layer unless ``final_activation``.

    Used for task towers (``n = T``) and for mixture-of-experts experts (``n = E``).
    """

    def __init__(
        self,
        features: Sequence[int],
        num_stacks: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        final_activation: bool = False,
    ):
        feats = check_features("StackedMLP", features)
        check_positive("StackedMLP", num_stacks=num_stacks)
        self.layers = nnx.List(
            [
                StackedLinear(a, b, num_stacks, rngs=rngs)
                for a, b in zip(feats[:-1], feats[1:], strict=True)
            ]
        )
        self.features = feats
        self.num_stacks = num_stacks
        self.activation = activation
        self.final_activation = final_activation

    def __call__(self, x: jax.Array, *, per_task: bool = False) -> jax.Array:
        if x.shape[-1] != self.features[0]:
            raise ValueError(
                f"StackedMLP: expected inputs with {self.features[0]} features in the last axis, "
                f"got shape {x.shape}"
            )
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, per_task=per_task or i > 0)
            if i < n - 1 or self.final_activation:
                x = self.activation(x)
        return x
