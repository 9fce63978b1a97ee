"""Shared pieces of the built-in regression problems: an MLP trunk with stacked linear heads."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtljax._src.model import Model, Params, from_nnx
from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.mlp import MLP
from mtljax._src.nn.stacked import StackedLinear
from mtljax._src.problems.base import Problem


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


def regression_problem(
    name: str,
    *,
    trunk: Sequence[int],
    out_features: int,
    task_names: Sequence[str],
    seed: int,
    train: tuple[jax.Array, jax.Array],
    validation: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    batch_size: int,
    learning_rate: float,
    info: dict,
) -> Problem:
    """A :class:`Problem` over fixed ``(x, y)`` splits, with the trunk-and-heads model above:
    per-task MSE (lower is better) on the validation and test splits."""
    model, params = trunk_and_heads(trunk, out_features, task_names, seed)
    splits = {
        "validation": {"x": validation[0], "y": validation[1]},
        "test": {"x": test[0], "y": test[1]},
    }
    mse = jax.jit(model.losses)

    def evaluate_split(p, split):
        if split not in splits:
            raise ValueError(f"{name}: unknown split {split!r}; valid: validation, test")
        return {"mse": mse(p, splits[split])}

    def init_params(key):
        return trunk_and_heads(trunk, out_features, task_names, key)[1]

    return Problem(
        name=name,
        model=model,
        params=params,
        sample=batch_sampler(*train, batch_size),
        optimizer=optax.adam(learning_rate),
        steps=3000,
        evaluate=lambda p: evaluate_split(p, "test"),
        info=info,
        evaluate_split=evaluate_split,
        metrics={n: ("mse", False) for n in task_names},
        init_params=init_params,
        steps_per_epoch=-(-int(train[0].shape[0]) // int(batch_size)),
    )
