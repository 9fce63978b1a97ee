"""A jitted multi-task train step: losses, what the method needs, the method, the optimizer."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtljax._src import base, engine
from mtljax._src import tree as tree_lib
from mtljax._src.describe import state_skeleton
from mtljax._src.model import Batch, Model, Params, StateFns

PyTree = Any
Mode = Literal["parameter", "feature"]
NonFinite = Literal["skip", "raise", "apply"]
Unconverged = Literal["report", "skip", "raise"]


class NonFiniteError(FloatingPointError):
    """A train step met a non-finite loss or gradient (``nonfinite="raise"``).

    Attributes:
      step: the index of the failing step (``state.step`` before it: the number of steps
        taken until then).
      tasks: the names of the tasks whose loss was not finite; if every loss was finite, of
        those whose gradient was not (when the method computed per-task gradients and not
        every one of them was non-finite); else empty.
    """

    def __init__(self, message: str, *, step: int, tasks: tuple[str, ...]):
        super().__init__(message)
        self.step, self.tasks = step, tasks


class SolverError(RuntimeError):
    """A method's solver did not converge in a train step (``unconverged="raise"``).

    Attributes:
      step: the index of the failing step; iterations, residual: the solve's report.
    """

    def __init__(self, message: str, *, step: int, iterations: int, residual: float):
        super().__init__(message)
        self.step, self.iterations, self.residual = step, iterations, residual


class SkippedStepWarning(RuntimeWarning):
    """A train step was skipped as non-finite (``nonfinite="skip"``); ``state.skipped``
    counts them."""


class PerTaskFeaturesWarning(UserWarning):
    """At feature level (``mode="feature"``), the task gradients w.r.t. the representation
    were orthogonal by construction: each task's head reads only its own part of it (per-task
    inputs, a representation with a task axis), so every cosine is 0 and a Gramian method
    sees no conflict (MGDA-UB reduces to weights ∝ 1/‖∇ᵢ‖²). ``mode="parameter"`` is the
    way out: there the tasks meet in the shared encoder's parameters."""


def _replicated_to_host(x: jax.Array) -> np.ndarray:
    """A metric on the host; under several processes, this process's copy of it."""
    if getattr(x, "is_fully_addressable", True) or not x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def _short(treedef: Any, limit: int = 300) -> str:
    text = str(treedef)
    return text if len(text) <= limit else text[:limit] + "…"


class TrainState(NamedTuple):
    """Everything a run carries from step to step (all arrays: checkpoint it whole).

    Attributes:
      params: the shared and task-specific parameters.
      opt_state: the optimizer's state.
      method_state: the method's state.
      key: the run's PRNG key; each step splits it, and the model's random streams (dropout)
        draw from a key derived from it and ``step`` (:func:`model_key`).
      step: the number of steps taken.
      skipped: how many of them were not applied (non-finite, or an unconverged solve).
      model_state: the model's non-parameter state (BatchNorm's running statistics...; see
        :func:`mtljax.from_nnx`), updated by each applied step; ``()`` for a model without.
    """

    params: Params
    opt_state: PyTree
    method_state: PyTree
    key: jax.Array
    step: jax.Array
    skipped: jax.Array
    model_state: PyTree = ()


# The model's random streams draw from fold_in(fold_in(key, _MODEL_STREAM), step): a stream of
# its own, apart from the keys that split(key) hands the method and the next step.
_MODEL_STREAM = 0x6D6F64  # "mod"


def model_key(key: jax.Array, step: jax.Array) -> jax.Array:
    """The key of a step's forward pass: derived from the train state's ``key`` and ``step``
    (so a repeated or resumed run draws the same dropout masks), independent of the keys the
    step hands the method."""
    return jax.random.fold_in(jax.random.fold_in(key, _MODEL_STREAM), step)


def init_train_state(
    model: Model,
    params: Params,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    model_state: PyTree = None,
) -> TrainState:
    """The initial :class:`TrainState`; checks that the method accepts the model's ``T``.

    A method that trains its weighting parameters with the model's optimizer
    (``method.with_optimizer``, e.g. UW) gets ``optimizer`` bound (:func:`base.bind_optimizer`),
    as in :func:`make_train_step`. ``model_state``: the model's non-parameter state to start
    from (BatchNorm statistics); by default the model's as built (``model.initial_state``).
    """
    _check_model_and_method("init_train_state", model, method)
    method = base.bind_optimizer(method, optimizer)
    key = _check_key(key)
    if not isinstance(params, Params):
        raise TypeError(f"params must be mtljax.Params(shared, specific), got {type(params)}")
    # Strong types from the start: a weak-typed leaf (e.g. from jnp.full(shape, 0.1)) turns
    # strong after the first update, which would compile the step a second time.
    params = _strong(params)
    method_state = _strong(method.init(model.num_tasks))
    if model_state is None:
        model_state = model.initial_state
    else:
        _check_model_state("init_train_state", model, model_state)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        method_state=method_state,
        key=key,
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        model_state=_strong(model_state),
    )


def _check_model_state(owner: str, model: Model, model_state: PyTree) -> None:
    """The model state must have the structure, shapes and dtypes of the model's."""
    from mtljax._src.model import _signature

    if _signature(model_state) != _signature(model.initial_state):
        have = tree_lib.leaf_paths(model_state) or "none"
        want = tree_lib.leaf_paths(model.initial_state) or "none (the model has no state)"
        raise ValueError(
            f"{owner}: the model state does not fit this model: it has the variables {have}, "
            f"the model {want} (or their shapes or dtypes differ); build the train state with "
            "init_train_state(model, ...) for this model"
        )


def _check_model_and_method(owner: str, model: Any, method: Any) -> None:
    if not isinstance(model, Model):
        raise TypeError(f"{owner}: expected an mtljax Model, got {type(model).__name__}")
    base.check_method(owner, method)


def _check_key(key: Any) -> jax.Array:
    """A PRNG key: typed (``jax.random.key``) or raw ``uint32[2]`` (``jax.random.PRNGKey``)."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"init_train_state: expected one PRNG key, got keys of shape {key.shape}"
            )
        return key
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError(
            f"init_train_state: key must be a PRNG key (jax.random.key(seed)), got "
            f"{key.dtype}{list(key.shape)}"
        )
    return key


def _strong(tree: PyTree) -> PyTree:
    def strong(x):
        return jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x

    return jax.tree_util.tree_map(strong, tree)


def pairwise_cosines(gram: jax.Array) -> jax.Array:
    """``cos(gᵢ, gⱼ) = Gᵢⱼ / (‖gᵢ‖‖gⱼ‖)`` from the Gramian (0 where a gradient is zero; NaN
    where ``Gᵢⱼ``, ``Gᵢᵢ`` or ``Gⱼⱼ`` is not finite, so a non-finite gradient is never read as
    an orthogonal one)."""
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    denom = norms[:, None] * norms[None, :]
    cos = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.where(jnp.isfinite(gram) & jnp.isfinite(denom), cos, jnp.nan)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _stays_finite(old: PyTree, new: PyTree) -> jax.Array:
    """Whether no entry of ``new`` is non-finite where ``old`` was finite (method states may
    hold deliberate infinities)."""
    oks = [
        jnp.all(jnp.isfinite(b) | ~jnp.isfinite(a))
        for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new), strict=True)
        if jnp.issubdtype(b.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(oks)) if oks else jnp.asarray(True)


def _cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map(cast, tree)


def mixed_precision(model: Model, compute_dtype: Any) -> Model:
    """The model computed in ``compute_dtype``, with float32 parameters, losses and Jacobians.

    The floating-point parameters and batch fields are cast to ``compute_dtype`` (e.g.
    ``jnp.bfloat16``) inside the loss, and the losses are cast back to float32; gradients
    w.r.t. the float32 master parameters are float32, and so are the Jacobian, the Gramian and
    everything a method's solver sees. At feature level the representation is handed to the
    heads' Jacobian in float32 too. (bfloat16 has float32's exponent range: no loss scaling.)
    A model ``regularizer`` is kept as it is: it is evaluated on the float32 master parameters.
    A model with state keeps its state (BatchNorm's statistics) in the dtypes it has; how a
    layer computes with it follows the layer's own ``dtype`` attribute.
    """
    dtype = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype, got {dtype}")
    out_dtype = jnp.promote_types(dtype, jnp.float32)

    def losses_fn(shared, specific, batch):
        out = model.losses_fn(
            _cast_floating(shared, dtype),
            _cast_floating(specific, dtype),
            _cast_floating(batch, dtype),
        )
        return out.astype(out_dtype)

    encode_fn = heads_fn = None
    if model.has_features:

        def encode_fn(shared, batch):
            z = model.encode_fn(_cast_floating(shared, dtype), _cast_floating(batch, dtype))
            return _cast_floating(z, out_dtype)

        def heads_fn(specific, z, batch):
            out = model.heads_fn(
                _cast_floating(specific, dtype),
                _cast_floating(z, dtype),
                _cast_floating(batch, dtype),
            )
            return out.astype(out_dtype)

    state_fns = model.state_fns
    if state_fns is not None:
        state_fns = _mixed_precision_state(state_fns, dtype, out_dtype)
    return dataclasses.replace(
        model, losses_fn=losses_fn, encode_fn=encode_fn, heads_fn=heads_fn, state_fns=state_fns
    )


def _mixed_precision_state(fns: StateFns, dtype: Any, out_dtype: Any) -> StateFns:
    """:func:`mixed_precision` for the functions of a model with state: parameters and batch
    in ``dtype``, losses and representation in ``out_dtype``. The model state keeps its own
    dtypes, as its updates need (a running average in bfloat16 would lose its increments);
    a layer's ``dtype`` attribute (``nnx.BatchNorm(..., dtype=jnp.bfloat16)``) says in which
    dtype it computes with it."""

    def cast(*trees):
        return tuple(_cast_floating(x, dtype) for x in trees)

    def losses(shared, specific, batch, ctx):
        out, ctx = fns.losses(*cast(shared, specific, batch), ctx)
        return out.astype(out_dtype), ctx

    def eval_losses(shared, specific, batch, ctx):
        return fns.eval_losses(*cast(shared, specific, batch), ctx).astype(out_dtype)

    encode = heads = None
    if fns.encode is not None:

        def encode(shared, batch, ctx):
            z, ctx = fns.encode(*cast(shared, batch), ctx)
            return _cast_floating(z, out_dtype), ctx

        def heads(specific, z, batch, ctx):
            out, ctx = fns.heads(*cast(specific, z, batch), ctx)
            return out.astype(out_dtype), ctx

    return fns._replace(losses=losses, eval_losses=eval_losses, encode=encode, heads=heads)


def add_regularizer(
    regularizer: Callable[[PyTree, PyTree, Any], jax.Array],
    params: Params,
    grads: Params,
    batch: Any,
) -> tuple[jax.Array, Params]:
    """``(R, d + ∇_θ R)`` with ``R = R(θ; batch)``: a regularizer's gradient added to a
    method's direction ``d``.

    ``R`` is differentiated on its own, outside the loss vector: its gradient is added once and
    unweighted, whatever weights the method gave the tasks (inside the loss vector a penalty is
    multiplied by its task's weight ``wᵢ``, which silently changes its strength). ``R`` is
    evaluated on ``params`` as they are: the float32 master parameters under mixed precision.
    """
    value, (g_shared, g_specific) = jax.value_and_grad(regularizer, argnums=(0, 1))(
        params.shared, params.specific, batch
    )

    def add(d, g):
        return d + g.astype(d.dtype)

    return value, Params(
        jax.tree_util.tree_map(add, grads.shared, g_shared),
        jax.tree_util.tree_map(add, grads.specific, g_specific),
    )


def _check_weights_defined(method: base.Method, head_grads: str, params: Params, mode: str) -> None:
    """A method that reads the shared gradients (Gramian or Jacobian) and scales the
    task-specific gradients by its weights has nothing to read in a model without shared
    parameters: its weights would come from ``G = 0`` (Nash-MTL's are then all zero, so the
    towers would silently not train). That is an error; ``head_grads="unit"`` is the way out.
    (At feature level the Gramian is that of the representation's gradients, not zero.)"""
    if method.needs == "losses" or head_grads != "weighted" or mode != "parameter":
        return
    if not jax.tree_util.tree_leaves(params.shared):
        raise ValueError(
            f"{method.name} computes its task weights from the shared parameters' gradients, "
            "but the model has no shared parameters (G = 0), so the weights that scale the "
            "task-specific gradients (head_grads='weighted') are undefined. Pass "
            "head_grads='unit' (each task's parameters get ∇Lᵢ) or use a method that weights "
            "the losses"
        )


def _method_weights(method: base.Method, losses, gram, state, key):
    """``method.weights`` with the weights in the losses' dtype: they are the cotangent of the
    losses' VJP, which must match it (a method may compute in float32 while the losses are
    float64 under ``jax_enable_x64``, or the reverse)."""
    w, state = method.weights(losses, gram, state, key)
    return jnp.asarray(w).astype(losses.dtype), state


def _method_direction(method: base.Method, jac, losses, state, key):
    """``method.direction`` with each leaf in its Jacobian leaf's dtype (that of the parameter
    or representation it is a gradient for)."""
    direction, state = method.direction(jac, losses, state, key)
    direction = jax.tree_util.tree_map(lambda d, j: d.astype(j.dtype), direction, jac)
    return direction, state


GramianChoice = Literal["auto", "jacobian", "layerwise"]


def check_gramian_path(method: base.Method, gramian: str) -> None:
    """``gramian="layerwise"`` applies to weighting methods that need the Gramian (at
    parameter or feature level); ``"auto"`` to every method."""
    if gramian not in ("auto", "jacobian", "layerwise"):
        raise ValueError(f"gramian must be 'auto', 'jacobian' or 'layerwise', got {gramian!r}")
    if gramian == "layerwise" and (method.weights is None or method.needs != "gramian"):
        raise ValueError(
            f"gramian='layerwise' computes a Gramian for a weighting method; {method.name} "
            + (
                "needs the losses only"
                if method.needs == "losses"
                else "yields a direction from the full Jacobian"
            )
        )


def resolve_gramian_path(
    method: base.Method,
    gramian: str,
    mode: str,
    *,
    chunk_size: int | None,
    gramian_chunk_size: int | None,
    constraint: Callable[[PyTree], PyTree] | None,
) -> engine.GramianPath:
    """The Gramian path ``gramian="auto"`` takes for ``method`` (:func:`engine.auto_path`):
    ``"layerwise"`` for a weighting method on the Gramian at feature level or on a layer
    subset (GradNorm's last shared layer); over all shared parameters ``"auto"``, which the
    engine settles from the shapes (:func:`mtljax._src.engine.layerwise_pays`: the layer-wise
    Gramian plus one backward pass for the update, against the formed Jacobian whose ``Jᵀw``
    saves that pass); ``"jacobian"`` for every other method, and wherever ``chunk_size``,
    ``gramian_chunk_size`` or a constraint asks for the Jacobian."""
    if gramian != "auto":
        return gramian
    if method.weights is None:
        return "jacobian"
    return engine.auto_path(
        method.needs,
        mode,
        method.params,
        chunk_size=chunk_size,
        gramian_chunk_size=gramian_chunk_size,
        constraint=constraint,
    )


class StepGradients(NamedTuple):
    """What :func:`step_gradients` returns: the update direction and the states it leaves."""

    grads: Params
    method_state: PyTree
    model_state: PyTree
    metrics: dict[str, jax.Array]


def gradients(
    model: Model,
    method: base.Method,
    params: Params,
    method_state: PyTree,
    batch: Batch,
    key: jax.Array | None,
    *,
    mode: Mode = "parameter",
    chunk_size: int | None = None,
    head_grads: str | None = None,
    gramian_chunk_size: int | None = None,
    jacobian_constraint: Callable[[PyTree], PyTree] | None = None,
    model_state: PyTree = None,
    model_key: jax.Array | None = None,
    gramian: GramianChoice = "auto",
) -> tuple[Params, PyTree, dict[str, jax.Array]]:
    """The parameter gradient (descent direction, negated by the optimizer) chosen by ``method``.

    Computes only what the method declares it needs. Returns ``(grads, method_state, metrics)``;
    ``metrics`` holds what the method computed (the train step completes it to the same keys
    for every method: :func:`complete_metrics`).
    With a model ``regularizer`` ``R``, the result is the method's direction plus ``∇R``
    (w.r.t. the shared and the task-specific parameters; see :func:`add_regularizer`), and
    ``metrics["regularizer"]`` holds ``R(θ; batch)``; without one there is no such metric.
    A model without shared parameters (``from_nnx(shared=None)``) has a Jacobian with no
    leaves and a zero Gramian; the task-specific parameters get the method's ``head_grads``
    (in parameter mode a Gramian or Jacobian method with ``head_grads="weighted"``, e.g.
    Nash-MTL, raises: its weights would come from ``G = 0``; pass ``head_grads="unit"``).
    ``gramian_chunk_size`` (weighting methods that need the Gramian) computes the Gramian
    that many tasks at a time without forming the Jacobian (see
    :func:`mtljax.gramian_by_chunks`); ``jacobian_constraint`` is applied to the
    parameter-level Jacobian (or its chunks), e.g. a sharding constraint.

    A model with state runs in training mode at ``model_state`` (``None``: as built), its
    random streams seeded from ``model_key`` (``None``: as built); the state its forward pass
    leaves is returned by :func:`step_gradients`, which the train step uses.
    """
    out = step_gradients(
        model,
        method,
        params,
        method_state,
        batch,
        key,
        mode=mode,
        chunk_size=chunk_size,
        head_grads=head_grads,
        gramian_chunk_size=gramian_chunk_size,
        jacobian_constraint=jacobian_constraint,
        model_state=model_state,
        model_key=model_key,
        gramian=gramian,
    )
    return out.grads, out.method_state, out.metrics


def step_gradients(
    model: Model,
    method: base.Method,
    params: Params,
    method_state: PyTree,
    batch: Batch,
    key: jax.Array | None,
    *,
    mode: Mode = "parameter",
    chunk_size: int | None = None,
    head_grads: str | None = None,
    gramian_chunk_size: int | None = None,
    jacobian_constraint: Callable[[PyTree], PyTree] | None = None,
    model_state: PyTree = None,
    model_key: jax.Array | None = None,
    gramian: GramianChoice = "auto",
) -> StepGradients:
    """:func:`gradients`, with the model state its forward pass leaves."""
    check_gramian_path(method, gramian)
    gramian = resolve_gramian_path(
        method,
        gramian,
        mode,
        chunk_size=chunk_size,
        gramian_chunk_size=gramian_chunk_size,
        constraint=jacobian_constraint,
    )
    head_grads = head_grads or method.head_grads
    _check_weights_defined(method, head_grads, params, mode)
    if mode not in ("parameter", "feature"):
        raise ValueError(f"mode must be 'parameter' or 'feature', got {mode!r}")
    if gramian_chunk_size is not None and method.needs != "losses" and method.weights is None:
        raise ValueError(
            f"gramian_chunk_size: {method.name} yields a direction from the full Jacobian; "
            "only weighting methods can work from the Gramian alone"
        )
    t = model.num_tasks
    metrics: dict[str, jax.Array] = {}
    q = engine.compute(
        model,
        params,
        batch,
        needs=method.needs,
        mode=mode,
        subset=method.params,
        chunk_size=chunk_size,
        gramian_chunk_size=gramian_chunk_size,
        constraint=jacobian_constraint if mode == "parameter" else None,
        model_state=model_state,
        key=model_key,
        gramian=gramian,
    )
    losses, vjp, gram, rows_ok = q.losses, q.vjp, q.gramian, q.rows_finite
    if method.weights is not None:
        w, method_state = _method_weights(method, losses, gram, method_state, key)
        grads = q.weighted(w)
    else:
        w = None
        direction, method_state = _method_direction(method, q.jacobian, losses, method_state, key)
        grads = Params(q.pullback(direction), vjp(jnp.ones_like(losses)).specific)

    if w is not None and head_grads == "unit":
        grads = Params(grads.shared, vjp(jnp.ones_like(losses)).specific)
    if model.regularizer is not None:
        value, grads = add_regularizer(model.regularizer, params, grads, batch)
        metrics["regularizer"] = value
    metrics["losses"] = losses
    metrics["task_finite"] = jnp.isfinite(losses)
    if rows_ok is not None:
        metrics["rows_finite"] = rows_ok
    if w is not None:
        metrics["weights"] = jnp.broadcast_to(w, (t,))
    if gram is not None:
        metrics["grad_norms"] = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
        metrics["cosines"] = pairwise_cosines(gram)
    info = base.solver_info(method_state)
    if info is not None:
        metrics["solver_iterations"] = info.iterations
        metrics["solver_converged"] = info.converged
        metrics["solver_residual"] = info.residual
    return StepGradients(grads, method_state, q.model_state, metrics)


# The metrics every train step reports, whatever the method (see make_train_step).
METHOD_METRICS = (
    "losses",
    "task_finite",
    "weights",
    "grad_norms",
    "cosines",
    "rows_finite",
    "solver_iterations",
    "solver_converged",
    "solver_residual",
)


def complete_metrics(metrics: dict[str, jax.Array], num_tasks: int) -> dict[str, jax.Array]:
    """``metrics`` with every key of :data:`METHOD_METRICS`, so that every method's step
    reports the same keys, shapes and dtypes: a quantity the method did not compute is
    filled in as not computed, by type: NaN for a float (``weights`` of a method that yields
    a direction; ``grad_norms`` and ``cosines`` of a losses-only method; ``solver_residual``
    of a method without a solver), ``-1`` for a count (``solver_iterations``), and ``True``
    for the flag of a check that was not made, which did not fail (``rows_finite`` of a
    losses-only method, ``solver_converged`` of a method without a solver)."""
    out = dict(metrics)
    t = num_tasks
    dtype = metrics["losses"].dtype
    out.setdefault("weights", jnp.full((t,), jnp.nan, dtype))
    out.setdefault("grad_norms", jnp.full((t,), jnp.nan, dtype))
    out.setdefault("cosines", jnp.full((t, t), jnp.nan, dtype))
    out.setdefault("rows_finite", jnp.ones((t,), bool))
    out.setdefault("solver_iterations", jnp.full((), -1, jnp.int32))
    out.setdefault("solver_converged", jnp.ones((), bool))
    out.setdefault("solver_residual", jnp.full((), jnp.nan, jnp.float32))
    return out


def _apply_prox(prox: Callable[[Params], Params], params: Params) -> Params:
    """``prox(params)``, checked to keep the structure, shapes and dtypes of the parameters."""
    out = prox(params)
    if not isinstance(out, Params):
        raise TypeError(f"prox must return mtljax.Params, got {type(out).__name__}")
    before = jax.tree_util.tree_structure(params)
    if jax.tree_util.tree_structure(out) != before:
        raise ValueError(
            f"prox changed the structure of the parameters: {jax.tree_util.tree_structure(out)} "
            f"instead of {before}"
        )
    for path, a, b in zip(
        tree_lib.leaf_paths(params),
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(out),
        strict=True,
    ):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"prox changed parameter {path!r} from {a.dtype}{list(a.shape)} to "
                f"{b.dtype}{list(b.shape)}"
            )
    return out


def _nonfinite_message(
    step: int, loss_tasks: Sequence[str], row_tasks: Sequence[str] | None
) -> str:
    if loss_tasks:
        names = ", ".join(repr(n) for n in loss_tasks)
        plural = "s" if len(loss_tasks) > 1 else ""
        return (
            f"non-finite loss or gradient at step {step} in task{plural} {names} (non-finite "
            "loss); the step was not applied"
        )
    head = f"non-finite gradient at step {step} although every task's loss was finite"
    if row_tasks:
        names = ", ".join(repr(n) for n in row_tasks)
        plural = "s" if len(row_tasks) > 1 else ""
        return f"{head}: in the gradient of task{plural} {names}; the step was not applied"
    if row_tasks is None:
        return (
            f"{head} (this method computes no per-task gradient to tell which task); the step "
            "was not applied"
        )
    return (
        f"{head}; every task's gradient is non-finite (a non-finite derivative inside one "
        "task, e.g. of sqrt or log at 0, reaches every task's gradient through 0·∞), or the "
        "method's output or state is; the step was not applied"
    )


def batch_signature(batch: Batch) -> tuple[Any, ...]:
    """The batch's tree structure, leaf shapes and dtypes: what makes ``jit`` compile anew."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return (treedef, *((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves))


class TrainStep:
    """``step(state, batch) -> (state, metrics)``, jit-compiled once per batch shape.

    Every batch of a shape or dtype not seen before (the first, and any that would make
    ``jit`` compile again) is checked first: against the model's ``batch_spec`` when it has
    one, and the model's output by abstract evaluation, so that errors name the field, the task
    or the problem instead of surfacing inside XLA (or training silently on a wrong layout).
    Batches like an already-checked one pass with no cost beyond reading their shapes.
    """

    def __init__(
        self,
        model,
        method,
        optimizer,
        *,
        mode,
        chunk_size,
        head_grads,
        nonfinite,
        compute_dtype=None,
        gramian_chunk_size=None,
        jacobian_constraint=None,
        prox=None,
        unconverged="report",
        gramian="auto",
    ):
        _check_model_and_method("make_train_step", model, method)
        method = base.bind_optimizer(method, optimizer)
        if mode not in ("parameter", "feature"):
            raise ValueError(f"mode must be 'parameter' or 'feature', got {mode!r}")
        if mode == "feature" and not model.has_features:
            raise ValueError(
                "mode='feature' needs a model given as encoder and heads "
                "(Model.from_encoder_heads, or from_nnx(encode=..., heads=...))"
            )
        if mode == "feature" and method.params not in ("all", method.paper_params):
            raise ValueError(
                f"{method.name} is set to a layer subset (params={method.params!r}), which "
                "mode='feature' cannot use: the feature-level Jacobian is taken w.r.t. the shared "
                "representation, not the shared parameters. Use mode='parameter' with the subset, "
                f"or {method.name} on all shared parameters (mtl.on_layers(method, 'all'))"
            )
        if head_grads not in (None, "weighted", "unit"):
            raise ValueError(f"head_grads must be None, 'weighted' or 'unit', got {head_grads!r}")
        if nonfinite not in ("skip", "raise", "apply"):
            raise ValueError(f"nonfinite must be 'skip', 'raise' or 'apply', got {nonfinite!r}")
        if unconverged not in ("report", "skip", "raise"):
            raise ValueError(
                f"unconverged must be 'report', 'skip' or 'raise', got {unconverged!r}"
            )
        if prox is not None and not callable(prox):
            raise TypeError(
                f"prox must be a function Params -> Params or None, got {type(prox).__name__}"
            )
        engine.check_chunk_size(chunk_size)
        if gramian_chunk_size is not None:
            try:
                engine.check_chunk_size(gramian_chunk_size)
            except ValueError:
                raise ValueError(
                    f"gramian_chunk_size must be a positive int or None, got {gramian_chunk_size!r}"
                ) from None
            if method.weights is None or method.needs == "losses":
                raise ValueError(
                    f"gramian_chunk_size applies to weighting methods that need the Gramian; "
                    f"{method.name} "
                    + (
                        "needs the losses only"
                        if method.needs == "losses"
                        else "yields a direction from the full Jacobian"
                    )
                )
        base.check_num_tasks(method.name, model.num_tasks, method.min_tasks)
        if method.needs != "losses" and mode == "parameter":
            engine.subset_predicate(model, method.params)
        self.model, self.method, self.optimizer = model, method, optimizer
        self.mode, self.chunk_size, self.head_grads, self.nonfinite = (
            mode,
            chunk_size,
            head_grads,
            nonfinite,
        )
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.gramian_chunk_size = gramian_chunk_size
        check_gramian_path(method, gramian)
        self.gramian = gramian
        self.jacobian_constraint = jacobian_constraint
        self.prox = prox
        self.unconverged = unconverged
        self._compute_model = (
            model if self.compute_dtype is None else mixed_precision(model, self.compute_dtype)
        )
        self._checked: set[Any] = set()
        self._skip_warned = False
        self._pending_finite: list[tuple[jax.Array, jax.Array]] = []
        # Feature level with a method that reads the task gradients: the first step's cosines
        # are checked once (warn_if_per_task_features).
        self._features_checked = mode != "feature" or method.needs == "losses"
        self.jitted = jax.jit(self._step)
        self._scan_jitted = jax.jit(self._scan, static_argnums=1)

    def _options(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this step with :func:`make_train_step`."""
        return dict(
            mode=self.mode,
            chunk_size=self.chunk_size,
            head_grads=self.head_grads,
            nonfinite=self.nonfinite,
            compute_dtype=self.compute_dtype,
            gramian_chunk_size=self.gramian_chunk_size,
            prox=self.prox,
            unconverged=self.unconverged,
            gramian=self.gramian,
        )

    def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key, method_key = jax.random.split(state.key)
        # One key for the step's one forward pass (dropout); none for a model that draws none.
        forward_key = model_key(state.key, state.step) if self.model.uses_key else None
        grads, method_state, model_state, metrics = step_gradients(
            self._compute_model,
            self.method,
            state.params,
            state.method_state,
            batch,
            method_key,
            mode=self.mode,
            chunk_size=self.chunk_size,
            head_grads=self.head_grads,
            gramian_chunk_size=self.gramian_chunk_size,
            jacobian_constraint=self.jacobian_constraint,
            model_state=state.model_state,
            model_key=forward_key,
            gramian=self.gramian,
        )
        metrics = complete_metrics(metrics, self.model.num_tasks)
        metrics["step"] = state.step
        has_state = bool(jax.tree_util.tree_leaves(state.model_state))

        def update():
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if self.prox is not None:
                params = _apply_prox(self.prox, params)
                # The whole step (optimizer, then prox): its norm is finite iff the new
                # parameters are, so the guard below judges the final parameters.
                updates = jax.tree_util.tree_map(jnp.subtract, params, state.params)
            return updates, params, opt_state

        def observe(params, method_state):
            # The method's view of the update it asked for: the losses at the new parameters on
            # the same batch (one forward pass), only for methods that declare the hook.
            # A model with state is evaluated as the step's own pass was (training mode, the
            # state before the step, the same random streams), and that state is not updated
            # again: the difference of the losses is the update's effect alone.
            if self.method.after_update is None:
                return method_state
            fns = self._compute_model.step_fns()
            ctx = fns.enter(state.model_state, forward_key)
            after = fns.losses(params.shared, params.specific, batch, ctx)[0]
            after = jax.lax.stop_gradient(after)
            return self.method.after_update(metrics["losses"], after, method_state)

        # A solve that did not converge is refused like a non-finite step when asked to.
        solved = metrics["solver_converged"]  # True for a method without a solver
        if self.unconverged == "report":
            solved = jnp.asarray(True)
        if self.nonfinite == "apply":
            updates, new_params, new_opt_state = update()
            method_state = observe(new_params, method_state)
            metrics["update_norm"] = optax.tree.norm(updates)
            if self.unconverged == "report":
                method_state, model_state = jax.tree_util.tree_map(
                    lambda a, b: a.astype(b.dtype),
                    (method_state, model_state),
                    (state.method_state, state.model_state),
                )
                new = TrainState(
                    new_params,
                    new_opt_state,
                    method_state,
                    key,
                    state.step + 1,
                    state.skipped,
                    model_state,
                )
                return new, metrics
            ok = solved
        else:
            # One reduction judges the step: the update's norm is finite iff every entry of
            # the update is, and a non-finite gradient makes the update non-finite (NaN or inf
            # passes through SGD, and Adam's m/√v turns inf into NaN). Separate finiteness
            # passes over the gradient and the update cost ~20% of an equal-weighting step on
            # CPU; this costs none beyond the update-norm metric.
            updates, new_params, new_opt_state = update()
            method_state = observe(new_params, method_state)
            update_norm = optax.tree.norm(updates)
            ok = (
                jnp.isfinite(update_norm)
                & jnp.all(jnp.isfinite(metrics["losses"]))
                & _stays_finite(state.method_state, method_state)
            )
            if "regularizer" in metrics:
                ok = ok & jnp.isfinite(metrics["regularizer"])
            if has_state:
                ok = ok & _stays_finite(state.model_state, model_state)
            metrics["finite"] = ok
            metrics["update_norm"] = update_norm
            ok = ok & solved

        # Each leaf keeps its dtype (a method state fed float64 losses under x64 stays as
        # initialised), so that the state's types are the same at every step.
        # A step that is not applied leaves the model state (BatchNorm's statistics) as well.
        params, opt_state, new_method_state, new_model_state = jax.tree_util.tree_map(
            lambda a, b: jnp.where(ok, a, b).astype(b.dtype),
            (new_params, new_opt_state, method_state, model_state),
            (state.params, state.opt_state, state.method_state, state.model_state),
        )
        new = TrainState(
            params,
            opt_state,
            new_method_state,
            key,
            state.step + 1,
            state.skipped + (~ok).astype(state.skipped.dtype),
            new_model_state,
        )
        if self.unconverged != "report":
            metrics["applied"] = ok
        return new, metrics

    def check(self, state: TrainState, batch: Batch) -> None:
        """The checks run for each new batch signature (the method's state, batch spec, empty
        fields, the losses' shape)."""
        expected = jax.eval_shape(lambda: self.method.init(self.model.num_tasks))
        got, want = (jax.tree_util.tree_structure(x) for x in (state.method_state, expected))
        if got != want:
            raise ValueError(
                f"the state's method_state does not fit method {self.method.name!r} (expected "
                f"{want}, got {got}); build the state with init_train_state(..., method, ...) "
                "for the same method as the step"
            )
        opt_expected = jax.eval_shape(self.optimizer.init, state.params)
        got, want = (jax.tree_util.tree_structure(x) for x in (state.opt_state, opt_expected))
        if got != want:
            shown = [state_skeleton(x) for x in (opt_expected, state.opt_state)]
            if shown[0] == shown[1]:
                shown = [_short(want), _short(got)]
            raise ValueError(
                "the state's opt_state does not fit this step's optimizer (expected "
                f"{shown[0]}, got {shown[1]}); build the state with "
                "init_train_state(..., optimizer, ...) for the same optimizer as the step"
            )
        _check_model_state("the train step", self.model, state.model_state)
        self.model.check(state.params, batch)
        self._checked.add(batch_signature(batch))

    def check_if_new(self, state: TrainState, batch: Batch) -> None:
        """:meth:`check` unless a batch of the same structure, shapes and dtypes passed it."""
        if batch_signature(batch) not in self._checked:
            self.check(state, batch)

    def raise_if_nonfinite(self, metrics: dict[str, jax.Array]) -> None:
        """Raises :class:`NonFiniteError` if the step (or any step of stacked metrics) failed."""
        if "finite" not in metrics:
            return
        finite = np.asarray(metrics["finite"])
        if finite.all():
            return
        idx = int(np.argmin(finite.reshape(-1)))
        t = self.model.num_tasks
        names = self.model.task_names

        def failing(key):
            ok = np.asarray(metrics[key]).reshape(-1, t)[idx]
            return tuple(n for n, good in zip(names, ok, strict=True) if not good)

        step = int(np.asarray(metrics["step"]).reshape(-1)[idx])
        loss_tasks = failing("task_finite")
        row_tasks = failing("rows_finite") if self.method.needs != "losses" else None
        if row_tasks is not None and len(row_tasks) == t:
            row_tasks = ()
        tasks = loss_tasks or row_tasks or ()
        message = _nonfinite_message(step, loss_tasks, row_tasks)
        if "regularizer" in metrics and not loss_tasks:
            r = float(np.asarray(metrics["regularizer"]).reshape(-1)[idx])
            if not np.isfinite(r):
                message = (
                    f"non-finite regularizer at step {step} (R = {r}) although every task's "
                    "loss was finite; the step was not applied"
                )
        raise NonFiniteError(message, step=step, tasks=tasks)

    def raise_if_unconverged(self, metrics: dict[str, jax.Array]) -> None:
        """Raises :class:`SolverError` if the solve of a step (or of any step of stacked
        metrics) did not converge."""
        converged = np.asarray(metrics["solver_converged"]).reshape(-1)
        if converged.all():
            return
        idx = int(np.argmin(converged))
        step = int(np.asarray(metrics["step"]).reshape(-1)[idx])
        iters = int(np.asarray(metrics["solver_iterations"]).reshape(-1)[idx])
        residual = float(np.asarray(metrics["solver_residual"]).reshape(-1)[idx])
        raise SolverError(
            f"{self.method.name}'s solver did not converge at step {step} ({iters} iterations, "
            f"residual {residual:.3g}); the step was not applied. unconverged='skip' skips such "
            "steps and goes on, 'report' applies them and only reports it",
            step=step,
            iterations=iters,
            residual=residual,
        )

    def warn_if_skipped(self, metrics: dict[str, jax.Array]) -> None:
        """With ``nonfinite="skip"``: a :class:`SkippedStepWarning`, once per step function,
        for the first step skipped as non-finite. It reads a step's ``finite`` flag once it is
        computed, without waiting for it (the warning may come a few steps later)."""
        if self.nonfinite != "skip" or self._skip_warned or "finite" not in metrics:
            return
        self._pending_finite.append((metrics["finite"], metrics["step"]))
        while self._pending_finite and (
            len(self._pending_finite) > 4 or self._pending_finite[0][0].is_ready()
        ):
            finite, step = (np.asarray(x).reshape(-1) for x in self._pending_finite.pop(0))
            if not finite.all():
                self._skip_warned = True
                self._pending_finite.clear()
                first = int(step[int(np.argmin(finite))])
                warnings.warn(
                    f"step {first} was skipped: a non-finite loss, gradient, update or method "
                    "state left the train state untouched. state.skipped counts such steps; "
                    "make_train_step(..., nonfinite='raise') stops at the first one and names "
                    "the task(s)",
                    SkippedStepWarning,
                    stacklevel=4,  # the caller of the step
                )

    def warn_if_per_task_features(self, metrics: dict[str, jax.Array]) -> None:
        """At feature level, once, on the first step: a :class:`PerTaskFeaturesWarning` if
        every pairwise cosine of the task gradients w.r.t. the representation is exactly 0
        while their norms are not (each head reads only its own slice of the representation,
        as with per-task inputs). Exact zeros do not arise from a representation the tasks
        share; a representation's shape alone cannot tell (MMoE's has an axis of experts,
        which may number T)."""
        if self._features_checked:
            return
        self._features_checked = True
        t = self.model.num_tasks
        if t < 2:
            return
        cos = _replicated_to_host(metrics["cosines"]).reshape(-1, t, t)[0]
        norms = _replicated_to_host(metrics["grad_norms"]).reshape(-1, t)[0]
        if np.all(cos[~np.eye(t, dtype=bool)] == 0) and np.all(norms > 0):
            warnings.warn(
                "mode='feature': the task gradients w.r.t. the shared representation are "
                "orthogonal (every cosine is exactly 0): each task's head reads only its own "
                "part of the representation, as with per-task inputs, so "
                f"{self.method.name} sees no conflict between the tasks (MGDA-UB reduces to "
                "weights ∝ 1/‖∇ᵢ‖²). Use mode='parameter', where the tasks meet in the shared "
                "encoder's parameters",
                PerTaskFeaturesWarning,
                stacklevel=4,  # the caller of the step
            )

    def raise_if_failed(self, metrics: dict[str, jax.Array]) -> None:
        """The host-side checks the step's options ask for, in order: non-finite, then an
        unconverged solve (and, at feature level, once, orthogonal task gradients)."""
        self.warn_if_skipped(metrics)
        self.warn_if_per_task_features(metrics)
        if self.nonfinite == "raise":
            self.raise_if_nonfinite(metrics)
        if self.unconverged == "raise":
            self.raise_if_unconverged(metrics)

    def __call__(self, state: TrainState, batch: Batch):
        self.check_if_new(state, batch)
        new, metrics = self.jitted(state, batch)
        self.raise_if_failed(metrics)
        return new, metrics

    def _scan(self, state, sample, keys):
        def body(s, k):
            return self._step(s, sample(k))

        return jax.lax.scan(body, state, keys)

    def scan(
        self, state: TrainState, sample: Callable[[Any], Batch], keys: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs ``len(keys)`` steps as one jitted ``lax.scan``, step ``i`` on ``sample(keys[i])``.

        ``keys``: an array (keys, say) or a pytree of arrays with a leading step axis, sliced
        per step as ``lax.scan`` slices its inputs. Returns the final state and the metrics of
        every step, stacked along a leading axis. With ``nonfinite="raise"`` the error (naming
        the first failing step) comes after the scan.
        """
        first = jax.tree_util.tree_map(lambda x: x[0], keys)
        self.check_if_new(state, jax.eval_shape(sample, first))
        new, metrics = self._scan_jitted(state, sample, keys)
        self.raise_if_failed(metrics)
        return new, metrics


def make_train_step(
    model: Model,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    *,
    mode: Mode = "parameter",
    chunk_size: int | None = None,
    head_grads: str | None = None,
    nonfinite: NonFinite = "skip",
    compute_dtype: Any = None,
    gramian_chunk_size: int | None = None,
    prox: Callable[[Params], Params] | None = None,
    unconverged: Unconverged = "report",
    gramian: GramianChoice = "auto",
) -> TrainStep:
    """Builds the jitted train step ``step(state, batch) -> (state, metrics)``.

    Args:
      model: the multi-task model.
      method: any method of ``mtljax.methods``. A method with an ``after_update`` hook (FAMO)
        costs one more forward pass per step: the losses at the updated parameters on the
        same batch. A method that trains its weighting parameters jointly with the model
        (``with_optimizer``: UW, IMTL-L by default) gets ``optimizer`` for them.
      optimizer: an optax optimizer for the model's parameters.
      mode: ``"parameter"`` (Jacobian w.r.t. the shared parameters) or ``"feature"`` (w.r.t.
        the shared representation; MGDA-UB is ``mgda`` in this mode).
      chunk_size: compute the Jacobian ``chunk_size`` tasks at a time to cap the memory of the
        backward passes (the Jacobian itself is still formed).
      head_grads: override the method's rule for task-specific parameters
        (``"weighted"``: ``wᵢ∇Lᵢ``; ``"unit"``: ``∇Lᵢ``).
      nonfinite: what a non-finite loss, gradient, update or method state does. In every mode
        but ``"apply"`` such a step never reaches the state: the parameters, optimizer and
        method state stay as they were (the key and step counter advance) and
        ``state.skipped`` counts it. ``"skip"`` goes on; ``"raise"`` then raises
        :class:`NonFiniteError` naming the step and the tasks at fault (this reads the
        step's ``finite`` flag on the host, one synchronisation per step); ``"apply"`` does
        not check.
      compute_dtype: mixed precision: e.g. ``jnp.bfloat16`` computes the model in that dtype
        while parameters, optimizer state, losses, Jacobian and Gramian stay float32, so
        methods and their solvers always see float32 (see :func:`mixed_precision`).
      gramian_chunk_size: for weighting methods that need the Gramian: accumulate it this
        many tasks at a time so that the ``T × P`` Jacobian never exists (see
        :func:`mtljax.gramian_by_chunks` for the compute it costs).
      prox: ``Params -> Params``, applied to the parameters right after the optimizer's update,
        inside the jitted step (so also in :meth:`TrainStep.scan` and data-parallel steps);
        the non-finite guard judges the parameters after it. For a non-smooth penalty
        ``λ g(θ)`` (ℓ1/ℓ2 group sparsity, trace norm…) give ``prox = prox_{ηλg}``
        (:func:`mtljax.regularizers.prox_on` applies one to selected parameters): with
        ``optax.sgd(η)`` the step is then exactly proximal gradient descent,
        ``θ ← prox_{ηλg}(θ − η(d + ∇R))`` (``d`` the method's direction, ``R`` the model's
        smooth ``regularizer``), which for ``ew`` converges to a minimiser of
        ``Σᵢ Lᵢ + R + λg`` for convex objectives and ``η ≤ 1/L`` (``L`` the Lipschitz constant
        of the smooth part's gradient; Combettes & Wajs 2005, Beck & Teboulle 2009). With
        momentum or adaptive optimizers (Adam…) the prox after their update is a heuristic,
        not a proximal method of the same objective (the effective step differs per
        coordinate).
      unconverged: what a step whose solver did not converge does (methods that run an
        iterative solver: MGDA, UPGrad, DualProj, CAGrad, Nash-MTL, FairGrad): ``"report"``
        applies it and reports it in the metrics; ``"skip"`` does not apply it (counted in
        ``state.skipped``, like a non-finite step) and goes on; ``"raise"`` does not apply it
        and raises :class:`SolverError` naming the step (one host synchronisation per step).
      gramian: for weighting methods that need the Gramian: ``"jacobian"`` (``G = J Jᵀ``
        from the formed Jacobian) or ``"layerwise"`` (accumulated layer by layer, without the
        per-task gradients of dense weights where that takes fewer multiply-adds,
        :func:`mtljax.gramian_layerwise`; at feature level, without the representation
        Jacobian where the heads apply ``z`` densely); the update is ``∇(w·L)``, one VJP.
        ``"auto"`` (default): ``"layerwise"`` at feature level and on a layer subset, where
        the update is one VJP either way; over all shared parameters whichever of the two
        counts fewer multiply-adds from the shapes, the update's extra backward pass included;
        ``"jacobian"`` otherwise (see :func:`resolve_gramian_path`).

    Metrics: a dict of arrays with the same keys, shapes and dtypes for every method, so that
    a loop that logs them works whichever method it runs (the keys of
    :data:`METHOD_METRICS`, filled by :func:`complete_metrics` where the method computes
    nothing: NaN for a float, ``-1`` for a count, ``True`` for the flag of a check not made).
    ``float`` is the losses' dtype (float32 unless the model computes in float64):

    - ``losses`` (``float[T]``): the task losses of the step's forward pass;
    - ``task_finite`` (``bool[T]``): the task's loss is finite;
    - ``weights`` (``float[T]``): the method's task weights; NaN for a method that yields a
      direction instead (PCGrad, GradDrop, ConFIG...);
    - ``grad_norms`` (``float[T]``) and ``cosines`` (``float[T, T]``): the task gradients'
      norms and pairwise cosines, from the Gramian the method used (its parameters, e.g.
      GradNorm's last shared layer, or the representation at feature level); NaN for a
      losses-only method;
    - ``rows_finite`` (``bool[T]``): the task's gradient is finite (a non-finite derivative
      inside one task can spoil every row through ``0·∞``); ``True`` for a losses-only method;
    - ``solver_iterations`` (``int32[]``), ``solver_converged`` (``bool[]``),
      ``solver_residual`` (``float32[]``): the last solve's :class:`mtljax.SolverInfo`;
      ``-1``, ``True`` and NaN for a method without an iterative solver;
    - ``step`` (``int32[]``): this step's index; ``update_norm`` (``float32[]``): the norm of
      the update (with ``prox``, of the whole step: the optimizer's update, then the prox).

    Three more depend on the step's options or the model, never on the method: ``finite``
    (``bool[]``, the step was finite, so applied unless ``unconverged`` refused it; not with
    ``nonfinite="apply"``), ``applied`` (``bool[]``, whether the step was applied; when
    ``unconverged`` is not ``"report"``) and ``regularizer`` (``R(θ)`` before the step, when
    the model has one).
    """
    return TrainStep(
        model,
        method,
        optimizer,
        mode=mode,
        chunk_size=chunk_size,
        head_grads=head_grads,
        nonfinite=nonfinite,
        compute_dtype=compute_dtype,
        gramian_chunk_size=gramian_chunk_size,
        prox=prox,
        unconverged=unconverged,
        gramian=gramian,
    )
