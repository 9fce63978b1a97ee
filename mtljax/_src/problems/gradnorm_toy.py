"""GradNorm's synthetic regression tasks (Chen et al. 2018, §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src.problems import _regression
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import register


def targets(x: jax.Array, b: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """``fᵢ(x) = σᵢ tanh((B + εᵢ) x)`` for every task: ``(N, in) -> (T, N, out)``."""
    return sigma[:, None, None] * jnp.tanh(
        jnp.einsum("oi,ni->no", b, x)[None] + jnp.einsum("toi,ni->tno", eps, x)
    )


@register("gradnorm_toy")
def gradnorm_toy(
    *,
    seed: int = 0,
    num_tasks: int = 10,
    sigmas: tuple[float, ...] | None = None,
    in_features: int = 250,
    out_features: int = 100,
    hidden: int = 100,
    num_train: int = 10_000,
    num_test: int = 2_000,
    num_validation: int | None = None,
    batch_size: int = 100,
    learning_rate: float = 1e-3,
) -> Problem:
    """GradNorm's toy: ``T`` regression tasks ``fᵢ(x) = σᵢ tanh((B + εᵢ)x)``.

    Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
    Multitask Networks", ICML 2018, §4: inputs of dimension 250, outputs of dimension 100,
    ``B`` and ``εᵢ`` with i.i.d. entries from N(0, 10) and N(0, 3.5) (variances), squared loss,
    a 4-layer fully-connected ReLU trunk of 100 units and one affine head per task. The scales
    ``σᵢ`` set each task's loss and gradient magnitude; by default ``σᵢ = i`` for
    ``i = 1..T``. GradNorm's behaviour to reproduce: its final weights are ordered inversely
    to ``σᵢ``.

    Held-out splits: ``"validation"`` (``num_validation`` points, default ``num_test``) and
    ``"test"``, scored by each task's MSE (lower is better).
    """
    if num_tasks < 2:
        raise ValueError(f"gradnorm_toy: num_tasks must be ≥ 2, got {num_tasks}")
    sigma = (
        np.arange(1, num_tasks + 1, dtype=np.float32)
        if sigmas is None
        else np.asarray(sigmas, np.float32)
    )
    if sigma.shape != (num_tasks,) or not np.all(sigma > 0):
        raise ValueError(f"gradnorm_toy: need {num_tasks} positive sigmas, got {sigmas}")
    kb, ke, kx, kt = jax.random.split(jax.random.key(seed), 4)
    b = jnp.sqrt(10.0) * jax.random.normal(kb, (out_features, in_features))
    eps = jnp.sqrt(3.5) * jax.random.normal(ke, (num_tasks, out_features, in_features))
    sigma_j = jnp.asarray(sigma)
    x_train = jax.random.normal(kx, (num_train, in_features))
    x_test = jax.random.normal(kt, (num_test, in_features))
    y_train = targets(x_train, b, eps, sigma_j)
    y_test = targets(x_test, b, eps, sigma_j)
    n_val = num_test if num_validation is None else int(num_validation)
    x_val = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1), (n_val, in_features))
    y_val = targets(x_val, b, eps, sigma_j)
    return _regression.regression_problem(
        "gradnorm_toy",
        trunk=(in_features, hidden, hidden, hidden, hidden),
        out_features=out_features,
        task_names=tuple(f"task{i}" for i in range(num_tasks)),
        seed=seed,
        train=(x_train, y_train),
        validation=(x_val, y_val),
        test=(x_test, y_test),
        batch_size=batch_size,
        learning_rate=learning_rate,
        info={"sigma": sigma.tolist()},
    )
