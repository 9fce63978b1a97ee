"""A jitted multi-task train step: losses, what the method needs, the method, the optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtljax._src import base, engine
from mtljax._src.model import Batch, Model, Params

PyTree = Any
Mode = Literal["parameter", "feature"]
NonFinite = Literal["skip", "apply"]


class TrainState(NamedTuple):
    """Everything a run carries from step to step (all arrays: checkpoint it whole)."""

    params: Params
    opt_state: PyTree
    method_state: PyTree
    key: jax.Array
    step: jax.Array
    skipped: jax.Array


def init_train_state(
    model: Model,
    params: Params,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
) -> TrainState:
    """The initial :class:`TrainState`; checks that the method accepts the model's ``T``."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be mtljax.Params(shared, specific), got {type(params)}")
    method_state = method.init(model.num_tasks)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        method_state=method_state,
        key=jnp.asarray(key),
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def pairwise_cosines(gram: jax.Array) -> jax.Array:
    """``cos(gᵢ, gⱼ) = Gᵢⱼ / (‖gᵢ‖‖gⱼ‖)`` from the Gramian (0 where a gradient is zero)."""
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    denom = norms[:, None] * norms[None, :]
    return jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


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
) -> tuple[Params, PyTree, dict[str, jax.Array]]:
    """The parameter gradient (descent direction, negated by the optimizer) chosen by ``method``.

    Computes only what the method declares it needs. Returns ``(grads, method_state, metrics)``.
    """
    head_grads = head_grads or method.head_grads
    t = model.num_tasks
    metrics: dict[str, jax.Array] = {}
    gram = None
    if method.needs == "losses":
        losses, vjp = engine.losses_and_vjp(model, params, batch)
        w, method_state = method.weights(losses, None, method_state, key)
        grads = vjp(w)
    elif mode == "parameter":
        losses, jac, vjp = engine.jacobian(
            model, params, batch, subset=method.params, chunk_size=chunk_size
        )
        gram = base.gramian(jac)
        if method.weights is not None:
            w, method_state = method.weights(losses, gram, method_state, key)
            if method.params == "all":
                grads = Params(base.combine(w, jac), vjp(w).specific)
            else:
                grads = vjp(w)
        else:
            w = None
            direction, method_state = method.direction(jac, losses, method_state, key)
            grads = Params(direction, vjp(jnp.ones_like(losses)).specific)
    elif mode == "feature":
        losses, jac, vjp, backprop = engine.feature_jacobian(
            model, params, batch, chunk_size=chunk_size
        )
        gram = base.gramian(jac)
        if method.weights is not None:
            w, method_state = method.weights(losses, gram, method_state, key)
            grads = vjp(w)
        else:
            w = None
            direction, method_state = method.direction(jac, losses, method_state, key)
            grads = Params(backprop(direction), vjp(jnp.ones_like(losses)).specific)
    else:
        raise ValueError(f"mode must be 'parameter' or 'feature', got {mode!r}")

    if w is not None and head_grads == "unit":
        grads = Params(grads.shared, vjp(jnp.ones_like(losses)).specific)
    metrics["losses"] = losses
    if w is not None:
        metrics["weights"] = jnp.broadcast_to(w, (t,))
    if gram is not None:
        metrics["grad_norms"] = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
        metrics["cosines"] = pairwise_cosines(gram)
    return grads, method_state, metrics


class TrainStep:
    """``step(state, batch) -> (state, metrics)``, jit-compiled once per batch shape.

    The first call checks the model against the batch by abstract evaluation, so that shape
    errors name the problem instead of surfacing inside XLA.
    """

    def __init__(self, model, method, optimizer, *, mode, chunk_size, head_grads, nonfinite):
        if not isinstance(model, Model):
            raise TypeError(f"expected an mtljax Model, got {type(model).__name__}")
        if not isinstance(method, base.Method):
            raise TypeError(f"expected an mtljax Method, got {type(method).__name__}")
        if mode not in ("parameter", "feature"):
            raise ValueError(f"mode must be 'parameter' or 'feature', got {mode!r}")
        if mode == "feature" and not model.has_features:
            raise ValueError(
                "mode='feature' needs a model given as encoder and heads "
                "(Model.from_encoder_heads, or from_nnx(encode=..., heads=...))"
            )
        if head_grads not in (None, "weighted", "unit"):
            raise ValueError(f"head_grads must be None, 'weighted' or 'unit', got {head_grads!r}")
        if nonfinite not in ("skip", "apply"):
            raise ValueError(f"nonfinite must be 'skip' or 'apply', got {nonfinite!r}")
        engine.check_chunk_size(chunk_size)
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
        self._checked = False
        self.jitted = jax.jit(self._step)
        self._scan_jitted = jax.jit(self._scan, static_argnums=1)

    def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key, method_key = jax.random.split(state.key)
        grads, method_state, metrics = gradients(
            self.model,
            self.method,
            state.params,
            state.method_state,
            batch,
            method_key,
            mode=self.mode,
            chunk_size=self.chunk_size,
            head_grads=self.head_grads,
        )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, method_state, key, state.step + 1, state.skipped)
        if self.nonfinite == "skip":
            ok = _all_finite((metrics["losses"], grads))
            keep = state._replace(key=key, step=state.step + 1, skipped=state.skipped + 1)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, keep)
            metrics["finite"] = ok
        metrics["update_norm"] = optax.tree.norm(updates)
        return new, metrics

    def __call__(self, state: TrainState, batch: Batch):
        if not self._checked:
            self.model.check(state.params, batch)
            self._checked = True
        return self.jitted(state, batch)

    def _scan(self, state, sample, keys):
        def body(s, k):
            return self._step(s, sample(k))

        return jax.lax.scan(body, state, keys)

    def scan(
        self, state: TrainState, sample: Callable[[jax.Array], Batch], keys: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs ``len(keys)`` steps as one jitted ``lax.scan``, step ``i`` on ``sample(keys[i])``.

        Returns the final state and the metrics of every step, stacked along a leading axis.
        """
        if not self._checked:
            self.model.check(state.params, jax.eval_shape(sample, keys[0]))
            self._checked = True
        return self._scan_jitted(state, sample, keys)


def make_train_step(
    model: Model,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    *,
    mode: Mode = "parameter",
    chunk_size: int | None = None,
    head_grads: str | None = None,
    nonfinite: NonFinite = "skip",
) -> TrainStep:
    """Builds the jitted train step ``step(state, batch) -> (state, metrics)``.

    Args:
      model: the multi-task model.
      method: any method of ``mtljax.methods``.
      optimizer: an optax optimizer for the model's parameters.
      mode: ``"parameter"`` (Jacobian w.r.t. the shared parameters) or ``"feature"`` (w.r.t.
        the shared representation; MGDA-UB is ``mgda`` in this mode).
      chunk_size: compute the Jacobian ``chunk_size`` tasks at a time to cap memory.
      head_grads: override the method's rule for task-specific parameters
        (``"weighted"``: ``wᵢ∇Lᵢ``; ``"unit"``: ``∇Lᵢ``).
      nonfinite: ``"skip"`` leaves the state untouched (but the key and step counters) when a
        loss or gradient is not finite and counts it in ``state.skipped``; ``"apply"`` does not
        check.

    Metrics: ``losses``; ``weights`` for weighting methods; ``grad_norms`` and ``cosines``
    (pairwise cosines of task gradients) whenever gradients were computed; ``update_norm``;
    ``finite``.
    """
    return TrainStep(
        model,
        method,
        optimizer,
        mode=mode,
        chunk_size=chunk_size,
        head_grads=head_grads,
        nonfinite=nonfinite,
    )
