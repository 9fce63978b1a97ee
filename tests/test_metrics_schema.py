"""One metrics schema: every method's train step reports the same keys, shapes and dtypes, with
what a method does not compute filled in by a fixed rule (NaN, -1, True)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src.train import METHOD_METRICS
from tests import helpers

T = 3


def _method(name, like):
    kwargs = {"weights": [1.0] * T} if name == "fixed" else {}
    return mtl.methods.get(name, like=like, **kwargs)


def _schema(name, **options):
    """``{key: (shape, dtype)}`` of the metrics of ``name``'s train step (traced, not run)."""
    model, params = helpers.tiny_model(T)
    like = params.shared
    if options.get("mode") == "feature":  # a state shaped like the gradients: the representation
        like = jax.eval_shape(model.encode_fn, params.shared, helpers.tiny_batch(T))
    method = _method(name, like)
    opt = optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, **options)
    _, metrics = jax.eval_shape(step.jitted, state, helpers.tiny_batch(T))
    return {k: (v.shape, v.dtype) for k, v in metrics.items()}


_REFERENCE: dict = {}


def _reference(**options):
    key = tuple(sorted(options.items()))
    if key not in _REFERENCE:
        _REFERENCE[key] = _schema("ew", **options)
    return _REFERENCE[key]


@pytest.mark.parametrize("name", mtl.methods.names())
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_every_method_reports_the_same_metrics(name, mode):
    options = {"mode": mode}
    got = _schema(name, **options)
    assert got == _reference(**options), name
    assert set(METHOD_METRICS) <= set(got)
    assert got["weights"] == ((T,), np.float32) and got["cosines"] == ((T, T), np.float32)
    assert got["solver_iterations"] == ((), np.int32)
    assert got["solver_converged"] == ((), np.bool_)


def test_options_add_the_same_keys_for_every_method():
    options = {"unconverged": "skip", "nonfinite": "raise"}
    for name in ("ew", "config", "mgda"):
        got = _schema(name, **options)
        assert got == _reference(**options), name
        assert "applied" in got and "finite" in got


def _one_step(name):
    model, params = helpers.tiny_model(T)
    method = _method(name, params.shared)
    opt = optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    _, metrics = mtl.make_train_step(model, method, opt)(state, helpers.tiny_batch(T))
    return {k: np.asarray(v) for k, v in metrics.items()}


def test_what_a_method_does_not_compute_is_filled_by_the_rule():
    ew, config, mgda = (_one_step(n) for n in ("ew", "config", "mgda"))
    # A losses-only method: no gradient, no solve.
    assert np.isnan(ew["grad_norms"]).all() and np.isnan(ew["cosines"]).all()
    assert ew["rows_finite"].all()
    assert int(ew["solver_iterations"]) == -1 and bool(ew["solver_converged"])
    assert np.isnan(ew["solver_residual"])
    np.testing.assert_array_equal(ew["weights"], 1.0)
    # A direction method (ConFIG): no weights; its gradients are real.
    assert np.isnan(config["weights"]).all()
    assert np.isfinite(config["grad_norms"]).all() and (config["grad_norms"] > 0).all()
    np.testing.assert_allclose(np.diagonal(config["cosines"]), 1.0, rtol=1e-5)
    assert int(config["solver_iterations"]) == -1 and config["rows_finite"].all()
    # A solver: its own figures.
    assert int(mgda["solver_iterations"]) >= 1 and np.isfinite(mgda["solver_residual"])
    np.testing.assert_allclose(mgda["weights"].sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ew["losses"], mgda["losses"], rtol=1e-6)


def test_a_method_without_a_solver_is_not_skipped_as_unconverged():
    model, params = helpers.tiny_model(T)
    method, opt = mtl.methods.ew(), optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, unconverged="raise")
    new, metrics = step(state, helpers.tiny_batch(T))
    assert bool(metrics["applied"]) and int(new.skipped) == 0
