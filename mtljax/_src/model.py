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


class ModelStateError(ValueError):
    """A module's non-parameter state that the train step cannot carry (the message names the
    variable and what to do)."""


class StateFns(NamedTuple):
    """How a model with non-parameter state computes (built by :func:`from_nnx`).

    A forward pass reads and updates a *context* ``ctx = enter(model_state, key)``: the model
    state (BatchNorm statistics, any other non-parameter variables) together with the random
    streams of the forward pass, seeded from ``key`` (``None``: the streams as the module was
    built). Each function returns the context its forward pass leaves, and ``leave(ctx)`` is
    the updated model state.

    Attributes:
      initial: the model state when the model was built (a pytree of arrays).
      enter: ``(model_state, key | None) -> ctx``.
      leave: ``ctx -> model_state``.
      losses: ``(shared, specific, batch, ctx) -> (f32[T], ctx)``, in training mode.
      encode: ``(shared, batch, ctx) -> (representation, ctx)``, or ``None``.
      heads: ``(specific, representation, batch, ctx) -> (f32[T], ctx)``, or ``None``.
      eval_losses: ``(shared, specific, batch, ctx) -> f32[T]``, in evaluation mode (running
        statistics, no dropout).
      uses_key: whether the forward pass draws random numbers (the module holds RNG streams).
    """

    initial: PyTree
    enter: Callable[[PyTree, jax.Array | None], PyTree]
    leave: Callable[[PyTree], PyTree]
    losses: Callable[..., tuple[jax.Array, PyTree]]
    encode: Callable[..., tuple[PyTree, PyTree]] | None
    heads: Callable[..., tuple[jax.Array, PyTree]] | None
    eval_losses: Callable[..., jax.Array]
    uses_key: bool


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
      state_fns: for a model with non-parameter state (BatchNorm statistics, other
        non-parameter variables, dropout's RNG streams; built by :func:`from_nnx`), the
        functions that thread it (:class:`StateFns`). The train step runs those: it carries the
        state in ``TrainState.model_state``, updates it from each step's own forward pass and
        hands the model a fresh key every step. ``losses_fn``, ``encode_fn``, ``heads_fn`` and
        ``regularizer`` are then the same computation, in training mode, at the state and the
        random streams the model was built with (what analysis tools such as
        :func:`mtljax.nn.check_shared_split` differentiate). ``None`` for a model that is a
        function of its parameters alone.
      nnx_rng: the RNG streams of the module (:func:`from_nnx`), as built.
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
    state_fns: StateFns | None = None
    nnx_rng: Any = None

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

    @property
    def has_state(self) -> bool:
        """Whether the model has non-parameter state or random streams (see ``state_fns``)."""
        return self.state_fns is not None

    @property
    def initial_state(self) -> PyTree:
        """The model state as built (``()`` for a model without state)."""
        return () if self.state_fns is None else self.state_fns.initial

    @property
    def uses_key(self) -> bool:
        """Whether the forward pass draws random numbers (dropout): the train step then hands
        it a fresh key every step."""
        return self.state_fns is not None and self.state_fns.uses_key

    def step_fns(self) -> StateFns:
        """The model's functions with the state threaded (:class:`StateFns`); a model without
        state gets them with an empty context, computing exactly its ``losses_fn``,
        ``encode_fn`` and ``heads_fn``."""
        if self.state_fns is not None:
            return self.state_fns
        encode = heads = None
        if self.has_features:
            encode = lambda s, b, c: (self.encode_fn(s, b), c)  # noqa: E731
            heads = lambda p, z, b, c: (self.heads_fn(p, z, b), c)  # noqa: E731
        return StateFns(
            initial=(),
            enter=lambda model_state, key: model_state,
            leave=lambda ctx: ctx,
            losses=lambda s, p, b, c: (self.losses_fn(s, p, b), c),
            encode=encode,
            heads=heads,
            eval_losses=lambda s, p, b, c: self.losses_fn(s, p, b),
            uses_key=False,
        )

    def eval_losses(self, params: Any, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
        """The task losses in evaluation mode: BatchNorm with its running statistics, dropout
        off (NNX's ``eval()`` mode), the model state left as it is.

        ``params``: a :class:`mtljax.TrainState` (its parameters and model state), or
        :class:`Params` (with the model state as built). ``key`` seeds the module's random
        streams, for a model that draws random numbers in evaluation mode too. For a model
        without state this is ``losses_fn``.
        """
        p, model_state = params_and_state(self, params)
        fns = self.step_fns()
        return fns.eval_losses(p.shared, p.specific, batch, fns.enter(model_state, key))

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
        except ModelStateError:
            raise
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


def params_and_state(model: Model, params: Any) -> tuple[Params, PyTree]:
    """``(Params, model_state)`` from :class:`Params` (the model state as built) or from a
    train state (anything with ``params`` and ``model_state``)."""
    if isinstance(params, Params):
        return params, model.initial_state
    inner = getattr(params, "params", None)
    if isinstance(inner, Params) and hasattr(params, "model_state"):
        return inner, params.model_state
    raise TypeError(
        f"expected mtljax.Params or a TrainState (parameters and model state), got "
        f"{type(params).__name__}"
    )


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
    differentiated; use ``to_nnx`` to put trained parameters (and model state) back into a
    module. Besides its parameters the module may hold:

    * :class:`mtljax.nn.Constant` variables: closed over, never trained;
    * RNG streams (``nnx.Rngs``, e.g. in ``nnx.Dropout``): every train step reseeds them from a
      key derived from the train state's key and the step, so a run is reproducible and every
      quantity of a step (the losses, the per-task Jacobian) sees the same dropout masks;
    * any other ``nnx.Variable`` holding an array, e.g. BatchNorm's ``nnx.BatchStat``: the
      model state. The train step runs the module in training mode (``Module.train()``),
      carries the state in ``TrainState.model_state`` and updates it once per step, from that
      step's own forward pass; :meth:`Model.eval_losses` and ``to_nnx(model, state).eval()``
      use it in evaluation mode (running statistics, dropout off).

    Values sown by an earlier call (``nnx.Intermediate``), an ``nnx.Optimizer``'s state and
    variables that do not hold an array are refused, naming the variable and the fix. A
    BatchNorm's ``scale`` and ``bias`` are parameters like any other: shared when the ``shared``
    filter selects them (a BatchNorm inside the shared encoder), task-specific otherwise; its
    statistics are model state, neither shared nor task-specific.
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
    graphdef, *states = nnx.split(
        module, nnx.All(nnx.Param, shared_filter), nnx.Param, Constant, nnx.RngState, ...
    )
    # ``nnx.split`` hands out the module's own Variable objects: copy them, so that changing the
    # module afterwards (training it, ``Cascade.set_anchor()``) changes neither these parameters
    # nor the constants and state the model starts from.
    shared_state, specific_state, rest, streams, carried = jax.tree_util.tree_map(
        lambda x: x, tuple(states)
    )
    if shared is not None and not jax.tree_util.tree_leaves(shared_state):
        raise ValueError(
            f"from_nnx: the filter shared={shared!r} selects no nnx.Param; the module's "
            f"parameters are {tree_lib.leaf_paths(specific_state)} (pass shared=None for a "
            "model in which no parameter is shared by two tasks)"
        )
    _refuse_unsupported_state(carried)
    stateful = bool(jax.tree_util.tree_leaves((streams, carried)))

    def merge(s, p):
        return nnx.merge(graphdef, s, p, rest)

    common = dict(
        last_shared=last_shared,
        nnx_graphdef=graphdef,
        nnx_rest=rest,
        batch_spec=batch_spec,
    )
    checked: set = set()  # (part, signature of its arguments) whose reads passed

    def refuse_reads_once(part, kind, fn, state, *args):
        key = (part, _signature(*args))
        if key not in checked:
            _refuse_reads(part, kind, fn, state)
            checked.add(key)

    if stateful:
        return _stateful_from_nnx(
            module,
            graphdef,
            (shared_state, specific_state, rest, streams, carried),
            task_names=tuple(task_names),
            losses=losses,
            encode=encode,
            heads=heads,
            regularizer=regularizer,
            refuse_reads_once=refuse_reads_once,
            common=common,
        )

    reg_fn = None if regularizer is None else (lambda s, p, b: regularizer(merge(s, p), b))
    if losses is not None:
        model = Model(
            tuple(task_names),
            lambda s, p, b: losses(merge(s, p), b),
            regularizer=reg_fn,
            **common,
        )
    else:

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
            regularizer=reg_fn,
            **common,
        )
    return model, Params(shared_state, specific_state)


# ----------------------------------------------------------------------------------------------
# Modules with non-parameter state


def _var_value(var: Any) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def _refuse_unsupported_state(carried: Any) -> None:
    """Refuses the non-parameter variables a train step cannot carry, naming each and the fix.

    Carried (as model state): every other ``nnx.Variable`` that holds an array, such as
    ``nnx.BatchStat``. Refused: values sown by an earlier call (``nnx.Intermediate``,
    ``nnx.Perturbation``), an optimizer's state (``nnx.Optimizer``), and variables that hold
    something other than an array.
    """
    from flax import nnx

    sown = tuple(getattr(nnx, n) for n in ("Intermediate", "Perturbation") if hasattr(nnx, n))
    optimizer_state = tuple(
        getattr(nnx, n) for n in ("OptState", "OptVariable", "OptArray") if hasattr(nnx, n)
    )
    for path, var in nnx.to_flat_state(carried):
        name = "/".join(str(k) for k in path)
        kind = (
            f"nnx.{type(var).__name__}"
            if type(var).__module__.startswith("flax")
            else (type(var).__name__)
        )
        if sown and isinstance(var, sown):
            raise ModelStateError(
                f"from_nnx: the module holds {name!r} ({kind}), a value sown by an earlier call; "
                "each forward pass sows anew, so it is not state a train step can carry. Remove "
                f"it before from_nnx: nnx.pop(module, {kind})"
            )
        if optimizer_state and isinstance(var, optimizer_state):
            raise ModelStateError(
                f"from_nnx: the module holds {name!r} ({kind}), an optimizer's state; pass the "
                "model itself, not an nnx.Optimizer: mtljax trains it with the optax optimizer "
                "given to make_train_step"
            )
        value = _var_value(var)
        if not (isinstance(value, jax.Array | np.ndarray | np.generic)):
            raise ModelStateError(
                f"from_nnx: the non-parameter variable {name!r} ({kind}) holds a "
                f"{type(value).__name__}, not an array; the train step carries a module's "
                "non-parameter state as arrays (updated inside the jitted step, checkpointed). "
                "Make its value an array, or make it a plain attribute of the module if it "
                "never changes"
            )


def _carry_like(new: PyTree, like: PyTree, what: str) -> PyTree:
    """``new`` (the variables a forward pass left) in the structure of ``like`` (those it was
    given): variables the pass created (sown values) are dropped; a variable it removed or
    whose shape or dtype it changed is refused, since the state the step carries is fixed."""
    got = {tree_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(new)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, old in flat:
        name = tree_lib.path_str(path)
        if name not in got:
            raise ModelStateError(
                f"from_nnx: the forward pass removed the {what} variable {name!r}; the train "
                "step carries the module's non-parameter variables from step to step, so a "
                "forward pass must keep them (update their values in place instead)"
            )
        value = got[name]
        if jnp.shape(value) != jnp.shape(old) or jnp.result_type(value) != jnp.result_type(old):
            raise ModelStateError(
                f"from_nnx: the forward pass changed the {what} variable {name!r} from "
                f"{jnp.result_type(old)}{list(jnp.shape(old))} to "
                f"{jnp.result_type(value)}{list(jnp.shape(value))}; the train step carries "
                "non-parameter variables of fixed shapes and dtypes from step to step: keep "
                "them so (e.g. accumulate into a fixed-size array), or compute the value "
                "inside the loss without storing it on the module"
            )
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _typed_key(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _seed_streams(streams: PyTree, key: jax.Array) -> PyTree:
    """The module's RNG streams seeded from ``key``: the ``i``-th stream's key is
    ``fold_in(key, i)`` and every count restarts at 0, so a forward pass draws the same random
    numbers for the same ``key`` whatever the module drew before."""
    from flax import nnx

    key = _typed_key(key)
    index = iter(range(len(jax.tree_util.tree_leaves(streams))))

    def seed(var):
        if isinstance(var, nnx.RngKey):
            return var.replace(jax.random.fold_in(key, next(index)))
        if isinstance(var, nnx.RngCount):
            return var.replace(jnp.zeros_like(_var_value(var)))
        return var

    return jax.tree_util.tree_map(seed, streams, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _mode_graphdef(graphdef: Any, states: tuple, *, train: bool) -> Any:
    """The module's graph with NNX's training or evaluation flags set, as ``Module.train()``
    and ``Module.eval()`` do (``deterministic``, ``use_running_average``)."""
    from flax import nnx

    view = nnx.merge(graphdef, *jax.tree_util.tree_map(lambda x: x, states))
    view.set_attributes(
        deterministic=not train, use_running_average=not train, raise_if_not_found=False
    )
    return nnx.split(view)[0]


def _stateful_from_nnx(
    module,
    graphdef,
    states,
    *,
    task_names,
    losses,
    encode,
    heads,
    regularizer,
    refuse_reads_once,
    common,
) -> tuple[Model, Params]:
    """:func:`from_nnx` for a module with non-parameter state or RNG streams: the model's
    functions thread the context ``(model_state, streams)`` (see :class:`StateFns`)."""
    from flax import nnx

    from mtljax._src.nn.constant import Constant

    shared_state, specific_state, rest, streams, carried = states
    train_graphdef = _mode_graphdef(graphdef, states, train=True)
    eval_graphdef = _mode_graphdef(graphdef, states, train=False)
    carried_filter = nnx.Not(nnx.Any(nnx.Param, Constant, nnx.RngState))

    def run(gdef, s, p, ctx, fn, *args):
        model_state, rngs = ctx
        copies = jax.tree_util.tree_map(lambda x: x, (rngs, model_state))
        m = nnx.merge(gdef, s, p, rest, *copies)
        out = fn(m, *args)
        new_rngs = _carry_like(nnx.state(m, nnx.RngState), rngs, "RNG stream")
        new_state = _carry_like(nnx.state(m, carried_filter), model_state, "model state")
        return out, (new_state, new_rngs)

    body = losses if losses is not None else (lambda m, b: heads(m, encode(m, b), b))

    def losses_ctx(s, p, b, ctx):
        return run(train_graphdef, s, p, ctx, body, b)

    def eval_losses_ctx(s, p, b, ctx):
        return run(eval_graphdef, s, p, ctx, body, b)[0]

    encode_ctx = heads_ctx = None
    if losses is None:

        def encode_ctx(s, b, ctx):
            read = lambda p: run(train_graphdef, s, p, ctx, encode, b)[0]  # noqa: E731
            refuse_reads_once("encode", "task-specific", read, specific_state, s, b)
            return run(train_graphdef, s, specific_state, ctx, encode, b)

        def heads_ctx(p, z, b, ctx):
            read = lambda s: run(train_graphdef, s, p, ctx, heads, z, b)[0]  # noqa: E731
            refuse_reads_once("heads", "shared", read, shared_state, p, z, b)
            return run(train_graphdef, shared_state, p, ctx, heads, z, b)

    fns = StateFns(
        initial=carried,
        enter=lambda model_state, key: (
            model_state,
            streams if key is None else _seed_streams(streams, key),
        ),
        leave=lambda ctx: ctx[0],
        losses=losses_ctx,
        encode=encode_ctx,
        heads=heads_ctx,
        eval_losses=eval_losses_ctx,
        uses_key=bool(jax.tree_util.tree_leaves(streams)),
    )
    built = (carried, streams)  # the views below run at the state and streams as built
    reg_fn = None
    if regularizer is not None:
        reg_fn = lambda s, p, b: run(train_graphdef, s, p, built, regularizer, b)[0]  # noqa: E731
    model = Model(
        task_names,
        lambda s, p, b: losses_ctx(s, p, b, built)[0],
        encode_fn=None if encode_ctx is None else (lambda s, b: encode_ctx(s, b, built)[0]),
        heads_fn=None if heads_ctx is None else (lambda p, z, b: heads_ctx(p, z, b, built)[0]),
        regularizer=reg_fn,
        state_fns=fns,
        nnx_rng=streams,
        **common,
    )
    return model, Params(shared_state, specific_state)


def to_nnx(model: Model, state: Any) -> Any:
    """Rebuilds the NNX module of a model made by :func:`from_nnx`.

    ``state``: a :class:`mtljax.TrainState` (its parameters and model state: BatchNorm's
    running statistics...), or :class:`Params` (with the model state as built). The module
    comes back in the mode it was given to ``from_nnx`` (NNX modules start in training mode):
    call ``module.eval()`` (or ``nnx.view``) to evaluate with running statistics and without
    dropout, as :meth:`Model.eval_losses` does.

    The module owns copies of its variables: changing it in place changes neither ``state``
    nor the model (its constants included); rebuild the model with ``from_nnx`` to use the
    changes."""
    from flax import nnx

    if model.nnx_graphdef is None:
        raise ValueError("to_nnx: this model was not built by from_nnx")
    params, model_state = params_and_state(model, state)
    states = [params.shared, params.specific, model.nnx_rest]
    if model.has_state:
        states += [model.nnx_rng, model_state]
    return nnx.merge(model.nnx_graphdef, *states, copy=True)
