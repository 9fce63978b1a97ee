"""Checkpoints of a whole training run with orbax-checkpoint, and exact resume.

A checkpoint holds every array of the :class:`~mtljax.TrainState` (parameters, optimizer state,
method state, RNG key, step, skipped-step count) and a JSON record: the data-iterator position,
the validation metric, free-form ``extra`` data, and what the run *is* (method and its
hyper-parameters, optimizer, task names, user configuration such as the problem, and the
structure, shapes and dtypes of the parameters and of the whole state). Restoring checks that
record against the run being resumed and refuses a checkpoint that belongs to another run,
listing what differs.

What a checkpoint folder guarantees:

* **Only mtljax's own checkpoints are ever deleted.** A step directory is mtljax's when its
  record or orbax's step metadata says so (each save writes both); retention, ``overwrite``
  and the removal of partial saves delete only those. A folder holding anything else named
  like a checkpoint (``3``, ``7.orbax-checkpoint-tmp``) is refused, untouched.
* **A folder holds one run.** Opening a folder that already holds checkpoints is refused
  unless the caller resumes that run (``mode="resume"``, checked against this run) or
  overwrites it (``mode="overwrite"``).
* **One writer at a time.** A writer holds an exclusive lock on ``mtljax.lock`` in the folder
  (``fcntl.flock``, released by the operating system when the process ends, even by SIGKILL,
  so a killed run never blocks its ``resume``); a second writer is refused with the holder's
  process id, host and command.
* **Saves are atomic** (orbax writes into a temporary directory and renames it when
  complete): a process killed during a save leaves the previous checkpoints intact, and the
  partial one is removed when the folder is opened again. A save that fails raises
  promptly, naming the step and the folder.
* **Restore falls back to the newest intact checkpoint.** Each record carries a SHA-256 of
  itself and orbax checksums the arrays; a damaged checkpoint is skipped with a warning that
  names it and the reason (a writer moves it aside to ``<step>.damaged``), and when none is
  intact the error names each one tried.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mtljax._src import describe as describe_lib
from mtljax._src import paths
from mtljax._src import tree as tree_lib

PyTree = Any

FORMAT = "mtljax-checkpoint/1"
LOCK_NAME = "mtljax.lock"
MODES = ("new", "resume", "overwrite", "read")

_STEP = re.compile(r"^\d+$")
_PARTIAL = re.compile(r"^\d+\.orbax-checkpoint-tmp")
# What orbax writes in a step directory (items "meta" and "state", its metadata, commit
# markers), including while a save is in progress.
_ORBAX_ENTRIES = ("meta", "state", "_CHECKPOINT_METADATA", "commit_success")


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another run (problem, method, tasks or parameter structure).

    Attributes:
      differences: one line per difference.
    """

    def __init__(self, message: str, differences: Sequence[str]):
        super().__init__(message)
        self.differences = tuple(differences)


class CheckpointFolderError(ValueError):
    """A folder cannot be used for this run's checkpoints: it holds another run's checkpoints
    (and neither resume nor overwrite was asked), or entries named like checkpoints that
    mtljax did not write, or it cannot be written."""


class CheckpointExistsError(CheckpointFolderError):
    """The folder already holds checkpoints of an mtljax run and neither resume nor overwrite
    was asked.

    Attributes:
      latest: the step of the newest of them.
    """

    def __init__(self, message: str, latest: int):
        super().__init__(message)
        self.latest = latest


class CheckpointLockedError(RuntimeError):
    """Another process is writing checkpoints in this folder.

    Attributes:
      holder: what the lock file says of its holder (pid, host, command, since), or ``{}``.
    """

    def __init__(self, message: str, holder: Mapping[str, Any]):
        super().__init__(message)
        self.holder = dict(holder)


class CheckpointDamagedError(RuntimeError):
    """No intact checkpoint could be restored.

    Attributes:
      tried: ``(step, reason)`` for each checkpoint tried, newest first.
    """

    def __init__(self, message: str, tried: Sequence[tuple[int, str]]):
        super().__init__(message)
        self.tried = tuple(tried)


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed (the folder became unwritable, the disk is full...)."""


class DamagedCheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older intact one."""


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


def _record_digest(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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


def _diff_values(label: str, saved: Any, now: Any, *, common_only: bool = False) -> list[str]:
    """One line per differing entry of two (JSON round-tripped) descriptions."""
    if saved == now:
        return []
    a, b = describe_lib.flatten(saved), describe_lib.flatten(now)
    keys = [k for k in a if k in b] if common_only else [*a, *(k for k in b if k not in a)]
    missing = object()
    out = [
        f"{label} {k}: checkpoint {a.get(k, missing)!r}, this run {b.get(k, missing)!r}".replace(
            repr(missing), "(none)"
        )
        for k in keys
        if a.get(k, missing) != b.get(k, missing)
    ]
    return out


def describe_optimizer(optimizer: Any = None, opt_state: PyTree = None) -> dict[str, Any]:
    """What a checkpoint records of the optimizer: the types of its state (optax's state
    classes in order: ``adam`` and ``adamw`` differ there) and, given the optimizer, the
    hyper-parameters its functions close over (see :mod:`mtljax._src.describe`)."""
    import optax

    out: dict[str, Any] = {"optax_version": optax.__version__}
    if opt_state is not None:
        out["state"] = describe_lib.state_skeleton(opt_state)
    if optimizer is not None:
        out["hyperparams"] = _jsonable(describe_lib.describe(optimizer))
    return out


# ----------------------------------------------------------------------------------------------
# What belongs to mtljax in a folder


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _marked(path: str) -> bool:
    """Whether mtljax wrote the step directory ``path``: its record (item ``meta``) or orbax's
    step metadata (``custom_metadata``) says so; either suffices, so that one damaged file
    does not hide a checkpoint's owner."""
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    for name in entries:
        if name.startswith("meta"):
            record = _read_json(os.path.join(path, name, "metadata"))
            if isinstance(record, dict) and str(record.get("format", "")).startswith(
                "mtljax-checkpoint/"
            ):
                return True
    meta = _read_json(os.path.join(path, "_CHECKPOINT_METADATA"))
    custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
    return isinstance(custom, dict) and custom.get("format") == FORMAT


def _orbax_like(path: str) -> bool:
    """A directory holding only what orbax writes during a save (or nothing yet)."""
    try:
        return os.path.isdir(path) and all(n.startswith(_ORBAX_ENTRIES) for n in os.listdir(path))
    except OSError:
        return False


@dataclasses.dataclass
class _Inventory:
    complete: dict[int, str]  # mtljax's complete checkpoints, by step
    partial: list[str]  # mtljax's interrupted saves
    foreign: list[str]  # entries named like checkpoints that mtljax did not write


def _inventory(directory: str, folder_used_before: bool) -> _Inventory:
    inv = _Inventory({}, [], [])
    if not os.path.isdir(directory):
        return inv
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _STEP.match(name):
            if os.path.isdir(path) and _marked(path):
                inv.complete[int(name)] = path
            else:
                inv.foreign.append(name)
        elif _PARTIAL.match(name):
            # A save killed early may not have written a record yet: in a folder mtljax has
            # used, a directory with only orbax's entries is one of its interrupted saves.
            if _marked(path) or (folder_used_before and _orbax_like(path)):
                inv.partial.append(path)
            else:
                inv.foreign.append(name)
    return inv


def _refuse_foreign(directory: str, inv: _Inventory) -> None:
    if inv.foreign:
        names = ", ".join(inv.foreign[:8]) + (" …" if len(inv.foreign) > 8 else "")
        raise CheckpointFolderError(
            f"{directory} holds {len(inv.foreign)} entries named like checkpoints that mtljax "
            f"did not write ({names}); mtljax never deletes or overwrites them: choose another "
            "folder (e.g. an empty sub-folder)"
        )


# ----------------------------------------------------------------------------------------------
# The writer's lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another process (it left no details)"
    text = f"process {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("since"):
        text += f" since {holder['since']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


class _FolderLock:
    """An exclusive lock on ``<folder>/mtljax.lock`` held for a writer's lifetime.

    ``fcntl.flock`` on the file: the operating system releases it when the holder ends, however
    it ends, so a lock is never stale. The file records the holder (pid, host, command) for
    the message a second writer gets. On a file system without ``flock`` the recorded pid is
    checked instead: a holder on this host whose process is gone is stale. The file is never
    removed (removing a lock file races with a process about to lock it).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        record = _read_json(self.path)
        return record if isinstance(record, dict) else {}

    def _refuse(self, holder: Mapping[str, Any]) -> CheckpointLockedError:
        return CheckpointLockedError(
            f"{self.directory} is being written by {_describe_holder(holder)}; two runs must "
            "not share a checkpoint folder: wait for it to end, or choose another folder",
            holder,
        )

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(fd)
            raise self._refuse(holder) from None
        except (ImportError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (
                errno.ENOLCK,
                errno.EOPNOTSUPP,
                errno.ENOSYS,
                errno.EINVAL,
            ):
                os.close(fd)
                raise
            holder = self._holder()  # no flock here: judge the recorded holder
            if holder.get("pid") is not None and not (
                holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))
            ):
                os.close(fd)
                raise self._refuse(holder) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # "no holder"; the file stays (see the class docstring)
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None


# ----------------------------------------------------------------------------------------------


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
      skipped: ``(step, reason)`` for each newer checkpoint skipped as damaged.
    """

    state: PyTree
    step: int
    data_position: Any
    metric: float | None
    extra: dict[str, Any]
    record: dict[str, Any]
    skipped: tuple[tuple[int, str], ...] = ()


class Checkpointer:
    """Saves and restores whole train states in ``directory`` with an orbax ``CheckpointManager``.

    Keeps the ``keep`` latest checkpoints plus the best one by the metric given to
    :meth:`save` (lowest with ``best_mode="min"``, highest with ``"max"``). See the module
    docstring for what the folder guarantees (what may be deleted, the lock, atomic saves,
    fallback to an intact checkpoint).

    Args:
      directory: where checkpoints go (one sub-directory per step; created if missing).
      keep: how many of the latest checkpoints to keep (≥ 1).
      best_mode: ``"min"`` or ``"max"``: which metric value is best.
      method: the :class:`~mtljax.Method` the run trains with (its name and hyper-parameters
        are recorded and checked on restore), or its name.
      task_names: the model's tasks, checked on restore.
      config: JSON-serialisable facts that define the run (problem, its options, seed...),
        checked on restore key by key.
      optimizer: the optax optimizer of the run: the hyper-parameters it closes over are
        recorded and checked on restore. Without it only its state's structure is checked.
      mode: what to do with checkpoints already in the folder. ``"new"`` (default): refuse a
        folder that holds any. ``"resume"``: continue that run (:meth:`restore` the latest
        intact one; a checkpoint of another run is refused by :meth:`restore`, and by the
        first :meth:`save` if nothing was restored). ``"overwrite"``: delete them (mtljax's
        checkpoints only) and start anew. ``"read"``: inspect and restore only; no lock, no
        save, nothing deleted. Every mode but ``"read"`` takes the folder's lock.
      async_save: write in a background thread (the arrays are copied to the host first, so
        training can go on); :meth:`wait_until_finished` or :meth:`close` waits for it.

    Raises:
      CheckpointFolderError: the folder cannot be written, holds entries named like
        checkpoints that mtljax did not write, or (``mode="new"``) already holds checkpoints.
      CheckpointLockedError: another process is writing in the folder.

    Example::

        with mtl.Checkpointer("/tmp/run", keep=3, method=method, optimizer=opt,
                              task_names=model.task_names, mode="resume") as ckpt:
            if ckpt.latest_step() is not None:
                state = ckpt.restore(state).state
            for i in range(int(state.step), steps):
                state, metrics = step(state, sample(i))
                if (i + 1) % 100 == 0:
                    ckpt.save(state, data_position=i + 1)
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
        optimizer: Any = None,
        mode: str = "new",
        async_save: bool = True,
    ):
        import orbax.checkpoint as ocp

        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"Checkpointer: keep must be an int ≥ 1, got {keep!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: best_mode must be 'min' or 'max', got {best_mode!r}")
        if mode not in MODES:
            raise ValueError(f"Checkpointer: mode must be one of {MODES}, got {mode!r}")
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep, self.best_mode, self.mode = keep, best_mode, mode
        self.method_name = getattr(method, "name", method)
        hparams = getattr(method, "hparams", None)
        self.method_hparams = None if not hparams else _jsonable(dict(hparams))
        self.task_names = None if task_names is None else list(task_names)
        self.config = _jsonable(dict(config or {}))
        self.optimizer = optimizer
        self._primary = jax.process_index() == 0
        self._lock: _FolderLock | None = None
        self._verified = True  # whether this run's identity was checked against the folder's
        self.manager = None

        if mode == "read":
            if not os.path.isdir(self.directory):
                raise CheckpointFolderError(f"no checkpoint folder {self.directory}")
        else:
            try:
                paths.check_output_dir(self.directory, "checkpoint folder")
                os.makedirs(self.directory, exist_ok=True)
            except (ValueError, OSError) as e:
                raise CheckpointFolderError(str(e)) from e
        used_before = os.path.exists(os.path.join(self.directory, LOCK_NAME))
        _refuse_foreign(self.directory, _inventory(self.directory, used_before))  # before locking
        if mode != "read" and self._primary:
            self._lock = _FolderLock(self.directory)
            self._lock.acquire()
        try:
            self._open(used_before, async_save)
        except BaseException:
            self._release()
            raise

    def _open(self, used_before: bool, async_save: bool) -> None:
        ocp = self._ocp
        inv = _inventory(self.directory, used_before)
        _refuse_foreign(self.directory, inv)
        if inv.complete and self.mode == "new":
            latest = max(inv.complete)
            raise CheckpointExistsError(
                f"{self.directory} already holds checkpoints of an mtljax run (latest: step "
                f"{latest}); resume it (mode='resume') or overwrite it (mode='overwrite'), or "
                "choose another folder",
                latest,
            )
        if self.mode != "read" and self._primary:
            doomed = list(inv.partial)
            if self.mode == "overwrite":
                doomed += list(inv.complete.values())
            for path in doomed:
                shutil.rmtree(path)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mtljax checkpoint folder {self.directory}")
        self._verified = not (self.mode == "resume" and inv.complete)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is done here, deleting mtljax's checkpoints only
            cleanup_tmp_directories=False,
            enable_async_checkpointing=async_save,
            # A failed directory creation then raises in `save` instead of leaving orbax's
            # background threads waiting (five minutes) for a signal that never comes.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            read_only=self.mode == "read",
            create=self.mode != "read",
            save_root_metadata=False,
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
        """The step of the checkpoint with the best metric (``None`` if none has one).
        Checkpoints whose record cannot be read are passed over."""
        best, best_value = None, None
        for s in self.steps():
            try:
                value = self.record(s).get("metric")
            except CheckpointDamagedError:
                continue
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            better = best_value is None or (
                value < best_value if self.best_mode == "min" else value > best_value
            )
            if better:
                best, best_value = s, value
        return best

    def record(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of a checkpoint (the latest by default).

        Raises :class:`CheckpointDamagedError` when it cannot be read or fails its checksum.
        """
        step = self._resolve(step)
        ocp = self._ocp
        where = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            record = dict(out.meta)
        except Exception as e:
            reason = f"its record {where} cannot be read ({type(e).__name__}: {e})"
            raise CheckpointDamagedError(
                f"checkpoint step {step} in {self.directory}: {reason}", [(step, reason)]
            ) from e
        digest = record.get("record_sha256")
        if digest is not None and digest != _record_digest(record):
            reason = f"its record {where} fails its SHA-256 checksum"
            raise CheckpointDamagedError(
                f"checkpoint step {step} in {self.directory}: {reason}", [(step, reason)]
            )
        return record

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
        opt_state = getattr(state, "opt_state", None)
        optimizer = None
        if self.optimizer is not None or opt_state is not None:
            optimizer = describe_optimizer(self.optimizer, opt_state)
        return {
            "method": self.method_name,
            "method_hparams": self.method_hparams,
            "task_names": self.task_names,
            "config": self.config,
            "optimizer": optimizer,
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

        Returns False (and saves nothing) when that step is already saved. Raises
        :class:`CheckpointSaveError` when this save, or the previous one still being written
        in the background, fails.
        """
        if self.mode == "read":
            raise ValueError(f"Checkpointer: {self.directory} was opened with mode='read'")
        ocp = self._ocp
        if step is None:
            if not hasattr(state, "step"):
                raise ValueError(
                    f"Checkpointer.save: a {type(state).__name__} has no `step`; pass step=..."
                )
            step = state.step
        step = int(np.asarray(_host_scalar(step)))
        self.wait_until_finished()  # the previous save, then retention
        if not self._verified:
            self._check_against_folder(state)
        if step in self.manager.all_steps():
            return False
        flat, _ = jax.tree_util.tree_flatten(state)
        arrays, keys = {}, []
        for i, leaf in enumerate(flat):
            if _is_key(leaf):
                keys.append([i, str(jax.random.key_impl(leaf))])
                leaf = jax.random.key_data(leaf)
            arrays[f"leaf_{i:05d}"] = leaf
        record = _jsonable(
            {
                "format": FORMAT,
                "step": step,
                **self._describe(state),
                "keys": keys,
                "data_position": data_position,
                "metric": None if metric is None else float(metric),
                "extra": dict(extra or {}),
                "jax_version": jax.__version__,
            }
        )
        record["record_sha256"] = _record_digest(record)
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(record)
                ),
                custom_metadata={"format": FORMAT},
                force=True,
            )
        except Exception as e:
            raise self._save_error(step, e) from e
        return bool(saved)

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
        which = "a checkpoint" if step is None else f"the checkpoint of step {step}"
        return CheckpointSaveError(
            f"saving {which} in {self.directory} failed: {type(e).__name__}: {e}"
        )

    def _check_against_folder(self, state: PyTree) -> None:
        """Before the first save of a resumed folder from which nothing was restored: this
        run must be the one whose checkpoints the folder holds (its newest readable one)."""
        for s in reversed(self.steps()):
            try:
                record = self.record(s)
            except CheckpointDamagedError:
                continue
            self.check(state, s, record=record)
            break
        self._verified = True

    def check(
        self, template: PyTree, step: int | None = None, *, record: dict | None = None
    ) -> dict[str, Any]:
        """Compares a checkpoint's record with this run; raises :class:`CheckpointMismatchError`
        listing every difference (problem and configuration, method and its hyper-parameters,
        optimizer, tasks, parameter and state structure).

        Returns the record when they match.
        """
        step = self._resolve(step)
        record = self.record(step) if record is None else record
        if record.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{self.directory} step {step} is not an mtljax checkpoint of format {FORMAT} "
                f"(found {record.get('format')!r})",
                ["format"],
            )
        now = _jsonable(self._describe(template))
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
        saved_hp, now_hp = record.get("method_hparams"), now["method_hparams"]
        if saved_hp is not None and now_hp is not None and record.get("method") == now["method"]:
            diffs += _diff_values("method hyper-parameter", saved_hp, now_hp)
        for key in sorted(set(saved_config) | set(now_config)):
            if key not in first:
                differs(key, saved_config.get(key), now_config.get(key))
        saved_opt, now_opt = record.get("optimizer") or {}, now["optimizer"] or {}
        if saved_opt.get("state") is not None and now_opt.get("state") is not None:
            differs("optimizer state", saved_opt["state"], now_opt["state"])
        if saved_opt.get("hyperparams") is not None and now_opt.get("hyperparams") is not None:
            diffs += _diff_values(
                "optimizer",
                saved_opt["hyperparams"],
                now_opt["hyperparams"],
                # names inside optax may change between its versions: compare what both have
                common_only=saved_opt.get("optax_version") != now_opt.get("optax_version"),
            )
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
        """Restores the newest intact checkpoint (or the one of ``step``) into ``template``'s
        structure.

        ``template`` is a state of the run being resumed (e.g. the freshly initialised one, or
        ``jax.eval_shape`` of it with shardings): its structure, shapes and dtypes must match
        the checkpoint's (see :meth:`check`), and its leaves' shardings, when they have any,
        say where the restored arrays go (a replicated or sharded state restores directly to
        its devices, on any number of them).

        A damaged checkpoint (a record or an array that cannot be read or fails its checksum)
        is skipped for the next older one, with a :class:`DamagedCheckpointWarning` naming it
        and the reason; a writer moves it aside to ``<step>.damaged`` so that the run can save
        that step again. When none is intact, :class:`CheckpointDamagedError` names each one
        tried. A checkpoint of another run raises :class:`CheckpointMismatchError` at once.
        """
        candidates = [self._resolve(step)] if step is not None else self.steps()[::-1]
        if not candidates:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        tried: list[tuple[int, str]] = []
        for s in candidates:
            try:
                record = self.record(s)
            except CheckpointDamagedError as e:
                tried += e.tried
                continue
            self.check(template, s, record=record)
            try:
                state = self._restore_arrays(s, template, record)
            except Exception as e:
                tried.append((s, f"its arrays cannot be restored ({type(e).__name__}: {e})"))
                continue
            self._verified = True
            if tried:
                self._set_aside([t for t, _ in tried])
                warnings.warn(
                    "skipped damaged checkpoint(s) in "
                    f"{self.directory}: "
                    + "; ".join(f"step {t}: {reason}" for t, reason in tried)
                    + f". Restored step {s}, the newest intact one"
                    + (
                        "; the damaged ones were moved to <step>.damaged"
                        if self.mode != "read" and self._primary
                        else ""
                    ),
                    DamagedCheckpointWarning,
                    stacklevel=2,
                )
            return Restored(
                state=state,
                step=s,
                data_position=record.get("data_position"),
                metric=record.get("metric"),
                extra=record.get("extra") or {},
                record=record,
                skipped=tuple(tried),
            )
        raise CheckpointDamagedError(
            f"no intact checkpoint in {self.directory}; tried "
            + "; ".join(f"step {t}: {reason}" for t, reason in tried),
            tried,
        )

    def _restore_arrays(self, step: int, template: PyTree, record: dict[str, Any]) -> PyTree:
        ocp = self._ocp
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
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _set_aside(self, steps: Sequence[int]) -> None:
        """Moves damaged checkpoints (mtljax's) to ``<step>.damaged`` (a writer only)."""
        if self.mode == "read" or not self._primary:
            return
        for s in steps:
            path = os.path.join(self.directory, str(s))
            if not _marked(path):
                continue
            target, n = f"{path}.damaged", 1
            while os.path.lexists(target):
                target, n = f"{path}.damaged-{n}", n + 1
            os.rename(path, target)
        self.manager.reload()

    # ------------------------------------------------------------------------------------------

    def _prune(self) -> None:
        """Keeps the ``keep`` latest checkpoints and the best one; deletes the others, each
        only after checking that mtljax wrote it."""
        if self.mode == "read" or not self._primary:
            return
        steps = self.steps()
        keep = set(steps[-self.keep :])
        if len(steps) > len(keep):
            best = self.best_step()
            if best is not None:
                keep.add(best)
        removed = False
        for s in steps:
            path = os.path.join(self.directory, str(s))
            if s not in keep and _marked(path):
                shutil.rmtree(path)
                removed = True
        if removed:
            self.manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until a save in progress is complete, then applies the retention policy.

        Raises :class:`CheckpointSaveError` if that save failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(None, e) from e
        self._prune()

    def close(self) -> None:
        """Waits for saves, applies the retention policy, releases the manager and the lock."""
        try:
            if self.manager is not None:
                try:
                    self.wait_until_finished()
                finally:
                    self.manager.close()
                    self.manager = None
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

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
    "CheckpointDamagedError",
    "CheckpointExistsError",
    "CheckpointFolderError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "Checkpointer",
    "DamagedCheckpointWarning",
    "Restored",
    "describe_optimizer",
    "structure",
]
