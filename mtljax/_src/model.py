"""A multi-task model: task losses as a vector, with shared and task-specific parameters.

At bottom a model is ``losses(params, batch) -> f32[T]`` where ``params = Params(shared,
specific)``. A model given as an encoder and heads, ``heads(specific, encode(shared, batch),
batch)``, also supports feature-level methods (Jacobian w.r.t. the shared representation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src import tree as tree_lib

PyTree = Any
Batch = Any


class Params(NamedTuple):
    """Parameters split into those shared by several tasks and the task-specific ones."""

    shared: PyTree
    specific: PyTree


@dataclasses.dataclass(frozen=True)
class Model:
    """A multi-task model as pure functions.

    Attributes:
      task_names: one name per task; ``T = len(task_names)``.
      losses_fn: ``(shared, specific, batch) -> f32[T]``.
      encode_fn: optional ``(shared, batch) -> representation`` (any pytree).
      heads_fn: optional ``(specific, representation, batch) -> f32[T]``; with ``encode_fn``
        it enables feature-level Jacobians.
      last_shared: path prefix (``"encoder/layers/2"``) of the last shared layer inside the
        shared parameters, for methods that differentiate only that layer (GradNorm).
    """

    task_names: tuple[str, ...]
    losses_fn: Callable[[PyTree, PyTree, Batch], jax.Array]
    encode_fn: Callable[[PyTree, Batch], PyTree] | None = None
    heads_fn: Callable[[PyTree, PyTree, Batch], jax.Array] | None = None
    last_shared: str | None = None
    nnx_graphdef: Any = None
    nnx_rest: Any = None

    def __post_init__(self):
        names = tuple(self.task_names)
        if not names:
            raise ValueError("Model: task_names is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"Model: task_names has duplicates: {names}")
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Model: task names must be non-empty strings, got {names}")
        object.__setattr__(self, "task_names", names)
        if (self.encode_fn is None) != (self.heads_fn is None):
            raise ValueError("Model: give both encode_fn and heads_fn, or neither")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def has_features(self) -> bool:
        return self.encode_fn is not None

    def losses(self, params: Params, batch: Batch) -> jax.Array:
        return self.losses_fn(params.shared, params.specific, batch)

    @classmethod
    def from_encoder_heads(
        cls,
        encode: Callable[[PyTree, Batch], PyTree],
        heads: Callable[[PyTree, PyTree, Batch], jax.Array],
        task_names: Sequence[str],
        *,
        last_shared: str | None = None,
    ) -> Model:
        def losses_fn(shared, specific, batch):
            return heads(specific, encode(shared, batch), batch)

        return cls(tuple(task_names), losses_fn, encode, heads, last_shared)

    def check(self, params: Params, batch: Batch) -> None:
        """Checks, by abstract evaluation (no compilation), that the losses have shape (T,)."""
        out = jax.eval_shape(self.losses_fn, params.shared, params.specific, batch)
        if not hasattr(out, "shape") or out.shape != (self.num_tasks,):
            raise ValueError(
                f"the model's losses must have shape (T,) = ({self.num_tasks},) for tasks "
                f"{self.task_names}; got {getattr(out, 'shape', type(out).__name__)}"
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"the model's losses must be floating point, got {out.dtype}")
        if self.last_shared is not None:
            paths = tree_lib.leaf_paths(params.shared)
            pred = tree_lib.prefix_predicate(self.last_shared)
            if not any(pred(p) for p in paths):
                raise ValueError(
                    f"last_shared={self.last_shared!r} matches no shared parameter; shared "
                    f"parameter paths are {paths}"
                )


def from_nnx(
    module: Any,
    *,
    task_names: Sequence[str],
    shared: Any,
    losses: Callable[[Any, Batch], jax.Array] | None = None,
    encode: Callable[[Any, Batch], PyTree] | None = None,
    heads: Callable[[Any, PyTree, Batch], jax.Array] | None = None,
    last_shared: str | None = None,
) -> tuple[Model, Params]:
    """Builds a :class:`Model` and its :class:`Params` from a Flax NNX module.

    Args:
      module: an ``nnx.Module`` holding every parameter.
      task_names: the tasks, in the order of the loss vector.
      shared: which ``nnx.Param`` are shared: an attribute name (``"encoder"``), or any NNX
        filter; every other ``nnx.Param`` is task-specific.
      losses: ``(module, batch) -> f32[T]``; or give ``encode`` and ``heads`` instead:
      encode: ``(module, batch) -> representation``, touching shared parameters only;
      heads: ``(module, representation, batch) -> f32[T]``, touching task-specific ones only.
      last_shared: path prefix of the last shared layer (see :class:`Model`).

    The functions receive the module rebuilt by ``nnx.merge`` from the parameters being
    differentiated; use ``to_nnx`` to put trained parameters back into a module.
    """
    from flax import nnx

    if (losses is None) == (encode is None and heads is None):
        raise ValueError("from_nnx: give `losses`, or `encode` and `heads` (not both)")
    if (encode is None) != (heads is None):
        raise ValueError("from_nnx: give both `encode` and `heads`")
    shared_filter = nnx.PathContains(shared) if isinstance(shared, str) else shared
    graphdef, shared_state, specific_state, rest = nnx.split(
        module, nnx.All(nnx.Param, shared_filter), nnx.Param, ...
    )
    if not jax.tree_util.tree_leaves(shared_state):
        raise ValueError(f"from_nnx: the filter shared={shared!r} selects no nnx.Param")
    rest_leaves = jax.tree_util.tree_leaves(rest)
    if rest_leaves:
        raise ValueError(
            "from_nnx: the module holds non-parameter state (batch statistics, RNG streams: "
            f"{tree_lib.leaf_paths(rest)}); mtljax models must be functions of their "
            "parameters: pass RNG keys through the batch instead"
        )

    def merge(s, p):
        return nnx.merge(graphdef, s, p, rest)

    if losses is not None:
        model = Model(
            tuple(task_names),
            lambda s, p, b: losses(merge(s, p), b),
            last_shared=last_shared,
            nnx_graphdef=graphdef,
            nnx_rest=rest,
        )
    else:
        model = Model(
            tuple(task_names),
            lambda s, p, b: heads(merge(s, p), encode(merge(s, p), b), b),
            encode_fn=lambda s, b: encode(merge(s, specific_state), b),
            heads_fn=lambda p, z, b: heads(merge(shared_state, p), z, b),
            last_shared=last_shared,
            nnx_graphdef=graphdef,
            nnx_rest=rest,
        )
    return model, Params(shared_state, specific_state)


def to_nnx(model: Model, params: Params) -> Any:
    """Rebuilds the NNX module of a model made by :func:`from_nnx` with the given parameters."""
    from flax import nnx

    if model.nnx_graphdef is None:
        raise ValueError("to_nnx: this model was not built by from_nnx")
    return nnx.merge(model.nnx_graphdef, params.shared, params.specific, model.nnx_rest)
