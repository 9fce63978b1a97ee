"""The layer-wise Gramian: exact against the Jacobian's Gramian, and free of per-task weight
gradients for the dense layers it handles.

References: ``base.gramian`` of the Jacobian from ``jax.jacrev``, in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jcore

import mtljax as mtl
from mtljax import nn as mnn
from mtljax._src import engine
from mtljax._src import gramian_layerwise as gl
from tests import test_nn
from tests.helpers import max_abs_diff, tiny_batch, tiny_model

# Every block that shares parameters (soft sharing has none: its Gramian is zero; convolutions:
# ResNet, below).
BLOCKS = [n for n, s in test_nn.SPECS.items() if s.shares]
# Blocks whose shared parameters are all convolutions (they take the exact path).
_CONV_ONLY = ("mtan", "mtan_task_extractors")


def _f64(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _losses_fn(model, batch):
    fns = model.step_fns()
    ctx = fns.enter(model.initial_state, None)
    return lambda shared, specific: fns.losses(shared, specific, batch, ctx)


def _check_exact(f, shared, specific, atol_rel=1e-11):
    g = jax.jit(lambda s, sp: mtl.gramian_layerwise(f, s, sp, policy="layerwise", has_aux=True)[1])
    jac = jax.jit(jax.jacrev(lambda s, sp: f(s, sp)[0]))(shared, specific)
    ref = np.asarray(mtl.gramian(jac), np.float64)
    g = g(shared, specific)
    scale = max(np.max(np.abs(ref)), 1e-300)
    np.testing.assert_allclose(np.asarray(g), ref, rtol=0, atol=atol_rel * scale)
    return gl.plan(lambda s, sp: f(s, sp)[0], shared, specific, policy="layerwise")


@pytest.mark.parametrize("name", BLOCKS)
def test_every_block_is_exact(name):
    with jax.enable_x64(True):
        spec, _, batch, model, params = test_nn._setup(name)
        params, batch = _f64(test_nn._perturb(params)), _f64(batch)
        plan = _check_exact(_losses_fn(model, batch), params.shared, params.specific)
    assert any(p.layerwise for p in plan.leaves) == (name not in _CONV_ONLY), name


def test_resnet_with_batch_norm_is_exact_and_convolutions_take_the_exact_path():
    with jax.enable_x64(True):
        net = mnn.HardSharing(
            mnn.ResNet(2, rngs=nnx.Rngs(0), widths=(3, 4), blocks=(1, 1), strides=(1, 2)),
            mnn.StackedLinear(4, 2, 3, rngs=nnx.Rngs(1)),
        )
        model, params = mnn.from_block(
            net,
            task_names=("a", "b", "c"),
            losses=lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2, axis=(1, 2)),
        )
        x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
        batch = _f64({"x": x, "y": jax.random.normal(jax.random.key(1), (3, 4, 2))})
        params = _f64(params)
        plan = _check_exact(_losses_fn(model, batch), params.shared, params.specific)
    conv = [p for p in plan.leaves if p.path.endswith("kernel")]
    assert conv and not any(p.layerwise for p in conv)
    # gramian="auto" keeps the Jacobian path: the extra backward pass through the convolutions
    # is not counted, and no block is cheaper layer-wise.
    assert not engine.layerwise_pays(_losses_fn(model, batch), params.shared, params.specific)


def test_weight_batch_axes_several_uses_and_either_operand():
    """Stacked experts (a batch axis of the weight), a weight applied twice (its blocks add up
    across uses) and a weight as the left operand."""
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 6)
        p = {
            "experts": jax.random.normal(k[0], (3, 5, 4)),  # [e, i, o]
            "twice": jax.random.normal(k[1], (4, 4)),
            "left": jax.random.normal(k[2], (6, 4)),  # used as W @ hᵀ
        }
        x = jax.random.normal(k[3], (3, 7, 5))  # [e, b, i]
        targets = jax.random.normal(k[4], (4, 6, 7))

        def f(p, x):
            h = jnp.tanh(jnp.einsum("ebi,eio->ebo", x, p["experts"])).sum(0)  # [b, o]
            h = jnp.tanh(h @ p["twice"]) @ p["twice"]
            z = jnp.tanh(p["left"] @ h.T)  # [6, b]
            return jnp.mean((z[None] - targets) ** 2 * jnp.arange(1.0, 5.0)[:, None, None], (1, 2))

        g = jax.jit(lambda p, x: mtl.gramian_layerwise(f, p, x, policy="layerwise")[1])(p, x)
        jac = jax.jit(jax.jacrev(f))(p, x)
        ref = np.asarray(mtl.gramian(jac, 4))
        np.testing.assert_allclose(np.asarray(g), ref, rtol=0, atol=1e-11 * np.abs(ref).max())
        plan = gl.plan(f, p, x, policy="layerwise")
    assert all(leaf.layerwise for leaf in plan.leaves)
    assert len([u for u in plan.uses if u.leaf == 2]) == 2  # "twice" (leaves sorted by key)


def test_a_weight_cast_to_the_compute_dtype_is_still_a_dense_weight():
    """Mixed precision casts the weights before the product: the cast weight is the weight."""
    with jax.enable_x64(True):
        f, p, x = _dense()
        p, x = _f64(p), _f64(x)

        def cast(p, x):
            q = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p)
            return f(q, x.astype(jnp.float32)).astype(jnp.float64)

        _, g = mtl.gramian_layerwise(cast, p, x, policy="layerwise")
        ref = np.asarray(mtl.gramian(jax.jacrev(cast)(p, x), 3))
        assert gl.plan(cast, p, x, policy="layerwise").leaves[1].layerwise  # leaves: b, w
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def _dense(t=3, d_in=11, d_out=13, n=4):
    k = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(k[0], (d_in, d_out)), "b": jnp.zeros(d_out)}
    x = jax.random.normal(k[1], (n, d_in))
    y = jax.random.normal(k[2], (t, n, d_out))

    def f(p, x):
        return jnp.mean((jnp.tanh(x @ p["w"] + p["b"])[None] - y) ** 2, axis=(1, 2))

    return f, p, x


def _shapes_in(jaxpr) -> set:
    out = set()
    for eqn in jaxpr.eqns:
        out |= {tuple(v.aval.shape) for v in eqn.outvars}
        for sub in jcore.jaxprs_in_params(eqn.params):
            out |= _shapes_in(sub)
    return out


def test_no_per_task_weight_gradient_is_formed():
    f, p, x = _dense()
    per_task = {(3, 11, 13), (3, 13, 11)}
    lw = jax.make_jaxpr(lambda p: mtl.gramian_layerwise(f, p, x, policy="layerwise"))(p)
    ex = jax.make_jaxpr(lambda p: mtl.gramian_layerwise(f, p, x, policy="exact"))(p)
    assert per_task & _shapes_in(ex.jaxpr)  # the check can fail: the exact path forms them
    assert not per_task & _shapes_in(lw.jaxpr)
    # in a train step's engine (the update's VJP from the same pass): none after compilation
    model = mtl.Model(("a", "b", "c"), lambda s, sp, b: f(s, b))
    params = mtl.Params(p, {})

    def hlo(gramian):
        def fn(q):
            out = engine.compute(model, q, x, needs="gramian", gramian=gramian)
            return out.gramian, out.weighted(jnp.ones(3))

        return jax.jit(fn).lower(params).compile().as_text()

    assert "f32[3,11,13]" in hlo("jacobian")
    assert "f32[3,11,13]" not in hlo("layerwise") and "f32[3,13,11]" not in hlo("layerwise")


def test_auto_chooses_by_multiply_adds():
    f, p, x = _dense(t=3, d_in=64, d_out=64, n=4)  # N = 4 rows, wide layer: layer-wise
    plan = gl.plan(f, p, x)
    w = next(leaf for leaf in plan.leaves if leaf.path == "w")
    assert w.layerwise and w.flops_layerwise < w.flops_exact
    f, p, x = _dense(t=3, d_in=4, d_out=4, n=64)  # many rows, narrow layer: exact
    plan = gl.plan(f, p, x)
    w = next(leaf for leaf in plan.leaves if leaf.path == "w")
    assert not w.layerwise and w.flops_layerwise > w.flops_exact


def test_auto_at_parameter_level_weighs_the_extra_backward_pass():
    # Over all shared parameters the layer-wise Gramian costs one more backward pass (the
    # update ∇(w·L)) than the formed Jacobian (Jᵀw): the engine takes it only where its blocks
    # save more than that pass. Wide layers, few rows, many tasks: layer-wise; two tasks:
    # the Jacobian. The choice shows in what comes back (no Jacobian on the layer-wise path).
    def chosen(t, n, width):
        f, p, x = _dense(t=t, d_in=width, d_out=width, n=n)
        model = mtl.Model(tuple(f"t{i}" for i in range(t)), lambda s, sp, b: f(s, b))
        q = engine.compute(model, mtl.Params(p, {}), x, needs="gramian", gramian="auto")
        pays = engine.layerwise_pays(lambda s, sp: f(s, x), p, {})
        assert (q.jacobian is None) == pays
        ref = engine.compute(model, mtl.Params(p, {}), x, needs="gramian", gramian="jacobian")
        np.testing.assert_allclose(q.gramian, ref.gramian, rtol=1e-4, atol=1e-5)
        return pays

    assert chosen(t=40, n=16, width=128)
    assert not chosen(t=2, n=64, width=128)
    # a chunk size caps the Jacobian's memory: "auto" keeps the chunked Jacobian path then
    f, p, x = _dense(t=40, d_in=128, d_out=128, n=16)
    model = mtl.Model(tuple(f"t{i}" for i in range(40)), lambda s, sp, b: f(s, b))
    q = engine.compute(model, mtl.Params(p, {}), x, needs="gramian", gramian="auto", chunk_size=8)
    assert q.jacobian is not None
    assert not chosen(t=40, n=256, width=8)
    # The step cost benchmark's MLP (B = 256, H = 512): layer-wise from T = 10, not at T = 2.
    for t, expected in ((2, False), (10, True), (40, True)):
        f, p, x = _dense(t=t, d_in=512, d_out=512, n=256)
        assert engine.layerwise_pays(lambda s, sp, f=f, x=x: f(s, x), p, {}) == expected, t


def test_train_step_layerwise_equals_jacobian_path():
    model, params = tiny_model(3, features=(5, 48, 48))
    batch = tiny_batch(3, n=8)
    method, opt = mtl.methods.imtl_g(), optax.sgd(0.1)
    plan = gl.plan(
        lambda s, sp: model.losses(mtl.Params(s, sp), batch), params.shared, params.specific
    )
    assert any(p.layerwise for p in plan.leaves)  # "auto" takes the layer-wise path here
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    out = {}
    for path in ("jacobian", "layerwise"):
        step = mtl.make_train_step(model, method, opt, gramian=path)
        out[path] = step(state, batch)
    (ref, m_ref), (new, m_new) = out["jacobian"], out["layerwise"]
    np.testing.assert_allclose(m_new["weights"], m_ref["weights"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m_new["grad_norms"], m_ref["grad_norms"], rtol=1e-4)
    leaves = zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(ref.params), strict=True
    )
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert bool(m_new["finite"])
    # with a layer subset: the layer-wise Gramian of that subset
    last = [
        engine.compute(model, params, batch, needs="gramian", subset="last", gramian=path).gramian
        for path in ("jacobian", "layerwise")
    ]
    np.testing.assert_allclose(last[1], last[0], rtol=1e-4, atol=1e-6 * float(last[0].max()))


def test_layerwise_refuses_what_it_cannot_serve():
    model, params = tiny_model(3)
    with pytest.raises(ValueError, match="direction from the full Jacobian"):
        mtl.make_train_step(model, mtl.methods.graddrop(), optax.sgd(0.1), gramian="layerwise")
    with pytest.raises(ValueError, match="losses only"):
        mtl.make_train_step(model, mtl.methods.ew(), optax.sgd(0.1), gramian="layerwise")
    with pytest.raises(ValueError, match="'jacobian' or 'layerwise'"):
        mtl.make_train_step(model, mtl.methods.mgda(), optax.sgd(0.1), gramian="chunks")


# Feature level: the Gramian of the representation Jacobian J_z from the heads' dense uses of z.

_D, _N, _TF = 24, 16, 4


def _feature_model(heads_kind):
    """An encoder to ``z`` (N × D) and heads that use ``z``: stacked (one matmul), separate
    (one matmul per task: ``T`` dense uses of ``z``), or after a nonlinearity (no dense use)."""
    k = jax.random.split(jax.random.key(3), 4)
    shared = {"w": jax.random.normal(k[0], (5, _D)), "b": jax.random.normal(k[1], (_D,))}
    w = jax.random.normal(k[2], (_D, _TF)) / np.sqrt(_D)
    specific = (
        [{"w": w[:, i : i + 1]} for i in range(_TF)] if heads_kind == "separate" else {"w": w}
    )
    batch = {"x": jax.random.normal(k[3], (_N, 5)), "y": jnp.cos(jnp.arange(_N * _TF))}
    batch["y"] = batch["y"].reshape(_N, _TF)

    def encode(s, b):
        return jax.nn.relu(b["x"] @ s["w"] + s["b"])

    def heads(sp, z, b):
        if heads_kind == "separate":
            pred = jnp.concatenate([z @ h["w"] for h in sp], axis=1)
        else:
            pred = (jnp.tanh(z) if heads_kind == "nonlinear" else z) @ sp["w"]
        return jnp.mean((pred - b["y"]) ** 2, axis=0)

    names = tuple(f"t{i}" for i in range(_TF))
    return mtl.Model.from_encoder_heads(encode, heads, names), mtl.Params(shared, specific), batch


@pytest.mark.parametrize("heads_kind", ["stacked", "separate", "nonlinear"])
def test_feature_level_layerwise_gramian_equals_the_mapped_vjps(heads_kind):
    with jax.enable_x64(True):
        model, params, batch = _feature_model(heads_kind)
        params, batch = _f64(params), _f64(batch)
        z = model.encode_fn(params.shared, batch)
        _, head_vjp = jax.vjp(lambda z_: model.heads_fn(params.specific, z_, batch), z)
        jz = jax.vmap(lambda c: head_vjp(c)[0])(jnp.eye(_TF))  # the plain T mapped VJPs
        ref = np.einsum("tnd,und->tu", np.asarray(jz), np.asarray(jz))
        w = jnp.array([0.4, -1.0, 2.0, 0.5])

        def quantities(p, b):
            q = engine.compute(model, p, b, needs="gramian", mode="feature", gramian="layerwise")
            return q.gramian, q.rows_finite, q.jacobian, q.vjp(w)

        gram, rows_ok, jac, grads = jax.jit(quantities)(params, batch)
        np.testing.assert_allclose(np.asarray(gram), ref, rtol=0, atol=1e-12 * ref.max())
        assert jac is None and bool(rows_ok.all())
        g_ref = jax.grad(lambda p: w @ model.losses_fn(p.shared, p.specific, batch))(params)
        assert max_abs_diff(grads, g_ref) < 1e-12
        plan = gl.plan(lambda z_, sp: model.heads_fn(sp, z_, batch), z, params.specific)
    # z enters the heads densely (once, or once per head): no J_z is formed
    assert plan.leaves[0].layerwise == (heads_kind != "nonlinear")


def test_feature_level_train_step_layerwise_equals_jacobian_path():
    model, params, batch = _feature_model("stacked")
    rep = jax.eval_shape(model.encode_fn, params.shared, batch)
    for name in ("mgda", "gradnorm"):
        method, opt = mtl.methods.get(name, like=rep), optax.sgd(0.1)
        state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
        out = {
            path: mtl.make_train_step(model, method, opt, mode="feature", gramian=path)(
                state, batch
            )
            for path in ("jacobian", "layerwise")
        }
        (ref, m_ref), (new, m_new) = out["jacobian"], out["layerwise"]
        np.testing.assert_allclose(m_new["weights"], m_ref["weights"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(m_new["grad_norms"], m_ref["grad_norms"], rtol=1e-4)
        for a, b in zip(
            jax.tree_util.tree_leaves(new.params),
            jax.tree_util.tree_leaves(ref.params),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_takes_the_layerwise_gramian_where_the_update_is_one_vjp_anyway():
    from mtljax._src import train

    def path(name, mode, **kw):
        opts = {"chunk_size": None, "gramian_chunk_size": None, "constraint": None} | kw
        return train.resolve_gramian_path(mtl.methods.get(name), "auto", mode, **opts)

    assert path("mgda", "feature") == "layerwise"
    assert path("gradnorm", "parameter") == "layerwise"  # the last shared layer only
    assert path("mgda", "parameter") == "auto"  # decided from the shapes, by the engine
    assert path("graddrop", "feature") == "jacobian"  # a direction from J_z itself
    assert path("ew", "feature") == "jacobian"  # losses only
    assert path("mgda", "feature", chunk_size=2) == "jacobian"
    assert path("gradnorm", "parameter", gramian_chunk_size=2) == "jacobian"
    assert path("gradnorm", "parameter", constraint=lambda j: j) == "jacobian"
    m = mtl.methods.mgda()
    assert (
        train.resolve_gramian_path(
            m,
            "jacobian",
            "feature",
            **dict.fromkeys(("chunk_size", "gramian_chunk_size", "constraint")),
        )
        == "jacobian"
    )
