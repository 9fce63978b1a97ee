"""Low-level supervision: task heads attached at different depths (Søgaard & Goldberg 2016)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import check_out_features, check_positive, check_width, count_tuple
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.stacked import StackedLinear


class LowLevelSupervision(nnx.Module):
    """A deep encoder with task ``t``'s head reading layer ``depths[t]``.

    Søgaard & Goldberg, "Deep multi-task learning with low level tasks supervised at lower
    layers", ACL 2016: lower-level tasks (e.g. POS tagging) are supervised at inner layers of
    a shared stack, higher-level tasks (e.g. chunking) at the outer layer. The encoder has
    ``max(depths)`` layers of width ``hidden`` (``relu(W h + b)``); the hidden states are
    stacked ``(L, batch, hidden)`` and gathered per task, and the ``T`` heads are one
    :class:`StackedLinear` applied per task (one batched matmul).

    **Shared / task-specific split.** Layer ``l`` (1-based) is used by the tasks with
    ``depth ≥ l``: shared when that is two tasks or more, task-specific when it is one (the
    layers above the second-deepest head belong to the deepest task). Heads: task-specific.

    Input ``(batch, in)``; output ``(T, batch, out_features)``; with one width per task in
    ``out_features``, ``(T, batch, max)`` with each task's extra columns 0
    (:func:`mtljax.nn.split_outputs` slices them off).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int | Sequence[int],
        depths: Sequence[int],
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        check_positive("LowLevelSupervision", in_features=in_features, hidden=hidden)
        d = count_tuple(depths, min_len=2)
        if d is None:
            raise ValueError(
                "LowLevelSupervision: depths must give a positive integer layer index (1-based) "
                f"for each of ≥ 2 tasks, got {depths!r}"
            )
        out_features = check_out_features("LowLevelSupervision", out_features, len(d))
        n = max(d)
        self.layers = nnx.List(
            [nnx.Linear(in_features if i == 0 else hidden, hidden, rngs=rngs) for i in range(n)]
        )
        self.heads = StackedLinear(hidden, out_features, len(d), rngs=rngs)
        self.depths = d
        self.in_features = in_features
        self.activation = activation

    def users(self, layer: int) -> int:
        """How many tasks read layer ``layer`` (0-based) or above."""
        return sum(1 for d in self.depths if d > layer)

    @property
    def shared_paths(self) -> tuple[str, ...]:
        return tuple(f"layers/{i}" for i in range(len(self.layers)) if self.users(i) >= 2)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        return self.shared_paths[-1]

    def _run(self, h: jax.Array, start: int, stop: int) -> list[jax.Array]:
        hs = []
        for i in range(start, stop):
            h = self.activation(self.layers[i](h))
            hs.append(h)
        return hs

    def encode(self, x: jax.Array) -> jax.Array:
        """Hidden states ``(S, batch, hidden)`` of the ``S`` shared layers."""
        check_width("LowLevelSupervision", x, self.in_features)
        return jnp.stack(self._run(x, 0, len(self.shared_paths)))

    def predict(self, hs: jax.Array) -> jax.Array:
        """``(T, batch, out)`` from the shared layers' states: runs the deepest task's own
        layers, then each head reads its layer."""
        hs = jnp.concatenate(
            [hs, *[h[None] for h in self._run(hs[-1], hs.shape[0], len(self.layers))]]
        )
        idx = jnp.asarray([d - 1 for d in self.depths])
        return self.heads(hs[idx], per_task=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.predict(self.encode(x))
