"""Data parallelism (and FSDP-style parameter sharding) over a ``jax.sharding`` mesh.

The batch is split along its example axis over the mesh's ``"data"`` axis and the train state is
replicated (or, with ``fsdp=True``, its large arrays are split over the same axis). The train
step is the ordinary one, compiled for the whole mesh: its losses are means over the **global**
batch, so the per-task Jacobian it differentiates is the global one. XLA computes each
device's share of it and sums the shares across devices (an all-reduce of the ``T × P``
Jacobian, or of the ``T × T`` Gramian when the Jacobian's parameter axis is sharded) *before*
the method sees it. This matters: the Gramian of a sum is not the sum of the Gramians, and a
nonlinear method (PCGrad, MGDA, UPGrad, Nash-MTL, GradNorm's weight update...) applied to each
device's own Jacobian and then averaged gives another, wrong, update. Training on ``N``
devices therefore matches training on one device with the same global batch, up to the order
of floating-point sums.

Multi-host: call :func:`initialize_distributed` first in every process; the mesh then spans
every process's devices, every process runs the same program on the same global batch
(each keeps only its devices' share), and checkpoints are written collectively.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtljax._src import model as model_lib
from mtljax._src import tree as tree_lib
from mtljax._src.train import TrainState, TrainStep, batch_signature, make_train_step

PyTree = Any
Batch = Any


# ----------------------------------------------------------------------------------------------
# Devices and processes


def backends_initialized() -> bool:
    """Whether JAX has already created its backends (device counts are then fixed)."""
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", {}))


def set_cpu_devices(num_devices: int) -> None:
    """Asks JAX for ``num_devices`` CPU devices (simulated on one host), before it starts.

    Has to run before JAX initialises its backends (before the first array or device query
    of the process). It only affects the CPU platform: on a machine with accelerators, the
    accelerators' devices are used as they are.
    """
    n = int(num_devices)
    if n < 1:
        raise ValueError(f"num_devices must be ≥ 1, got {num_devices}")
    if backends_initialized():
        if jax.default_backend() == "cpu" and len(jax.devices()) != n and n > 1:
            raise RuntimeError(
                f"JAX has already started with {len(jax.devices())} CPU devices; ask for "
                f"{n} before any JAX computation (or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={n} in the environment)"
            )
        return
    jax.config.update("jax_num_cpu_devices", n)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_devices: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins a multi-process (multi-host) JAX run: call it first thing in every process.

    Wraps ``jax.distributed.initialize``. On clusters that JAX recognises (SLURM, Open MPI,
    Cloud TPU, Kubernetes with the right environment) every argument may be left out;
    otherwise give the coordinator's ``host:port`` (process 0 listens there), the number of
    processes and this process's index. ``cpu_devices`` sets how many CPU devices each
    process simulates (CPU-only runs; the CPU backend exchanges data over TCP with gloo).

    After it, ``jax.devices()`` lists the devices of every process and :func:`make_mesh`
    builds a mesh over all of them.
    """
    if cpu_devices is not None:
        set_cpu_devices(cpu_devices)
    if jax.config.jax_platforms in (None, "", "cpu") or cpu_devices is not None:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):  # pragma: no cover - older or newer JAX
            pass
    kwargs: dict[str, Any] = {"initialization_timeout": initialization_timeout}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def make_mesh(
    num_devices: int | None = None,
    *,
    axis_name: str = "data",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A one-axis mesh over ``num_devices`` devices (all of them, across processes, by default)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"make_mesh: asked for {num_devices} devices, {len(devices)} are available "
                f"({devices[0].platform}); on CPU, call mtljax.set_cpu_devices({num_devices}) "
                "before JAX starts"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (axis_name,))


# ----------------------------------------------------------------------------------------------
# Placing arrays


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` as a global array with ``sharding`` (works across processes, typed keys too)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if _is_key(x):
        impl = str(jax.random.key_impl(x))
        spec = P(*sharding.spec, *([None] * (jax.random.key_data(x).ndim - len(sharding.spec))))
        data = _put(jax.random.key_data(x), NamedSharding(sharding.mesh, spec))
        return jax.random.wrap_key_data(data, impl=impl)
    if jax.process_count() == 1 or isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copies every array of ``tree`` (e.g. a train state) to every device of ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, *, axis: str = "data", min_size: int = 2**12) -> P:
    """The FSDP split of an array: its largest axis divisible by the mesh, if it is large."""
    n = mesh.shape[axis]
    size = int(np.prod(shape)) if len(shape) else 1
    if n == 1 or size < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % n == 0]
    if not candidates:
        return P()
    best = max(candidates, key=lambda i: shape[i])
    return P(*[axis if i == best else None for i in range(len(shape))])


def state_shardings(
    state: PyTree, mesh: Mesh, *, fsdp: bool = False, axis: str = "data", min_size: int = 2**12
) -> PyTree:
    """Shardings for every array of a state: replicated, or FSDP-split (see :func:`fsdp_spec`).

    The FSDP rule depends on an array's shape alone, so parameters and the optimizer's
    moments of the same shape are split alike.
    """

    def one(x):
        if not fsdp or _is_key(x):
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(np.shape(x), mesh, axis=axis, min_size=min_size))

    return jax.tree_util.tree_map(one, state)


def batch_shardings(
    batch: Batch, mesh: Mesh, *, batch_axes: PyTree = 0, axis: str = "data"
) -> PyTree:
    """Per field of ``batch``, the sharding that splits its batch axis over ``axis``.

    ``batch_axes`` is an int for every field, or a pytree prefix of the batch with an int
    (the field's example axis) or ``None`` (replicate the field) per field.
    """
    axes = model_lib._broadcast_prefix(batch_axes, batch, "batch_axes")
    n = mesh.shape[axis]

    def one(path, x, ax):
        if ax is None:
            return replicated(mesh)
        shape = np.shape(x)
        if not -len(shape) <= ax < len(shape):
            raise ValueError(
                f"batch field {tree_lib.path_str(path)!r} of shape {shape} has no batch axis {ax}"
            )
        if shape[ax] % n:
            raise ValueError(
                f"batch field {tree_lib.path_str(path)!r} has {shape[ax]} examples "
                f"on axis {ax}, not divisible by the {n} devices of the mesh's {axis!r} axis"
            )
        spec = [None] * len(shape)
        spec[ax] = axis
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(one, batch, axes)


def shard_batch(batch: Batch, mesh: Mesh, *, batch_axes: PyTree = 0, axis: str = "data") -> Batch:
    """Splits ``batch`` over the devices of ``mesh`` along each field's batch axis.

    In a multi-process run every process passes the same global batch and keeps its share.
    """
    shardings = batch_shardings(batch, mesh, batch_axes=batch_axes, axis=axis)
    return jax.tree_util.tree_map(_put, batch, shardings)


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of a tree's arrays on this process (gathering sharded multi-process ones)."""
    from jax.experimental import multihost_utils

    def one(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


# ----------------------------------------------------------------------------------------------
# The data-parallel step


def _jacobian_constraint(mesh: Mesh, axis: str, min_size: int):
    """Keeps each Jacobian leaf ``(T, *shape)`` split like its parameter (FSDP)."""

    def constrain(jac):
        def one(leaf):
            spec = fsdp_spec(leaf.shape[1:], mesh, axis=axis, min_size=min_size)
            return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, P(None, *spec)))

        return jax.tree_util.tree_map(one, jac)

    return constrain


class DataParallelStep:
    """A train step over a mesh: ``step(state, batch) -> (state, metrics)``.

    Places the state (replicated, or FSDP-split) and splits the batch along its example axis
    on every call (a no-op when they are already placed: use :meth:`place_state` and
    :func:`shard_batch` ahead to keep transfers off the step). The metrics are replicated.
    """

    def __init__(
        self,
        step: TrainStep,
        mesh: Mesh,
        *,
        batch_axes: PyTree = None,
        fsdp: bool = False,
        axis: str = "data",
        min_size: int = 2**12,
    ):
        if not isinstance(step, TrainStep):
            raise TypeError(f"data_parallel: expected a TrainStep, got {type(step).__name__}")
        if axis not in mesh.axis_names:
            raise ValueError(f"data_parallel: the mesh has axes {mesh.axis_names}, not {axis!r}")
        self.mesh, self.axis, self.fsdp, self.min_size = mesh, axis, fsdp, min_size
        if batch_axes is None:
            spec = step.model.batch_spec
            batch_axes = 0 if spec is None else model_lib.batch_axes_of(spec)
        self.batch_axes = batch_axes
        constraint = _jacobian_constraint(mesh, axis, min_size) if fsdp else None
        self.step = make_train_step(step.model, step.method, step.optimizer, **step._options())
        self.step.jacobian_constraint = constraint
        self.model, self.method, self.nonfinite = step.model, step.method, step.nonfinite
        self._jitted: dict[Any, Any] = {}

    def state_shardings(self, state: TrainState) -> PyTree:
        return state_shardings(
            state, self.mesh, fsdp=self.fsdp, axis=self.axis, min_size=self.min_size
        )

    def place_state(self, state: TrainState) -> TrainState:
        """The state on the mesh (replicated, or FSDP-split)."""
        return jax.tree_util.tree_map(_put, state, self.state_shardings(state))

    def shard_batch(self, batch: Batch) -> Batch:
        return shard_batch(batch, self.mesh, batch_axes=self.batch_axes, axis=self.axis)

    def batch_shardings(self, batch: Batch) -> PyTree:
        return batch_shardings(batch, self.mesh, batch_axes=self.batch_axes, axis=self.axis)

    def _compiled(self, state: TrainState, batch: Batch):
        key = (jax.tree_util.tree_structure(state), batch_signature(batch))
        if key not in self._jitted:
            state_sh = self.state_shardings(state)
            self._jitted[key] = jax.jit(
                self.step._step,
                in_shardings=(state_sh, self.batch_shardings(batch)),
                out_shardings=(state_sh, replicated(self.mesh)),
            )
        return self._jitted[key]

    def lower(self, state: TrainState, batch: Batch):
        """The lowered computation (for ``.compile().memory_analysis()`` or HLO inspection)."""
        return self._compiled(state, batch).lower(state, batch)

    def __call__(self, state: TrainState, batch: Batch):
        self.step.check_if_new(state, batch)
        state = self.place_state(state)
        batch = self.shard_batch(batch)
        new, metrics = self._compiled(state, batch)(state, batch)
        self.step.raise_if_failed(metrics)
        return new, metrics


def data_parallel(
    step: TrainStep,
    mesh: Mesh,
    *,
    batch_axes: PyTree = None,
    fsdp: bool = False,
    axis: str = "data",
    min_size: int = 2**12,
) -> DataParallelStep:
    """The train step ``step`` run data-parallel over ``mesh``.

    Args:
      step: a step from :func:`mtljax.make_train_step` (its options carry over).
      mesh: e.g. :func:`make_mesh`; the batch is split over its ``axis``.
      batch_axes: each batch field's example axis (an int, or a pytree prefix of the batch
        with an int or ``None`` per field); by default the model's ``batch_spec`` says, or
        axis 0.
      fsdp: also split the state's large arrays (parameters, optimizer moments) over the same
        axis, each along its largest axis divisible by the number of devices; the Jacobian
        is kept split like the parameters, so each device forms its share of the Gramian
        ``Σ_p J[:, p] J[:, p]ᵀ`` and the ``T × T`` partial Gramians are summed across devices.
      min_size: arrays smaller than this many elements stay replicated under ``fsdp``.
    """
    return DataParallelStep(
        step, mesh, batch_axes=batch_axes, fsdp=fsdp, axis=axis, min_size=min_size
    )


def process_info() -> dict[str, Any]:
    """This process's place in a multi-process run (for logs)."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        "host": os.uname().nodename if hasattr(os, "uname") else "",
    }
