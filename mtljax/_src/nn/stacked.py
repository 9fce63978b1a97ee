"""Homogeneous task heads stacked along a task axis and applied as one batched matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import check_positive, check_width


class StackedLinear(nnx.Module):
    """``T`` linear heads in one kernel ``(T, in, out)`` and bias ``(T, out)`` (none with
    ``use_bias=False``).

    Applied to a shared representation ``x: (..., in)`` it returns ``(T, ..., out)``; applied to
    per-task inputs ``x: (T, ..., in)`` with ``per_task=True`` it maps each task's input by its
    own head. Either way it is one batched matmul, not ``T`` small ones.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
    ):
        check_positive(
            "StackedLinear",
            in_features=in_features,
            out_features=out_features,
            num_tasks=num_tasks,
        )
        in_features, out_features, num_tasks = int(in_features), int(out_features), int(num_tasks)
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(
            jax.vmap(lambda k: init(k, (in_features, out_features)))(
                jax.random.split(rngs.params(), num_tasks)
            )
        )
        self.bias = nnx.Param(jnp.zeros((num_tasks, out_features))) if use_bias else None
        self.num_tasks = num_tasks
        self.in_features = in_features

    def __call__(self, x: jax.Array, *, per_task: bool = False) -> jax.Array:
        check_width("StackedLinear", x, self.in_features)
        kernel = self.kernel[...]
        if per_task:
            if x.shape[0] != self.num_tasks:
                raise ValueError(
                    f"StackedLinear: per-task input needs a leading axis of {self.num_tasks} "
                    f"tasks, got shape {x.shape}"
                )
            out = jnp.einsum("t...i,tio->t...o", x, kernel)
        else:
            out = jnp.einsum("...i,tio->t...o", x, kernel)
        if self.bias is None:
            return out
        bias = self.bias[...]
        return out + bias.reshape((bias.shape[0],) + (1,) * (out.ndim - 2) + bias.shape[1:])
