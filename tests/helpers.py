"""Small models shared by the tests."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

import mtljax as mtl
from tests import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's Python subprocess: this checkout first on the path, CPU
    only, and the suite's XLA flags in place of the caller's (a device-count flag of the
    caller would override the subprocess's own ``set_cpu_devices``)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def tiny_model(num_tasks: int = 3, *, seed: int = 0, features=(5, 12, 7)):
    """An MLP encoder and stacked linear heads, per-task MSE; with encoder/heads split."""
    rngs = nnx.Rngs(seed)
    encoder = mtl.nn.MLP(features, rngs=rngs, final_activation=True)
    net = mtl.nn.HardSharing(encoder, mtl.nn.StackedLinear(features[-1], 2, num_tasks, rngs=rngs))

    def encode(m, b):
        return m.encode(b["x"])

    def heads(m, z, b):
        return jnp.mean((m.predict(z) - b["y"]) ** 2, axis=(1, 2))

    return mtl.from_nnx(
        net,
        task_names=tuple(f"t{i}" for i in range(num_tasks)),
        shared="encoder",
        encode=encode,
        heads=heads,
        last_shared="encoder/" + encoder.last_layer_path,
    )


def tiny_batch(num_tasks: int = 3, *, seed: int = 1, n: int = 16, d: int = 5):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {
        "x": jax.random.normal(kx, (n, d)),
        "y": jax.random.normal(ky, (num_tasks, n, 2)),
    }


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
    return float(max(jax.tree_util.tree_leaves(diffs)))
