"""Regression tasks with known noise levels, for uncertainty weighting (Kendall et al. 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src.problems import _regression
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import register


@register("uw_noise")
def uw_noise(
    *,
    seed: int = 0,
    noise_std: tuple[float, ...] = (0.1, 0.3, 0.6, 1.0),
    in_features: int = 16,
    hidden: int = 64,
    num_train: int = 20_000,
    num_test: int = 4_000,
    num_validation: int | None = None,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
) -> Problem:
    """Regression tasks that share structure but differ in their noise level.

    ``yᵢ = aᵢᵀ tanh(Wx) + σᵢ ξ`` with ``x ~ N(0, I)``, ``ξ ~ N(0, 1)``, a shared random ``W``
    (16 → 16) and random unit ``aᵢ``. The best achievable MSE of task ``i`` is ``σᵢ²``: this is
    the homoscedastic (task-dependent) noise of Kendall, Gal & Cipolla, "Multi-Task Learning
    Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018. Behaviour
    to reproduce: uncertainty weighting's learned ``σᵢ² = e^{sᵢ}`` tracks each task's MSE.

    Held-out splits: ``"validation"`` (``num_validation`` points, default ``num_test``) and
    ``"test"``, scored by each task's MSE (lower is better).
    """
    sigma = np.asarray(noise_std, np.float32)
    if sigma.ndim != 1 or sigma.size < 2 or not np.all(sigma >= 0):
        raise ValueError(f"uw_noise: need ≥ 2 non-negative noise levels, got {noise_std}")
    t = sigma.size
    kw, ka, kx, kn, kxt, knt = jax.random.split(jax.random.key(seed), 6)
    w = jax.random.normal(kw, (in_features, in_features)) / jnp.sqrt(in_features)
    a = jax.random.normal(ka, (t, in_features))
    a = a / jnp.linalg.norm(a, axis=1, keepdims=True)

    def data(kx_, kn_, n):
        x = jax.random.normal(kx_, (n, in_features))
        clean = jnp.einsum("ti,ni->tn", a, jnp.tanh(x @ w.T))
        y = clean + jnp.asarray(sigma)[:, None] * jax.random.normal(kn_, (t, n))
        return x, y[..., None]

    x_train, y_train = data(kx, kn, num_train)
    x_test, y_test = data(kxt, knt, num_test)
    kxv, knv = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    x_val, y_val = data(kxv, knv, num_test if num_validation is None else int(num_validation))
    return _regression.regression_problem(
        "uw_noise",
        trunk=(in_features, hidden, hidden),
        out_features=1,
        task_names=tuple(f"noise{s:g}" for s in sigma),
        seed=seed,
        train=(x_train, y_train),
        validation=(x_val, y_val),
        test=(x_test, y_test),
        batch_size=batch_size,
        learning_rate=learning_rate,
        info={"noise_std": sigma.tolist(), "noise_var": (sigma**2).tolist()},
    )
