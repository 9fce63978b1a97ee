"""mtljax: functional multi-task learning for JAX and Flax.

A multi-task model is a vector of task losses and a split of its parameters into shared and
task-specific ones; a method (``mtljax.methods``) turns the losses, the Gramian or the Jacobian
of the shared parameters into an update, inside one jitted train step.
"""

from mtljax import methods, nn, problems
from mtljax._src.base import Method, aggregate, combine, gramian, weights_from_gramian
from mtljax._src.engine import feature_jacobian, jacobian, task_jacobian
from mtljax._src.model import Model, Params, from_nnx, to_nnx
from mtljax._src.train import (
    TrainState,
    TrainStep,
    gradients,
    init_train_state,
    make_train_step,
    pairwise_cosines,
)

__version__ = "0.1.0"

__all__ = [
    "Method",
    "Model",
    "Params",
    "TrainState",
    "TrainStep",
    "aggregate",
    "combine",
    "feature_jacobian",
    "from_nnx",
    "gradients",
    "gramian",
    "init_train_state",
    "jacobian",
    "make_train_step",
    "methods",
    "nn",
    "problems",
    "pairwise_cosines",
    "task_jacobian",
    "to_nnx",
    "weights_from_gramian",
]
