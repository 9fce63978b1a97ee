"""Customized Gate Control and Progressive Layered Extraction (Tang et al. 2020)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import (
    check_features,
    check_positive,
    check_sizes,
    check_stacked_features,
)
from mtljax._src.nn.mmoe import check_input
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.stacked import StackedLinear
from mtljax._src.nn.towers import StackedMLP


class ExtractionLayer(nnx.Module):
    """One extraction network of PLE (a CGC layer): shared experts, ``T`` groups of
    task-specific experts, one gate per task and, except at the last level, a gate for the
    shared branch.

    Task ``k``'s gate mixes its own experts and the shared ones (Tang et al. eq. 4–5); the
    shared gate mixes every expert of the layer (§4.3.2). All experts of a kind are stacked
    (``StackedMLP``), the task gates too (``StackedLinear (T, in, m_k + m_s)``). Gates are
    ``softmax(W x)`` without a bias, as in the paper, unless ``gate_bias=True``.

    A building block of :class:`PLE` and :class:`CGC` (it has no ``__call__``: :meth:`experts`,
    :meth:`task_mix` and :meth:`shared_mix` are its steps).
    """

    def __init__(
        self,
        features: Sequence[int],
        num_shared_experts: int,
        num_task_experts: int,
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        shared_gate: bool,
        gate_bias: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        feats = check_features("ExtractionLayer", features)
        check_positive(
            "ExtractionLayer",
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
            num_tasks=num_tasks,
        )
        self.shared_experts = StackedMLP(
            feats, num_shared_experts, rngs=rngs, activation=activation, final_activation=True
        )
        self.task_experts = StackedMLP(
            feats,
            num_tasks * num_task_experts,
            rngs=rngs,
            activation=activation,
            final_activation=True,
        )
        self.task_gates = StackedLinear(
            feats[0],
            num_task_experts + num_shared_experts,
            num_tasks,
            rngs=rngs,
            use_bias=gate_bias,
        )
        self.shared_gate = (
            nnx.Linear(
                feats[0],
                num_tasks * num_task_experts + num_shared_experts,
                rngs=rngs,
                use_bias=gate_bias,
            )
            if shared_gate
            else None
        )
        self.num_tasks = num_tasks
        self.num_task_experts = num_task_experts

    def experts(self, xt: jax.Array | None, xs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(te, se)``: task experts ``(T, m_k, batch, h)`` and shared experts ``(m_s, batch, h)``.

        ``xt``: per-task inputs ``(T, batch, in)``, or ``None`` when every branch reads ``xs``.
        """
        se = self.shared_experts(xs)
        if xt is None:
            te = self.task_experts(xs)
        else:
            te = self.task_experts(jnp.repeat(xt, self.num_task_experts, axis=0), per_task=True)
        return te.reshape((self.num_tasks, self.num_task_experts) + te.shape[1:]), se

    def task_mix(
        self, te: jax.Array, se: jax.Array, xt: jax.Array | None, xs: jax.Array
    ) -> jax.Array:
        """``(T, batch, h)``: task ``k``'s gate over its experts and the shared ones."""
        logits = self.task_gates(xs) if xt is None else self.task_gates(xt, per_task=True)
        both = jnp.concatenate([te, jnp.broadcast_to(se, (self.num_tasks,) + se.shape)], axis=1)
        return jnp.einsum("tbe,tebh->tbh", jax.nn.softmax(logits, axis=-1), both)

    def shared_mix(self, te: jax.Array, se: jax.Array, xs: jax.Array) -> jax.Array:
        """``(batch, h)``: the shared gate over all experts of the layer."""
        every = jnp.concatenate([te.reshape((-1,) + te.shape[2:]), se], axis=0)
        return jnp.einsum("be,ebh->bh", jax.nn.softmax(self.shared_gate(xs), axis=-1), every)


class PLE(nnx.Module):
    """Progressive Layered Extraction.

    Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
    (MTL) Model for Personalized Recommendations", RecSys 2020. ``num_levels`` extraction
    layers (:class:`ExtractionLayer`); at level ``j`` task ``k``'s branch is

        gᵏʲ = wᵏʲ(gᵏʲ⁻¹) Sᵏʲ,   Sᵏʲ = [task-k experts(gᵏʲ⁻¹), shared experts(gˢʲ⁻¹)],

    and the shared branch ``gˢʲ`` gates all experts of the level by ``gˢʲ⁻¹``; level 0 reads
    ``x`` everywhere; the last level has no shared gate; towers read ``gᵏ`` of the last level.
    With ``num_levels=1`` it is CGC (:class:`CGC`).

    **Shared / task-specific split** (level ``j`` of ``L``): shared experts and shared gates
    are shared. Task experts at ``j < L−1`` also feed the shared gate of their level, so
    they are shared; at the last level they are task-specific. Task gates at ``j ≤ L−3`` feed
    next-level task experts that are shared, so they are shared; the task gates of the last
    two levels are task-specific, as are the towers.

    Input ``(batch, in)``; output ``(T, batch, tower_features[-1])``. The last tower size may
    give one width per task (``(8, (10, 1))``): the output is then ``(T, batch, max)`` with
    each task's extra columns 0; :func:`mtljax.nn.split_outputs` slices them off.
    """

    def __init__(
        self,
        in_features: int,
        expert_features: Sequence[int],
        num_shared_experts: int,
        num_task_experts: int,
        tower_features: Sequence[int | Sequence[int]],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        num_levels: int = 2,
        gate_bias: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        name = type(self).__name__
        check_positive(
            name,
            in_features=in_features,
            num_tasks=num_tasks,
            num_levels=num_levels,
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
        )
        check_sizes(name, expert_features=expert_features, tower_features=tower_features)
        ef = check_features(f"{name} expert_features", (in_features, *expert_features))
        tf = check_stacked_features(f"{name} tower_features", (ef[-1], *tower_features), num_tasks)
        levels = []
        for j in range(num_levels):
            feats = ef if j == 0 else (ef[-1], *ef[1:])
            levels.append(
                ExtractionLayer(
                    feats,
                    num_shared_experts,
                    num_task_experts,
                    num_tasks,
                    rngs=rngs,
                    shared_gate=j < num_levels - 1,
                    gate_bias=gate_bias,
                    activation=activation,
                )
            )
        self.levels = nnx.List(levels)
        self.towers = StackedMLP(tf, num_tasks, rngs=rngs, activation=activation)
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.num_levels = num_levels

    @property
    def shared_paths(self) -> tuple[str, ...]:
        n = self.num_levels
        paths = []
        for j in range(n):
            paths.append(f"levels/{j}/shared_experts")
            if j < n - 1:
                paths += [f"levels/{j}/shared_gate", f"levels/{j}/task_experts"]
            if j <= n - 3:
                paths.append(f"levels/{j}/task_gates")
        return tuple(paths)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        return f"levels/{self.num_levels - 1}/shared_experts"

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(type(self).__name__, x, self.in_features)
        xt, xs = None, x
        for level in self.levels:
            te, se = level.experts(xt, xs)
            new_t = level.task_mix(te, se, xt, xs)
            xs = level.shared_mix(te, se, xs) if level.shared_gate is not None else None
            xt = new_t
        return self.towers(xt, per_task=True)

    def encode(self, x: jax.Array) -> dict[str, Any]:
        """Everything the task-specific part reads that depends on shared parameters."""
        check_input(type(self).__name__, x, self.in_features)
        n = self.num_levels
        if n == 1:
            return {"se": self.levels[0].shared_experts(x)}
        xt, xs = None, x
        for level in list(self.levels)[: n - 2]:
            te, se = level.experts(xt, xs)
            xt, xs = level.task_mix(te, se, xt, xs), level.shared_mix(te, se, xs)
        pen = self.levels[n - 2]
        te, se = pen.experts(xt, xs)
        gs = pen.shared_mix(te, se, xs)
        return {"te": te, "se": se, "gate_in": xt, "se_last": self.levels[n - 1].shared_experts(gs)}

    def predict(self, z: dict[str, Any], x: jax.Array) -> jax.Array:
        """``(T, batch, out)`` from :meth:`encode`'s output and the input ``x``."""
        n = self.num_levels
        last = self.levels[n - 1]
        if n == 1:
            te = last.task_experts(x)
            te = te.reshape((self.num_tasks, last.num_task_experts) + te.shape[1:])
            return self.towers(last.task_mix(te, z["se"], None, x), per_task=True)
        pen = self.levels[n - 2]
        gt = pen.task_mix(z["te"], z["se"], z["gate_in"], x)
        te = last.task_experts(jnp.repeat(gt, last.num_task_experts, axis=0), per_task=True)
        te = te.reshape((self.num_tasks, last.num_task_experts) + te.shape[1:])
        return self.towers(last.task_mix(te, z["se_last"], gt, x), per_task=True)


class CGC(PLE):
    """Customized Gate Control (Tang et al. 2020, §4.2): one :class:`ExtractionLayer` with no
    shared gate; task ``k``'s gate mixes its ``m_k`` experts and the ``m_s`` shared ones.

    Shared: the shared experts. Task-specific: task experts, task gates, towers.
    """

    def __init__(
        self,
        in_features: int,
        expert_features: Sequence[int],
        num_shared_experts: int,
        num_task_experts: int,
        tower_features: Sequence[int | Sequence[int]],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        gate_bias: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        super().__init__(
            in_features,
            expert_features,
            num_shared_experts,
            num_task_experts,
            tower_features,
            num_tasks,
            rngs=rngs,
            num_levels=1,
            gate_bias=gate_bias,
            activation=activation,
        )
