"""Homogeneous per-task (or per-expert) MLPs stacked along a leading axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx

from mtljax._src.nn.checks import check_positive, check_stacked_features, check_width
from mtljax._src.nn.stacked import StackedLinear


class StackedMLP(nnx.Module):
    """``n`` MLPs of identical shape stacked along a leading axis, applied as batched matmuls.

    Layer ``l`` is a :class:`StackedLinear` with kernel ``(n, f_l, f_{l+1})`` at path
    ``layers/l``. Applied to a shared input ``x: (..., f_0)`` it returns ``(n, ..., f_L)``;
    applied to stacked inputs ``x: (n, ..., f_0)`` with ``per_task=True`` each stack member
    maps its own input. No activation after the last layer unless ``final_activation``.

    The last size may give one width per stack member (task towers with heads of different
    widths, e.g. ``(16, 8, (10, 1))``): the last layer is then a padded :class:`StackedLinear`
    whose columns past each member's width output 0; :attr:`out_sizes` lists the widths and
    :func:`mtljax.nn.split_outputs` slices each member's own columns.

    Used for task towers (``n = T``) and for mixture-of-experts experts (``n = E``).
    """

    def __init__(
        self,
        features: Sequence[int],
        num_stacks: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        final_activation: bool = False,
    ):
        check_positive("StackedMLP", num_stacks=num_stacks)
        feats = check_stacked_features("StackedMLP", features, num_stacks)
        self.layers = nnx.List(
            [
                StackedLinear(a, b, num_stacks, rngs=rngs)
                for a, b in zip(feats[:-1], feats[1:], strict=True)
            ]
        )
        self.features = feats
        self.out_sizes = self.layers[-1].out_sizes
        self.num_stacks = num_stacks
        self.activation = activation
        self.final_activation = final_activation

    def __call__(self, x: jax.Array, *, per_task: bool = False) -> jax.Array:
        check_width("StackedMLP", x, self.features[0])
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, per_task=per_task or i > 0)
            if i < n - 1 or self.final_activation:
                x = self.activation(x)
        return x
