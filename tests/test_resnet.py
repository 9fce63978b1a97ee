"""mtljax.nn.ResNet: the residual encoder with batch normalisation, against a float64 NumPy
reference written from He et al. (2016) and Ioffe & Szegedy (2015)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtljax as mtl
from mtljax import nn as mnn
from mtljax._src import tree as tree_lib
from mtljax._src.nn.split import stacked_owner_ok

EPS = 1e-5
MOMENTUM = 0.9


# ----------------------------------------------------------------------------- NumPy reference


def _conv(x: np.ndarray, k: np.ndarray, stride: int) -> np.ndarray:
    """``y[b, i, j, o] = Σ x_pad[b, s·i + u, s·j + v, c] · k[u, v, c, o]``, padding ``(k−1)/2``
    on each side (1 for a 3×3 kernel, 0 for a 1×1)."""
    size = k.shape[0]
    p = (size - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h = (x.shape[1] + 2 * p - size) // stride + 1
    w = (x.shape[2] + 2 * p - size) // stride + 1
    y = np.zeros((x.shape[0], h, w, k.shape[3]))
    for u in range(size):
        for v in range(size):
            patch = xp[
                :, u : u + stride * (h - 1) + 1 : stride, v : v + stride * (w - 1) + 1 : stride
            ]
            y += np.einsum("bhwc,co->bhwo", patch, k[u, v])
    return y


class _RefBN:
    """Batch normalisation: in training, ``γ (x − μ_B)/√(σ²_B + ε) + β`` with the batch's mean
    and biased variance over (batch, H, W), and running statistics ``r ← m·r + (1 − m)·stat``;
    in evaluation, the running statistics in place of the batch's."""

    def __init__(self, bn: nnx.BatchNorm):
        f = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
        self.gamma, self.beta = f(bn.scale), f(bn.bias)
        self.mean, self.var = f(bn.mean), f(bn.var)

    def __call__(self, x: np.ndarray, train: bool) -> np.ndarray:
        if train:
            mu, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            self.mean = MOMENTUM * self.mean + (1 - MOMENTUM) * mu
            self.var = MOMENTUM * self.var + (1 - MOMENTUM) * var
        else:
            mu, var = self.mean, self.var
        return self.gamma * (x - mu) / np.sqrt(var + EPS) + self.beta


def _kernel(conv: nnx.Conv) -> np.ndarray:
    return np.asarray(conv.kernel[...], np.float64)


class _RefResNet:
    """The forward pass of :class:`mtljax.nn.ResNet` (no dropout) from its parameters."""

    def __init__(self, net: mnn.ResNet):
        self.stem = (_kernel(net.stem_conv), _RefBN(net.stem_bn))
        self.blocks = []
        for stage, stride in zip(net.stages, net.strides, strict=True):
            for j, b in enumerate(stage):
                short = None
                if b.shortcut is not None:
                    short = (_kernel(b.shortcut.conv), _RefBN(b.shortcut.bn))
                self.blocks.append(
                    (
                        stride if j == 0 else 1,
                        (_kernel(b.conv1), _RefBN(b.bn1)),
                        (_kernel(b.conv2), _RefBN(b.bn2)),
                        short,
                    )
                )

    def bns(self) -> list[_RefBN]:
        out = [self.stem[1]]
        for _, c1, c2, short in self.blocks:
            out += [c1[1], c2[1]] + ([short[1]] if short is not None else [])
        return out

    def __call__(self, x: np.ndarray, train: bool) -> np.ndarray:
        relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
        h = relu(self.stem[1](_conv(x, self.stem[0], 1), train))
        for stride, (k1, bn1), (k2, bn2), short in self.blocks:
            y = relu(bn1(_conv(h, k1, stride), train))
            y = bn2(_conv(y, k2, 1), train)
            skip = h if short is None else short[1](_conv(h, short[0], stride), train)
            h = relu(y + skip)
        return h.mean(axis=(1, 2))


def _module_bns(net: mnn.ResNet) -> list[nnx.BatchNorm]:
    out = [net.stem_bn]
    for stage in net.stages:
        for b in stage:
            out += [b.bn1, b.bn2] + ([b.shortcut.bn] if b.shortcut is not None else [])
    return out


def _small(**kw) -> mnn.ResNet:
    args = dict(widths=(3, 4), blocks=(1, 2), strides=(1, 2))
    args.update(kw)
    return mnn.ResNet(2, rngs=nnx.Rngs(0), **args)


def _images(n: int = 4, h: int = 8, w: int = 8, c: int = 2, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, h, w, c))


# ----------------------------------------------------------------------------- tests


def test_defaults_are_he_et_al_cifar_resnet20():
    """Defaults: 3×3 stem with 16 filters, 3 stages of 3 basic blocks with {16, 32, 64}
    filters, subsampling by stride 2 at the 2nd and 3rd stages (He et al. 2016, §4.2): 19
    convolutions of 3×3 (+ the classifier: 20 layers), projections where the shape changes,
    about 0.27M parameters (their Table 6)."""
    net = mnn.ResNet(3, rngs=nnx.Rngs(0))
    assert (net.widths, net.blocks, net.strides) == ((16, 32, 64), (3, 3, 3), (1, 2, 2))
    kernels = [
        v.shape for p, v in nnx.to_flat_state(nnx.state(net, nnx.Param)) if str(p[-1]) == "kernel"
    ]
    assert sum(k[:2] == (3, 3) for k in kernels) == 19
    assert sorted(k for k in kernels if k[:2] == (1, 1)) == [(1, 1, 16, 32), (1, 1, 32, 64)]
    # Parameters counted from the architecture: 3×3 convolutions, BN (γ, β) after each, and
    # the two 1×1 projections with their BN.
    conv3 = 9 * 3 * 16 + 3 * 2 * 9 * 16 * 16 + (9 * 16 * 32 + 9 * 32 * 32 + 2 * 2 * 9 * 32 * 32)
    conv3 += 9 * 32 * 64 + 9 * 64 * 64 + 2 * 2 * 9 * 64 * 64
    bn = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    proj = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    n = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param)))
    assert n == conv3 + bn + proj
    assert round(n / 1e6, 2) == 0.27
    graphdef, state = nnx.split(net)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 64)
    fmap = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s).feature_map(x), state, jnp.zeros((2, 32, 32, 3))
    )
    assert fmap.shape == (2, 8, 8, 64)


def test_train_mode_matches_the_reference_and_updates_the_statistics():
    net = _small()
    ref = _RefResNet(net)
    x = _images()
    graphdef, state = nnx.split(net)

    @jax.jit
    def forward(s, x):
        m = nnx.merge(graphdef, s)
        y = m(x)
        return y, nnx.state(m)

    y, new_state = forward(state, x)
    want = ref(np.asarray(x, np.float64), train=True)
    assert y.shape == (4, 4)
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
    nnx.update(net, new_state)
    bns, ref_bns = _module_bns(net), ref.bns()
    assert len(bns) == 1 + 1 * 2 + 2 * 2 + 1  # stem, 3 blocks, one projection
    for bn, r in zip(bns, ref_bns, strict=True):
        # Every statistic moved off its initial value (0 for the mean, 1 for the variance) …
        assert np.all(np.asarray(bn.mean[...]) != 0.0)
        assert np.all(np.asarray(bn.var[...]) != 1.0)
        # … to m·init + (1 − m)·(the batch's statistic).
        np.testing.assert_allclose(bn.mean[...], r.mean, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], r.var, rtol=2e-4, atol=1e-6)
    # The running statistics are nnx.BatchStat, never parameters.
    stats = nnx.state(net, nnx.BatchStat)
    assert len(jax.tree_util.tree_leaves(stats)) == 2 * len(bns)
    param_paths = {tree_lib.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(net, nnx.Param))}
    assert not any(p.endswith("/mean") or p.endswith("/var") for p in param_paths)


def test_eval_mode_uses_the_running_statistics_and_is_deterministic():
    net = _small(dropout_rate=0.3)
    x = _images()
    for seed in (1, 2):  # train on two batches: the running statistics move
        net(_images(seed=seed))
    net.eval()
    ref = _RefResNet(net)  # reads the running statistics as they are now
    before = jax.tree_util.tree_map(np.asarray, nnx.state(net, nnx.BatchStat))
    y1, y2 = net(x), net(x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(
        y1, ref(np.asarray(x, np.float64), train=False), rtol=2e-4, atol=2e-5
    )
    after = jax.tree_util.tree_map(np.asarray, nnx.state(net, nnx.BatchStat))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    # In evaluation each example is mapped on its own; in training the batch's statistics
    # couple the examples.
    np.testing.assert_allclose(net(x[:1]), y1[:1], rtol=1e-5, atol=1e-6)
    net.train()
    assert not np.allclose(net(x[:2])[:1], net(x)[:1], atol=1e-4)


def test_dropout_draws_fresh_masks_in_training_only():
    x = _images()
    net = _small(dropout_rate=0.5)
    assert not np.allclose(net(x), net(x))  # the module's stream advances between calls
    key = jax.random.key(3)
    np.testing.assert_array_equal(net(x, rngs=key), net(x, rngs=key))
    assert not np.allclose(net(x, rngs=key), net(x, rngs=jax.random.key(4)))
    # Dropout off: the block has no dropout layer and no RNG state.
    plain = _small()
    assert all(b.dropout is None for stage in plain.stages for b in stage)
    assert not jax.tree_util.tree_leaves(nnx.state(plain, nnx.RngState))
    net.eval()
    np.testing.assert_array_equal(net(x), net(x))
    np.testing.assert_array_equal(net(x, rngs=key), net(x, rngs=jax.random.key(4)))


def test_strides_and_projection_shortcuts():
    net = mnn.ResNet(
        2, rngs=nnx.Rngs(0), widths=(3, 3, 5, 5), blocks=(2, 1, 1, 1), strides=(1, 2, 1, 2)
    )
    shortcuts = [[b.shortcut is not None for b in stage] for stage in net.stages]
    # Projection exactly where a block changes the resolution (stride 2) or the width.
    assert shortcuts == [[False, False], [True], [True], [True]]
    assert net.stages[1][0].shortcut.conv.kernel.shape == (1, 1, 3, 3)
    assert net.stages[2][0].shortcut.conv.kernel.shape == (1, 1, 3, 5)
    assert net.stages[1][0].conv1.strides == (2, 2) and net.stages[1][0].shortcut.conv.strides == (
        2,
        2,
    )
    assert net.stages[0][1].conv1.strides == (1, 1)
    graphdef, state = nnx.split(net)

    def shape(fn, *x_shape):
        out = jax.eval_shape(
            lambda s, x: fn(nnx.merge(graphdef, s, copy=True), x), state, jnp.zeros(x_shape)
        )
        return out.shape

    for h, want in ((8, 2), (7, 2), (9, 3), (1, 1)):  # ⌈⌈h/2⌉/2⌉
        assert shape(lambda m, x: m.feature_map(x), 2, h, h, 2) == (2, want, want, 5)
    assert shape(lambda m, x: m(x), 2, 8, 6, 2) == (2, 5)
    assert net.last_layer_path == "stages/3/0"
    # The reference agrees on odd sizes too (padding 1 on each side of a stride-2 3×3).
    x = _images(3, 7, 5)
    ref = _RefResNet(net)
    np.testing.assert_allclose(
        net(x), ref(np.asarray(x, np.float64), train=True), rtol=2e-4, atol=2e-5
    )


def _hard_sharing(num_tasks: int = 3) -> mnn.HardSharing:
    enc = _small()
    return mnn.HardSharing(enc, mnn.StackedLinear(enc.out_features, 2, num_tasks, rngs=nnx.Rngs(1)))


def test_hard_sharing_split_shares_the_encoder_parameters_not_its_statistics():
    """``HardSharing(ResNet, heads)``: every encoder parameter (convolutions, BN γ and β) is
    shared, the heads are task-specific, and the BN statistics are in neither."""
    net = _hard_sharing()
    assert net.shared_paths == ("encoder",)
    assert net.last_shared == "encoder/stages/1/1"
    graphdef, shared, specific, rest = nnx.split(
        net, nnx.All(nnx.Param, net.shared_filter), nnx.Param, ...
    )
    shared_paths = {tree_lib.path_str(p) for p, _ in nnx.to_flat_state(shared)}
    specific_paths = {tree_lib.path_str(p) for p, _ in nnx.to_flat_state(specific)}
    all_params = {
        tree_lib.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(net.encoder, nnx.Param))
    }
    assert shared_paths == {f"encoder/{p}" for p in all_params}
    assert {
        "encoder/stem_bn/scale",
        "encoder/stem_bn/bias",
        "encoder/stages/1/0/shortcut/bn/scale",
    } <= shared_paths
    assert specific_paths == {"heads/kernel", "heads/bias"}
    rest_leaves = nnx.to_flat_state(rest)
    assert rest_leaves and all(isinstance(v, nnx.BatchStat) for _, v in rest_leaves)
    assert any(p.startswith(net.last_shared + "/") for p in shared_paths)


def test_hard_sharing_split_is_verified_numerically():
    """check_shared_split on a model built from the NNX split (training mode: BN normalises by
    the batch's statistics, which couple examples, not tasks)."""
    t = 3
    net = _hard_sharing(t)
    graphdef, shared, specific, rest = nnx.split(
        net, nnx.All(nnx.Param, net.shared_filter), nnx.Param, ...
    )
    x = _images(6)
    y = jax.random.normal(jax.random.key(5), (t, 6, 2))

    def losses(s, p, b):
        pred = nnx.merge(graphdef, s, p, rest, copy=True)(b["x"])
        return jnp.mean((pred - b["y"]) ** 2, axis=(1, 2))

    model = mtl.Model(("a", "b", "c"), losses, last_shared=net.last_shared)
    params = mtl.Params(shared, specific)
    batch = {"x": x, "y": y}
    model.check(params, batch)
    report = mnn.check_shared_split(model, params, batch)
    assert report.ok
    assert report.over_shared() == (), report.shared_tasks  # every encoder leaf moves all tasks
    assert report.unused == ()
    assert np.all(report.shared_reach > 0)
    assert stacked_owner_ok(report.owners["heads/kernel"])
    assert stacked_owner_ok(report.owners["heads/bias"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=0), "ResNet: in_channels must be a positive int"),
        (dict(in_channels=2.0), "ResNet: in_channels must be a positive int"),
        (dict(in_channels=True), "ResNet: in_channels must be a positive int"),
        (dict(widths=()), "ResNet: widths must list"),
        (dict(widths=8), r"ResNet: widths must be a sequence of sizes, e.g. \(16,\)"),
        (dict(widths=(4, 0)), "ResNet: widths must list"),
        (dict(widths=(4.0, 8)), "ResNet: widths must list"),
        (dict(widths=(4, True)), "ResNet: widths must list"),
        (dict(widths=(4, 8), blocks=(1,)), "ResNet: blocks must list 2 positive ints"),
        (dict(widths=(4, 8), blocks=(1, 0)), "ResNet: blocks must list 2"),
        (dict(widths=(4, 8), blocks=(1, 1.5)), "ResNet: blocks must list 2"),
        (dict(widths=(4, 8), blocks=2), "ResNet: blocks must be a sequence of 2 positive ints"),
        (dict(widths=(4, 8), strides=(1, 2, 2)), "ResNet: strides must list 2"),
        (dict(widths=(4, 8), strides=(1, 0)), "ResNet: strides must list 2"),
        (dict(widths=(4, 8), strides=(1, 2.0)), "ResNet: strides must list 2"),
        (dict(widths=(4,), strides=2), "ResNet: strides must be a sequence"),
        (dict(dropout_rate=1.0), r"ResNet: dropout_rate must be in \[0, 1\)"),
        (dict(dropout_rate=-0.1), "ResNet: dropout_rate must be a finite number ≥ 0"),
        (dict(dropout_rate=True), "ResNet: dropout_rate"),
        (dict(dropout_rate=float("nan")), "ResNet: dropout_rate"),
        (dict(bn_momentum=1.0), r"ResNet: bn_momentum must be in \[0, 1\)"),
        (dict(bn_momentum=float("nan")), "ResNet: bn_momentum"),
        (dict(bn_epsilon=0.0), "ResNet: bn_epsilon must be a finite number > 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(in_channels=2, widths=(4,))
    args.update(kwargs)
    in_channels = args.pop("in_channels")
    with pytest.raises(ValueError, match=match):
        mnn.ResNet(in_channels, rngs=nnx.Rngs(0), **args)


def test_numpy_integer_sizes_are_accepted():
    n = np.int64
    got = mnn.ResNet(
        n(2), rngs=nnx.Rngs(0), widths=(n(3), n(4)), blocks=(n(1), n(1)), strides=(n(1), n(2))
    )
    want = mnn.ResNet(2, rngs=nnx.Rngs(0), widths=(3, 4), blocks=(1, 1), strides=(1, 2))
    g, w = nnx.state(got, nnx.Param), nnx.state(want, nnx.Param)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(w)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(w), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(type(v) is int for v in (*got.widths, *got.blocks, *got.strides, got.in_channels))


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (8, 8, 2), (4, 0, 8, 2)])
def test_wrong_input_shape_names_the_block(shape):
    with pytest.raises(ValueError, match=r"ResNet: expected images \(batch, H, W, 2\) \(NHWC\)"):
        _small()(jnp.zeros(shape))
