"""Flax NNX building blocks for multi-task models (each in ``mtljax/_src/nn/<name>.py``).

Every block declares which of its parameters are shared by several tasks' losses
(``block.shared_filter``, ``block.shared_paths``) and, where it has one, its last shared layer
(``block.last_shared``); :func:`from_block` passes both to :func:`mtljax.from_nnx`, and
:func:`check_shared_split` verifies the split numerically. A block whose penalty couples
tasks (soft sharing, a cascade's successive regularization) defines ``regularizer(self) ->
f32[]``, which :func:`from_block` wires as the model's regularizer: added to the multi-task
method's update, outside the loss vector. A penalty that reads the input (DSelect-k's
``entropy_penalty(x)``) is passed to :func:`from_block` as ``regularizer=lambda m, batch: …``.

Sizes, counts and layer indices are integers (Python or NumPy); a float or a bool is refused,
not truncated. Every block accepts a single task (``T = 1``, the single-task baseline with the
same architecture) except those whose structure is a relation between tasks: ``CrossStitch``,
``LowLevelSupervision`` and ``Cascade`` need ``T ≥ 2``.
"""

from mtljax._src.nn.cascade import Cascade
from mtljax._src.nn.constant import Constant
from mtljax._src.nn.cross_stitch import CrossStitch, CrossStitchUnit, cross_stitch_init
from mtljax._src.nn.dselect_k import DSelectK, selector_weights, smooth_step
from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.low_level import LowLevelSupervision
from mtljax._src.nn.mlp import MLP
from mtljax._src.nn.mmoe import MMoE, OMoE
from mtljax._src.nn.mtan import MTAN
from mtljax._src.nn.ple import CGC, PLE, ExtractionLayer
from mtljax._src.nn.resnet import BasicBlock, ResNet
from mtljax._src.nn.soft_sharing import HybridSharing, SoftSharing
from mtljax._src.nn.split import (
    PathPrefixes,
    SplitReport,
    check_shared_split,
    from_block,
    last_shared,
    shared_filter,
)
from mtljax._src.nn.stacked import StackedLinear, split_outputs
from mtljax._src.nn.towers import StackedMLP

__all__ = [
    "CGC",
    "MLP",
    "MMoE",
    "MTAN",
    "OMoE",
    "PLE",
    "BasicBlock",
    "Cascade",
    "Constant",
    "CrossStitch",
    "CrossStitchUnit",
    "DSelectK",
    "ExtractionLayer",
    "HardSharing",
    "HybridSharing",
    "LowLevelSupervision",
    "PathPrefixes",
    "ResNet",
    "SoftSharing",
    "SplitReport",
    "StackedLinear",
    "StackedMLP",
    "check_shared_split",
    "cross_stitch_init",
    "from_block",
    "last_shared",
    "selector_weights",
    "shared_filter",
    "smooth_step",
    "split_outputs",
]
