"""Multi-Task Attention Network (Liu, Johns & Davison 2019), small convolutional version."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import check_out_features, check_positive, count_tuple
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.stacked import StackedLinear


def pool2(x: jax.Array) -> jax.Array:
    """2×2 max pooling with stride 2 over the two spatial axes before the channel axis."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2, c).max(axis=(-4, -2))


class _TrunkBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv_u = nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs)
        self.conv_p = nnx.Conv(cout, cout, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        u = nnx.relu(self.conv_u(x))
        return u, nnx.relu(self.conv_p(u))


class _StackedConv3(nnx.Module):
    """``T`` 3×3 convolutions stacked along a task axis, applied with ``vmap``."""

    def __init__(self, cin: int, cout: int, num_tasks: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        keys = jax.random.split(rngs.params(), num_tasks)
        self.kernel = nnx.Param(jax.vmap(lambda k: init(k, (3, 3, cin, cout), jnp.float32))(keys))
        self.bias = nnx.Param(jnp.zeros((num_tasks, cout), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(xt, k, b):
            y = jax.lax.conv_general_dilated(
                xt, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return y + b

        return jax.vmap(conv)(x, self.kernel[...], self.bias[...])


class MTAN(nnx.Module):
    """Multi-Task Attention Network over a small shared convolutional trunk.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (the
    encoder half, with a classification/regression head per task). The shared trunk has ``L``
    blocks; block ``j`` computes ``u⁽ʲ⁾ = relu(conv₃(·))`` and ``p⁽ʲ⁾ = relu(conv₃(u⁽ʲ⁾))``,
    then 2×2 max-pooling feeds block ``j+1``. Task ``t``'s attention module at block ``j``
    (eq. 1)

        â⁽ʲ⁾ₜ = g⁽ʲ⁾ₜ([u⁽ʲ⁾; f⁽ʲ⁾(p̂⁽ʲ⁻¹⁾ₜ)]),   p̂⁽ʲ⁾ₜ = â⁽ʲ⁾ₜ ⊙ p⁽ʲ⁾,

    with ``g`` two 1×1 convolutions (ReLU, then sigmoid: a soft mask per channel and pixel),
    stacked over tasks (one batched matmul on the channel axis), and ``f⁽ʲ⁾`` a 3×3 convolution
    with ReLU followed by pooling to block ``j``'s resolution (at ``j = 0`` the input is
    ``u⁽⁰⁾`` alone). Heads: global average pooling of ``p̂⁽ᴸ⁻¹⁾ₜ`` and a linear map per task.
    Batch normalisation is left out (mtljax models are functions of their parameters).

    ``share_extractor=True`` shares ``f⁽ʲ⁾`` between tasks, as in the paper; since it reads
    task-specific masked features it is then a shared parameter used after task-specific ones,
    so :meth:`encode`/:meth:`predict` (feature level) need ``share_extractor=False``
    (per-task ``f``, stacked).

    **Shared / task-specific split.** Shared: ``trunk`` (and ``extractors`` when shared).
    Task-specific: ``attention``, ``heads`` (and per-task ``extractors``).

    Input ``(batch, H, W, C)`` with ``H, W`` divisible by ``2^(L−1)``; output
    ``(T, batch, out_features)``. ``out_features`` may give one width per task (``(10, 1)``:
    a classifier and a regressor): the output is then ``(T, batch, max)`` with each task's
    extra columns 0; :func:`mtljax.nn.split_outputs` slices them off.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        out_features: int | Sequence[int],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        share_extractor: bool = True,
    ):
        chans = count_tuple(channels, min_len=1)
        if chans is None:
            raise ValueError(
                f"MTAN: channels must list ≥ 1 positive integer sizes, got {channels!r}"
            )
        check_positive("MTAN", in_channels=in_channels, num_tasks=num_tasks)
        out_features = check_out_features("MTAN", out_features, num_tasks)
        self.trunk = nnx.List(
            [
                _TrunkBlock(a, b, rngs=rngs)
                for a, b in zip((in_channels, *chans[:-1]), chans, strict=True)
            ]
        )
        att = []
        for j, c in enumerate(chans):
            cin = c if j == 0 else 2 * c
            att.append(
                nnx.List(
                    [
                        StackedLinear(cin, c, num_tasks, rngs=rngs),
                        StackedLinear(c, c, num_tasks, rngs=rngs),
                    ]
                )
            )
        self.attention = nnx.List(att)
        if share_extractor:
            ext = [
                nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs)
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        else:
            ext = [
                _StackedConv3(a, b, num_tasks, rngs=rngs)
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        self.extractors = nnx.List(ext)
        self.heads = StackedLinear(chans[-1], out_features, num_tasks, rngs=rngs)
        self.channels = chans
        self.in_channels = in_channels
        self.num_tasks = num_tasks
        self.share_extractor = share_extractor

    @property
    def shared_paths(self) -> tuple[str, ...]:
        if self.share_extractor and len(self.extractors):
            return ("trunk", "extractors")
        return ("trunk",)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        return f"trunk/{len(self.trunk) - 1}"

    def check_feature_level(self) -> None:
        """Feature level (``encode``/``predict`` as separate halves) needs task-specific
        extractors: shared ones read the task-specific masked features."""
        if self.share_extractor and len(self.extractors):
            raise ValueError(
                "MTAN: with share_extractor=True the shared extractors f⁽ʲ⁾ read task-specific "
                "masked features, so encode/predict cannot be split into shared and "
                "task-specific halves; build MTAN(..., share_extractor=False) for feature "
                "level, or train at parameter level with losses="
            )

    def _check(self, x: jax.Array) -> None:
        div = 2 ** (len(self.channels) - 1)
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % div or x.shape[2] % div:
            raise ValueError(
                f"MTAN: expected inputs (batch, H, W, {self.in_channels}) with H and W divisible "
                f"by {div}, got shape {x.shape}"
            )

    def encode(self, x: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """The shared trunk's features ``[(u⁽ʲ⁾, p⁽ʲ⁾)]`` at every block."""
        self._check(x)
        feats = []
        h = x
        for j, block in enumerate(self.trunk):
            if j > 0:
                h = pool2(h)
            u, p = block(h)
            feats.append((u, p))
            h = p
        return feats

    def _extract(self, j: int, masked: jax.Array) -> jax.Array:
        ext = self.extractors[j - 1]
        t, b = masked.shape[:2]
        if self.share_extractor:
            y = ext(masked.reshape((t * b,) + masked.shape[2:]))
            y = y.reshape((t, b) + y.shape[1:])
        else:
            y = ext(masked)
        return pool2(nnx.relu(y))

    def predict(self, feats: list[tuple[jax.Array, jax.Array]], x: Any = None) -> jax.Array:
        """``(T, batch, out)``: the attention modules and heads on the trunk's features."""
        t = self.num_tasks
        masked = None
        for j, (u, p) in enumerate(feats):
            ut = jnp.broadcast_to(u, (t,) + u.shape)
            inp = ut if j == 0 else jnp.concatenate([ut, self._extract(j, masked)], axis=-1)
            g1, g2 = self.attention[j]
            mask = jax.nn.sigmoid(g2(nnx.relu(g1(inp, per_task=True)), per_task=True))
            masked = mask * p
        pooled = jnp.mean(masked, axis=(2, 3))  # (T, batch, C)
        return self.heads(pooled, per_task=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.predict(self.encode(x))
