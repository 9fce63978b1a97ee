"""mtljax: functional multi-task learning for JAX and Flax.

A multi-task model is a vector of task losses and a split of its parameters into shared and
task-specific ones; a method (``mtljax.methods``) turns the losses, the Gramian or the Jacobian
of the shared parameters into an update, inside one jitted train step.
"""

from mtljax import analysis, bench, methods, nn, problems, regularizers
from mtljax._src.base import (
    Method,
    SolverInfo,
    SolverState,
    aggregate,
    combine,
    gramian,
    solver_info,
    weights_from_gramian,
)
from mtljax._src.checkpoint import (
    CheckpointDamagedError,
    Checkpointer,
    CheckpointExistsError,
    CheckpointFolderError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointSaveError,
    DamagedCheckpointWarning,
    Restored,
)
from mtljax._src.engine import feature_jacobian, gramian_by_chunks, jacobian, task_jacobian
from mtljax._src.gramian_layerwise import gramian_layerwise
from mtljax._src.layer_subset import on_layers
from mtljax._src.metrics_log import MetricsWriter, read_metrics
from mtljax._src.model import (
    BatchField,
    Model,
    ModelStateError,
    Params,
    batch_axes_of,
    batch_spec_like,
    check_batch,
    from_nnx,
    to_nnx,
)
from mtljax._src.sharding import (
    DataParallelStep,
    data_parallel,
    initialize_distributed,
    make_mesh,
    replicate,
    set_cpu_devices,
    shard_batch,
    state_shardings,
    to_host,
)
from mtljax._src.train import (
    NonFiniteError,
    PerTaskFeaturesWarning,
    SkippedStepWarning,
    SolverError,
    TrainState,
    TrainStep,
    gradients,
    init_train_state,
    make_train_step,
    mixed_precision,
    pairwise_cosines,
)

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "bench",
    "BatchField",
    "CheckpointDamagedError",
    "CheckpointExistsError",
    "CheckpointFolderError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "Checkpointer",
    "DamagedCheckpointWarning",
    "DataParallelStep",
    "Method",
    "MetricsWriter",
    "Model",
    "ModelStateError",
    "NonFiniteError",
    "PerTaskFeaturesWarning",
    "SkippedStepWarning",
    "Params",
    "Restored",
    "SolverError",
    "SolverInfo",
    "SolverState",
    "TrainState",
    "TrainStep",
    "aggregate",
    "batch_axes_of",
    "batch_spec_like",
    "check_batch",
    "combine",
    "data_parallel",
    "feature_jacobian",
    "from_nnx",
    "gradients",
    "gramian",
    "gramian_by_chunks",
    "gramian_layerwise",
    "init_train_state",
    "initialize_distributed",
    "jacobian",
    "make_mesh",
    "make_train_step",
    "methods",
    "mixed_precision",
    "nn",
    "on_layers",
    "pairwise_cosines",
    "problems",
    "read_metrics",
    "regularizers",
    "replicate",
    "set_cpu_devices",
    "shard_batch",
    "solver_info",
    "state_shardings",
    "task_jacobian",
    "to_host",
    "to_nnx",
    "weights_from_gramian",
]
