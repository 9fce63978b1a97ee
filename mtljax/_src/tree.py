"""Small pytree helpers: path names, partition by path, combine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


def path_str(path: tuple) -> str:
    """``('encoder', 'layers', 2, 'kernel', .value)`` -> ``"encoder/layers/2/kernel"``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def prefix_predicate(prefix: str) -> Callable[[str], bool]:
    prefix = prefix.strip("/")
    return lambda p: p == prefix or p.startswith(prefix + "/")


def partition(tree: PyTree, predicate: Callable[[str], bool]) -> tuple[list, list, Any, list]:
    """Splits the leaves of ``tree`` by ``predicate(path)``: (selected, rest, treedef, mask)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    mask = [bool(predicate(path_str(p))) for p, _ in flat]
    selected = [leaf for (_, leaf), m in zip(flat, mask, strict=True) if m]
    rest = [leaf for (_, leaf), m in zip(flat, mask, strict=True) if not m]
    return selected, rest, treedef, mask


def combine(selected: list, rest: list, treedef: Any, mask: list) -> PyTree:
    it_s, it_r = iter(selected), iter(rest)
    leaves = [next(it_s) if m else next(it_r) for m in mask]
    return jax.tree_util.tree_unflatten(treedef, leaves)
