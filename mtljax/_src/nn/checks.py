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
    (NumPy ones included), else ``None`` (a bare number included), for the caller to raise with
    its own message."""
    out = int_tuple(values)
    if out is None:
        return None
    return out if len(out) >= min_len and all(is_count(v) and v >= 1 for v in out) else None


def check_features(owner: str, features: Sequence[int], *, min_len: int = 2) -> tuple[int, ...]:
    """Validates a ``(in, hidden…, out)`` size list; returns it as a tuple of ints."""
    feats = count_tuple(features, min_len=min_len)
    if feats is None:
        raise ValueError(
            f"{owner}: features must list ≥ {min_len} positive integer sizes (input, …, output), "
            f"got {features!r}"
        )
    return feats


def check_out_features(
    owner: str, out_features: Any, num_tasks: int, *, name: str = "out_features"
) -> int | tuple[int, ...]:
    """An output size: one positive int for every task, or a sequence of ``num_tasks`` positive
    ints, one per task (heterogeneous heads: e.g. 10 classes for one task, 1 value for another);
    returns an int, or the tuple of per-task sizes. Bad sizes raise naming ``owner`` and
    ``name``."""
    if is_count(out_features) and out_features >= 1:
        return int(out_features)
    sizes = count_tuple(out_features, min_len=1)
    if sizes is None or len(sizes) != num_tasks:
        raise ValueError(
            f"{owner}: {name} must be a positive int, or a sequence of {num_tasks} positive ints "
            f"(one per task), got {out_features!r}"
        )
    return sizes


def check_stacked_features(
    owner: str, features: Sequence[Any], num_stacks: int, *, min_len: int = 2
) -> tuple[Any, ...]:
    """Validates a ``(in, hidden…, out)`` size list of ``num_stacks`` stacked MLPs whose last
    entry may give one size per stack (see :func:`check_out_features`); returns the sizes as
    ints, the last one possibly a tuple."""
    if int_tuple(features) is not None and len(features):
        last = features[-1]
        if int_tuple(last) is not None:
            head = count_tuple(features[:-1], min_len=min_len - 1)
            if head is None:
                raise ValueError(
                    f"{owner}: features must list ≥ {min_len} sizes (input, …, output), each a "
                    f"positive integer but the output, which may give one per task; got "
                    f"{tuple(features)}"
                )
            return (*head, check_out_features(owner, last, num_stacks, name="the last size"))
    return check_features(owner, features, min_len=min_len)


def max_width(size: int | tuple[int, ...]) -> int:
    """The stacked width of an output size: the size, or the widest of the per-task sizes."""
    return max(size) if isinstance(size, tuple) else size


def int_tuple(values: Any) -> tuple | None:
    """``values`` as a tuple with NumPy integers turned into Python ints (anything else is
    kept as it is, for the caller's check to name); ``None`` when ``values`` is not a sequence
    (a bare ``8`` where ``(8,)`` was meant, or a string)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        return None
    return tuple(int(v) if isinstance(v, np.integer) else v for v in values)


def check_sizes(owner: str, **values: Any) -> None:
    """Refuses a size list given as a bare number or a string (``expert_features=16`` for
    ``(16,)``), naming ``owner`` and the argument."""
    for name, v in values.items():
        if int_tuple(v) is None:
            raise ValueError(f"{owner}: {name} must be a sequence of sizes, e.g. (16,), got {v!r}")


def check_real(owner: str, name: str, value: Any, *, low: float, strict: bool) -> float:
    """``value`` as a finite float ``> low`` (``strict``) or ``≥ low``; bools, strings and
    non-finite numbers are refused naming ``owner`` and ``name``."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not (np.isfinite(v) and (v > low if strict else v >= low)):
        bound = f"{'>' if strict else '≥'} {low:g}"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")
    return v


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
