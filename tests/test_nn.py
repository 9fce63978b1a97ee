"""Tests of the architecture blocks of mtljax.nn: shapes, jit, NNX round trip, the
shared/task-specific split (checked numerically), gradient flow, feature-level split and short
training runs with several methods."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtljax as mtl
from mtljax import nn as mnn
from mtljax._src import tree as tree_lib
from mtljax._src.nn.split import stacked_owner_ok

T = 3
B = 16
D = 5


def _mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((pred - y) ** 2, axis=tuple(range(1, y.ndim)))


def _vector_batch(key: jax.Array, t: int = T, out: int = 1) -> dict[str, jax.Array]:
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (B, D))
    a = jax.random.normal(ka, (t, D, out))
    return {"x": x, "y": jnp.tanh(jnp.einsum("bd,tdo->tbo", x, a))}


def _image_batch(key: jax.Array) -> dict[str, jax.Array]:
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (3, 4, 4, 2))
    a = jax.random.normal(ka, (2, 2, 2))
    return {"x": x, "y": jnp.tanh(jnp.einsum("bhwc,tco->tbo", x, a) / 4.0)}


def _plain_losses(m: Any, b: dict) -> jax.Array:
    return _mse(m(b["x"]), b["y"])


def _dselect_entropy(m: Any, b: dict) -> jax.Array:
    return m.entropy_penalty(b["x"])


def _cascade_losses(m: Any, b: dict) -> jax.Array:
    preds = m(b["x"])
    ce = -jnp.mean(jnp.sum(jax.nn.log_softmax(preds[0]) * b["labels"], axis=-1))
    rest = [jnp.mean((p - y) ** 2) for p, y in zip(preds[1:], b["y"][1:], strict=True)]
    return jnp.stack([ce, *rest])


def _cascade_batch(key: jax.Array) -> dict[str, jax.Array]:
    b = _vector_batch(key)
    labels = jax.nn.one_hot(jnp.argmax(b["x"][:, :3], axis=1), 3)
    return {**b, "labels": labels}


@dataclasses.dataclass
class Spec:
    build: Callable[[], nnx.Module]
    batch: Callable[[jax.Array], dict]
    losses: Callable[[Any, dict], jax.Array]
    out_shape: tuple[int, ...] | None
    stacked: tuple[str, ...] = ()  # task-specific leaves stacked along a task axis (axis 0)
    feature: bool = True  # has encode/predict
    over_shared_ok: bool = False
    num_tasks: int = T
    shares: bool = True  # some parameter is shared by several tasks' losses
    regularizer: Callable[[Any, dict], jax.Array] | None = None  # from_block's extra penalty


SPECS: dict[str, Spec] = {
    "hard_sharing": Spec(
        lambda: mnn.HardSharing(
            mnn.MLP((D, 8), rngs=nnx.Rngs(0), final_activation=True),
            mnn.StackedMLP((8, 6, 1), T, rngs=nnx.Rngs(1)),
        ),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("heads/layers/0/kernel", "heads/layers/1/bias"),
    ),
    "soft_sharing": Spec(
        lambda: mnn.SoftSharing((D, 8, 1), T, rngs=nnx.Rngs(0), penalty_weight=0.1),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("towers/layers/0/kernel", "towers/layers/1/bias"),
        feature=False,
        shares=False,
    ),
    "hybrid_sharing": Spec(
        lambda: mnn.HybridSharing(
            mnn.MLP((D, 8), rngs=nnx.Rngs(0), final_activation=True),
            (8, 6, 1),
            T,
            rngs=nnx.Rngs(1),
            penalty="pairwise",
        ),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("towers/layers/0/kernel", "towers/layers/1/kernel", "towers/layers/1/bias"),
    ),
    "cross_stitch": Spec(
        lambda: mnn.CrossStitch((D, 8, 8, 1), T, rngs=nnx.Rngs(0)),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("stitches/1/alpha", "layers/2/kernel", "layers/2/bias"),
    ),
    "mmoe": Spec(
        lambda: mnn.MMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0)),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("gates/kernel", "towers/layers/0/kernel", "towers/layers/1/bias"),
    ),
    "omoe": Spec(
        lambda: mnn.OMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0)),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("towers/layers/0/kernel", "towers/layers/1/bias"),
    ),
    "cgc": Spec(
        lambda: mnn.CGC(D, (8,), 2, 1, (6, 1), T, rngs=nnx.Rngs(0)),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("levels/0/task_experts/layers/0/kernel", "levels/0/task_gates/kernel"),
    ),
    "ple": Spec(
        lambda: mnn.PLE(D, (8,), 2, 1, (6, 1), T, rngs=nnx.Rngs(0), num_levels=3),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=(
            "levels/1/task_gates/kernel",
            "levels/2/task_gates/kernel",
            "levels/2/task_experts/layers/0/kernel",
        ),
    ),
    "dselect_k": Spec(
        lambda: mnn.DSelectK(D, 5, (8,), (6, 1), T, k=2, rngs=nnx.Rngs(0), entropy_weight=0.05),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("z_gate/kernel", "alpha_gate/bias", "towers/layers/0/kernel"),
        regularizer=_dselect_entropy,
    ),
    "dselect_k_static": Spec(
        lambda: mnn.DSelectK(
            D, 4, (8,), (6, 1), T, k=2, rngs=nnx.Rngs(0), per_example=False, entropy_weight=0.05
        ),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("z", "alpha"),
        regularizer=_dselect_entropy,
    ),
    "mtan": Spec(
        lambda: mnn.MTAN(2, (3, 4), 2, 2, rngs=nnx.Rngs(0)),
        _image_batch,
        _plain_losses,
        (2, 3, 2),
        stacked=("attention/0/0/kernel", "attention/1/1/kernel", "heads/kernel"),
        feature=False,
        num_tasks=2,
    ),
    "mtan_task_extractors": Spec(
        lambda: mnn.MTAN(2, (3, 4), 2, 2, rngs=nnx.Rngs(0), share_extractor=False),
        _image_batch,
        _plain_losses,
        (2, 3, 2),
        stacked=("extractors/0/kernel", "attention/1/0/kernel", "heads/bias"),
        num_tasks=2,
    ),
    "low_level": Spec(
        lambda: mnn.LowLevelSupervision(D, 8, 1, (1, 2, 4), rngs=nnx.Rngs(0)),
        _vector_batch,
        _plain_losses,
        (T, B, 1),
        stacked=("heads/kernel", "heads/bias"),
    ),
    "cascade": Spec(
        lambda: mnn.Cascade(
            D,
            8,
            (3, 1, 1),
            rngs=nnx.Rngs(0),
            kinds=("classification", "regression", "regression"),
            embed_features=6,
            successive_weight=0.1,
        ),
        _cascade_batch,
        _cascade_losses,
        None,
        feature=False,
    ),
}


def _names() -> list:
    return list(SPECS)


def _setup(name: str):
    spec = SPECS[name]
    module = spec.build()
    batch = spec.batch(jax.random.key(1))
    names = [f"task{i}" for i in range(spec.num_tasks)]
    model, params = mnn.from_block(
        module, task_names=names, losses=spec.losses, regularizer=spec.regularizer
    )
    return spec, module, batch, model, params


@functools.partial(jax.jit, static_argnames="scale")
def _perturb(params: mtl.Params, scale: float = 0.05) -> mtl.Params:
    """Moves the parameters off their initial values (zero biases, identity-like stitches).

    One normal draw for all leaves, cut to their shapes (one random kernel to compile)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [x.size for x in leaves]
    noise = jax.random.normal(jax.random.key(7), (sum(sizes),))
    cuts = np.cumsum(sizes)[:-1].tolist()
    parts = jnp.split(noise, cuts)
    return jax.tree_util.tree_unflatten(
        treedef,
        [x + scale * n.reshape(x.shape) for x, n in zip(leaves, parts, strict=True)],
    )


def _first(tree: Any) -> jax.Array:
    return jax.tree_util.tree_leaves(tree)[0]


@pytest.mark.parametrize("name", _names())
def test_shapes_jit_and_roundtrip(name):
    spec, module, batch, model, params = _setup(name)
    graphdef, state = nnx.split(module)

    @jax.jit
    def forward(s, b):  # NNX split -> merge inside jit
        m = nnx.merge(graphdef, s)
        return m(b["x"]), spec.losses(m, b)

    out, module_losses = forward(state, batch)
    if spec.out_shape is not None:
        assert out.shape == spec.out_shape
    else:
        assert [o.shape for o in out] == [(B, 3), (B, 1), (B, 1)]
    # The Model built from the block gives the module's losses, and to_nnx rebuilds the module.
    losses = jax.jit(model.losses)(params, batch)
    assert losses.shape == (spec.num_tasks,)
    np.testing.assert_allclose(losses, module_losses, rtol=1e-5)
    _, rebuilt_state = nnx.split(mtl.to_nnx(model, params))
    rebuilt_out, _ = forward(rebuilt_state, batch)
    np.testing.assert_allclose(_first(rebuilt_out), _first(out), rtol=1e-6)
    model.check(params, batch)


@pytest.mark.parametrize("name", _names())
def test_shared_split_and_gradient_flow(name):
    spec, module, batch, model, params = _setup(name)
    params = _perturb(params)
    report = mnn.check_shared_split(model, params, batch)
    assert report.ok
    # Every declared-shared leaf really moves several tasks' losses (nothing needlessly shared).
    if not spec.over_shared_ok:
        assert report.over_shared() == (), report.shared_tasks
    # No parameter is dead, and every task's loss reaches the shared parameters (if any).
    assert report.unused == ()
    if spec.shares:
        assert np.all(report.shared_reach > 0)
    else:
        assert jax.tree_util.tree_leaves(params.shared) == []
    # Gradients: the slice t of a task-stacked specific leaf gets task t's gradient only.
    jac = jax.jit(jax.jacrev(model.losses))(params, batch)
    flat = {
        tree_lib.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(jac.specific)[0]
    }
    for path in spec.stacked:
        assert stacked_owner_ok(report.owners[path]), path
        g = np.asarray(flat[path])  # (T_losses, T_slices, ...)
        for i in range(spec.num_tasks):
            assert np.any(g[i, i] != 0.0), (path, i)
            assert np.all(np.delete(g[i], i, axis=0) == 0.0), (path, i)


def test_hard_sharing_shares_the_top_level_encoder_only():
    """A head may have a sub-module called ``encoder``: it stays task-specific."""

    class Head(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(8, 4, rngs=rngs)
            self.out = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, z):
            return self.out(nnx.relu(self.encoder(z)))

    rngs = nnx.Rngs(0)
    block = mnn.HardSharing(
        mnn.MLP((D, 8), rngs=rngs, final_activation=True), [Head(rngs) for _ in range(T)]
    )

    def losses(m, b):
        preds = m(b["x"])
        return jnp.stack([jnp.mean((p - y) ** 2) for p, y in zip(preds, b["y"], strict=True)])

    model, params = mnn.from_block(block, task_names=("a", "b", "c"), losses=losses)
    shared = {
        tree_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params.shared)[0]
    }
    specific = {
        tree_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params.specific)[0]
    }
    assert shared and all(p.startswith("encoder/") for p in shared)
    assert {f"heads/{i}/encoder/kernel" for i in range(T)} <= specific
    assert mnn.check_shared_split(model, params, _vector_batch(jax.random.key(0))).ok
    assert model.last_shared == "encoder/layers/0"


def test_check_shared_split_judges_each_task_on_its_own_scale():
    """Task 1 reads task 0's head; its loss is 10⁷ times smaller than task 0's: still caught."""

    def losses(shared, specific, batch):
        z = jnp.tanh(batch["x"] @ shared["w"])
        p0 = z @ specific["h0"]
        p1 = z @ specific["h1"] + 0.5 * z @ specific["h0"]
        return jnp.stack([1e4 * jnp.mean(p0**2), 1e-3 * jnp.mean(p1**2)])

    keys = jax.random.split(jax.random.key(0), 4)
    params = mtl.Params(
        {"w": jax.random.normal(keys[0], (D, 4))},
        {"h0": jax.random.normal(keys[1], (4,)), "h1": jax.random.normal(keys[2], (4,))},
    )
    model = mtl.Model(("a", "b"), losses)
    report = mnn.check_shared_split(
        model, params, {"x": jax.random.normal(keys[3], (B, D))}, raise_on_error=False
    )
    assert not report.ok and report.violations["h0"][1] == (0, 1)


def test_check_shared_split_catches_a_wrong_split():
    module = mnn.MMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0))
    batch = _vector_batch(jax.random.key(0))
    # Declaring the experts task-specific is wrong: they move every task's loss.
    model, params = mtl.from_nnx(
        module, task_names=["a", "b", "c"], shared="gates", losses=_plain_losses
    )
    with pytest.raises(ValueError, match="experts"):
        mnn.check_shared_split(model, params, batch)
    report = mnn.check_shared_split(model, params, batch, raise_on_error=False)
    assert not report.ok and any(p.startswith("experts") for p in report.violations)
    # Declaring the MMoE gates shared is safe but needlessly so: each moves one task only.
    model, params = mtl.from_nnx(
        mnn.MMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0)),
        task_names=["a", "b", "c"],
        shared=mnn.PathPrefixes("experts", "gates"),
        losses=_plain_losses,
    )
    report = mnn.check_shared_split(model, params, batch)
    assert set(report.over_shared()) == {"gates/kernel"}


def _encode_heads(name: str):
    if name in ("soft_sharing", "hybrid_sharing"):
        return (
            lambda m, b: m.encode(b["x"]),
            lambda m, z, b: _mse(m.predict(z), b["y"]),
        )
    if name in ("mmoe", "omoe", "cgc", "ple") or name.startswith("dselect_k"):
        return (lambda m, b: m.encode(b["x"]), lambda m, z, b: _mse(m.predict(z, b["x"]), b["y"]))
    return (lambda m, b: m.encode(b["x"]), lambda m, z, b: _mse(m.predict(z), b["y"]))


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.feature])
def test_feature_level_split_matches_parameter_level(name):
    """encode touches shared parameters only and heads task-specific ones: the feature-level
    gradient of the summed losses equals the ordinary one."""
    spec, module, batch, model, params = _setup(name)
    encode, heads = _encode_heads(name)
    assert spec.feature
    fmodel, fparams = mnn.from_block(
        spec.build(), task_names=model.task_names, encode=encode, heads=heads
    )
    params = _perturb(params)
    np.testing.assert_allclose(fmodel.losses(params, batch), model.losses(params, batch), rtol=1e-5)

    @jax.jit
    def both(p):
        losses, _, vjp, _ = mtl.feature_jacobian(fmodel, p, batch)
        want = jax.grad(lambda q: jnp.sum(model.losses(q, batch)))(p)
        return vjp(jnp.ones_like(losses)), want

    got, want = both(params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


# Every block trains with a losses-only method and a gradient-projection method (each is one
# compile of the train step; 40 steps on a tiny model).
TRAIN_METHODS = ("ew", "pcgrad")
TRAIN_BLOCKS = [
    "hard_sharing",
    "soft_sharing",
    "hybrid_sharing",
    "cross_stitch",
    "mmoe",
    "omoe",
    "cgc",
    "ple",
    "dselect_k",
    "mtan",
    "low_level",
    "cascade",
]


def _train(model: mtl.Model, params: mtl.Params, batch: dict, method_name: str, steps: int):
    """``steps`` Adam(1e-2) steps of ``method_name`` on one batch; returns the train state."""
    method = mtl.methods.get(method_name, like=params.shared)
    step = mtl.make_train_step(model, method, optax.adam(1e-2))
    state = mtl.init_train_state(model, params, method, optax.adam(1e-2), jax.random.key(0))
    for _ in range(steps):
        state, _ = step(state, batch)
    return state


@pytest.mark.parametrize("name", TRAIN_BLOCKS)
def test_short_training_lowers_every_task_loss(name):
    spec, module, batch, model, params = _setup(name)
    before = np.asarray(model.losses(params, batch))
    for method_name in TRAIN_METHODS:
        state = _train(model, params, batch, method_name, 40)
        after = np.asarray(model.losses(state.params, batch))
        assert np.all(after < before), (method_name, before, after)
        assert int(state.skipped) == 0


# -- heads of different widths ----------------------------------------------------------------

WIDTHS = (3, 1)  # task 0: a 3-way classifier; task 1: a scalar regression


def _mixed_losses(m: Any, b: dict) -> jax.Array:
    logits, value = mnn.split_outputs(m(b["x"]), WIDTHS)
    ce = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * b["labels"], axis=-1))
    return jnp.stack([ce, jnp.mean((value[..., 0] - b["target"]) ** 2)])


def _mixed_batch(key: jax.Array, image: bool) -> dict[str, jax.Array]:
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (8, 4, 4, 2) if image else (B, D))
    flat = x.mean(axis=(1, 2)) if image else x
    a = jax.random.normal(ka, (flat.shape[-1], 4))
    labels = jax.nn.one_hot(jnp.argmax(flat @ a[:, :3], axis=1), 3)
    return {"x": x, "labels": labels, "target": jnp.tanh(flat @ a[:, 3])}


MIXED: dict[str, Callable[[], nnx.Module]] = {
    "hard_sharing": lambda: mnn.HardSharing(
        mnn.MLP((D, 8), rngs=nnx.Rngs(0), final_activation=True),
        mnn.StackedLinear(8, WIDTHS, 2, rngs=nnx.Rngs(1)),
    ),
    "hybrid_sharing": lambda: mnn.HybridSharing(
        mnn.MLP((D, 8), rngs=nnx.Rngs(0), final_activation=True),
        (8, 6, WIDTHS),
        2,
        rngs=nnx.Rngs(1),
        soft_layers=(0,),
    ),
    "cross_stitch": lambda: mnn.CrossStitch((D, 8, 8, WIDTHS), 2, rngs=nnx.Rngs(0)),
    "mmoe": lambda: mnn.MMoE(D, 4, (8,), (6, WIDTHS), 2, rngs=nnx.Rngs(0)),
    "omoe": lambda: mnn.OMoE(D, 4, (8,), (6, WIDTHS), 2, rngs=nnx.Rngs(0)),
    "ple": lambda: mnn.PLE(D, (8,), 2, 1, (6, WIDTHS), 2, rngs=nnx.Rngs(0)),
    "dselect_k": lambda: mnn.DSelectK(D, 4, (8,), (WIDTHS,), 2, k=2, rngs=nnx.Rngs(0)),
    "mtan": lambda: mnn.MTAN(2, (3, 4), WIDTHS, 2, rngs=nnx.Rngs(0)),
    "low_level": lambda: mnn.LowLevelSupervision(D, 8, WIDTHS, (1, 2), rngs=nnx.Rngs(0)),
}


def _padded_layers(module: nnx.Module) -> list[tuple[str, Any]]:
    return [
        ("/".join(map(str, path)), m)
        for path, m in nnx.iter_modules(module)
        if isinstance(m, mnn.StackedLinear) and m.padded
    ]


@pytest.mark.parametrize("name", list(MIXED))
def test_heads_of_different_widths(name):
    """Per-task output widths: each task's extra columns output 0, their parameters are 0 and get
    no gradient, the split stays right, and both tasks learn (and the padded parameters stay 0)."""
    module = MIXED[name]()
    batch = _mixed_batch(jax.random.key(1), image=name == "mtan")
    layers = _padded_layers(module)
    assert len(layers) == 1 and layers[0][1].out_sizes == WIDTHS
    path = layers[0][0]
    out = module(batch["x"])
    assert out.shape == (2, batch["x"].shape[0], 3)
    assert np.all(np.asarray(out[1, :, 1:]) == 0.0)
    model, params = mnn.from_block(module, task_names=["cls", "reg"], losses=_mixed_losses)
    mnn.check_shared_split(model, _perturb(params), batch)

    def padded_entries(p: mtl.Params) -> list[np.ndarray]:
        layer = dict(_padded_layers(mtl.to_nnx(model, p)))[path]
        return [np.asarray(layer.kernel[...][1, :, 1:]), np.asarray(layer.bias[...][1, 1:])]

    # The mask, not the zero initialisation, keeps them out: perturbed, they still output 0.
    perturbed_out = mtl.to_nnx(model, _perturb(params))(batch["x"])
    assert np.all(np.asarray(perturbed_out[1, :, 1:]) == 0.0)
    assert np.any(np.asarray(perturbed_out[0]) != np.asarray(out[0]))
    grads = jax.grad(lambda p: jnp.sum(model.losses(p, batch)))(_perturb(params))
    assert all(np.all(g == 0.0) for g in padded_entries(grads))
    assert all(np.all(v == 0.0) for v in padded_entries(params))
    before = np.asarray(model.losses(params, batch))
    # A Jacobian method too on a hard- and a soft-sharing block (its per-task gradients are
    # pieces of the summed one, whose padded entries are checked 0 above).
    for method_name in ("ew", "upgrad") if name in ("hard_sharing", "cross_stitch") else ("ew",):
        state = _train(model, params, batch, method_name, 30)
        after = np.asarray(model.losses(state.params, batch))
        assert np.all(after < before), (method_name, before, after)
        assert all(np.all(v == 0.0) for v in padded_entries(state.params))


def test_split_outputs_and_coupled_padded_layers_are_refused():
    y = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    a, b = mnn.split_outputs(y, WIDTHS)
    np.testing.assert_array_equal(a, y[0])
    np.testing.assert_array_equal(b, y[1, :, :1])
    with pytest.raises(ValueError, match="split_outputs: expected stacked outputs"):
        mnn.split_outputs(y, (4, 1))
    with pytest.raises(ValueError, match="split_outputs: expected stacked outputs"):
        mnn.split_outputs(y, (3, 1, 1))
    with pytest.raises(ValueError, match="split_outputs: sizes"):
        mnn.split_outputs(y, (3, 0))
    with pytest.raises(ValueError, match="SoftSharing: the output layer .* soft_layers"):
        mnn.SoftSharing((D, 8, WIDTHS), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="CrossStitch: the output layer .* stitch_after"):
        mnn.CrossStitch((D, 8, WIDTHS), 2, stitch_after=(1,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MMoE tower_features: the last size .* 2 positive"):
        mnn.MMoE(D, 4, (8,), (6, (3, 1, 1)), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MTAN: out_features"):
        mnn.MTAN(2, (3,), (3, 0), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="LowLevelSupervision: out_features"):
        mnn.LowLevelSupervision(D, 8, (3,), (1, 2), rngs=nnx.Rngs(0))


# -- blocks' own maths ------------------------------------------------------------------------


def test_soft_sharing_penalty_forms_and_regularizer():
    m = mnn.SoftSharing((D, 4, 1), T, rngs=nnx.Rngs(0), penalty_weight=0.3, penalty="pairwise")
    kernels = [layer.kernel[...] for layer in m.towers.layers] + [
        layer.bias[...] for layer in m.towers.layers
    ]
    pairwise = sum(
        jnp.sum((k[i] - k[j]) ** 2) for k in kernels for i in range(T) for j in range(i + 1, T)
    )
    np.testing.assert_allclose(m.penalty(), 0.3 * pairwise, rtol=1e-5)
    np.testing.assert_allclose(m.regularizer(), m.penalty(), rtol=1e-6)
    mean = mnn.SoftSharing((D, 4, 1), T, rngs=nnx.Rngs(0), penalty_weight=0.3 * T)
    np.testing.assert_allclose(mean.penalty(), m.penalty(), rtol=1e-5)
    # from_block wires the block's regularizer; without a trunk nothing is shared.
    assert m.shared_filter is None and m.last_shared is None and m.shared_paths == ()
    model, params = mnn.from_block(m, task_names=("a", "b", "c"), losses=_plain_losses)
    assert jax.tree_util.tree_leaves(params.shared) == []
    np.testing.assert_allclose(model.regularizer(*params, None), m.penalty(), rtol=1e-6)
    with pytest.raises(ValueError, match="trunk"):
        m.encode(jnp.zeros((2, D)))
    # A further penalty given to from_block (one reading the batch) is added to the block's.
    batch = _vector_batch(jax.random.key(1))
    model, params = mnn.from_block(
        m,
        task_names=("a", "b", "c"),
        losses=_plain_losses,
        regularizer=lambda net, b: 0.01 * jnp.sum(b["x"] ** 2),
    )
    np.testing.assert_allclose(
        model.regularizer(*params, batch),
        m.penalty() + 0.01 * jnp.sum(batch["x"] ** 2),
        rtol=1e-6,
    )
    with pytest.raises(TypeError, match="regularizer must be a function"):
        mnn.from_block(m, task_names=("a", "b", "c"), losses=_plain_losses, regularizer=0.1)
    # A penalty written for the module alone (no batch argument) is refused by name.
    model, params = mtl.from_nnx(
        m, task_names=("a", "b", "c"), shared=None, losses=_plain_losses, regularizer=lambda n: 0.0
    )
    with pytest.raises(ValueError, match=r"regularizer\(shared, specific, batch\)"):
        model.check(params, batch)


def _soft_block(trunk: bool, weight: float) -> nnx.Module:
    if trunk:
        return mnn.HybridSharing(
            mnn.MLP((D, 8), rngs=nnx.Rngs(0), final_activation=True),
            (8, 6, 1),
            T,
            rngs=nnx.Rngs(1),
            penalty_weight=weight,
        )
    return mnn.SoftSharing((D, 6, 1), T, rngs=nnx.Rngs(0), penalty_weight=weight)


@pytest.mark.parametrize("trunk", [False, True])
@pytest.mark.parametrize("method_name", ["fixed", "mgda"])
def test_soft_sharing_coupling_gradient_is_unweighted(method_name, trunk):
    """With a non-EW method the towers' coupling gradient is λ∇(Σᵢ‖θᵢ − θ̄‖²) = 2λ(θᵢ − θ̄),
    whatever the method's task weights (inside the loss vector it would be scaled by wᵢ)."""
    lam = 0.3
    model, params = mnn.from_block(
        _soft_block(trunk, lam), task_names=("a", "b", "c"), losses=_plain_losses
    )
    params = _perturb(params, 0.3)
    batch = _vector_batch(jax.random.key(1))
    data_only = dataclasses.replace(model, regularizer=None)
    method = mtl.methods.fixed([0.5, 2.0, 3.0]) if method_name == "fixed" else mtl.methods.mgda()
    state = method.init(T)

    @jax.jit
    def both(p):
        return [mtl.gradients(m, method, p, state, batch, None)[::2] for m in (model, data_only)]

    (g, metrics), (g_data, metrics_data) = both(params)
    np.testing.assert_allclose(metrics["weights"], metrics_data["weights"], rtol=1e-6)
    assert not np.allclose(metrics["weights"], 1.0)
    coupling = jax.tree_util.tree_map(jnp.subtract, g, g_data)
    towers = params.specific["towers"]["layers"]
    got = coupling.specific["towers"]["layers"]
    for i in range(len(towers)):
        for name in ("kernel", "bias"):
            leaf = towers[i][name][...]
            want = 2 * lam * (leaf - jnp.mean(leaf, axis=0, keepdims=True))
            np.testing.assert_allclose(got[i][name][...], want, rtol=1e-4, atol=1e-6)
    for leaf in jax.tree_util.tree_leaves(coupling.shared):  # the trunk is not coupled
        np.testing.assert_allclose(leaf, 0.0, atol=1e-7)


@pytest.mark.parametrize("name", mtl.methods.names())
def test_pure_soft_sharing_every_method_gives_a_finite_update(name):
    """No shared parameter: the Jacobian has no columns and the Gramian is zero; every method
    gives a finite update, and the towers get the method's head rule (wᵢ∇Lᵢ or ∇Lᵢ) + ∇R.
    A method whose weights come from the (absent) shared gradients and scale the towers'
    gradients (Nash-MTL, GradNorm) raises instead of training nothing; with
    ``head_grads="unit"`` it trains the towers by their own task gradients."""
    model, params = mnn.from_block(
        _soft_block(False, 0.1), task_names=("a", "b", "c"), losses=_plain_losses
    )
    params = _perturb(params, 0.3)
    batch = _vector_batch(jax.random.key(1))
    kwargs: dict[str, Any] = {"weights": [1.0, 2.0, 3.0]} if name == "fixed" else {}
    if name == "gradnorm":  # no shared parameter, so no last shared layer
        kwargs["params"] = "all"
    method = mtl.methods.get(name, like=params.shared, **kwargs)
    state = method.init(T)
    head_grads = None
    if method.needs != "losses" and method.head_grads == "weighted":
        with pytest.raises(ValueError, match="no shared parameters.*head_grads='unit'"):
            mtl.gradients(model, method, params, state, batch, jax.random.key(0))
        head_grads = "unit"

    @jax.jit
    def run(p, s):
        return mtl.gradients(model, method, p, s, batch, jax.random.key(0), head_grads=head_grads)

    g, new_state, metrics = run(params, state)
    g, new_state, metrics = run(params, new_state)  # a second step, from the updated state
    for leaf in jax.tree_util.tree_leaves((g, new_state, metrics)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert np.all(np.isfinite(leaf)), name
    if "grad_norms" in metrics:
        np.testing.assert_array_equal(metrics["grad_norms"], 0.0)
    if (head_grads or method.head_grads) == "weighted" and "weights" in metrics:
        w = metrics["weights"]
    else:
        w = jnp.ones((T,))
    task_part = jax.grad(lambda p: w @ model.losses(p, batch))(params).specific
    reg_part = jax.grad(lambda p: model.regularizer(*p, batch))(params).specific
    want = jax.tree_util.tree_map(jnp.add, task_part, reg_part)
    leaves = zip(
        jax.tree_util.tree_leaves(g.specific), jax.tree_util.tree_leaves(want), strict=True
    )
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cross_stitch_initialisation():
    a = mnn.cross_stitch_init(2)
    np.testing.assert_allclose(a, [[0.9, 0.1], [0.1, 0.9]], rtol=1e-6)
    a3 = mnn.cross_stitch_init(3, alpha_same=0.8)
    np.testing.assert_allclose(a3.sum(axis=1), 1.0, rtol=1e-6)
    unit = mnn.CrossStitchUnit(2, channels=3)
    x = jax.random.normal(jax.random.key(0), (2, 4, 3))
    np.testing.assert_allclose(unit(x)[0], 0.9 * x[0] + 0.1 * x[1], rtol=1e-5)


def test_dselect_k_gate_properties():
    gamma = 1.0
    t = jnp.linspace(-1, 1, 101)
    s = mnn.smooth_step(t, gamma)
    assert float(s[0]) == 0.0 and float(s[-1]) == 1.0
    assert np.all(np.diff(np.asarray(s)) >= 0)
    np.testing.assert_allclose(mnn.smooth_step(jnp.zeros(()), gamma), 0.5)
    # Selectors are on the simplex; binary z (|z| ≥ γ/2) picks exactly one expert.
    z = jax.random.normal(jax.random.key(0), (7, 3))
    r = mnn.selector_weights(z, gamma, 5)
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(r) >= 0)
    zb = jnp.array([[1.0, -1.0, 1.0]])  # code 0b101 = 5 -> expert 5 mod 5 = 0
    np.testing.assert_allclose(mnn.selector_weights(zb, gamma, 5), [[1, 0, 0, 0, 0]])
    zb = jnp.array([[-1.0, 1.0]])  # code 0b10 = 2
    np.testing.assert_allclose(mnn.selector_weights(zb, gamma, 4), [[0, 0, 1, 0]])
    m = mnn.DSelectK(D, 4, (8,), (6, 1), T, k=2, rngs=nnx.Rngs(0), entropy_weight=1.0)
    q, _ = m.gates(jax.random.normal(jax.random.key(1), (B, D)))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)
    # The entropy penalty, by hand: λ Σₜ (1/B) Σ_b Σᵢ h(r), with λ = 1.
    x = jax.random.normal(jax.random.key(1), (B, D))
    r = np.asarray(m.gates(x)[1], np.float64)  # (T, B, k, n)
    by_hand = -np.sum(np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)) / B
    assert by_hand > 0
    np.testing.assert_allclose(m.entropy_penalty(x), by_hand, rtol=1e-5)


@pytest.mark.parametrize("name", ["dselect_k", "dselect_k_static"])
def test_dselect_k_entropy_is_a_regularizer_outside_the_method(name):
    """The gate entropy is the model's regularizer, not part of the task losses: the objective
    is Σₜ wₜ Lₜ + λ Ω (Hazimeh et al. §4), whatever weights wₜ the method gives."""
    spec, module, batch, model, params = _setup(name)
    params = _perturb(params)
    w = jnp.array([0.25, 4.0, 1.5])
    method = mtl.methods.fixed(w)

    @jax.jit
    def run(p):
        g, _, metrics = mtl.gradients(model, method, p, method.init(T), batch, jax.random.key(0))
        want = jax.grad(lambda q: w @ model.losses(q, batch) + model.regularizer(*q, batch))(p)
        return g, metrics, want

    g, metrics, want = run(params)
    net = mtl.to_nnx(model, params)
    np.testing.assert_allclose(metrics["losses"], _plain_losses(net, batch), rtol=1e-5)
    np.testing.assert_allclose(metrics["regularizer"], net.entropy_penalty(batch["x"]), rtol=1e-5)
    assert float(metrics["regularizer"]) > 0
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_low_level_supervision_split_follows_depths():
    m = mnn.LowLevelSupervision(D, 8, 1, (1, 3, 3, 5), rngs=nnx.Rngs(0))
    assert m.shared_paths == ("layers/0", "layers/1", "layers/2")


def test_ple_split_by_level():
    m = mnn.PLE(D, (8,), 2, 1, (6, 1), T, rngs=nnx.Rngs(0), num_levels=3)
    assert set(m.shared_paths) == {
        "levels/0/shared_experts",
        "levels/0/shared_gate",
        "levels/0/task_experts",
        "levels/0/task_gates",
        "levels/1/shared_experts",
        "levels/1/shared_gate",
        "levels/1/task_experts",
        "levels/2/shared_experts",
    }
    assert mnn.CGC(D, (8,), 2, 1, (6, 1), T, rngs=nnx.Rngs(0)).shared_paths == (
        "levels/0/shared_experts",
    )


def test_cascade_successive_regularization():
    m = mnn.Cascade(D, 6, (3, 2, 1), rngs=nnx.Rngs(0), successive_weight=0.5)
    np.testing.assert_allclose(m.regularizer(), 0.0)  # the anchor starts at the initial values
    anchor = m.anchor()
    m.layers[0].bias[...] = m.layers[0].bias[...] + 1.0  # task 0's parameters move by 6 units²
    # JMT's successive terms per task are δ·[0, 6, 6]; the regularizer is their sum.
    np.testing.assert_allclose(m.regularizer(), 0.5 * 12.0, rtol=1e-6)
    np.testing.assert_allclose(m.successive_regularization(anchor, 0.5), 6.0, rtol=1e-6)
    m.layers[1].bias[...] = m.layers[1].bias[...] + 1.0  # task 1's: counted by task 2 only
    np.testing.assert_allclose(m.regularizer(), 6.0 + 0.5 * 6.0, rtol=1e-6)
    # from_block wires the regularizer; the anchor is a constant of the model, not a parameter.
    model, params = mnn.from_block(m, task_names=("a", "b", "c"), losses=_cascade_losses)
    paths = tree_lib.leaf_paths(params)
    assert not any("anchor" in p for p in paths) and model.nnx_rest is not None
    np.testing.assert_allclose(model.regularizer(*params, None), 9.0, rtol=1e-6)
    m.set_anchor()
    np.testing.assert_allclose(m.regularizer(), 0.0)
    plain = mnn.Cascade(D, 6, (3, 2, 1), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(plain.regularizer(), 0.0)
    with pytest.raises(ValueError, match="successive_weight"):
        plain.set_anchor()


def test_cascade_anchor_checkpointed_beside_the_train_state(tmp_path):
    """The recipe of mtljax.nn.Constant: save (state, model.nnx_rest), restore into a fresh
    model's, write the constants into the module, rebuild: the resumed model has the anchor."""
    names = ("a", "b", "c")

    def build():
        return mnn.Cascade(D, 6, (3, 2, 1), rngs=nnx.Rngs(0), successive_weight=0.5)

    model, params = mnn.from_block(build(), task_names=names, losses=_cascade_losses)
    method, opt = mtl.methods.get("ew"), optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    moved = jax.tree_util.tree_map(lambda x: x + 0.3, state.params)  # "after an epoch"
    module = mtl.to_nnx(model, moved)
    module.set_anchor()
    model, _ = mnn.from_block(module, task_names=names, losses=_cascade_losses)
    state = state._replace(params=moved, step=jnp.asarray(7, jnp.int32))
    later = jax.tree_util.tree_map(lambda x: x + 0.1, moved)
    expected = float(model.regularizer(*later, None))
    ckpt = mtl.Checkpointer(tmp_path, async_save=False)
    with pytest.raises(ValueError, match="step="):
        ckpt.save((state, model.nnx_rest))
    assert ckpt.save((state, model.nnx_rest), step=int(state.step))

    fresh, fresh_params = mnn.from_block(build(), task_names=names, losses=_cascade_losses)
    assert not np.isclose(float(fresh.regularizer(*later, None)), expected)  # anchor at the init
    template = (
        mtl.init_train_state(fresh, fresh_params, method, opt, jax.random.key(0)),
        fresh.nnx_rest,
    )
    restored = ckpt.restore(template)
    state2, consts = restored.state
    assert restored.step == 7
    module2 = mtl.to_nnx(fresh, state2.params)
    nnx.update(module2, consts)
    resumed, _ = mnn.from_block(module2, task_names=names, losses=_cascade_losses)
    np.testing.assert_allclose(float(resumed.regularizer(*later, None)), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: mnn.MMoE(D, 0, (8,), (1,), T, rngs=nnx.Rngs(0)), "num_experts"),
        (lambda: mnn.MMoE(D, 4, (8,), (1,), T, rngs=nnx.Rngs(0), num_gates=2), "num_gates"),
        (lambda: mnn.DSelectK(D, 4, (8,), (1,), T, k=5, rngs=nnx.Rngs(0)), "k=5"),
        (lambda: mnn.DSelectK(D, 4, (8,), (1,), T, k=2, gamma=0.0, rngs=nnx.Rngs(0)), "gamma"),
        (lambda: mnn.CrossStitch((D, 4, 1), 1, rngs=nnx.Rngs(0)), "2 tasks"),
        (
            lambda: mnn.CrossStitch((D, 4, 1), T, stitch_after=(3,), rngs=nnx.Rngs(0)),
            "stitch_after",
        ),
        (
            lambda: mnn.SoftSharing((D, 4, 1), T, penalty_weight=-1.0, rngs=nnx.Rngs(0)),
            "penalty_weight",
        ),
        (lambda: mnn.SoftSharing((D, 4, 1), T, penalty="l1", rngs=nnx.Rngs(0)), "penalty"),
        (lambda: mnn.LowLevelSupervision(D, 4, 1, (0, 2), rngs=nnx.Rngs(0)), "depths"),
        (lambda: mnn.Cascade(D, 4, (2,), rngs=nnx.Rngs(0)), "out_features"),
        (lambda: mnn.Cascade(D, 4, (2, 2), kinds="ranking", rngs=nnx.Rngs(0)), "kinds"),
        (
            lambda: mnn.Cascade(D, 4, (2, 2), successive_weight=-1.0, rngs=nnx.Rngs(0)),
            "successive_weight",
        ),
        (lambda: mnn.StackedMLP((D,), T, rngs=nnx.Rngs(0)), "features"),
        (lambda: mnn.CrossStitchUnit(0), "num_tasks"),
        (lambda: mnn.CrossStitchUnit(T, channels=0), "channels"),
        (
            lambda: mnn.CrossStitch((D, 4, 4, 1), T, stitch_after=(True,), rngs=nnx.Rngs(0)),
            "stitch_after",
        ),
        (lambda: mnn.Cascade(D, 4, (1, 2), rngs=nnx.Rngs(0)), "softmax would be constant"),
        # sizes and indices are integers: a float or a bool is refused, never truncated to int
        (lambda: mnn.MLP((D, 2.5), rngs=nnx.Rngs(0)), "MLP: features .* integer"),
        (lambda: mnn.MLP((D, True), rngs=nnx.Rngs(0)), "MLP: features .* integer"),
        (lambda: mnn.StackedMLP((D, 4.0, 1), T, rngs=nnx.Rngs(0)), "StackedMLP: features"),
        (lambda: mnn.MMoE(D, 4, (8.5,), (1,), T, rngs=nnx.Rngs(0)), "expert_features"),
        (lambda: mnn.MTAN(2, (3.7, 4), 2, T, rngs=nnx.Rngs(0)), "MTAN: channels"),
        (lambda: mnn.MTAN(2, (True, 4), 2, T, rngs=nnx.Rngs(0)), "MTAN: channels"),
        (lambda: mnn.LowLevelSupervision(D, 4, 1, (True, 2), rngs=nnx.Rngs(0)), "depths"),
        (lambda: mnn.LowLevelSupervision(D, 4, 1, (1.0, 2), rngs=nnx.Rngs(0)), "depths"),
        (lambda: mnn.Cascade(D, 4, (True, 2), rngs=nnx.Rngs(0)), "out_features .* integer"),
        (lambda: mnn.MMoE(D, True, (8,), (1,), T, rngs=nnx.Rngs(0)), "num_experts"),
        (lambda: mnn.MMoE(D, 4, (8,), (1,), 2.0, rngs=nnx.Rngs(0)), "num_tasks"),
        (lambda: mnn.StackedLinear(True, 2, T, rngs=nnx.Rngs(0)), "StackedLinear: in_features"),
        (lambda: mnn.StackedLinear(D, 2.0, T, rngs=nnx.Rngs(0)), "StackedLinear: out_features"),
        (lambda: mnn.StackedLinear(D, 2, 0, rngs=nnx.Rngs(0)), "StackedLinear: num_tasks"),
        # a bare number where a size list is meant, bools and non-finite reals
        (lambda: mnn.MMoE(D, 4, 8, (1,), T, rngs=nnx.Rngs(0)), r"MMoE: expert_features .* \(16,\)"),
        (lambda: mnn.PLE(D, (8,), 2, 1, 1, T, rngs=nnx.Rngs(0)), "PLE: tower_features"),
        (
            lambda: mnn.CrossStitch((D, 4, 4, 1), T, stitch_after=1, rngs=nnx.Rngs(0)),
            "stitch_after",
        ),
        (lambda: mnn.LowLevelSupervision(D, 4, 1, 3, rngs=nnx.Rngs(0)), "depths"),
        (lambda: mnn.MLP(5, rngs=nnx.Rngs(0)), "MLP: features"),
        (
            lambda: mnn.Cascade(D, 4, (2, 2), embed_features=True, rngs=nnx.Rngs(0)),
            "embed_features",
        ),
        (lambda: mnn.Cascade(D, 4, (2, 2), embed_features=0, rngs=nnx.Rngs(0)), "embed_features"),
        (
            lambda: mnn.SoftSharing((D, 4, 1), T, soft_layers=(True,), rngs=nnx.Rngs(0)),
            "soft_layers",
        ),
        (
            lambda: mnn.SoftSharing((D, 4, 1), T, soft_layers=(1.0,), rngs=nnx.Rngs(0)),
            "soft_layers",
        ),
        (lambda: mnn.SoftSharing((D,), T, rngs=nnx.Rngs(0)), "SoftSharing: features"),
        (
            lambda: mnn.SoftSharing((D, 4, 1), T, penalty_weight="0.1", rngs=nnx.Rngs(0)),
            "SoftSharing: penalty_weight",
        ),
        (
            lambda: mnn.DSelectK(D, 4, (8,), (1,), T, k=2, gamma=float("inf"), rngs=nnx.Rngs(0)),
            "DSelectK: gamma must be a finite number",
        ),
        (lambda: mnn.DSelectK(D, 4, (8,), (1,), T, k=2, gamma=True, rngs=nnx.Rngs(0)), "gamma"),
        (
            lambda: mnn.MMoE(D, 4, (8,), (1,), T, num_gates=True, rngs=nnx.Rngs(0)),
            "MMoE: num_gates",
        ),
        (lambda: mnn.MMoE(D, 4, (8,), (1,), T, num_gates=1.0, rngs=nnx.Rngs(0)), "MMoE: num_gates"),
        (lambda: mnn.CGC(D, (8,), 2, 0, (1,), T, rngs=nnx.Rngs(0)), "CGC: num_task_experts"),
        (lambda: mnn.smooth_step(jnp.zeros(3), 0.0), "smooth_step: gamma"),
        (lambda: mnn.selector_weights(jnp.zeros((2, 1)), 1.0, 4), "selector_weights: 4 experts"),
    ],
)
def test_bad_hyper_parameters_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_numpy_integer_sizes_are_accepted():
    """Sizes computed with NumPy (``np.int64``) build the same blocks as Python ints."""
    n = np.int64
    blocks = [
        (mnn.MLP((n(D), n(4)), rngs=nnx.Rngs(0)), mnn.MLP((D, 4), rngs=nnx.Rngs(0))),
        (
            mnn.MMoE(n(D), n(4), (n(8),), (n(1),), n(T), rngs=nnx.Rngs(0)),
            mnn.MMoE(D, 4, (8,), (1,), T, rngs=nnx.Rngs(0)),
        ),
        (
            mnn.LowLevelSupervision(D, 4, 1, (n(1), n(2)), rngs=nnx.Rngs(0)),
            mnn.LowLevelSupervision(D, 4, 1, (1, 2), rngs=nnx.Rngs(0)),
        ),
        (
            mnn.MTAN(2, (n(3), n(4)), 2, T, rngs=nnx.Rngs(0)),
            mnn.MTAN(2, (3, 4), 2, T, rngs=nnx.Rngs(0)),
        ),
        (
            mnn.StackedLinear(n(D), n(2), n(T), rngs=nnx.Rngs(0)),
            mnn.StackedLinear(D, 2, T, rngs=nnx.Rngs(0)),
        ),
    ]
    for got, want in blocks:
        g, w = nnx.state(got, nnx.Param), nnx.state(want, nnx.Param)
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(w)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(w), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "block, name",
    [
        (lambda: mnn.MLP((D, 4), rngs=nnx.Rngs(0)), "MLP"),
        (lambda: mnn.StackedLinear(D, 2, T, rngs=nnx.Rngs(0)), "StackedLinear"),
        (
            lambda: mnn.HardSharing(
                mnn.MLP((D, 4), rngs=nnx.Rngs(0)), mnn.StackedLinear(4, 1, T, rngs=nnx.Rngs(0))
            ),
            "MLP",
        ),
        (lambda: mnn.StackedMLP((D, 4, 1), T, rngs=nnx.Rngs(0)), "StackedMLP"),
        (lambda: mnn.SoftSharing((D, 4, 1), T, rngs=nnx.Rngs(0)), "StackedMLP"),
        (lambda: mnn.CrossStitch((D, 4, 1), T, rngs=nnx.Rngs(0)), "CrossStitch"),
        (lambda: mnn.MMoE(D, 4, (8,), (1,), T, rngs=nnx.Rngs(0)), "MMoE"),
        (lambda: mnn.CGC(D, (8,), 2, 1, (1,), T, rngs=nnx.Rngs(0)), "CGC"),
        (lambda: mnn.PLE(D, (8,), 2, 1, (1,), T, rngs=nnx.Rngs(0), num_levels=2), "PLE"),
        (lambda: mnn.DSelectK(D, 4, (8,), (1,), T, k=2, rngs=nnx.Rngs(0)), "DSelectK"),
        (lambda: mnn.LowLevelSupervision(D, 4, 1, (1, 2), rngs=nnx.Rngs(0)), "LowLevelSupervision"),
        (lambda: mnn.Cascade(D, 4, (2, 2), rngs=nnx.Rngs(0)), "Cascade"),
    ],
)
def test_wrong_input_width_names_the_block(block, name):
    """An input with the wrong number of features raises a ValueError naming the block and
    the expected width, not an error from deep inside a matmul."""
    with pytest.raises(ValueError, match=rf"{name}: expected .*{D}"):
        block()(jnp.zeros((3, D + 1)))


def test_mtan_with_shared_extractors_refuses_feature_level_and_names_the_option():
    def encode(m, b):
        return m.encode(b["x"])

    def heads(m, z, b):
        return jnp.mean(m.predict(z) ** 2, axis=(1, 2))

    shared = mnn.MTAN(2, (3, 4), 2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"share_extractor=False"):
        mnn.from_block(shared, task_names=("a", "b"), encode=encode, heads=heads)
    own = mnn.MTAN(2, (3, 4), 2, 2, rngs=nnx.Rngs(0), share_extractor=False)
    model, _ = mnn.from_block(own, task_names=("a", "b"), encode=encode, heads=heads)
    assert model.has_features


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="MMoE"):
        mnn.MMoE(D, 4, (8,), (1,), T, rngs=nnx.Rngs(0))(jnp.zeros((2, D + 1)))
    with pytest.raises(ValueError, match="MTAN"):
        mnn.MTAN(2, (3, 4), 2, 2, rngs=nnx.Rngs(0))(jnp.zeros((1, 7, 8, 2)))
    with pytest.raises(ValueError, match="task axis"):
        mnn.CrossStitchUnit(3)(jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match="shared"):
        mnn.shared_filter(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_gates_have_no_bias_unless_asked():
    """Ma et al.'s and Tang et al.'s gates are softmax(W x): no bias by default."""

    def names(block):
        return {
            tree_lib.path_str(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(block, nnx.Param))[0]
        }

    plain = mnn.MMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0))
    biased = mnn.MMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0), gate_bias=True)
    assert not any(n.startswith("gates/bias") for n in names(plain))
    assert "gates/bias" in names(biased)
    ple = mnn.PLE(D, (8,), 2, 1, (6, 1), T, rngs=nnx.Rngs(0), num_levels=2)
    assert not any("gate" in n and n.endswith("bias") for n in names(ple))
    ple_b = mnn.PLE(D, (8,), 2, 1, (6, 1), T, rngs=nnx.Rngs(0), num_levels=2, gate_bias=True)
    assert {"levels/0/task_gates/bias", "levels/0/shared_gate/bias"} <= names(ple_b)
    # Without a bias the gate of the zero input is uniform.
    w = plain.gate_weights(jnp.zeros((1, D)))
    np.testing.assert_allclose(w, 0.25, rtol=1e-6)


def test_mixtures_reject_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 experts"):
        mnn.MMoE(D, 1, (8,), (6, 1), T, rngs=nnx.Rngs(0))
    block = mnn.MMoE(D, 4, (8,), (6, 1), T, rngs=nnx.Rngs(0))
    for bad in (jnp.ones((2, B, D)), jnp.ones((D,)), jnp.ones((B, D + 1))):
        with pytest.raises(ValueError, match=r"shape \(batch, 5\)"):
            block(bad)


def test_cascade_feeds_every_earlier_label_embedding():
    """JMT §2.4: a layer reads the label embeddings of all the tasks below it."""
    kinds = ("classification", "regression", "regression")
    m = mnn.Cascade(D, 6, (3, 2, 1), rngs=nnx.Rngs(0), kinds=kinds)
    x = jax.random.normal(jax.random.key(0), (B, D))
    h0 = jnp.tanh(m.layers[0](x))
    y0 = m.heads[0](h0)
    l0 = m.label_embeddings[0](jax.nn.softmax(y0, axis=-1))
    h1 = jnp.tanh(m.layers[1](jnp.concatenate([h0, x, l0], axis=-1)))
    y1 = m.heads[1](h1)
    l1 = m.label_embeddings[1](y1)
    h2 = jnp.tanh(m.layers[2](jnp.concatenate([h1, x, l0, l1], axis=-1)))
    for got, want in zip(m(x), (y0, y1, m.heads[2](h2)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    prev = mnn.Cascade(D, 6, (3, 2, 1), rngs=nnx.Rngs(0), label_inputs="previous")
    assert prev.layers[2].kernel.shape == (6 + D + 8, 6)
    assert m.layers[2].kernel.shape == (6 + D + 2 * 8, 6)
    with pytest.raises(ValueError, match="label_inputs"):
        mnn.Cascade(D, 6, (3, 2), rngs=nnx.Rngs(0), label_inputs="next")
