"""Shared pieces of the built-in regression problems: an MLP trunk with stacked linear heads."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.model import Model, Params, from_nnx
from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.mlp import MLP
from mtljax._src.nn.stacked import StackedLinear


def mse_per_task(pred: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of each task: ``pred, y: (T, B, out) -> f32[T]``."""
    return jnp.mean((pred - y) ** 2, axis=tuple(range(1, pred.ndim)))


def trunk_and_heads(
    trunk: Sequence[int], out_features: int, task_names: Sequence[str], seed: int
) -> tuple[Model, Params]:
    """Hard sharing: ``MLP(trunk)`` with ReLU after every layer, then one linear head per task.

    Batches are ``{"x": (B, in), "y": (T, B, out)}``; losses are per-task MSE. The last shared
    layer (GradNorm's default subset) is the trunk's last linear layer.
    """
    rngs = nnx.Rngs(seed)
    encoder = MLP(trunk, rngs=rngs, final_activation=True)
    net = HardSharing(encoder, StackedLinear(trunk[-1], out_features, len(task_names), rngs=rngs))

    def encode(m, batch):
        return m.encode(batch["x"])

    def heads(m, z, batch):
        return mse_per_task(m.predict(z), batch["y"])

    return from_nnx(
        net,
        task_names=task_names,
        shared="encoder",
        encode=encode,
        heads=heads,
        last_shared="encoder/" + encoder.last_layer_path,
    )


def batch_sampler(x: jax.Array, y: jax.Array, batch_size: int):
    """``key -> {"x", "y"}``: a uniform minibatch (with replacement) of a fixed dataset."""

    def sample(key):
        idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
        return {"x": x[idx], "y": y[:, idx]}

    return sample
