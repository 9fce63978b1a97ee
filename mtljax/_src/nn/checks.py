"""Checks of the blocks' hyper-parameters: sizes, counts and indices must be integers.

Floats and bools are refused with the block's name rather than truncated (``int(2.5) == 2``,
``True == 1``); NumPy integers are accepted as Python ints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax import Array


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


def check_width(owner: str, x: Array, in_features: int) -> None:
    """Refuses an input whose last axis is not ``in_features`` wide, naming ``owner``."""
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{owner}: expected inputs with {in_features} features in the last axis, got shape "
            f"{x.shape}"
        )
