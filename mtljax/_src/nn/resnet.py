"""A small residual convolutional encoder with batch normalisation (He et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import check_positive, check_real, count_tuple, int_tuple

_CONV3_PADDING = ((1, 1), (1, 1))


def he_normal() -> nnx.Initializer:
    """``N(0, 2 / fan_in)`` with ``fan_in = k·k·C_in``: He et al., "Delving Deep into Rectifiers",
    ICCV 2015, eq. 10 (the initialisation the ResNet paper uses, its ref. [13])."""
    return nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv(cin: int, cout: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (size, size),
        strides=(stride, stride),
        padding=_CONV3_PADDING if size == 3 else "VALID",
        use_bias=False,  # the batch normalisation that follows has its own shift β
        kernel_init=he_normal(),
        rngs=rngs,
    )


def _bn(c: int, momentum: float, epsilon: float, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=momentum, epsilon=epsilon, rngs=rngs)


class _Projection(nnx.Module):
    """Shortcut ``BN(W_s x)`` with ``W_s`` a 1×1 convolution of stride ``s`` (option B)."""

    def __init__(self, cin, cout, stride, momentum, epsilon, rngs):
        self.conv = _conv(cin, cout, 1, stride, rngs)
        self.bn = _bn(cout, momentum, epsilon, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """``y = relu(BN₂(conv₂(drop(relu(BN₁(conv₁(x)))))) + shortcut(x))``: the basic residual
    block of He et al. 2016 (Fig. 2 and 5 left), conv₁ of stride ``stride``. The shortcut is
    the identity when the block keeps the shape, else a projection (see :class:`ResNet`).
    ``drop`` is dropout between the two convolutions, as Zagoruyko & Komodakis place it (Wide
    Residual Networks, BMVC 2016); absent when ``dropout_rate == 0``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        *,
        rngs: nnx.Rngs,
        dropout_rate: float = 0.0,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
    ):
        self.conv1 = _conv(cin, cout, 3, stride, rngs)
        self.bn1 = _bn(cout, momentum, epsilon, rngs)
        self.conv2 = _conv(cout, cout, 3, 1, rngs)
        self.bn2 = _bn(cout, momentum, epsilon, rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
        if stride != 1 or cin != cout:
            self.shortcut = _Projection(cin, cout, stride, momentum, epsilon, rngs)
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array, *, rngs: Any = None) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        if self.dropout is not None:
            h = self.dropout(h, rngs=rngs)
        h = self.bn2(self.conv2(h))
        skip = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(h + skip)


def _stage_sizes(name: str, values: Any, default: tuple[int, ...], stages: int) -> tuple:
    if values is None:
        return default
    if int_tuple(values) is None:
        raise ValueError(
            f"ResNet: {name} must be a sequence of {stages} positive ints (one per stage), "
            f"got {values!r}"
        )
    sizes = count_tuple(values, min_len=1)
    if sizes is None or len(sizes) != stages:
        raise ValueError(
            f"ResNet: {name} must list {stages} positive ints (one per stage, as widths), "
            f"got {values!r}"
        )
    return sizes


class ResNet(nnx.Module):
    """A residual convolutional encoder: images ``(batch, H, W, in_channels)`` (NHWC) to
    features ``(batch, widths[-1])``.

    He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. The
    network is their CIFAR-10 design (§4.2) with configurable stages:

    - a stem ``relu(BN(conv₃ₓ₃(x)))`` with ``widths[0]`` channels, stride 1;
    - stage ``i``: ``blocks[i]`` :class:`BasicBlock` of width ``widths[i]``; the first has
      stride ``strides[i]`` (the stage's subsampling, by a strided convolution as in the
      paper), the others stride 1;
    - global average pooling over ``H, W``.

    Every convolution is followed by batch normalisation (Ioffe & Szegedy 2015) before its
    ReLU, as in the paper; convolutions have no bias (BN's ``β`` is the shift), kernels are
    drawn from ``N(0, 2/fan_in)`` (He et al. 2015, the paper's initialisation) and BN's
    ``γ = 1, β = 0``. A shortcut is the identity when a block keeps the shape and a 1×1
    projection of the block's stride followed by BN when it changes the width or the
    resolution: the paper's option B (§3.3). Its CIFAR networks use option A instead
    (subsampled identities zero-padded to the new width); option B also handles a stage
    narrower than the previous one, which zero-padding cannot, and is what torchvision's
    ResNets, which LibMTL uses as MTL encoders, do. 3×3 convolutions pad by 1 on each side,
    so a stride-2 stage maps ``H`` to ``⌈H/2⌉``.

    Defaults: ``widths=(16, 32, 64)``, 3 blocks per stage and strides ``(1, 2, 2)`` are the
    paper's CIFAR ResNet-20 (``n = 3``; filters {16, 32, 64}; subsampling at the start of the
    2nd and 3rd stages); with other ``widths``, ``blocks`` defaults to 3 per stage and
    ``strides`` to 1 for the first stage and 2 for each later one. ``bn_momentum=0.9``:
    running statistics ``r ← m·r + (1 − m)·batch statistic`` (Flax's convention), i.e.
    PyTorch's BatchNorm default (its ``momentum=0.1`` is the batch's weight), under which
    torchvision's ResNets and LibMTL's encoders train; ``bn_epsilon=1e-5`` is the same
    libraries' default (the BN paper leaves both open). ``dropout_rate=0`` (the ResNet paper
    uses none); when positive, dropout sits between each block's two convolutions (Wide
    Residual Networks, Zagoruyko & Komodakis 2016) and draws its masks from the ``dropout``
    stream of the ``rngs`` given at construction (``default`` if it has none), or from
    ``rngs=`` given to the call.

    **Modes.** In training mode (the default, or after ``module.train()``), BN normalises by
    the batch's mean and (biased) variance and updates its running statistics in place;
    after ``module.eval()``, BN uses the running statistics and dropout is off, so the
    output is a deterministic function of the input. The running statistics are
    ``nnx.BatchStat`` variables, not parameters; BN's scale ``γ`` and shift ``β`` are
    parameters.

    **As a multi-task encoder** (hard parameter sharing, as the MTL literature's image
    benchmarks use ResNets): ``HardSharing(ResNet(3, rngs=rngs), StackedLinear(64, k, T,
    rngs=rngs))``. Every parameter of the encoder (convolutions, BN ``γ`` and ``β``) is then
    shared, under ``encoder``; :class:`HardSharing` declares ``shared_paths = ("encoder",)``
    and ``last_shared = "encoder/" + last_layer_path``, the last residual block
    (``stages/<last>/<last>``).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        rngs: nnx.Rngs,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        dropout_rate: float = 0.0,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
    ):
        check_positive("ResNet", in_channels=in_channels)
        if int_tuple(widths) is None:
            raise ValueError(
                f"ResNet: widths must be a sequence of sizes, e.g. (16,), got {widths!r}"
            )
        chans = count_tuple(widths, min_len=1)
        if chans is None:
            raise ValueError(f"ResNet: widths must list ≥ 1 positive integer sizes, got {widths!r}")
        s = len(chans)
        depth = _stage_sizes("blocks", blocks, (3,) * s, s)
        steps = _stage_sizes("strides", strides, (1,) + (2,) * (s - 1), s)
        rate = check_real("ResNet", "dropout_rate", dropout_rate, low=0.0, strict=False)
        if rate >= 1.0:
            raise ValueError(f"ResNet: dropout_rate must be in [0, 1), got {dropout_rate!r}")
        momentum = check_real("ResNet", "bn_momentum", bn_momentum, low=0.0, strict=False)
        if momentum >= 1.0:
            raise ValueError(f"ResNet: bn_momentum must be in [0, 1), got {bn_momentum!r}")
        epsilon = check_real("ResNet", "bn_epsilon", bn_epsilon, low=0.0, strict=True)
        in_channels = int(in_channels)

        self.stem_conv = _conv(in_channels, chans[0], 3, 1, rngs)
        self.stem_bn = _bn(chans[0], momentum, epsilon, rngs)
        stages = []
        cin = chans[0]
        for width, n, stride in zip(chans, depth, steps, strict=True):
            stage = []
            for j in range(n):
                stage.append(
                    BasicBlock(
                        cin,
                        width,
                        stride if j == 0 else 1,
                        rngs=rngs,
                        dropout_rate=rate,
                        momentum=momentum,
                        epsilon=epsilon,
                    )
                )
                cin = width
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        self.in_channels = in_channels
        self.widths = chans
        self.blocks = depth
        self.strides = steps
        self.dropout_rate = rate
        self.out_features = chans[-1]

    @property
    def last_layer_path(self) -> str:
        """Path of the last residual block, ``stages/<last>/<last>`` (GradNorm's default
        subset when the ResNet is the shared encoder of :class:`HardSharing`)."""
        return f"stages/{len(self.stages) - 1}/{len(self.stages[-1]) - 1}"

    def _check(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels or 0 in x.shape[1:3]:
            raise ValueError(
                f"ResNet: expected images (batch, H, W, {self.in_channels}) (NHWC), got shape "
                f"{x.shape}"
            )

    def feature_map(self, x: jax.Array, *, rngs: Any = None) -> jax.Array:
        """The last stage's output ``(batch, H', W', widths[-1])``, before pooling."""
        self._check(x)
        blocks = [block for stage in self.stages for block in stage]
        if isinstance(rngs, jax.Array) and self.dropout_rate > 0:
            keys = list(jax.random.split(rngs, len(blocks)))  # one mask stream per block
        else:
            keys = [rngs] * len(blocks)
        h = nnx.relu(self.stem_bn(self.stem_conv(x)))
        for block, key in zip(blocks, keys, strict=True):
            h = block(h, rngs=key)
        return h

    def __call__(self, x: jax.Array, *, rngs: Any = None) -> jax.Array:
        """``(batch, widths[-1])``: global average pooling of :meth:`feature_map`. ``rngs``
        (an ``nnx.Rngs``, a stream, or a key, split into one per block) replaces the module's
        own dropout stream."""
        return jnp.mean(self.feature_map(x, rngs=rngs), axis=(1, 2))
