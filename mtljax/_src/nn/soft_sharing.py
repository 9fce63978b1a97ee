"""Soft parameter sharing: one tower per task, tied by a distance penalty; and hybrid sharing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.towers import StackedMLP, check_positive

PenaltyKind = Literal["mean", "pairwise"]


def _penalty_scale(kind: str, weight: float, num_tasks: int) -> float:
    if kind == "mean":
        return float(weight)
    if kind == "pairwise":
        return float(weight) * num_tasks
    raise ValueError(f"soft sharing: penalty must be 'mean' or 'pairwise', got {kind!r}")


def tower_distance(stacked: Sequence[jax.Array], *, detach_mean: bool) -> jax.Array:
    """``f32[T]``: ``Σ_leaves ‖θᵢ − θ̄‖²`` for stacked leaves ``(T, …)`` (θ̄: mean over tasks).

    With ``detach_mean`` the mean is a constant (``stop_gradient``): then task ``i``'s term
    depends (for differentiation) on tower ``i`` only, while its gradient w.r.t. ``θᵢ``,
    ``2(θᵢ − θ̄)``, equals that of the full penalty ``Σⱼ‖θⱼ − θ̄‖²`` (whose terms' mean-derivatives
    cancel because ``Σⱼ(θⱼ − θ̄) = 0``).
    """
    total = None
    for leaf in stacked:
        mean = jnp.mean(leaf, axis=0, keepdims=True)
        if detach_mean:
            mean = jax.lax.stop_gradient(mean)
        d = (leaf - mean).reshape(leaf.shape[0], -1)
        term = jnp.sum(d * d, axis=1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("soft sharing: no tower parameters to couple")
    return total


class SoftSharing(nnx.Module):
    """Soft parameter sharing: each task has its own tower; corresponding tower parameters are
    pulled together by a squared-distance penalty.

    Duong, Cohn, Bird & Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing
    in a Neural Network Parser", ACL 2015 (ℓ₂ distance between the two parsers' parameters);
    Yang & Hospedales, "Trace Norm Regularised Deep Multi-Task Learning", ICLR-W 2017 (soft
    sharing of per-task layers by a regularizer). The towers are one :class:`StackedMLP`
    (``T`` stacked ``(f_l, f_{l+1})`` kernels, one batched matmul per layer) and the penalty is

    * ``penalty="pairwise"``: ``λ Σ_{i<j} ‖θᵢ − θⱼ‖²``;
    * ``penalty="mean"``: ``λ Σᵢ ‖θᵢ − θ̄‖²`` with ``θ̄ = (1/T) Σⱼ θⱼ``;

    summed over the coupled layers (``soft_layers``, default all; kernels and biases). The two
    forms are proportional: ``Σ_{i<j}‖θᵢ − θⱼ‖² = T Σᵢ‖θᵢ − θ̄‖²``.

    With a ``trunk`` module in front of the towers this is **hybrid sharing**: the trunk is
    hard-shared (see :class:`HybridSharing`).

    **Shared / task-specific split.** Tower ``i`` enters only task ``i``'s data loss. The penalty
    is put into the loss vector as :meth:`penalty_per_task`, ``cλ‖θᵢ − sg(θ̄)‖²`` for task ``i``
    (``sg``: stop-gradient), whose sum is the penalty and whose gradient w.r.t. each tower is
    exactly the penalty's. The loss Jacobian w.r.t. the towers is then block-structured, so
    the towers are **task-specific** and the ``trunk`` is shared. Without a trunk no parameter
    is shared by two tasks' losses; as :func:`mtljax.from_nnx` needs a non-empty shared set,
    the towers are then declared shared, and Jacobian methods see task gradients with disjoint
    supports (zero pairwise cosines).

    Output: ``(T, batch, out)``.
    """

    def __init__(
        self,
        features: Sequence[int],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        trunk: nnx.Module | None = None,
        penalty_weight: float = 1e-2,
        penalty: PenaltyKind = "mean",
        soft_layers: Sequence[int] | None = None,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        check_positive("SoftSharing", num_tasks=num_tasks)
        if not float(penalty_weight) >= 0.0:
            raise ValueError(f"SoftSharing: penalty_weight must be ≥ 0, got {penalty_weight!r}")
        _penalty_scale(penalty, 1.0, num_tasks)
        self.towers = StackedMLP(features, num_tasks, rngs=rngs, activation=activation)
        self.trunk = trunk
        n_layers = len(self.towers.layers)
        layers = tuple(range(n_layers)) if soft_layers is None else tuple(soft_layers)
        if (
            not layers
            or any(not 0 <= i < n_layers for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"SoftSharing: soft_layers must be distinct indices in [0, {n_layers}), got "
                f"{soft_layers!r}"
            )
        self.soft_layers = layers
        self.num_tasks = num_tasks
        self.penalty_weight = float(penalty_weight)
        self.penalty_kind = penalty

    # -- the split --------------------------------------------------------------------------
    @property
    def shared_paths(self) -> tuple[str, ...]:
        return ("trunk",) if self.trunk is not None else ("towers",)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str | None:
        if self.trunk is not None:
            path = getattr(self.trunk, "last_layer_path", None)
            return f"trunk/{path}" if path else "trunk"
        return f"towers/layers/{len(self.towers.layers) - 1}"

    # -- forward ----------------------------------------------------------------------------
    def encode(self, x: jax.Array) -> jax.Array:
        """The shared representation, the trunk's output (feature-level methods need a trunk:
        without one the towers, declared shared, come after the representation)."""
        if self.trunk is None:
            raise ValueError(
                "SoftSharing: without a trunk there is no shared representation to take a "
                "feature-level Jacobian at; give a `trunk` (hybrid sharing)"
            )
        return self.trunk(x)

    def predict(self, z: jax.Array) -> jax.Array:
        """``(T, batch, out)`` from the trunk's output."""
        return self.towers(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.towers(self.trunk(x) if self.trunk is not None else x)

    # -- the penalty ------------------------------------------------------------------------
    def _coupled(self) -> list[jax.Array]:
        leaves = []
        for i in self.soft_layers:
            layer = self.towers.layers[i]
            leaves += [layer.kernel[...], layer.bias[...]]
        return leaves

    def penalty(self) -> jax.Array:
        """The soft-sharing penalty (a scalar, differentiable w.r.t. every tower)."""
        c = _penalty_scale(self.penalty_kind, self.penalty_weight, self.num_tasks)
        return c * jnp.sum(tower_distance(self._coupled(), detach_mean=False))

    def penalty_per_task(self) -> jax.Array:
        """``f32[T]`` to add to the task losses: sums to :meth:`penalty`, same tower gradients,
        and task ``i``'s term depends on tower ``i`` only (see the class docstring)."""
        c = _penalty_scale(self.penalty_kind, self.penalty_weight, self.num_tasks)
        return c * tower_distance(self._coupled(), detach_mean=True)


class HybridSharing(SoftSharing):
    """Hybrid sharing: a hard-shared ``trunk`` followed by soft-shared task towers.

    The first layers (the trunk, any module mapping inputs to ``features[0]``) are shared by
    all tasks; the later layers are per-task towers tied by the soft-sharing penalty of
    :class:`SoftSharing`. Shared: ``trunk``; task-specific: ``towers``.
    """

    def __init__(self, trunk: nnx.Module, features: Sequence[int], num_tasks: int, **kwargs: Any):
        if trunk is None:
            raise ValueError("HybridSharing: give the hard-shared `trunk` module")
        super().__init__(features, num_tasks, trunk=trunk, **kwargs)
