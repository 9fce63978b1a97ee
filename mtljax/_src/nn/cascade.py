"""Cascades: a task's prediction feeds later tasks (Hashimoto et al. 2017, Joint Many-Task)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.towers import check_positive

Kind = Literal["classification", "regression"]


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
    """A cascade of tasks: task ``t``'s layer reads the input, task ``t−1``'s hidden state and an
    embedding of task ``t−1``'s prediction.

    Hashimoto, Xiong, Tsuruoka & Socher, "A Joint Many-Task Model: Growing a Neural Network for
    Multiple NLP Tasks", EMNLP 2017. With ``e = embedding(x)`` (shared; ``x`` itself without
    one),

        h₀ = act(W₀ e + b₀),   hₜ = act(Wₜ [hₜ₋₁; e; yₜ₋₁ Eₜ₋₁] + bₜ),   ŷₜ = Vₜ hₜ + cₜ,

    where ``yₜ₋₁`` is ``softmax(ŷₜ₋₁)`` for a classification task (the label embedding weighted by
    the predicted probabilities, JMT §2.2) or ``ŷₜ₋₁`` for a regression task, and ``Eₜ₋₁`` a
    learned label embedding; the shortcut ``e`` reaches every layer.

    Successive regularization (JMT §2.6): task ``t``'s loss adds ``δ‖θ_{<t} − θ'_{<t}‖²`` on the
    parameters below it (the embedding and tasks ``< t``'s layers, heads and label embeddings),
    with ``θ'`` their values at an anchor (JMT: after the previous task's training epoch). Get
    the anchor with :meth:`anchor` and pass it through the batch; :meth:`successive_penalty`
    gives the terms, ``f32[T]``.

    **Shared / task-specific split.** The embedding, and task ``t < T−1``'s layer and head, feed
    task ``t`` and every later task: shared. Label embedding ``Eₜ`` feeds tasks ``> t``: shared
    for ``t < T−2``, while ``E_{T−2}`` feeds the last task only. The last task's layer and head,
    and ``E_{T−2}``, are task-specific (the successive terms of task ``t`` only involve
    parameters of tasks ``< t``, which feed task ``t`` anyway, so they change nothing here).

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
    ):
        outs = tuple(out_features)
        if len(outs) < 2 or any(not isinstance(o, int) or o < 1 for o in outs):
            raise ValueError(
                f"Cascade: out_features must give a positive output size for each of ≥ 2 tasks, "
                f"got {out_features!r}"
            )
        check_positive(
            "Cascade", in_features=in_features, hidden=hidden, label_features=label_features
        )
        t = len(outs)
        ks = (kinds,) * t if isinstance(kinds, str) else tuple(kinds)
        if len(ks) != t or any(k not in ("classification", "regression") for k in ks):
            raise ValueError(
                f"Cascade: kinds must be 'classification' or 'regression' (one, or one per task "
                f"for {t} tasks), got {kinds!r}"
            )
        self.embedding = (
            nnx.Linear(in_features, embed_features, rngs=rngs)
            if embed_features is not None
            else None
        )
        e = embed_features if embed_features is not None else in_features
        self.layers = nnx.List(
            [
                nnx.Linear(e if i == 0 else hidden + e + label_features, hidden, rngs=rngs)
                for i in range(t)
            ]
        )
        self.heads = nnx.List([nnx.Linear(hidden, o, rngs=rngs) for o in outs])
        self.label_embeddings = nnx.List(
            [nnx.Linear(o, label_features, use_bias=False, rngs=rngs) for o in outs[:-1]]
        )
        self.kinds = ks
        self.num_tasks = t
        self.in_features = in_features
        self.activation = activation

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
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Cascade: expected {self.in_features} input features, got {x.shape}")
        e = self.activation(self.embedding(x)) if self.embedding is not None else x
        preds = []
        h = None
        for i in range(self.num_tasks):
            if i == 0:
                inp = e
            else:
                prev = preds[-1]
                y = jax.nn.softmax(prev, axis=-1) if self.kinds[i - 1] == "classification" else prev
                inp = jnp.concatenate([h, e, self.label_embeddings[i - 1](y)], axis=-1)
            h = self.activation(self.layers[i](inp))
            preds.append(self.heads[i](h))
        return preds

    def _task_params(self, i: int) -> list[jax.Array]:
        arrs = _arrays(self.layers[i]) + _arrays(self.heads[i])
        if i < self.num_tasks - 1:
            arrs += _arrays(self.label_embeddings[i])
        return arrs

    def anchor(self) -> dict[str, Any]:
        """The current values of the parameters under successive regularization (constants)."""
        emb = _arrays(self.embedding) if self.embedding is not None else []
        tasks = [self._task_params(i) for i in range(self.num_tasks - 1)]
        return jax.lax.stop_gradient({"embedding": emb, "tasks": tasks})

    def successive_penalty(self, anchor: dict[str, Any], delta: float) -> jax.Array:
        """``f32[T]``: ``δ(‖θₑ − θ'ₑ‖² + Σ_{s<t} ‖θₛ − θ'ₛ‖²)`` for task ``t`` (JMT eq. 6–8's
        successive terms), ``θₑ`` the embedding and ``θₛ`` task ``s``'s parameters."""
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
        terms = [emb]
        acc = emb
        for s in range(self.num_tasks - 1):
            acc = acc + _sq_dist(self._task_params(s), anchor["tasks"][s])
            terms.append(acc)
        return delta * jnp.stack(terms)
