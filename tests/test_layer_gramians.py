"""Layer-subset Gramians: weights from the Gramian of a few shared layers, update over all.

The reference is written from the definition, in float64 numpy: the task Jacobian of the
selected leaves (from per-task gradients), its Gramian ``G_S = J_S J_Sᵀ``, and the update
``Jᵀw`` with the Jacobian of every shared parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src import engine, runner
from mtljax._src import tree as tree_lib
from tests.helpers import tiny_batch, tiny_model

# `--dist loadgroup` keeps this module on one worker: module fixtures.
pytestmark = pytest.mark.xdist_group("layer_gramians")

T = 3
# Every weighting method reads the subset's Gramian through the same engine path; these cover
# closed forms and an iterative solver at a small compile cost.
WEIGHTING = ("imtl_g", "aligned_mtl", "fairgrad")
LAYERS = ("last", ("encoder/layers/0",), ("encoder/layers/0/kernel", "encoder/layers/1/bias"))


@pytest.fixture(scope="module")
def setup64():
    with jax.enable_x64(True):
        model, params = tiny_model(T)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tiny_batch(T))
        yield model, params, batch


def _task_grads(model, params, batch):
    """Per-task gradients of (shared, specific), one ``jax.grad`` per task, as numpy."""
    out = []
    for i in range(T):
        g = jax.grad(lambda p, i=i: model.losses(p, batch)[i])(params)
        out.append(g)
    return out


def _rows(grads, part, paths_pred):
    rows = []
    for g in grads:
        flat = jax.tree_util.tree_flatten_with_path(getattr(g, part))[0]
        leaves = [
            np.asarray(x, np.float64).ravel() for p, x in flat if paths_pred(tree_lib.path_str(p))
        ]
        rows.append(np.concatenate(leaves) if leaves else np.zeros(0))
    return np.stack(rows)


def _selected(model, layers):
    return engine.subset_predicate(model, layers if layers == "last" else tuple(layers))


def test_subset_gramian_is_that_of_the_selected_leaves(setup64):
    model, params, batch = setup64
    grads = _task_grads(model, params, batch)
    g_all = _rows(grads, "shared", lambda p: True)
    for layers in LAYERS:
        j_s = _rows(grads, "shared", _selected(model, layers))
        assert 0 < j_s.shape[1] < g_all.shape[1]
        q = engine.compute(model, params, batch, needs="gramian", subset=layers)
        np.testing.assert_allclose(np.asarray(q.gramian), j_s @ j_s.T, rtol=1e-12, atol=1e-14)
        assert not np.allclose(j_s @ j_s.T, g_all @ g_all.T)
        w = jnp.asarray([0.3, -1.2, 2.0], jnp.float64)
        upd = q.weighted(w)
        np.testing.assert_allclose(
            _flat(upd.shared),
            g_all.T @ np.asarray(w),
            rtol=1e-12,
            atol=1e-14,
        )


def _flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("name", WEIGHTING)
def test_step_weights_from_the_subset_update_over_all(setup64, name):
    model, params, batch = setup64
    grads = _task_grads(model, params, batch)
    j_all = _rows(grads, "shared", lambda p: True)
    j_spec = _rows(grads, "specific", lambda p: True)
    layers = LAYERS[WEIGHTING.index(name) % len(LAYERS)]
    method = mtl.methods.get(name, params=layers)
    assert method.params == layers
    state = method.init(T)
    out, _, metrics = mtl.gradients(model, method, params, state, batch, jax.random.key(0))
    losses = model.losses(params, batch)
    j_s = _rows(grads, "shared", _selected(model, layers))
    w_ref, _ = method.weights(losses, jnp.asarray(j_s @ j_s.T), state, jax.random.key(0))
    w_ref = np.asarray(w_ref, np.float64)
    np.testing.assert_allclose(np.asarray(metrics["weights"]), w_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_flat(out.shared), j_all.T @ w_ref, rtol=1e-9, atol=1e-12)
    spec_w = w_ref if method.head_grads == "weighted" else np.ones(T)
    np.testing.assert_allclose(_flat(out.specific), j_spec.T @ spec_w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(metrics["grad_norms"]), np.linalg.norm(j_s, axis=1), rtol=1e-10
    )


def test_direction_and_loss_methods_refuse_a_subset():
    for name in ("graddrop", "config"):
        with pytest.raises(ValueError, match="every row of the task Jacobian"):
            mtl.on_layers(mtl.methods.get(name), "last")
    with pytest.raises(ValueError, match="every row of the task Jacobian"):
        mtl.methods.get("graddrop", params="last")
    for name in ("ew", "uw"):
        with pytest.raises(ValueError, match="losses only"):
            mtl.on_layers(mtl.methods.get(name), "last")


def test_invalid_layer_selectors():
    m = mtl.methods.upgrad()
    for bad in ("encoder/layers/0", (), ("",), (3,), None):
        with pytest.raises(ValueError, match="params must be"):
            mtl.on_layers(m, bad)
    assert mtl.on_layers(m, ["/encoder/layers/0/"]).params == ("encoder/layers/0",)
    assert mtl.on_layers(m, mtl.nn.PathPrefixes("a", "b/c")).params == ("a", "b/c")
    assert dict(mtl.on_layers(m, "last").hparams)["params"] == "last"
    assert mtl.on_layers(m, "all").params == "all"


def test_prefixes_matching_nothing_are_an_error():
    model, params = tiny_model(T)
    method = mtl.on_layers(mtl.methods.upgrad(), ("encoder/nothing",))
    with pytest.raises(ValueError, match="match no shared parameter"):
        mtl.gradients(model, method, params, method.init(T), tiny_batch(T), None)


def test_train_step_and_cli_accept_the_selector():
    model, params = tiny_model(T)
    args = runner.parse_method_args(["params=('encoder/layers/0',)"])
    method = mtl.methods.get("mgda", **args)
    assert method.params == ("encoder/layers/0",)
    assert mtl.methods.get("upgrad", **runner.parse_method_args(["params=last"])).params == "last"
    mtl.make_train_step(model, method, optax.sgd(1e-2))  # the step accepts the selector
    with pytest.raises(ValueError, match="last_shared"):
        bare = mtl.Model(model.task_names, model.losses_fn)
        mtl.make_train_step(bare, mtl.on_layers(method, "last"), optax.sgd(1e-2))


def test_feature_level_refuses_a_layer_subset():
    """A layer subset selects shared parameters; the feature-level Jacobian is w.r.t. the
    representation, so the step refuses the subset instead of ignoring it. GradNorm's paper
    takes the last shared layer (``Method.paper_params``), for which the representation stands
    at feature level: its default runs there, any other subset is refused as for the others."""
    model, params = tiny_model(T)
    assert model.has_features
    opt = optax.sgd(0.1)
    for layers in ("last", ("encoder/layers/0",)):
        method = mtl.on_layers(mtl.methods.get("upgrad"), layers)
        with pytest.raises(ValueError, match="mode='feature' cannot use"):
            mtl.make_train_step(model, method, opt, mode="feature")
        mtl.make_train_step(model, method, opt)  # parameter level: fine
    gradnorm = mtl.methods.get("gradnorm")
    assert gradnorm.paper_params == "last" and mtl.methods.get("upgrad").paper_params == "all"
    subset = mtl.on_layers(gradnorm, ("encoder/layers/0",))
    with pytest.raises(ValueError, match="gradnorm is set to a layer subset"):
        mtl.make_train_step(model, subset, opt, mode="feature")
    mtl.make_train_step(model, mtl.methods.get("gradnorm", params="all"), opt, mode="feature")
    step = mtl.make_train_step(model, gradnorm, opt, mode="feature")
    state = mtl.init_train_state(model, params, gradnorm, opt, jax.random.key(0))
    state, metrics = step(state, tiny_batch(T))
    assert np.all(np.isfinite(np.asarray(metrics["losses"])))
