"""Checkpoints of a whole training run with orbax-checkpoint, and exact resume.

A checkpoint holds every array of the :class:`~mtljax.TrainState` (parameters, optimizer state,
method state, RNG key, step, skipped-step count) and a JSON record: the data-iterator position,
the validation metric, free-form ``extra`` data, and what the run *is* (method, task names,
user configuration such as the problem and the method's hyper-parameters, and the structure,
shapes and dtypes of the parameters and of the whole state). Restoring checks that record
against the run being resumed and refuses a checkpoint that belongs to another run, saying
what differs.

Saves are atomic (orbax writes into a temporary directory and renames it when complete): a
process killed during a save leaves the previous checkpoints intact and the partial one is
ignored, then removed when the directory is opened again.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mtljax._src import tree as tree_lib

PyTree = Any

FORMAT = "mtljax-checkpoint/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another run (problem, method, tasks or parameter structure).

    Attributes:
      differences: one line per difference.
    """

    def __init__(self, message: str, differences: Sequence[str]):
        super().__init__(message)
        self.differences = tuple(differences)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dtype_name(x: Any) -> str:
    return str(x.dtype) if _is_key(x) else np.dtype(x.dtype).name


def structure(tree: PyTree) -> list[list[Any]]:
    """``[[path, shape, dtype], ...]`` for the leaves of ``tree``, in flattening order."""
    return [
        [tree_lib.path_str(path), list(np.shape(leaf)), _dtype_name(leaf)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _jsonable(value: Any) -> Any:
    """A JSON round-trip-stable form (tuples become lists, numpy scalars Python numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _diff_structure(label: str, saved: list, now: list, limit: int = 6) -> list[str]:
    if saved == now:
        return []
    saved_map = {p: (s, d) for p, s, d in saved}
    now_map = {p: (s, d) for p, s, d in now}
    out = []
    missing = [p for p in now_map if p not in saved_map]
    extra = [p for p in saved_map if p not in now_map]
    if missing:
        out.append(
            f"{label}: this run has {len(missing)} leaves the checkpoint lacks: {missing[:limit]}"
        )
    if extra:
        out.append(
            f"{label}: the checkpoint has {len(extra)} leaves this run lacks: {extra[:limit]}"
        )
    changed = [
        f"{p}: checkpoint {saved_map[p][1]}{tuple(saved_map[p][0])}, this run "
        f"{now_map[p][1]}{tuple(now_map[p][0])}"
        for p in now_map
        if p in saved_map and saved_map[p] != now_map[p]
    ]
    if changed:
        out.append(
            f"{label}: {len(changed)} leaves differ in shape or dtype: "
            + "; ".join(changed[:limit])
        )
    if not out:
        out.append(f"{label}: the leaves are ordered differently")
    return out


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
      state: the restored state, with the template's structure, dtypes and shardings.
      step: the checkpoint's step.
      data_position: the data-iterator position saved with it (any JSON value).
      metric: the validation metric saved with it, or ``None``.
      extra: the free-form JSON data saved with it.
      record: the whole JSON record.
    """

    state: PyTree
    step: int
    data_position: Any
    metric: float | None
    extra: dict[str, Any]
    record: dict[str, Any]


class Checkpointer:
    """Saves and restores whole train states in ``directory`` with an orbax ``CheckpointManager``.

    Keeps the ``keep`` latest checkpoints plus the best one by the metric given to
    :meth:`save` (lowest with ``best_mode="min"``, highest with ``"max"``).

    Args:
      directory: where checkpoints go (one sub-directory per step).
      keep: how many of the latest checkpoints to keep (≥ 1).
      best_mode: ``"min"`` or ``"max"``: which metric value is best.
      method: the method (or its name) the run trains with, checked on restore.
      task_names: the model's tasks, checked on restore.
      config: JSON-serialisable facts that define the run (problem, its options, the method's
        hyper-parameters, seed...), checked on restore key by key.
      async_save: write in a background thread (the arrays are copied to the host first, so
        training can go on); :meth:`wait_until_finished` or :meth:`close` waits for it.

    Example::

        ckpt = mtl.Checkpointer("/tmp/run", keep=3, method=method, task_names=model.task_names)
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state).state
        for i in range(int(state.step), steps):
            state, metrics = step(state, sample(i))
            if (i + 1) % 100 == 0:
                ckpt.save(state, data_position=i + 1)
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        best_mode: str = "min",
        method: Any = None,
        task_names: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        async_save: bool = True,
    ):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as managers

        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer: keep must be an int ≥ 1, got {keep!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: best_mode must be 'min' or 'max', got {best_mode!r}")
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep, self.best_mode = keep, best_mode
        self.method_name = getattr(method, "name", method)
        self.task_names = None if task_names is None else list(task_names)
        self.config = _jsonable(dict(config or {}))
        policy = managers.AnyPreservationPolicy(
            [
                managers.LatestN(n=keep),
                managers.BestN(
                    get_metric_fn=lambda m: m["metric"],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints in the directory, ascending."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step of the checkpoint with the best metric (``None`` if none has one)."""
        best, best_value = None, None
        for s in self.steps():
            value = self.record(s).get("metric")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            better = best_value is None or (
                value < best_value if self.best_mode == "min" else value > best_value
            )
            if better:
                best, best_value = s, value
        return best

    def record(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of a checkpoint (the latest by default)."""
        step = self._resolve(step)
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; there are {steps}"
            )
        return int(step)

    # ------------------------------------------------------------------------------------------

    def _describe(self, state: PyTree) -> dict[str, Any]:
        params = getattr(state, "params", None)
        return {
            "method": self.method_name,
            "task_names": self.task_names,
            "config": self.config,
            "params": structure(params) if params is not None else None,
            "state": structure(state),
        }

    def save(
        self,
        state: PyTree,
        *,
        data_position: Any = None,
        metric: float | None = None,
        extra: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> bool:
        """Saves ``state`` as the checkpoint of step ``int(state.step)`` (or ``step``).

        Args:
          state: a :class:`~mtljax.TrainState`, or any pytree of arrays: with no ``step``
            attribute, give ``step``. E.g. a train state with the model's constants (see
            :class:`mtljax.nn.Constant`): ``save((state, model.nnx_rest), step=int(state.step))``.
          data_position: where the data iterator is (any JSON value), returned on restore.
          metric: the validation metric that ranks checkpoints for the "best" one kept.
          extra: free-form JSON data (histories, notes) returned on restore.
          step: the checkpoint's step; by default ``state.step``.

        Returns False (and saves nothing) when that step is already saved.
        """
        ocp = self._ocp
        if step is None:
            if not hasattr(state, "step"):
                raise ValueError(
                    f"Checkpointer.save: a {type(state).__name__} has no `step`; pass step=..."
                )
            step = state.step
        step = int(np.asarray(_host_scalar(step)))
        if step in self.manager.all_steps():
            return False
        flat, _ = jax.tree_util.tree_flatten(state)
        arrays, keys = {}, []
        for i, leaf in enumerate(flat):
            if _is_key(leaf):
                keys.append([i, str(jax.random.key_impl(leaf))])
                leaf = jax.random.key_data(leaf)
            arrays[f"leaf_{i:05d}"] = leaf
        record = {
            "format": FORMAT,
            "step": step,
            **self._describe(state),
            "keys": keys,
            "data_position": _jsonable(data_position),
            "metric": None if metric is None else float(metric),
            "extra": _jsonable(dict(extra or {})),
            "jax_version": jax.__version__,
        }
        metrics = None
        if metric is not None and not math.isnan(float(metric)):
            metrics = {"metric": float(metric)}
        return bool(
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(record)
                ),
                metrics=metrics,
                force=True,
            )
        )

    def check(self, template: PyTree, step: int | None = None) -> dict[str, Any]:
        """Compares a checkpoint's record with this run; raises :class:`CheckpointMismatchError`.

        Returns the record when they match.
        """
        step = self._resolve(step)
        record = self.record(step)
        if record.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{self.directory} step {step} is not an mtljax checkpoint of format {FORMAT} "
                f"(found {record.get('format')!r})",
                ["format"],
            )
        now = self._describe(template)
        diffs: list[str] = []
        saved_config, now_config = record.get("config") or {}, now["config"]

        def differs(key, saved, current):
            if saved != current:
                diffs.append(f"{key}: checkpoint {saved!r}, this run {current!r}")

        first = [k for k in ("problem", "problem_args") if k in saved_config or k in now_config]
        for key in first:
            differs(key, saved_config.get(key), now_config.get(key))
        if record.get("method") is not None and now["method"] is not None:
            differs("method", record["method"], now["method"])
        for key in sorted(set(saved_config) | set(now_config)):
            if key not in first:
                differs(key, saved_config.get(key), now_config.get(key))
        saved_tasks, now_tasks = record.get("task_names"), now["task_names"]
        if saved_tasks is not None and now_tasks is not None and saved_tasks != now_tasks:
            diffs.append(f"task_names: checkpoint {saved_tasks}, this run {now_tasks}")
        if record.get("params") is not None and now["params"] is not None:
            diffs += _diff_structure("parameters", record["params"], now["params"])
        if not diffs:
            diffs += _diff_structure(
                "state (optimizer or method state)", record["state"], now["state"]
            )
        if diffs:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.directory} (step {step}) belongs to another run:\n  "
                + "\n  ".join(diffs),
                diffs,
            )
        return record

    def restore(self, template: PyTree, *, step: int | None = None) -> Restored:
        """Restores a checkpoint (the latest by default) into ``template``'s structure.

        ``template`` is a state of the run being resumed (e.g. the freshly initialised one, or
        ``jax.eval_shape`` of it with shardings): its structure, shapes and dtypes must match
        the checkpoint's (see :meth:`check`), and its leaves' shardings, when they have any,
        say where the restored arrays go (a replicated or sharded state restores directly to
        its devices, on any number of them).
        """
        ocp = self._ocp
        step = self._resolve(step)
        record = self.check(template, step)
        flat, treedef = jax.tree_util.tree_flatten(template)
        key_impl = {int(i): impl for i, impl in record.get("keys", [])}
        abstract = {}
        for i, leaf in enumerate(flat):
            sharding = getattr(leaf, "sharding", None)
            if _is_key(leaf):
                data = jax.eval_shape(jax.random.key_data, leaf)
                shape, dtype = data.shape, data.dtype
                if sharding is not None and isinstance(leaf, jax.Array):
                    sharding = jax.random.key_data(leaf).sharding
                elif sharding is not None:
                    sharding = None
            else:
                shape, dtype = np.shape(leaf), leaf.dtype
            if sharding is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract[f"leaf_{i:05d}"] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        leaves = []
        for i, leaf in enumerate(flat):
            value = out.state[f"leaf_{i:05d}"]
            if _is_key(leaf):
                impl = key_impl.get(i, str(jax.random.key_impl(leaf)))
                value = jax.random.wrap_key_data(value, impl=impl)
            leaves.append(value)
        return Restored(
            state=jax.tree_util.tree_unflatten(treedef, leaves),
            step=step,
            data_position=record.get("data_position"),
            metric=record.get("metric"),
            extra=record.get("extra") or {},
            record=record,
        )

    def wait_until_finished(self) -> None:
        """Blocks until a save in progress is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves (and the removal of partial checkpoints) and releases the manager."""
        self.manager.wait_until_finished()
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host_scalar(x: Any) -> Any:
    """A scalar array's value on this host (also for a replicated multi-process array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return x


__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "Restored",
    "structure",
]
