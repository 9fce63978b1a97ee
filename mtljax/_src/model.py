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
import numpy as np

from mtljax._src import tree as tree_lib

PyTree = Any
Batch = Any


# ----------------------------------------------------------------------------------------------
# Batch specs


@dataclasses.dataclass(frozen=True)
class BatchField:
    """What one array of a batch must look like.

    Attributes:
      shape: one entry per axis: an ``int`` (that exact size), ``"batch"`` (the example axis:
        the same size in every field, never 0; data parallelism shards it), ``"tasks"`` (one
        entry per task, in the model's order) or ``None`` (any size).
      dtype: an exact dtype (``jnp.float32``), a kind (``jnp.floating``, ``jnp.integer``,
        ``jnp.bool_``), or ``None`` for any.
      task: the task this array belongs to (its targets, say), named in errors; ``None`` for
        inputs shared by every task.
    """

    shape: tuple[int | str | None, ...]
    dtype: Any = None
    task: str | None = None

    def __post_init__(self):
        shape = tuple(self.shape)
        for d in shape:
            if not (d is None or d in ("batch", "tasks") or (isinstance(d, int) and d >= 0)):
                raise ValueError(
                    f"BatchField: each axis is an int, 'batch', 'tasks' or None; got {shape}"
                )
        if shape.count("batch") > 1:
            raise ValueError(f"BatchField: at most one 'batch' axis, got {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def batch_axis(self) -> int | None:
        return self.shape.index("batch") if "batch" in self.shape else None


def _is_field(x: Any) -> bool:
    return isinstance(x, BatchField)


def _broadcast_prefix(prefix: PyTree, tree: PyTree, name: str) -> PyTree:
    """Broadcasts a pytree prefix of ints/None/str to the leaves of ``tree``."""

    def is_leaf(x):
        return x is None or isinstance(x, int | str)

    try:
        return jax.tree_util.tree_map(
            lambda p, sub: jax.tree_util.tree_map(lambda _: p, sub),
            prefix,
            tree,
            is_leaf=is_leaf,
        )
    except ValueError as e:
        raise ValueError(
            f"{name} must be an int, None, or a pytree prefix of the batch; got {prefix!r} for a "
            f"batch of structure {jax.tree_util.tree_structure(tree)}"
        ) from e


def batch_spec_like(
    example: Batch,
    *,
    batch_axes: PyTree = 0,
    task_axes: PyTree = None,
    task_names: Sequence[str] = (),
) -> PyTree:
    """A batch spec (a pytree of :class:`BatchField`) that matches ``example`` exactly.

    Every axis keeps its size and every dtype is exact, except the batch axis (``batch_axes``:
    an int for every field, or a pytree prefix of the batch with an int or ``None`` per field)
    and the task axis (``task_axes``, likewise; ``None``: no task axis). A field whose path
    contains a task name (``{"targets": {"depth": ...}}``) is that task's.
    """
    batch_axes = _broadcast_prefix(batch_axes, example, "batch_axes")
    task_axes = _broadcast_prefix(task_axes, example, "task_axes")
    names = set(task_names)
    flat, treedef = jax.tree_util.tree_flatten_with_path(example)
    b_flat = treedef.flatten_up_to(batch_axes)
    t_flat = treedef.flatten_up_to(task_axes)
    fields = []
    for (path, leaf), b_ax, t_ax in zip(flat, b_flat, t_flat, strict=True):
        shape: list[Any] = list(np.shape(leaf))
        for ax, label in ((b_ax, "batch"), (t_ax, "tasks")):
            if ax is not None:
                if not -len(shape) <= ax < len(shape):
                    raise ValueError(
                        f"batch_spec_like: field {tree_lib.path_str(path)!r} of shape "
                        f"{np.shape(leaf)} has no axis {ax} ({label})"
                    )
                shape[ax] = label
        parts = tree_lib.path_str(path).split("/")
        task = next((p for p in parts if p in names), None)
        fields.append(BatchField(tuple(shape), np.dtype(leaf.dtype), task))
    return jax.tree_util.tree_unflatten(treedef, fields)


def batch_axes_of(spec: PyTree) -> PyTree:
    """The batch axis of every field of a batch spec (``None`` where a field has none)."""
    return jax.tree_util.tree_map(lambda f: f.batch_axis, spec, is_leaf=_is_field)


def _describe_shape(field: BatchField, num_tasks: int) -> str:
    parts = []
    for d in field.shape:
        if d == "tasks":
            parts.append(f"tasks={num_tasks}")
        elif d is None:
            parts.append("*")
        else:
            parts.append(str(d))
    return "(" + ", ".join(parts) + (",)" if len(parts) == 1 else ")")


def _lookup(batch: Batch, path: tuple) -> tuple[bool, Any]:
    node = batch
    for k in path:
        try:
            if isinstance(k, jax.tree_util.DictKey):
                node = node[k.key]
            elif isinstance(k, jax.tree_util.SequenceKey):
                node = node[k.idx]
            elif isinstance(k, jax.tree_util.GetAttrKey):
                node = getattr(node, k.name)
            else:
                node = node[k.key]
        except (KeyError, IndexError, TypeError, AttributeError):
            return False, None
    return True, node


def _dtype_ok(dtype: Any, want: Any) -> bool:
    if want is None:
        return True
    if (
        isinstance(want, type)
        and issubclass(want, np.generic)
        and want
        in (
            np.floating,
            np.integer,
            np.signedinteger,
            np.unsignedinteger,
            np.complexfloating,
            np.number,
            np.inexact,
        )
    ):
        return bool(jnp.issubdtype(dtype, want))
    return np.dtype(dtype) == np.dtype(want)


def check_task_names(owner: str, task_names: Any) -> None:
    """``task_names`` must be a sequence of names: a bare string would be read as one task per
    character (``"cls"`` as ``('c', 'l', 's')``)."""
    if isinstance(task_names, str | bytes):
        raise ValueError(
            f"{owner}: task_names must be a sequence of names, got the string {task_names!r} "
            f"(for one task, pass ({task_names!r},))"
        )


def check_batch(spec: PyTree, batch: Batch, task_names: Sequence[str]) -> None:
    """Checks ``batch`` against a spec of :class:`BatchField`; errors name the field and task.

    Missing fields, wrong ranks or sizes, a task axis of the wrong length, a batch axis that is
    empty or differs between fields, and wrong dtypes raise ``ValueError`` (``TypeError`` for
    dtypes and non-arrays). Fields of the batch that the spec does not mention are ignored.
    """
    t = len(task_names)
    flat, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_field)
    batch_sizes: list[tuple[str, int, int]] = []
    for path, field in flat:
        if not _is_field(field):
            raise TypeError(f"a batch spec's leaves are BatchField, got {field!r}")
        name = tree_lib.path_str(path) or "<batch>"
        whose = f" (task {field.task!r})" if field.task else ""
        found, value = _lookup(batch, path)
        if not found:
            what = f"the targets of task {field.task!r}" if field.task else "a model input"
            raise ValueError(
                f"the batch is missing field {name!r} ({what}); the batch holds "
                f"{tree_lib.leaf_paths(batch) or 'no arrays'}"
            )
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"batch field {name!r}{whose} must be an array, got {type(value).__name__}"
            )
        shape = tuple(value.shape)
        want = _describe_shape(field, t)
        if len(shape) != len(field.shape):
            raise ValueError(
                f"batch field {name!r}{whose} has shape {shape}, expected {want} "
                f"({len(field.shape)} axes)"
            )
        for ax, (got, d) in enumerate(zip(shape, field.shape, strict=True)):
            if d == "tasks" and got != t:
                raise ValueError(
                    f"batch field {name!r} holds one entry per task on axis {ax}, for the "
                    f"{t} tasks {tuple(task_names)}; got {got} entries (shape {shape})"
                )
            if d == "batch":
                if got == 0:
                    raise ValueError(
                        f"empty batch: field {name!r}{whose} has 0 examples on its batch axis "
                        f"{ax} (shape {shape})"
                    )
                batch_sizes.append((name, ax, got))
            if isinstance(d, int) and got != d:
                raise ValueError(
                    f"batch field {name!r}{whose} has shape {shape}, expected {want}: axis {ax} "
                    f"has size {got}, not {d}"
                )
        if not _dtype_ok(value.dtype, field.dtype):
            want_dtype = getattr(field.dtype, "__name__", str(field.dtype))
            raise TypeError(
                f"batch field {name!r}{whose} has dtype {np.dtype(value.dtype).name}, expected "
                f"{want_dtype}"
            )
    if len({n for _, _, n in batch_sizes}) > 1:
        sizes = ", ".join(f"{f!r} has {n} (axis {ax})" for f, ax, n in batch_sizes)
        raise ValueError(f"the batch's fields disagree on the number of examples: {sizes}")


def check_batch_generic(batch: Batch) -> None:
    """Checks that need no spec: every leaf is an array, and none is empty."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        name = tree_lib.path_str(path) or "<batch>"
        if not hasattr(leaf, "shape"):
            if isinstance(leaf, int | float | bool | np.generic):
                field = path  # a number inside a list or tuple: the field is the outer path
                while field and isinstance(field[-1], jax.tree_util.SequenceKey):
                    field = field[:-1]
                if len(field) < len(path):
                    field = tree_lib.path_str(field) or "<batch>"
                    raise TypeError(
                        f"batch field {field!r} is a Python list or tuple of numbers; pass an "
                        "array (jnp.asarray(...))"
                    )
                continue
            raise TypeError(f"batch field {name!r} must be an array, got {type(leaf).__name__}")
        if 0 in tuple(leaf.shape):
            raise ValueError(f"empty batch: field {name!r} has shape {tuple(leaf.shape)}")


def _batch_summary(batch: Batch) -> str:
    items = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        dtype = getattr(leaf, "dtype", type(leaf).__name__)
        items.append(f"{tree_lib.path_str(path) or '<batch>'}: {dtype}{list(np.shape(leaf))}")
    return ", ".join(items) or "no arrays"


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
      batch_spec: optional pytree of :class:`BatchField` that batches must match (checked by
        the train step on every batch of a new shape or dtype, before compilation); it also
        tells data parallelism which axis of each field holds the examples.
      regularizer: optional ``(shared, specific, batch) -> f32[]``, a penalty ``R(θ; batch)``
        added **outside** the multi-task method: the train step computes the method's update
        ``d`` from the task losses as usual and descends along ``d + ∇_θ R``. ``R`` never
        enters the loss vector, the Jacobian, the Gramian or the method's weights, so a
        weighting method cannot rescale it (a penalty inside the loss vector would be
        multiplied by its task's weight ``wᵢ``). Most penalties read the parameters only and
        ignore ``batch``; data-dependent ones (DSelect-k's gate entropy, an MoE
        load-balancing term) read it.
    """

    task_names: tuple[str, ...]
    losses_fn: Callable[[PyTree, PyTree, Batch], jax.Array]
    encode_fn: Callable[[PyTree, Batch], PyTree] | None = None
    heads_fn: Callable[[PyTree, PyTree, Batch], jax.Array] | None = None
    last_shared: str | None = None
    nnx_graphdef: Any = None
    nnx_rest: Any = None
    batch_spec: Any = None
    regularizer: Callable[[PyTree, PyTree, Batch], jax.Array] | None = None

    def __post_init__(self):
        check_task_names("Model", self.task_names)
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
        if self.regularizer is not None and not callable(self.regularizer):
            raise TypeError(
                "Model: regularizer must be a function (shared, specific, batch) -> f32[], got "
                f"{type(self.regularizer).__name__}"
            )

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
        batch_spec: Any = None,
        regularizer: Callable[[PyTree, PyTree, Batch], jax.Array] | None = None,
    ) -> Model:
        """The model ``heads(specific, encode(shared, batch), batch)``; ``regularizer``: an
        optional ``(shared, specific, batch) -> f32[]`` penalty added outside the method (see
        :class:`Model`)."""

        check_task_names("Model.from_encoder_heads", task_names)

        def losses_fn(shared, specific, batch):
            return heads(specific, encode(shared, batch), batch)

        return cls(
            tuple(task_names),
            losses_fn,
            encode,
            heads,
            last_shared,
            batch_spec=batch_spec,
            regularizer=regularizer,
        )

    def check_batch(self, batch: Batch) -> None:
        """Checks a batch against :attr:`batch_spec` (when given) and for empty fields."""
        if self.batch_spec is not None:
            check_batch(self.batch_spec, batch, self.task_names)
        check_batch_generic(batch)

    def check(self, params: Params, batch: Batch) -> None:
        """Checks the batch, then, by abstract evaluation (no compilation), that the losses
        have shape (T,)."""
        self.check_batch(batch)
        try:
            out = jax.eval_shape(self.losses_fn, params.shared, params.specific, batch)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            why = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(
                f"the model's losses cannot be evaluated on this batch ({_batch_summary(batch)}): "
                f"{why}"
            ) from e
        _check_float_output(
            "losses",
            out,
            (self.num_tasks,),
            f"have shape (T,) = ({self.num_tasks},) for tasks {self.task_names}",
        )
        if self.regularizer is not None:
            self._check_regularizer(params, batch)
        if self.last_shared is not None:
            paths = tree_lib.leaf_paths(params.shared)
            pred = tree_lib.prefix_predicate(self.last_shared)
            if not any(pred(p) for p in paths):
                raise ValueError(
                    f"last_shared={self.last_shared!r} matches no shared parameter; shared "
                    f"parameter paths are {paths}"
                )

    def _check_regularizer(self, params: Params, batch: Batch) -> None:
        """By abstract evaluation: the regularizer maps the parameters and the batch to a float
        scalar."""
        try:
            out = jax.eval_shape(self.regularizer, params.shared, params.specific, batch)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise ValueError(
                "the model's regularizer cannot be evaluated as regularizer(shared, specific, "
                f"batch) on the parameters and this batch ({_batch_summary(batch)}): {e}"
            ) from e
        _check_float_output("regularizer", out, (), "return a scalar f32[]")


def _check_float_output(what: str, out: Any, shape: tuple[int, ...], expected: str) -> None:
    """Checks an abstractly evaluated output of the model's ``what`` (losses, regularizer):
    its ``shape``, described by ``expected``, and a floating dtype."""
    if not hasattr(out, "shape") or out.shape != shape:
        raise ValueError(
            f"the model's {what} must {expected}; got {getattr(out, 'shape', type(out).__name__)}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"the model's {what} must be floating point, got {out.dtype}")


def _leaves_read(fn: Callable[[PyTree], Any], tree: PyTree) -> list[str]:
    """The paths of the leaves of ``tree`` that ``fn(tree)`` reads: ``fn`` is traced to a jaxpr
    (nothing runs) and a leaf counts when an operation or the output uses it."""
    jaxpr = jax.make_jaxpr(fn)(tree).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    used |= {id(v) for v in jaxpr.outvars}
    return [
        p for p, v in zip(tree_lib.leaf_paths(tree), jaxpr.invars, strict=True) if id(v) in used
    ]


def _signature(*trees: PyTree) -> tuple:
    """The structure, shapes and dtypes of ``trees`` (hashable; tracers included): what a
    read check depends on, so that it runs once per signature rather than at every trace."""
    leaves, treedef = jax.tree_util.tree_flatten(trees)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def _refuse_reads(part: str, kind: str, fn: Callable[[PyTree], Any], state: PyTree) -> None:
    """Feature mode hands ``encode`` only the shared parameters and ``heads`` only the
    task-specific ones; the other half is the module's value when the model was built. A
    function that reads that other half would silently use stale values and pass them no
    gradient, so it is an error."""
    if not jax.tree_util.tree_leaves(state):
        return
    read = _leaves_read(fn, state)
    if read:
        raise ValueError(
            f"from_nnx: `{part}` reads the {kind} parameters {read}. With encode= and heads=, "
            "`encode` may read only the shared parameters and `heads` only the task-specific "
            "ones (feature-level Jacobians differentiate the heads w.r.t. the representation "
            "alone); change the `shared` filter, move that computation, or give `losses=` "
            "instead"
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
    batch_spec: Any = None,
    regularizer: Callable[[Any, Batch], jax.Array] | None = None,
) -> tuple[Model, Params]:
    """Builds a :class:`Model` and its :class:`Params` from a Flax NNX module.

    Args:
      module: an ``nnx.Module`` holding every parameter.
      task_names: the tasks, in the order of the loss vector.
      shared: which ``nnx.Param`` are shared: an attribute path (``"encoder"``,
        ``"trunk/layers/0"``: the parameters whose path starts with it, as
        :class:`mtljax.nn.PathPrefixes`; a head's own ``encoder`` attribute is not matched),
        or any NNX filter; every other ``nnx.Param`` is task-specific. A filter that selects no
        parameter is an error (usually a typo). ``shared=None`` declares that no parameter is
        shared by two tasks' losses (pure soft sharing, independent per-task models): the
        shared set is empty, the task Jacobian has no columns and the Gramian is zero, so the
        method's weights only decide what the task-specific parameters get (its
        ``head_grads`` rule).
      losses: ``(module, batch) -> f32[T]``; or give ``encode`` and ``heads`` instead:
      encode: ``(module, batch) -> representation``, touching shared parameters only;
      heads: ``(module, representation, batch) -> f32[T]``, touching task-specific ones only
        (feature mode checks both when it traces them: a read of the other half, which it
        would see at its build-time value and not differentiate, raises).
      last_shared: path prefix of the last shared layer (see :class:`Model`).
      batch_spec: what batches must look like (see :class:`Model`).
      regularizer: ``(module, batch) -> f32[]``, a penalty added to the update outside the
        multi-task method (see :class:`Model`), e.g. ``lambda m, b: m.regularizer()`` or,
        reading the batch, ``lambda m, b: m.entropy_penalty(b["x"])`` (DSelect-k).

    The functions receive the module rebuilt by ``nnx.merge`` from the parameters being
    differentiated; use ``to_nnx`` to put trained parameters back into a module. The module may
    hold :class:`mtljax.nn.Constant` variables besides its parameters: they are closed over,
    never trained (any other non-parameter state is refused).
    """
    from flax import nnx

    from mtljax._src.nn.constant import Constant

    check_task_names("from_nnx", task_names)
    if (losses is None) == (encode is None and heads is None):
        raise ValueError("from_nnx: give `losses`, or `encode` and `heads` (not both)")
    if (encode is None) != (heads is None):
        raise ValueError("from_nnx: give both `encode` and `heads`")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"from_nnx: regularizer must be a function (module, batch) -> f32[], got "
            f"{type(regularizer).__name__}"
        )
    if shared is None:
        shared_filter = nnx.Nothing
    elif isinstance(shared, str):
        from mtljax._src.nn.split import PathPrefixes

        shared_filter = PathPrefixes(shared)
    else:
        shared_filter = shared
    graphdef, *states = nnx.split(module, nnx.All(nnx.Param, shared_filter), nnx.Param, ...)
    # ``nnx.split`` hands out the module's own Variable objects: copy them, so that changing the
    # module afterwards (training it, ``Cascade.set_anchor()``) changes neither these parameters
    # nor the constants the model closes over.
    shared_state, specific_state, rest = jax.tree_util.tree_map(lambda x: x, tuple(states))
    if shared is not None and not jax.tree_util.tree_leaves(shared_state):
        raise ValueError(
            f"from_nnx: the filter shared={shared!r} selects no nnx.Param; the module's "
            f"parameters are {tree_lib.leaf_paths(specific_state)} (pass shared=None for a "
            "model in which no parameter is shared by two tasks)"
        )
    not_constant = [
        "/".join(str(k) for k in path)
        for path, v in nnx.to_flat_state(rest)
        if not isinstance(v, Constant)
    ]
    if not_constant:
        raise ValueError(
            "from_nnx: the module holds non-parameter state (batch statistics, RNG streams: "
            f"{not_constant}); mtljax models must be functions of their parameters: pass RNG "
            "keys through the batch instead (values that are read but never trained may be "
            "mtljax.nn.Constant variables)"
        )

    def merge(s, p):
        return nnx.merge(graphdef, s, p, rest)

    reg_fn = None if regularizer is None else (lambda s, p, b: regularizer(merge(s, p), b))
    if losses is not None:
        model = Model(
            tuple(task_names),
            lambda s, p, b: losses(merge(s, p), b),
            last_shared=last_shared,
            nnx_graphdef=graphdef,
            nnx_rest=rest,
            batch_spec=batch_spec,
            regularizer=reg_fn,
        )
    else:
        checked: set = set()  # (part, signature of its arguments) whose reads passed

        def refuse_reads_once(part, kind, fn, state, *args):
            key = (part, _signature(*args))
            if key not in checked:
                _refuse_reads(part, kind, fn, state)
                checked.add(key)

        def encode_fn(s, b):
            read = lambda p: encode(merge(s, p), b)  # noqa: E731
            refuse_reads_once("encode", "task-specific", read, specific_state, s, b)
            return encode(merge(s, specific_state), b)

        def heads_fn(p, z, b):
            read = lambda s: heads(merge(s, p), z, b)  # noqa: E731
            refuse_reads_once("heads", "shared", read, shared_state, p, z, b)
            return heads(merge(shared_state, p), z, b)

        model = Model(
            tuple(task_names),
            lambda s, p, b: heads(merge(s, p), encode(merge(s, p), b), b),
            encode_fn=encode_fn,
            heads_fn=heads_fn,
            last_shared=last_shared,
            nnx_graphdef=graphdef,
            nnx_rest=rest,
            batch_spec=batch_spec,
            regularizer=reg_fn,
        )
    return model, Params(shared_state, specific_state)


def to_nnx(model: Model, params: Params) -> Any:
    """Rebuilds the NNX module of a model made by :func:`from_nnx` with the given parameters.

    The module owns copies of its variables: changing it in place changes neither ``params``
    nor the model (its constants included); rebuild the model with ``from_nnx`` to use the
    changes."""
    from flax import nnx

    if model.nnx_graphdef is None:
        raise ValueError("to_nnx: this model was not built by from_nnx")
    return nnx.merge(model.nnx_graphdef, params.shared, params.specific, model.nnx_rest, copy=True)
