"""Plain descriptions of hyper-parameters and optimizers, to record with a run and compare.

A description is built from JSON values only (numbers, strings, booleans, ``None``, lists and
string-keyed dicts), made hashable by :func:`freeze`, so that it can live in a
:class:`~mtljax.Method` and in a checkpoint's record, and two runs compare equal exactly when
their descriptions do. Objects without a plain value (a model, a mesh) are described by their
type's name, never by a ``repr`` that could hold a memory address.

An optax optimizer is described by the values its functions close over (optax builds each
transformation as closures over its hyper-parameters: Adam's ``b1``, ``b2``, ``eps``, a
learning rate or the parameters of a schedule), found by walking the closures of its
``update`` function, and by the structure of its state (:func:`state_skeleton`: the optax
state types in order, e.g. ``(ScaleByAdamState(count, mu, nu), EmptyState())``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

_MAX_DEPTH = 8
_MAX_ARRAY = 64  # arrays up to this size are described by value, larger ones by shape


def _qualname(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{name}" if name else type(fn).__name__


def _number(x: Any) -> Any:
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else str(x)  # nan != nan: a string compares equal


def _is_transformation(x: Any) -> bool:
    return (
        isinstance(x, tuple)
        and callable(getattr(x, "init", None))
        and callable(getattr(x, "update", None))
    )


def describe(value: Any, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> Any:
    """A JSON description of ``value`` (see the module docstring)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | np.bool_ | np.integer | np.floating):
        return _number(value)
    if _depth > _MAX_DEPTH or id(value) in _seen:
        return f"<{type(value).__name__}>"
    seen = _seen | {id(value)}
    deeper = functools.partial(describe, _depth=_depth + 1, _seen=seen)
    if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
        return str(np.dtype(value))
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy and JAX arrays
        try:
            arr = np.asarray(value)
        except Exception:  # an abstract array (a tracer, a ShapeDtypeStruct)
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        if arr.size > _MAX_ARRAY or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            return {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        out = arr.tolist()
        if arr.ndim == 0:
            return _number(out)
        return np.vectorize(_number, otypes=[object])(arr).tolist()
    if _is_transformation(value):
        return deeper(value.update)
    if isinstance(value, Mapping):
        return {str(k): deeper(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [deeper(v) for v in value]
    if isinstance(value, functools.partial):
        return {
            "function": _qualname(value.func),
            "args": [deeper(a) for a in value.args],
            "keywords": {k: deeper(v) for k, v in value.keywords.items()},
        }
    if callable(value):
        fn = getattr(value, "__wrapped__", value)
        out = {"function": _qualname(fn)}
        code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
        if code is not None and cells:
            for name, cell in zip(code.co_freevars, cells, strict=False):
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                out[name] = deeper(contents)
        return out
    return f"<{type(value).__name__}>"


def freeze(value: Any) -> Any:
    """A hashable form of a description: lists become tuples, dicts sorted ``(key, value)``
    tuples."""
    if isinstance(value, Mapping):
        return tuple((k, freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"path": leaf}`` for a (JSON round-tripped) description: one entry per plain value."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list | tuple):
        if not value:
            out[prefix] = []
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def state_skeleton(tree: Any, _depth: int = 0) -> str:
    """The container types of a state, down to its arrays: ``ScaleByAdamState(count, mu, nu)``.

    Named tuples (optax's states, mtljax's) are written with their fields; tuples and lists
    in brackets; anything else (a dict of parameters, an array) is a field's name only.
    """
    if _depth > _MAX_DEPTH:
        return "…"
    fields = getattr(type(tree), "_fields", None)
    if isinstance(tree, tuple) and fields is not None:
        inner = [
            f"{f}={state_skeleton(v, _depth + 1)}" if isinstance(v, tuple) else f
            for f, v in zip(fields, tree, strict=True)
        ]
        return f"{type(tree).__name__}({', '.join(inner)})"
    if isinstance(tree, list | tuple):
        return "(" + ", ".join(state_skeleton(v, _depth + 1) for v in tree) + ")"
    return "*"


__all__ = ["describe", "flatten", "freeze", "state_skeleton"]
