"""Flax NNX building blocks for multi-task models (each in ``mtljax/_src/nn/<name>.py``)."""

from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.mlp import MLP
from mtljax._src.nn.stacked import StackedLinear

__all__ = ["MLP", "HardSharing", "StackedLinear"]
