"""Which parameters are shared: path filters for blocks, and a numerical check of the split.

A parameter is **shared** when more than one task's loss depends on it; the engine takes the
per-task Jacobian w.r.t. the shared parameters only, and gives every task-specific parameter the
gradient of its own task's loss. Every block of :mod:`mtljax.nn` declares its split through
``shared_paths`` (path prefixes such as ``"experts"`` or ``"levels/0/task_gates"``) and
``shared_filter`` (the NNX filter to pass to :func:`mtljax.from_nnx`); :func:`check_shared_split`
verifies numerically that the Jacobian of the losses w.r.t. the task-specific parameters is
block-structured: each task-specific scalar moves at most one task's loss. A block in which no
parameter is shared (soft sharing without a trunk) has ``shared_filter = None``.

**The regularizer protocol.** A block whose penalty couples parameters across tasks (or ties
them to an anchor) defines a method ``regularizer(self) -> f32[]`` returning its whole penalty;
:func:`from_block` wires it as the model's ``regularizer``, which the train step adds to the
multi-task method's update, outside the loss vector (see :class:`mtljax.Model`). A penalty that
reads the input (DSelect-k's gate entropy: ``DSelectK.entropy_penalty(x)``) cannot know where
the input sits in a batch: pass it to :func:`from_block` as ``regularizer=lambda m, b: …``.
Task losses then hold data losses only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mtljax._src import tree as tree_lib
from mtljax._src.model import Batch, Model, Params, from_nnx

PyTree = Any


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


class PathPrefixes:
    """An NNX filter matching the parameters whose path starts with one of ``prefixes``.

    ``PathPrefixes("experts", "levels/0")`` matches ``experts/layers/0/kernel`` and
    ``levels/0/task_gates/kernel`` but not ``levels/1/…`` nor ``experts_bias``. Pass it as
    ``shared=`` to :func:`mtljax.from_nnx`.
    """

    def __init__(self, *prefixes: str):
        cleaned = tuple(p.strip("/") for p in prefixes)
        if any(not p for p in cleaned):
            raise ValueError(f"PathPrefixes: empty path prefix in {prefixes!r}")
        self.prefixes = cleaned

    def matches(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)

    def __call__(self, path: Sequence[Any], value: Any) -> bool:
        return self.matches(_path_str(path))

    def __repr__(self) -> str:
        return f"PathPrefixes{self.prefixes!r}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathPrefixes) and other.prefixes == self.prefixes

    def __hash__(self) -> int:
        return hash(self.prefixes)


def shared_filter(module: Any) -> Any:
    """The NNX filter of a block's shared parameters (``None`` for a block that shares no
    parameter, as :func:`mtljax.from_nnx` takes it)."""
    if hasattr(module, "shared_filter"):
        return module.shared_filter
    raise TypeError(
        f"{type(module).__name__} declares no shared parameters; mtljax.nn blocks expose "
        "`shared_filter` (pass any NNX filter to mtljax.from_nnx(shared=...) for other modules)"
    )


def last_shared(module: Any) -> str | None:
    """The path prefix of a block's last shared layer, for methods that differentiate it only."""
    return getattr(module, "last_shared", None)


def block_regularizer(module: Any) -> Callable[[Any, Batch], jax.Array] | None:
    """``lambda m, batch: m.regularizer()`` if the block defines a ``regularizer`` method (the
    protocol of the module docstring), else ``None``."""
    method = getattr(type(module), "regularizer", None)
    if method is None:
        return None
    if not callable(method):
        raise TypeError(
            f"{type(module).__name__}.regularizer must be a method (self) -> f32[], got "
            f"{type(method).__name__}"
        )
    return lambda m, batch: m.regularizer()


def from_block(
    module: Any,
    *,
    task_names: Sequence[str],
    losses: Callable[[Any, Batch], jax.Array] | None = None,
    encode: Callable[[Any, Batch], PyTree] | None = None,
    heads: Callable[[Any, PyTree, Batch], jax.Array] | None = None,
    regularizer: Callable[[Any, Batch], jax.Array] | None = None,
) -> tuple[Model, Params]:
    """:func:`mtljax.from_nnx` with the block's own shared filter, last shared layer and, if
    it defines a ``regularizer(self) -> f32[]`` method, that regularizer (see the module
    docstring): the losses then hold the task losses only. ``regularizer``: a further
    ``(module, batch) -> f32[]`` penalty, e.g. one that reads the input (DSelect-k's
    ``lambda m, b: m.entropy_penalty(b["x"])``); it is added to the block's own.

    With ``encode`` and ``heads`` (feature level), a block that defines
    ``check_feature_level(self)`` is asked first whether its configuration allows it (MTAN
    with shared extractors does not, and says which option does)."""
    if heads is not None and callable(getattr(module, "check_feature_level", None)):
        module.check_feature_level()
    own = block_regularizer(module)
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"from_block: regularizer must be a function (module, batch) -> f32[], got "
            f"{type(regularizer).__name__}"
        )
    if own is None or regularizer is None:
        combined = own if regularizer is None else regularizer
    else:

        def combined(m, b):
            return own(m, b) + regularizer(m, b)

    return from_nnx(
        module,
        task_names=task_names,
        shared=shared_filter(module),
        losses=losses,
        encode=encode,
        heads=heads,
        last_shared=last_shared(module),
        regularizer=combined,
    )


@dataclasses.dataclass(frozen=True)
class SplitReport:
    """The result of :func:`check_shared_split`.

    Attributes:
      ok: no task-specific scalar moves more than one task's loss.
      violations: ``{path: (number of offending scalars, tasks they move)}`` for task-specific
        leaves that move several tasks' losses (these must be declared shared).
      owners: ``{path: int array shaped like the leaf}`` for task-specific leaves: the task whose
        loss each scalar moves, ``-1`` where none does (at this point), ``-2`` where several do.
      shared_tasks: ``{path: int}`` for shared leaves: the largest number of tasks any one of
        their scalars moves. A shared leaf at ``≤ 1`` could be task-specific (or is unused at
        this point, e.g. behind a dead ReLU).
      unused: paths of leaves (shared or specific) that move no loss at all at this point.
      shared_reach: ``(T,)`` how many shared scalars each task's loss moves with (a task at 0
        shares nothing with the others).
    """

    ok: bool
    violations: dict[str, tuple[int, tuple[int, ...]]]
    owners: dict[str, np.ndarray]
    shared_tasks: dict[str, int]
    unused: tuple[str, ...]
    shared_reach: np.ndarray

    def over_shared(self) -> tuple[str, ...]:
        """Shared leaves none of whose scalars moves more than one task's loss."""
        return tuple(p for p, n in self.shared_tasks.items() if n <= 1)


def _task_scales(*jacobians: Any) -> np.ndarray:
    """``(T,)``: each task's largest ``|∂Lₜ/∂θ|`` over every parameter."""
    rows = [
        np.abs(np.asarray(leaf, np.float64)).reshape(leaf.shape[0], -1).max(axis=1)
        for jac in jacobians
        for leaf in jax.tree_util.tree_leaves(jac)
        if leaf.size
    ]
    return np.max(np.stack(rows), axis=0) if rows else np.zeros((0,))


def _dependence(jac_leaf: jax.Array, rtol: float, scales: np.ndarray) -> np.ndarray:
    """``(T, *shape)`` Jacobian -> bool ``(T, *shape)``: does task t's loss move with the scalar
    (more than ``rtol`` × task ``t``'s largest entry: a small loss still counts)."""
    a = np.abs(np.asarray(jac_leaf, dtype=np.float64))
    s = scales.reshape((-1,) + (1,) * (a.ndim - 1))
    return (a > rtol * s) & (s > 0)


def check_shared_split(
    model: Model,
    params: Params,
    batch: Batch,
    *,
    rtol: float = 1e-6,
    raise_on_error: bool = True,
) -> SplitReport:
    """Checks numerically that each task-specific parameter moves only its own task's loss.

    Computes the Jacobian ``∂L/∂θ`` (``T`` rows) of the losses w.r.t. every parameter at
    ``params`` on ``batch`` and reads its sparsity: for the task-specific parameters it must be
    block-structured (each scalar's column has at most one non-zero). An entry counts as
    non-zero when it exceeds ``rtol`` times the largest entry of its task's row (over every
    parameter), so that a task with a small loss is judged on its own scale. Use a batch and
    parameters in general position (random, not all-zero) so that a dependence does not vanish
    by accident.

    Raises ``ValueError`` naming the offending parameters unless ``raise_on_error=False``;
    returns a :class:`SplitReport` either way.
    """
    t = model.num_tasks
    jac_shared, jac_specific = jax.jit(jax.jacrev(model.losses_fn, argnums=(0, 1)))(
        params.shared, params.specific, batch
    )
    violations: dict[str, tuple[int, tuple[int, ...]]] = {}
    owners: dict[str, np.ndarray] = {}
    shared_tasks: dict[str, int] = {}
    unused: list[str] = []
    reach = np.zeros((t,), np.int64)
    for leaf in jax.tree_util.tree_leaves((jac_shared, jac_specific)):
        if leaf.shape[:1] != (t,):
            raise ValueError(f"check_shared_split: the losses must have shape ({t},)")
    scales = _task_scales(jac_shared, jac_specific)
    for path, leaf in jax.tree_util.tree_flatten_with_path(jac_specific)[0]:
        name = tree_lib.path_str(path)
        dep = _dependence(leaf, rtol, scales)
        count = dep.sum(axis=0)
        owner = np.where(count == 0, -1, np.where(count == 1, dep.argmax(axis=0), -2))
        owners[name] = owner
        if (count > 1).any():
            tasks = tuple(int(i) for i in np.nonzero(dep[:, count > 1].any(axis=1))[0])
            violations[name] = (int((count > 1).sum()), tasks)
        if not dep.any():
            unused.append(name)
    for path, leaf in jax.tree_util.tree_flatten_with_path(jac_shared)[0]:
        name = tree_lib.path_str(path)
        dep = _dependence(leaf, rtol, scales)
        shared_tasks[name] = int(dep.sum(axis=0).max()) if dep.size else 0
        reach += dep.reshape(t, -1).sum(axis=1)
        if not dep.any():
            unused.append(name)
    report = SplitReport(not violations, violations, owners, shared_tasks, tuple(unused), reach)
    if violations and raise_on_error:
        lines = [
            f"  {p}: {n} scalar(s) move the losses of tasks {[model.task_names[i] for i in tasks]}"
            for p, (n, tasks) in violations.items()
        ]
        raise ValueError(
            "check_shared_split: these task-specific parameters move more than one task's loss "
            "and must be declared shared:\n" + "\n".join(lines)
        )
    return report


def stacked_owner_ok(owner: np.ndarray, axis: int = 0) -> bool:
    """Whether every used scalar of a leaf stacked along a task ``axis`` belongs to its index."""
    shape = [1] * owner.ndim
    shape[axis] = -1
    idx = np.broadcast_to(np.arange(owner.shape[axis]).reshape(shape), owner.shape)
    return bool(np.all((owner == idx) | (owner == -1)))
