"""Per-task inputs (each task its own examples, batch ``(T, B, ...)``): training at parameter
level, and the warning at feature level, where each head reads only its own slice of the
representation so that every task cosine is 0 by construction."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtljax as mtl
from tests import helpers

T, B, D = 3, 8, 5


def _per_task_model():
    class PerTask(nnx.Module):
        def __init__(self, rngs):
            self.encoder = mtl.nn.MLP((D, 8), rngs=rngs, final_activation=True)
            self.heads = mtl.nn.StackedLinear(8, 1, T, rngs=rngs)

    return mtl.from_nnx(
        PerTask(nnx.Rngs(0)),
        task_names=("a", "b", "c"),
        shared="encoder",
        encode=lambda m, b: m.encoder(b["x"]),  # (T, B, 8): task t's examples only in row t
        heads=lambda m, z, b: jnp.mean((m.heads(z, per_task=True)[..., 0] - b["y"]) ** 2, 1),
    )


def _batch(seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(kx, (T, B, D)), "y": jax.random.normal(ky, (T, B))}


def _run(model, params, batch, name, mode, steps=1):
    method, opt = mtl.methods.get(name), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, mode=mode)
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


def _off_diagonal(cos):
    return np.asarray(cos)[~np.eye(T, dtype=bool)]


def test_feature_level_on_per_task_inputs_warns_once_and_names_the_fix():
    model, params = _per_task_model()
    with pytest.warns(mtl.PerTaskFeaturesWarning, match=r"mgda sees no conflict.*mode='parameter'"):
        state, metrics = _run(model, params, _batch(), "mgda", "feature")
    # What the warning says: orthogonal by construction, so MGDA-UB weights ∝ 1/‖∇ᵢ‖².
    assert np.all(_off_diagonal(metrics["cosines"]) == 0)
    inv = 1.0 / np.asarray(metrics["grad_norms"], np.float64) ** 2
    np.testing.assert_allclose(metrics["weights"], inv / inv.sum(), rtol=1e-4)
    # Once per step function: the following steps run without it.
    method, opt = mtl.methods.mgda(), optax.sgd(1e-2)
    step = mtl.make_train_step(model, method, opt, mode="feature")
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    with pytest.warns(mtl.PerTaskFeaturesWarning):
        state, _ = step(state, _batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error", mtl.PerTaskFeaturesWarning)
        step(state, _batch(1))


def test_parameter_level_on_per_task_inputs_sees_the_tasks_interact():
    model, params = _per_task_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", mtl.PerTaskFeaturesWarning)
        state, metrics = _run(model, params, _batch(), "mgda", "parameter", steps=2)
        # A losses-only method at feature level reads no cosine: nothing to warn about.
        _run(model, params, _batch(), "ew", "feature")
    assert np.max(np.abs(_off_diagonal(metrics["cosines"]))) > 1e-3
    assert int(state.skipped) == 0


def test_a_shared_representation_at_feature_level_does_not_warn():
    model, params = helpers.tiny_model(T)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mtl.PerTaskFeaturesWarning)
        _, metrics = _run(model, params, helpers.tiny_batch(T), "mgda", "feature")
    assert np.max(np.abs(_off_diagonal(metrics["cosines"]))) > 1e-3
