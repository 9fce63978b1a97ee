"""Cascades: a task's prediction feeds later tasks (Hashimoto et al. 2017, Joint Many-Task)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import check_positive, check_width, count_tuple
from mtljax._src.nn.constant import Constant
from mtljax._src.nn.split import PathPrefixes

Kind = Literal["classification", "regression"]


def _as_anchor(groups: list[list[jax.Array]]) -> dict[str, Any]:
    """``{"embedding", "tasks"}`` from the groups of :meth:`Cascade._anchor_groups`, as
    constants (no gradient flows into an anchor)."""
    emb, *tasks = groups
    return jax.lax.stop_gradient({"embedding": emb, "tasks": tasks})


def _arrays(module: nnx.Module) -> list[jax.Array]:
    return [
        v[...]
        for v in jax.tree_util.tree_leaves(
            nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)
        )
    ]


def _sq_dist(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
    return sum(
        (jnp.sum((x - jnp.asarray(y)) ** 2) for x, y in zip(a, b, strict=True)), jnp.zeros(())
    )


class Cascade(nnx.Module):
    """A cascade of tasks: task ``t``'s layer reads the input, task ``t−1``'s hidden state and
    embeddings of the earlier tasks' predictions.

    Hashimoto, Xiong, Tsuruoka & Socher, "A Joint Many-Task Model: Growing a Neural Network for
    Multiple NLP Tasks", EMNLP 2017. With ``e = embedding(x)`` (shared; ``x`` itself without
    one),

        h₀ = act(W₀ e + b₀),   hₜ = act(Wₜ [hₜ₋₁; e; y₀ E₀; …; yₜ₋₁ Eₜ₋₁] + bₜ),   ŷₜ = Vₜ hₜ + cₜ,

    where ``yₛ`` is ``softmax(ŷₛ)`` for a classification task (the label embedding weighted by
    the predicted probabilities, JMT §2.2) or ``ŷₛ`` for a regression task, and ``Eₛ`` task
    ``s``'s learned label embedding, computed once and read by every later layer (JMT's
    dependency layer reads both the POS and the chunking label embeddings, §2.4); the shortcut
    ``e`` reaches every layer. ``label_inputs="previous"`` feeds layer ``t`` with ``yₜ₋₁ Eₜ₋₁``
    only.

    Successive regularization (JMT §2.6): task ``t``'s objective adds ``δ(‖θₑ − θ'ₑ‖² +
    Σ_{s<t} ‖θₛ − θ'ₛ‖²)`` on the parameters below it (``θₑ`` the embedding, ``θₛ`` task ``s``'s
    layer, head and label embedding), with ``θ'`` their values at an anchor (JMT: after the
    previous task's training epoch). Summed over the tasks this is the block's
    :meth:`regularizer` (see :meth:`successive_regularization`), which
    :func:`mtljax.nn.from_block` wires as the model's regularizer: the train step adds its
    gradient to the multi-task method's update, unweighted, and the task losses hold the data
    losses only. With ``successive_weight = δ > 0`` the anchor is kept in the module as
    :class:`mtljax.nn.Constant` variables, initialised to the initial parameters; move it with
    :meth:`set_anchor` (``to_nnx``, ``set_anchor()``, then ``from_block`` again: the anchor is
    a constant of the model).

    **Shared / task-specific split.** The embedding, and task ``t < T−1``'s layer and head, feed
    task ``t`` and every later task: shared. Label embedding ``Eₜ`` feeds tasks ``> t``: shared
    for ``t < T−2``, while ``E_{T−2}`` feeds the last task only. The last task's layer and head,
    and ``E_{T−2}``, are task-specific.

    Output: a list of ``T`` predictions ``(batch, out_t)`` (output sizes may differ per task).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: Sequence[int],
        *,
        rngs: nnx.Rngs,
        kinds: Kind | Sequence[Kind] = "classification",
        label_features: int = 8,
        embed_features: int | None = None,
        activation: Callable[[jax.Array], jax.Array] = nnx.tanh,
        successive_weight: float = 0.0,
        label_inputs: Literal["all", "previous"] = "all",
    ):
        outs = count_tuple(out_features, min_len=2)
        if outs is None:
            raise ValueError(
                "Cascade: out_features must give a positive integer output size for each of ≥ 2 "
                f"tasks, got {out_features!r}"
            )
        check_positive(
            "Cascade", in_features=in_features, hidden=hidden, label_features=label_features
        )
        if embed_features is not None:
            check_positive("Cascade", embed_features=embed_features)
        t = len(outs)
        ks = (kinds,) * t if isinstance(kinds, str) else tuple(kinds)
        if len(ks) != t or any(k not in ("classification", "regression") for k in ks):
            raise ValueError(
                f"Cascade: kinds must be 'classification' or 'regression' (one, or one per task "
                f"for {t} tasks), got {kinds!r}"
            )
        for i, (k, o) in enumerate(zip(ks[:-1], outs[:-1], strict=True)):
            if k == "classification" and o < 2:
                raise ValueError(
                    f"Cascade: classification task {i} has {o} output; its softmax would be "
                    "constant and pass nothing to later tasks (give ≥ 2 classes, or kind "
                    "'regression')"
                )
        if label_inputs not in ("all", "previous"):
            raise ValueError(
                f"Cascade: label_inputs must be 'all' or 'previous', got {label_inputs!r}"
            )
        self.embedding = (
            nnx.Linear(in_features, embed_features, rngs=rngs)
            if embed_features is not None
            else None
        )
        e = embed_features if embed_features is not None else in_features
        self.layers = nnx.List(
            [
                nnx.Linear(
                    e
                    if i == 0
                    else hidden + e + (i if label_inputs == "all" else 1) * label_features,
                    hidden,
                    rngs=rngs,
                )
                for i in range(t)
            ]
        )
        self.heads = nnx.List([nnx.Linear(hidden, o, rngs=rngs) for o in outs])
        self.label_embeddings = nnx.List(
            [nnx.Linear(o, label_features, use_bias=False, rngs=rngs) for o in outs[:-1]]
        )
        if not float(successive_weight) >= 0.0:
            raise ValueError(f"Cascade: successive_weight must be ≥ 0, got {successive_weight!r}")
        self.kinds = ks
        self.label_inputs = label_inputs
        self.num_tasks = t
        self.in_features = in_features
        self.activation = activation
        self.successive_weight = float(successive_weight)
        self.successive_anchor = (
            nnx.List([nnx.List([Constant(a) for a in group]) for group in self._anchor_groups()])
            if self.successive_weight > 0
            else None
        )

    @property
    def shared_paths(self) -> tuple[str, ...]:
        t = self.num_tasks
        paths = ["embedding"] if self.embedding is not None else []
        for i in range(t - 1):
            paths += [f"layers/{i}", f"heads/{i}"]
            if i < t - 2:
                paths.append(f"label_embeddings/{i}")
        return tuple(paths)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        return f"heads/{self.num_tasks - 2}"

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        check_width("Cascade", x, self.in_features)
        e = self.activation(self.embedding(x)) if self.embedding is not None else x
        preds, labels = [], []
        h = None
        for i in range(self.num_tasks):
            if i == 0:
                inp = e
            else:
                prev = preds[-1]
                y = jax.nn.softmax(prev, axis=-1) if self.kinds[i - 1] == "classification" else prev
                labels.append(self.label_embeddings[i - 1](y))
                read = labels if self.label_inputs == "all" else labels[-1:]
                inp = jnp.concatenate([h, e, *read], axis=-1)
            h = self.activation(self.layers[i](inp))
            preds.append(self.heads[i](h))
        return preds

    def _task_params(self, i: int) -> list[jax.Array]:
        arrs = _arrays(self.layers[i]) + _arrays(self.heads[i])
        if i < self.num_tasks - 1:
            arrs += _arrays(self.label_embeddings[i])
        return arrs

    def _anchor_groups(self) -> list[list[jax.Array]]:
        """The regularized parameters: the embedding's, then task ``s``'s for ``s < T−1``."""
        emb = _arrays(self.embedding) if self.embedding is not None else []
        return [emb] + [self._task_params(i) for i in range(self.num_tasks - 1)]

    def anchor(self) -> dict[str, Any]:
        """The current values of the parameters under successive regularization (constants)."""
        return _as_anchor(self._anchor_groups())

    def _stored_constants(self) -> Any:
        """The module's anchor variables (grouped as :meth:`_anchor_groups`)."""
        if self.successive_anchor is None:
            raise ValueError(
                "Cascade: successive_weight is 0, so the module holds no anchor; build it with "
                "successive_weight > 0"
            )
        return self.successive_anchor

    def stored_anchor(self) -> dict[str, Any]:
        """The anchor held in the module (needs ``successive_weight > 0``)."""
        return _as_anchor([[c[...] for c in group] for group in self._stored_constants()])

    def set_anchor(self) -> None:
        """Moves the stored anchor to the current parameters (JMT: after each task's epoch)."""
        for consts, arrays in zip(self._stored_constants(), self._anchor_groups(), strict=True):
            for c, a in zip(consts, arrays, strict=True):
                c[...] = jax.lax.stop_gradient(a)

    def regularizer(self) -> jax.Array:
        """The whole successive regularization at the stored anchor with ``δ =
        successive_weight`` (0 when it is 0): the regularizer protocol of
        :func:`mtljax.nn.from_block`."""
        if self.successive_weight == 0.0:
            return jnp.zeros(())
        return self.successive_regularization(self.stored_anchor(), self.successive_weight)

    def successive_regularization(self, anchor: dict[str, Any], delta: float) -> jax.Array:
        """``f32[]``: the sum over tasks ``t`` of JMT's successive terms (eq. 6–8),
        ``δ(‖θₑ − θ'ₑ‖² + Σ_{s<t} ‖θₛ − θ'ₛ‖²)``, i.e.

            δ (T ‖θₑ − θ'ₑ‖² + Σ_{s<T−1} (T − 1 − s) ‖θₛ − θ'ₛ‖²),

        ``θₑ`` the embedding and ``θₛ`` task ``s``'s parameters, ``θ'`` the ``anchor`` (from
        :meth:`anchor`). A penalty of the parameters, not a task loss: add it outside the
        multi-task method (the model's ``regularizer``), never to the loss vector."""
        if not float(delta) >= 0.0:
            raise ValueError(f"Cascade: delta must be ≥ 0, got {delta!r}")
        if len(anchor["tasks"]) != self.num_tasks - 1:
            raise ValueError(
                f"Cascade: the anchor holds {len(anchor['tasks'])} tasks, expected "
                f"{self.num_tasks - 1}"
            )
        emb = (
            _sq_dist(_arrays(self.embedding), anchor["embedding"])
            if self.embedding is not None
            else jnp.zeros(())
        )
        t = self.num_tasks
        total = t * emb
        for s in range(t - 1):
            total = total + (t - 1 - s) * _sq_dist(self._task_params(s), anchor["tasks"][s])
        return delta * total
