"""The method contract: a multi-task method is a pair of pure functions plus what it needs.

A method either yields **weights** ``w ∈ ℝᵀ`` (the shared update is ``Jᵀw``) or a **direction**
(an arbitrary function of the Jacobian). It declares what it needs so that the train step computes
only that:

* ``"losses"``: the loss vector only (one backward, like equal weighting);
* ``"gramian"``: the Gramian ``G = J Jᵀ`` of the task Jacobian (a weighting that depends on the
  gradients only through their inner products; works on parameter- or feature-level Jacobians);
* ``"jacobian"``: the Jacobian itself (e.g. element-wise operations on gradients).

Two optional hooks extend the contract for what only a train step can supply (both are ``None``
for most methods, which then cost nothing extra):

* ``after_update``: a method that learns from the effect of the update on the batch it was
  computed on (FAMO) reads the task losses at the updated parameters, on the same batch;
* ``with_optimizer``: a method whose learned weighting parameters train jointly with the model
  (UW, IMTL-L) takes the model's optimizer for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Needs = Literal["losses", "gramian", "jacobian"]
# "all" shared parameters, the model's "last" shared layer, or a tuple of parameter path prefixes.
ParamSubset = Literal["all", "last"] | tuple[str, ...]
HeadGrads = Literal["weighted", "unit"]

WeightsFn = Callable[
    [jax.Array, jax.Array | None, PyTree, jax.Array | None], tuple[jax.Array, PyTree]
]
DirectionFn = Callable[[PyTree, jax.Array, PyTree, jax.Array | None], tuple[PyTree, PyTree]]
AfterUpdateFn = Callable[[jax.Array, jax.Array, PyTree], PyTree]

_NEEDS = ("losses", "gramian", "jacobian")


class SolverInfo(NamedTuple):
    """How a method's iterative solve ended (the last one; a batch of solves is summarised).

    A method that runs an iterative solver keeps this in its state's ``solver`` field (see
    :func:`solver_info`), so that the train step reports it in its metrics
    (``solver_iterations``, ``solver_converged``, ``solver_residual``) and can refuse a step
    whose solve did not converge (``make_train_step(..., unconverged=...)``).

    Attributes:
      iterations: int32, the iterations taken (the most over a batch of solves). An iteration
        evaluates the solver's stopping test and, unless it is met, takes a step (a pivot, a
        Newton step, ...), so a solve that ran counts at least 1, also when its starting point
        already meets the test; 0 only before any solve (:meth:`initial`) or where the answer
        has a closed form and no solver runs (e.g. a single task).
      converged: bool, whether every solve met its stopping test.
      residual: float32, the final optimality residual, relative to the scale of its terms (the
        largest over a batch); each solver's docstring says what it measures.
    """

    iterations: jax.Array
    converged: jax.Array
    residual: jax.Array

    @staticmethod
    def initial() -> SolverInfo:
        """The value before any solve: 0 iterations, converged, residual 0."""
        return SolverInfo(jnp.zeros((), jnp.int32), jnp.ones((), bool), jnp.zeros((), jnp.float32))

    @staticmethod
    def of(iterations: Any, converged: Any, residual: Any) -> SolverInfo:
        """Summarises one solve or a batch of them (arrays of any shape) as scalars."""
        return SolverInfo(
            jnp.max(jnp.asarray(iterations)).astype(jnp.int32),
            jnp.all(jnp.asarray(converged)),
            jnp.max(jnp.asarray(residual)).astype(jnp.float32),
        )

    @staticmethod
    def merge(*infos: SolverInfo) -> SolverInfo:
        """Several solves as one: the most iterations, all converged, the largest residual."""
        return SolverInfo.of(
            jnp.stack([i.iterations for i in infos]),
            jnp.stack([i.converged for i in infos]),
            jnp.stack([i.residual for i in infos]),
        )


class SolverState(NamedTuple):
    """The state of a method whose only state is its last solve's :class:`SolverInfo`."""

    solver: SolverInfo


def solver_info(state: PyTree) -> SolverInfo | None:
    """The :class:`SolverInfo` a method keeps in its state's ``solver`` field, or ``None``."""
    info = getattr(state, "solver", None)
    return info if isinstance(info, SolverInfo) else None


class Method(NamedTuple):
    """A multi-task method: ``init`` and either ``weights`` or ``direction``, all pure.

    Attributes:
      name: the factory's name (``"upgrad"``, ``"uw"``...).
      init: ``num_tasks -> state``, a pytree of arrays (may be an empty tuple).
      needs: ``"losses"``, ``"gramian"`` or ``"jacobian"`` (see the module docstring).
      weights: ``(losses, gramian, state, key) -> (w, state)`` with ``w: f32[T]``; ``gramian`` is
        ``None`` when ``needs == "losses"``. Exactly one of ``weights`` and ``direction`` is set.
      direction: ``(jacobian, losses, state, key) -> (direction, state)``, the jacobian a pytree
        whose leaves have a leading task axis and the direction the same structure without it.
      params: which shared parameters the Jacobian/Gramian is taken over: ``"all"`` of them, the
        ``"last"`` shared layer only (GradNorm's default), as declared by the model, or a tuple
        of parameter path prefixes (see :func:`mtljax.on_layers`).
      head_grads: what task-specific parameters receive in the train step: ``"weighted"``
        (``wᵢ∇Lᵢ``, the gradient of the weighted objective) or ``"unit"`` (``∇Lᵢ``).
      min_tasks: the fewest tasks the method is defined for.
      hparams: the factory's arguments, defaults included, as ``(name, value)`` pairs of plain
        (hashable) descriptions; filled by the factories of :mod:`mtljax.methods`, recorded
        with checkpoints and compared on restore.
      after_update: ``(losses_before, losses_after, state) -> state``, or ``None``. When set,
        the train step (:func:`mtljax.make_train_step`, also under ``scan`` and data
        parallelism), after the optimizer's update ``θ → θ'`` on batch ``b``, evaluates the task
        losses ``ℓ(θ'; b)`` on the same batch (one more forward pass of the same compute
        model, no gradient) and calls ``after_update(ℓ(θ; b), ℓ(θ'; b), state)`` with the state
        that ``weights``/``direction`` returned. The state it returns goes through the step's
        guards like the rest of the step: a step that is not applied (non-finite, unconverged)
        keeps the method state it started from. Functions that apply no update
        (:func:`aggregate`, :func:`weights_from_gramian`, :func:`mtljax.gradients`) never call
        it, so a method that sets it must stay well defined without it (its docstring says
        what it does then).
      with_optimizer: ``optimizer -> Method``, or ``None``. Set by a method whose learned
        weighting parameters default to the model's optimizer (trained jointly with the model,
        as their paper does): it returns the same method with ``optimizer`` bound for those
        parameters (and ``with_optimizer=None``). :func:`mtljax.init_train_state` and
        :func:`mtljax.make_train_step` bind the model's optimizer through
        :func:`bind_optimizer`; elsewhere the method uses the fallback its docstring gives.
      paper_params: the shared parameters the method's paper takes its gradients over:
        ``"all"``, or ``"last"`` for GradNorm (the last shared layer). At feature level
        (``mode="feature"``) the Jacobian w.r.t. the shared representation stands for them,
        so :func:`mtljax.make_train_step` accepts ``params`` equal to ``"all"`` or to this
        there, and refuses any other subset (``on_layers``) instead of ignoring it.
    """

    name: str
    init: Callable[[int], PyTree]
    needs: Needs = "losses"
    weights: WeightsFn | None = None
    direction: DirectionFn | None = None
    params: ParamSubset = "all"
    head_grads: HeadGrads = "weighted"
    min_tasks: int = 1
    hparams: tuple[tuple[str, Any], ...] = ()
    after_update: AfterUpdateFn | None = None
    with_optimizer: Callable[[Any], Method] | None = None
    paper_params: ParamSubset = "all"


def make_method(
    name: str,
    init: Callable[[int], PyTree],
    *,
    needs: Needs,
    weights: WeightsFn | None = None,
    direction: DirectionFn | None = None,
    params: ParamSubset = "all",
    head_grads: HeadGrads = "weighted",
    min_tasks: int = 1,
    after_update: AfterUpdateFn | None = None,
    with_optimizer: Callable[[Any], Method] | None = None,
    paper_params: ParamSubset = "all",
) -> Method:
    """Builds a :class:`Method`, checking its declaration and wrapping ``init`` to check ``T``."""
    if needs not in _NEEDS:
        raise ValueError(f"{name}: needs must be one of {_NEEDS}, got {needs!r}")
    if (weights is None) == (direction is None):
        raise ValueError(f"{name}: give exactly one of `weights` and `direction`")
    if direction is not None and needs != "jacobian":
        raise ValueError(f"{name}: a direction method needs the jacobian, declared {needs!r}")
    params = check_param_subset(name, params)
    paper_params = check_param_subset(name, paper_params)
    if head_grads not in ("weighted", "unit"):
        raise ValueError(f"{name}: head_grads must be 'weighted' or 'unit', got {head_grads!r}")
    for hook, fn in (("after_update", after_update), ("with_optimizer", with_optimizer)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: {hook} must be a function or None, got {fn!r}")

    def checked_init(num_tasks: int) -> PyTree:
        check_num_tasks(name, num_tasks, min_tasks)
        return init(int(num_tasks))

    return Method(
        name,
        checked_init,
        needs,
        weights,
        direction,
        params,
        head_grads,
        min_tasks,
        after_update=after_update,
        with_optimizer=with_optimizer,
        paper_params=paper_params,
    )


def bind_optimizer(method: Method, optimizer: Any) -> Method:
    """``method`` with the model's ``optimizer`` bound where it trains its weighting parameters
    jointly with the model (``method.with_optimizer``); any other method is returned as is.

    Binding twice changes nothing: a bound method has ``with_optimizer=None``.
    """
    if method.with_optimizer is None:
        return method
    bound = method.with_optimizer(optimizer)
    if not isinstance(bound, Method) or bound.with_optimizer is not None:
        raise TypeError(
            f"{method.name}: with_optimizer must return a Method with with_optimizer=None"
        )
    return bound._replace(hparams=method.hparams)


def check_param_subset(name: str, params: Any) -> ParamSubset:
    """``params`` as a :data:`ParamSubset`: ``"all"``, ``"last"`` or a non-empty tuple of path
    prefixes (``"encoder/layers/2"``; surrounding slashes removed). A list or an
    :class:`mtljax.nn.PathPrefixes` becomes a tuple."""
    if isinstance(params, str):
        if params in ("all", "last"):
            return params
        raise ValueError(
            f"{name}: params must be 'all', 'last' or a tuple of parameter path prefixes, got "
            f"{params!r} (for one prefix write ({params!r},))"
        )
    prefixes = getattr(params, "prefixes", params)
    if isinstance(prefixes, list | tuple) and prefixes:
        cleaned = tuple(p.strip("/") if isinstance(p, str) else p for p in prefixes)
        if all(isinstance(p, str) and p for p in cleaned):
            return cleaned
    raise ValueError(
        f"{name}: params must be 'all', 'last' or a non-empty tuple of non-empty parameter path "
        f"prefixes, got {params!r}"
    )


def check_num_tasks(name: str, num_tasks: Any, min_tasks: int) -> None:
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool):
        raise TypeError(f"{name}.init: num_tasks must be an int, got {num_tasks!r}")
    if num_tasks < min_tasks:
        raise ValueError(f"{name} needs at least {min_tasks} tasks, got num_tasks={num_tasks}")


# ----------------------------------------------------------------------------------------------
# Jacobian pytrees


def num_tasks_of(jacobian: PyTree, num_tasks: int | None = None) -> int:
    """The task axis' length ``T`` of a Jacobian pytree.

    A Jacobian with no leaves (a model without shared parameters: ``T × 0``) has no task axis
    to read; ``num_tasks`` gives ``T`` then, and is checked against the leaves otherwise.
    """
    leaves = jax.tree_util.tree_leaves(jacobian)
    if not leaves:
        if num_tasks is None:
            raise ValueError(
                "the jacobian has no leaves (no shared parameters): give the number of tasks"
            )
        return int(num_tasks)
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [leaf.shape for leaf in leaves]
        raise ValueError(
            f"every jacobian leaf needs the same leading task axis; got leaf shapes {shapes}"
        )
    t = sizes.pop()
    if num_tasks is not None and t != num_tasks:
        raise ValueError(f"the jacobian has {t} task rows, expected {num_tasks}")
    return t


def gramian(jacobian: PyTree, num_tasks: int | None = None) -> jax.Array:
    """``G = J Jᵀ`` (T×T), summed over the leaves of a Jacobian pytree, in float32 or wider.

    A Jacobian with no leaves (``T × 0``: no shared parameters) has ``G = 0``; give
    ``num_tasks`` for it (see :func:`num_tasks_of`).
    """
    leaves = jax.tree_util.tree_leaves(jacobian)
    t = num_tasks_of(jacobian, num_tasks)
    dtype = jnp.promote_types(leaves[0].dtype, jnp.float32) if leaves else jnp.float32
    g = jnp.zeros((t, t), dtype)
    for leaf in leaves:
        m = leaf.reshape(t, -1).astype(g.dtype)
        g = g + jnp.matmul(m, m.T, precision=jax.lax.Precision.HIGHEST)
    return 0.5 * (g + g.T)


def combine(weights: jax.Array, jacobian: PyTree) -> PyTree:
    """``Jᵀw``: the weighted sum of the task rows of every leaf.

    A contraction at full precision (accelerators may otherwise round float32 products to
    TF32); with ``w = 1`` it is also the fast way to sum over the task axis: XLA's CPU
    reduction over a leading axis is tens of times slower than this product."""
    return jax.tree_util.tree_map(
        lambda leaf: jnp.tensordot(
            weights.astype(leaf.dtype), leaf, axes=1, precision=jax.lax.Precision.HIGHEST
        ),
        jacobian,
    )


def _check_losses(name: str, losses: jax.Array, t: int) -> jax.Array:
    losses = jnp.asarray(losses)
    if losses.shape != (t,):
        raise ValueError(
            f"{name}: losses must have shape (T,) = ({t},) to match the jacobian's task axis, "
            f"got {losses.shape}"
        )
    return losses


def check_method(owner: str, method: Any) -> None:
    """``method`` must be a :class:`Method` (an uncalled factory, ``mtl.methods.ew``, is named
    as such)."""
    if not isinstance(method, Method):
        hint = " (a factory: call it, e.g. mtl.methods.ew())" if callable(method) else ""
        raise TypeError(f"{owner}: expected an mtljax Method, got {type(method).__name__}{hint}")


def aggregate(
    method: Method,
    jacobian: PyTree,
    losses: jax.Array,
    state: PyTree,
    *,
    key: jax.Array | None = None,
) -> tuple[PyTree, PyTree]:
    """Applies ``method`` to a task Jacobian: returns ``(direction, new_state)``.

    ``jacobian`` is a pytree whose leaves carry a leading task axis of size ``T`` (a ``(T, P)``
    matrix is one); ``direction`` has the same structure without the task axis. A Jacobian
    with no leaves (no shared parameters) gives an empty direction; ``T`` is then the length
    of ``losses``. Pure and jittable: ``jax.jit(functools.partial(mtljax.aggregate, method))``.
    """
    check_method("aggregate", method)
    empty = not jax.tree_util.tree_leaves(jacobian)
    t = num_tasks_of(jacobian, jnp.shape(losses)[0] if empty and jnp.ndim(losses) == 1 else None)
    check_num_tasks(method.name, t, method.min_tasks)
    losses = _check_losses(method.name, losses, t)
    if method.weights is not None:
        g = gramian(jacobian, t) if method.needs != "losses" else None
        w, state = method.weights(losses, g, state, key)
        return combine(w, jacobian), state
    return method.direction(jacobian, losses, state, key)


def weights_from_gramian(
    method: Method,
    gramian_matrix: jax.Array,
    losses: jax.Array,
    state: PyTree,
    *,
    key: jax.Array | None = None,
) -> tuple[jax.Array, PyTree]:
    """Runs a weighting method on a Gramian alone (parameter- or feature-level)."""
    if method.weights is None:
        raise ValueError(
            f"{method.name} yields a direction from the full jacobian, not weights from a Gramian"
        )
    g = jnp.asarray(gramian_matrix)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"{method.name}: the Gramian must be square (T, T), got {g.shape}")
    check_num_tasks(method.name, g.shape[0], method.min_tasks)
    losses = _check_losses(method.name, losses, g.shape[0])
    return method.weights(losses, g if method.needs != "losses" else None, state, key)
