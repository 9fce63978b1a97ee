"""Homogeneous task heads stacked along a task axis and applied as one batched matmul."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import (
    check_out_features,
    check_positive,
    check_width,
    count_tuple,
    max_width,
)


def out_sizes(out_features: int | tuple[int, ...], num_tasks: int) -> tuple[int, ...]:
    """One output size per task (``out_features`` repeated when it is a single int)."""
    return out_features if isinstance(out_features, tuple) else (out_features,) * num_tasks


def output_mask(sizes: Sequence[int]) -> jax.Array:
    """``(T, max(sizes))`` float mask: 1 in task ``t``'s first ``sizes[t]`` columns, else 0."""
    return (jnp.arange(max(sizes)) < jnp.asarray(sizes)[:, None]).astype(jnp.float32)


def split_outputs(y: jax.Array, sizes: Sequence[int]) -> tuple[jax.Array, ...]:
    """Task ``t``'s own outputs ``y[t, …, :sizes[t]]`` from a stacked ``(T, …, max(sizes))``
    output, e.g. ``split_outputs(block(x), (10, 1))`` for heads of different widths."""
    widths = count_tuple(sizes, min_len=1)
    if widths is None:
        raise ValueError(f"split_outputs: sizes must list positive ints, got {sizes!r}")
    if y.ndim < 2 or y.shape[0] != len(widths) or y.shape[-1] < max(widths):
        raise ValueError(
            f"split_outputs: expected stacked outputs (T={len(widths)}, …, ≥ {max(widths)}) for "
            f"sizes {widths}, got shape {y.shape}"
        )
    return tuple(y[t, ..., :w] for t, w in enumerate(widths))


class StackedLinear(nnx.Module):
    """``T`` linear heads in one kernel ``(T, in, out)`` and bias ``(T, out)`` (none with
    ``use_bias=False``).

    Applied to a shared representation ``x: (..., in)`` it returns ``(T, ..., out)``; applied to
    per-task inputs ``x: (T, ..., in)`` with ``per_task=True`` it maps each task's input by its
    own head. Either way it is one batched matmul, not ``T`` small ones.

    ``out_features`` may give one width per task (``(10, 1)``: a 10-way classifier and a scalar
    regression head). The kernel is then ``(T, in, max)`` and task ``t``'s columns past its
    width are zero and masked (they output 0 and get no gradient); :attr:`out_sizes` lists the
    widths and :func:`split_outputs` slices each task's own columns.

    The parameters are ``param_dtype`` (float32 by default, as Flax's layers, also under
    ``jax_enable_x64``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
    ):
        check_positive("StackedLinear", in_features=in_features, num_tasks=num_tasks)
        in_features, num_tasks = int(in_features), int(num_tasks)
        out = check_out_features("StackedLinear", out_features, num_tasks)
        width = max_width(out)
        init = nnx.initializers.lecun_normal()
        kernel = jax.vmap(lambda k: init(k, (in_features, width), param_dtype))(
            jax.random.split(rngs.params(), num_tasks)
        )
        self.out_sizes = out_sizes(out, num_tasks)
        if self.padded:
            kernel = kernel * output_mask(self.out_sizes)[:, None, :].astype(param_dtype)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((num_tasks, width), param_dtype)) if use_bias else None
        self.num_tasks = num_tasks
        self.in_features = in_features

    @property
    def padded(self) -> bool:
        """Whether the tasks' output widths differ (the kernel is then padded and masked)."""
        return len(set(self.out_sizes)) > 1

    def __call__(self, x: jax.Array, *, per_task: bool = False) -> jax.Array:
        check_width("StackedLinear", x, self.in_features)
        kernel = self.kernel[...]
        mask = output_mask(self.out_sizes) if self.padded else None
        if mask is not None:
            kernel = kernel * mask[:, None, :].astype(kernel.dtype)
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
        if mask is not None:
            bias = bias * mask.astype(bias.dtype)
        return out + bias.reshape((bias.shape[0],) + (1,) * (out.ndim - 2) + bias.shape[1:])
