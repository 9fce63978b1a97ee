"""Cross-stitch networks (Misra et al. 2016)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import (
    check_positive,
    check_stacked_features,
    check_width,
    int_tuple,
    is_count,
)
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.stacked import StackedLinear


def cross_stitch_init(
    num_tasks: int, alpha_same: float = 0.9, alpha_diff: float | None = None
) -> jax.Array:
    """The ``T×T`` initial mixing matrix: ``α_same`` on the diagonal, ``α_diff`` elsewhere.

    Misra et al. initialise a two-task unit at ``(α_S, α_D) = (0.9, 0.1)``, a convex
    combination; by default ``α_diff = (1 − α_same)/(T − 1)`` keeps every row summing to one.
    """
    if alpha_diff is None:
        alpha_diff = (1.0 - alpha_same) / (num_tasks - 1) if num_tasks > 1 else 0.0
    eye = jnp.eye(num_tasks)
    return alpha_same * eye + alpha_diff * (1.0 - eye)


class CrossStitchUnit(nnx.Module):
    """A cross-stitch unit: ``x̃ᵢ = Σⱼ αᵢⱼ xⱼ`` over the task axis of ``x: (T, …, C)``.

    ``alpha``: ``(T, T)``, or ``(C, T, T)`` with ``channelwise=True`` (one mixing per channel).
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        channels: int | None = None,
        alpha_same: float = 0.9,
        alpha_diff: float | None = None,
    ):
        check_positive("CrossStitchUnit", num_tasks=num_tasks)
        if channels is not None:
            check_positive("CrossStitchUnit", channels=channels)
        a = cross_stitch_init(num_tasks, alpha_same, alpha_diff)
        if channels is not None:
            a = jnp.broadcast_to(a, (channels, num_tasks, num_tasks))
        self.alpha = nnx.Param(jnp.asarray(a, jnp.float32))
        self.channelwise = channels is not None

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.alpha[...]
        if x.shape[0] != a.shape[-1]:
            raise ValueError(
                f"CrossStitchUnit: expected a leading task axis of {a.shape[-1]}, got {x.shape}"
            )
        if self.channelwise:
            if x.ndim < 2 or x.shape[-1] != a.shape[0]:
                raise ValueError(
                    f"CrossStitchUnit: expected {a.shape[0]} channels in the last axis, got "
                    f"{x.shape}"
                )
            return jnp.einsum("cij,j...c->i...c", a, x)
        return jnp.einsum("ij,j...->i...", a, x)


class CrossStitch(nnx.Module):
    """Cross-stitch network: one MLP column per task, activations mixed after chosen layers.

    Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR
    2016. The ``T`` columns share a shape and are stacked: layer ``l`` is one
    :class:`StackedLinear` ``(T, f_l, f_{l+1})``. After each layer in ``stitch_after`` (after
    its activation) a :class:`CrossStitchUnit` replaces column ``i``'s activations by
    ``x̃ᵢ = Σⱼ αᵢⱼ xⱼ`` (Misra et al. eq. 1 for ``T`` tasks), initialised near identity with
    ``α_same`` on the diagonal and ``α_diff`` off it (0.9 / 0.1 for two tasks, as in the paper).
    The paper trains ``α`` with a larger learning rate than the columns (e.g. through
    ``optax.multi_transform`` on the paths ``stitches/…``).

    **Shared / task-specific split.** Everything upstream of the last stitch moves every task's
    loss (through the off-diagonal ``α``): the column layers up to and including the last
    stitched layer and all stitch units but the last are **shared**. The last unit's row ``i``
    and the layers after it feed task ``i`` only, so they are **task-specific**.

    Input ``(batch, f_0)``; output ``(T, batch, f_L)``.
    """

    def __init__(
        self,
        features: Sequence[int],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        stitch_after: Sequence[int] | None = None,
        alpha_same: float = 0.9,
        alpha_diff: float | None = None,
        channelwise: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        check_positive("CrossStitch", num_tasks=num_tasks)
        if num_tasks < 2:
            raise ValueError("CrossStitch: needs at least 2 tasks to stitch")
        feats = check_stacked_features("CrossStitch", features, num_tasks)
        n_layers = len(feats) - 1
        after = tuple(range(n_layers - 1)) if stitch_after is None else int_tuple(stitch_after)
        if (
            not after
            or any(not is_count(i) for i in after)
            or list(after) != sorted(set(after))
            or not all(0 <= i < n_layers for i in after)
        ):
            raise ValueError(
                f"CrossStitch: stitch_after must be increasing layer indices in [0, {n_layers}) "
                f"(at least one), got {stitch_after!r}"
            )
        if isinstance(feats[-1], tuple) and after[-1] == n_layers - 1:
            raise ValueError(
                f"CrossStitch: the output layer has one width per task {feats[-1]}, so its "
                f"columns do not correspond and cannot be stitched; stitch_after must stop "
                f"before layer {n_layers - 1}, got {stitch_after!r}"
            )
        self.layers = nnx.List(
            [
                StackedLinear(a, b, num_tasks, rngs=rngs)
                for a, b in zip(feats[:-1], feats[1:], strict=True)
            ]
        )
        self.stitches = nnx.List(
            [
                CrossStitchUnit(
                    num_tasks,
                    channels=feats[i + 1] if channelwise else None,
                    alpha_same=alpha_same,
                    alpha_diff=alpha_diff,
                )
                for i in after
            ]
        )
        self.stitch_after = after
        self.num_tasks = num_tasks
        self.activation = activation
        self.features = feats

    @property
    def shared_paths(self) -> tuple[str, ...]:
        last = self.stitch_after[-1]
        return tuple(f"layers/{i}" for i in range(last + 1)) + tuple(
            f"stitches/{k}" for k in range(len(self.stitches) - 1)
        )

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        return f"layers/{self.stitch_after[-1]}"

    def _run(self, h: jax.Array, start: int, stop: int, stitch_last: bool) -> jax.Array:
        n = len(self.layers)
        for i in range(start, stop):
            h = self.layers[i](h, per_task=i > 0)
            if i < n - 1:
                h = self.activation(h)
            if i in self.stitch_after:
                k = self.stitch_after.index(i)
                if k < len(self.stitches) - 1 or stitch_last:
                    h = self.stitches[k](h)
        return h

    def encode(self, x: jax.Array) -> jax.Array:
        """The column activations ``(T, batch, f)`` entering the last stitch unit (shared part)."""
        check_width("CrossStitch", x, self.features[0])
        return self._run(x, 0, self.stitch_after[-1] + 1, stitch_last=False)

    def predict(self, z: jax.Array) -> jax.Array:
        """The task-specific part: the last stitch unit and the layers after it."""
        h = self.stitches[-1](z)
        return self._run(h, self.stitch_after[-1] + 1, len(self.layers), stitch_last=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.predict(self.encode(x))
