"""Soft parameter sharing: one tower per task, tied by a distance penalty; and hybrid sharing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from flax import nnx

from mtljax._src.nn.checks import (
    check_positive,
    check_real,
    check_stacked_features,
    int_tuple,
    is_count,
)
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.towers import StackedMLP
from mtljax._src.regularizers import mean_regularized

PenaltyKind = Literal["mean", "pairwise"]


def _penalty_scale(kind: str, weight: float, num_tasks: int) -> float:
    if kind == "mean":
        return float(weight)
    if kind == "pairwise":
        return float(weight) * num_tasks
    raise ValueError(f"soft sharing: penalty must be 'mean' or 'pairwise', got {kind!r}")


class SoftSharing(nnx.Module):
    """Soft parameter sharing: each task has its own tower; corresponding tower parameters are
    pulled together by a squared-distance penalty.

    Duong, Cohn, Bird & Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing
    in a Neural Network Parser", ACL 2015 (ℓ₂ distance between the two parsers' parameters);
    Yang & Hospedales, "Trace Norm Regularised Deep Multi-Task Learning", ICLR-W 2017 (soft
    sharing of per-task layers by a regularizer; their coupling is the trace norm of the
    stacked layers, :func:`mtljax.regularizers.trace_norm`, which can replace this block's
    squared distance as the model's regularizer). The towers are one :class:`StackedMLP`
    (``T`` stacked ``(f_l, f_{l+1})`` kernels, one batched matmul per layer) and the penalty is

    * ``penalty="pairwise"``: ``λ Σ_{i<j} ‖θᵢ − θⱼ‖²``;
    * ``penalty="mean"``: ``λ Σᵢ ‖θᵢ − θ̄‖²`` with ``θ̄ = (1/T) Σⱼ θⱼ``;

    summed over the coupled layers (``soft_layers``, default all; kernels and biases). The two
    forms are proportional: ``Σ_{i<j}‖θᵢ − θⱼ‖² = T Σᵢ‖θᵢ − θ̄‖²``.

    With a ``trunk`` module in front of the towers this is **hybrid sharing**: the trunk is
    hard-shared (see :class:`HybridSharing`).

    **Shared / task-specific split.** Tower ``i`` enters only task ``i``'s loss, so the towers
    are **task-specific** and the ``trunk`` (if any) is shared. The penalty is not a task loss:
    it is the block's :meth:`regularizer`, which :func:`mtljax.nn.from_block` wires as the
    model's ``regularizer``, so the train step adds ``∇penalty`` to the method's update once
    and unweighted. (Put into the loss vector, each task's share would be multiplied by that
    task's weight ``wᵢ`` under any method but equal weighting, silently changing the coupling
    strength.) Without a trunk no parameter is shared by two tasks' losses: the block declares
    no shared parameters (``shared_filter`` is ``None``, i.e. ``from_nnx(shared=None)``), the
    task Jacobian is empty, and each tower trains on its own task's gradient (the method's
    ``head_grads`` rule) plus the coupling gradient (Nash-MTL and GradNorm, whose weights
    would come from the zero Gramian, need ``head_grads="unit"`` here).

    Output: ``(T, batch, out)``. The last size of ``features`` may give one width per task
    (then ``(T, batch, max)``, each task's extra columns 0, see :class:`StackedMLP`); that
    output layer cannot be coupled, so ``soft_layers`` must leave it out.
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
        penalty_weight = check_real(
            "SoftSharing", "penalty_weight", penalty_weight, low=0.0, strict=False
        )
        _penalty_scale(penalty, 1.0, num_tasks)
        check_stacked_features("SoftSharing", features, num_tasks)
        self.towers = StackedMLP(features, num_tasks, rngs=rngs, activation=activation)
        self.trunk = trunk
        n_layers = len(self.towers.layers)
        layers = tuple(range(n_layers)) if soft_layers is None else int_tuple(soft_layers)
        if (
            not layers
            or any(not is_count(i) for i in layers)
            or any(not 0 <= i < n_layers for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"SoftSharing: soft_layers must be distinct indices in [0, {n_layers}), got "
                f"{soft_layers!r}"
            )
        padded = n_layers - 1
        if self.towers.layers[padded].padded and padded in layers:
            raise ValueError(
                f"SoftSharing: the output layer has one width per task "
                f"{self.towers.out_sizes}, so its parameters do not correspond across tasks and "
                f"cannot be coupled; "
                + (
                    f"pass soft_layers without layer {padded}, e.g. {tuple(range(padded))}"
                    if padded
                    else "with no hidden layer there is nothing left to couple"
                )
            )
        self.soft_layers = layers
        self.num_tasks = num_tasks
        self.penalty_weight = float(penalty_weight)
        self.penalty_kind = penalty

    # -- the split --------------------------------------------------------------------------
    @property
    def shared_paths(self) -> tuple[str, ...]:
        return ("trunk",) if self.trunk is not None else ()

    @property
    def shared_filter(self) -> PathPrefixes | None:
        """The trunk; ``None`` (no shared parameter) without one."""
        return PathPrefixes(*self.shared_paths) if self.shared_paths else None

    @property
    def last_shared(self) -> str | None:
        if self.trunk is None:
            return None
        path = getattr(self.trunk, "last_layer_path", None)
        return f"trunk/{path}" if path else "trunk"

    # -- forward ----------------------------------------------------------------------------
    def encode(self, x: jax.Array) -> jax.Array:
        """The shared representation, the trunk's output (feature-level methods need a trunk:
        without one nothing is shared)."""
        if self.trunk is None:
            raise ValueError(
                "SoftSharing: without a trunk nothing is shared, so there is no shared "
                "representation to take a feature-level Jacobian at; give a `trunk` (hybrid "
                "sharing)"
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
        """The soft-sharing penalty ``λ Σᵢ ‖θᵢ − θ̄‖²`` (``"mean"``) or ``λ Σ_{i<j} ‖θᵢ − θⱼ‖²``
        (``"pairwise"``), a scalar differentiable w.r.t. every tower."""
        c = _penalty_scale(self.penalty_kind, self.penalty_weight, self.num_tasks)
        return c * sum(mean_regularized(leaf) for leaf in self._coupled())

    def regularizer(self) -> jax.Array:
        """The block's whole penalty, :meth:`penalty`: the regularizer protocol of
        :func:`mtljax.nn.from_block` (added outside the multi-task method, never to the task
        losses)."""
        return self.penalty()


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
