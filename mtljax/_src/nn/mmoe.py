"""Multi-gate mixture-of-experts (Ma et al. 2018) and its one-gate variant."""

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
    is_count,
)
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.stacked import StackedLinear
from mtljax._src.nn.towers import StackedMLP


def check_input(owner: str, x: jax.Array, in_features: int) -> None:
    if x.ndim != 2 or x.shape[-1] != in_features:
        raise ValueError(
            f"{owner}: expected inputs of shape (batch, {in_features}), got shape {x.shape}"
        )


def expert_bank(
    owner: str,
    in_features: int,
    num_experts: int,
    expert_features: Sequence[int],
    tower_features: Sequence[Any],
    num_tasks: int,
    *,
    rngs: nnx.Rngs,
    activation: Callable[[jax.Array], jax.Array],
) -> tuple[StackedMLP, tuple[Any, ...]]:
    """The experts of a mixture (``num_experts`` stacked MLPs ``(in, *expert_features)``,
    activation on the output) and the towers' layer sizes ``(expert_features[-1],
    *tower_features)``, the last one possibly per task; bad sizes raise naming ``owner``."""
    check_sizes(owner, expert_features=expert_features, tower_features=tower_features)
    ef = check_features(f"{owner} expert_features", (in_features, *expert_features))
    tf = check_stacked_features(f"{owner} tower_features", (ef[-1], *tower_features), num_tasks)
    experts = StackedMLP(ef, num_experts, rngs=rngs, activation=activation, final_activation=True)
    return experts, tf


class MMoE(nnx.Module):
    """Multi-gate Mixture-of-Experts.

    Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018, eqs. 6–8:

        gᵏ(x) = softmax(W_gk x),   fᵏ(x) = Σᵢ gᵏ(x)ᵢ fᵢ(x),   yₖ = hᵏ(fᵏ(x)),

    with ``n ≥ 2`` experts ``fᵢ`` (stacked MLPs ``(in, *expert_features)``, ReLU output), one
    linear softmax gate per task (stacked ``(T, in, n)``; without a bias, as in the paper, unless
    ``gate_bias=True``) and a tower ``hᵏ`` per task (stacked ``(expert_features[-1],
    *tower_features)``). With ``num_gates=1`` it is the paper's one-gate baseline OMoE (eq. 5
    feeding every tower).

    **Shared / task-specific split.** The experts feed every task: **shared**. Gate ``k`` and
    tower ``k`` move task ``k``'s loss only: **task-specific** (the single OMoE gate feeds every
    task and is shared).

    Input ``(batch, in)``; output ``(T, batch, tower_features[-1])``. The last tower size may
    give one width per task (``(8, (10, 1))``): the output is then ``(T, batch, max)`` with
    each task's extra columns 0; :func:`mtljax.nn.split_outputs` slices them off.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_features: Sequence[int],
        tower_features: Sequence[int | Sequence[int]],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        num_gates: int | None = None,
        gate_bias: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        check_positive(
            "MMoE", in_features=in_features, num_experts=num_experts, num_tasks=num_tasks
        )
        if num_experts < 2:
            raise ValueError("MMoE: needs at least 2 experts for the gates to choose between")
        gates = num_tasks if num_gates is None else num_gates
        if not is_count(gates) or gates not in (1, num_tasks):
            raise ValueError(f"MMoE: num_gates must be 1 (OMoE) or T={num_tasks}, got {num_gates}")
        self.experts, tf = expert_bank(
            "MMoE",
            in_features,
            num_experts,
            expert_features,
            tower_features,
            num_tasks,
            rngs=rngs,
            activation=activation,
        )
        self.gates = StackedLinear(in_features, num_experts, gates, rngs=rngs, use_bias=gate_bias)
        self.towers = StackedMLP(tf, num_tasks, rngs=rngs, activation=activation)
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.num_gates = gates

    @property
    def shared_paths(self) -> tuple[str, ...]:
        return ("experts", "gates") if self.num_gates == 1 else ("experts",)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        """The experts' last layer (OMoE's gate is a small side branch of the mixture)."""
        return f"experts/layers/{len(self.experts.layers) - 1}"

    def gate_weights(self, x: jax.Array) -> jax.Array:
        """``(G, batch, n)`` softmax gate weights (``G`` = T, or 1 for OMoE)."""
        return jax.nn.softmax(self.gates(x), axis=-1)

    def encode(self, x: jax.Array) -> jax.Array:
        """The shared representation: the experts' outputs ``(n, batch, h)`` (MMoE), or the one
        gate's mixture ``(batch, h)`` (OMoE)."""
        check_input(type(self).__name__, x, self.in_features)
        e = self.experts(x)
        if self.num_gates == 1:
            return jnp.einsum("be,ebh->bh", self.gate_weights(x)[0], e)
        return e

    def predict(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """``(T, batch, out)`` from :meth:`encode`'s output (the gates read ``x``)."""
        if self.num_gates == 1:
            return self.towers(z)
        mixed = jnp.einsum("tbe,ebh->tbh", self.gate_weights(x), z)
        return self.towers(mixed, per_task=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.predict(self.encode(x), x)


class OMoE(MMoE):
    """One-gate Mixture-of-Experts (Ma et al. 2018, eq. 5): :class:`MMoE` with a single gate
    shared by all tasks. Shared: ``experts``, ``gates``; task-specific: ``towers``."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_features: Sequence[int],
        tower_features: Sequence[int | Sequence[int]],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        gate_bias: bool = False,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        super().__init__(
            in_features,
            num_experts,
            expert_features,
            tower_features,
            num_tasks,
            rngs=rngs,
            num_gates=1,
            gate_bias=gate_bias,
            activation=activation,
        )
