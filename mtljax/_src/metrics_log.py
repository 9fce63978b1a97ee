"""Logging a train step's metrics: one JSON object per step in a JSON Lines file, and
optionally TensorBoard scalars (with the ``tensorboard`` extra, ``tensorboardX``).

**The JSONL format.** Each line is one strict JSON object (RFC 8259: no ``NaN`` tokens)
``{"step": s, "<metric>": value, …}``, written with the metrics' own order after ``step``.
A scalar becomes a JSON number (``true``/``false`` for a bool), an array a nested list of
them. Floats are converted to float64 (exact for float16, bfloat16, float32 and float64) and
written as the shortest decimal that reads back to the same float64, so a value read back
equals the value written. A non-finite float, which JSON numbers cannot hold, is written as
one of the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JavaScript's names for them);
metric values are never strings otherwise, so :func:`read_metrics` turns these three back into
floats unambiguously (a NaN's payload bits are not kept: every NaN reads back as ``nan``).
Integers stay integers; the dtype itself is not recorded.

Every line is written and flushed whole, so a run that stops keeps every step written before.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src import paths

NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
MODES = ("new", "append", "overwrite")
_EXTRA = "pip install 'mtljax[tensorboard]' (or pip install tensorboardX)"


def _float_json(v: float) -> float | str:
    if math.isfinite(v):
        return v
    if math.isnan(v):
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def encode_value(name: str, value: Any) -> Any:
    """A metric's value (a host array, a NumPy or Python scalar) as JSON data: numbers, bools
    and nested lists, non-finite floats as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    a = np.asarray(value)
    if a.dtype == np.bool_ or jnp.issubdtype(a.dtype, jnp.integer):
        return a.tolist()
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(
            f"MetricsWriter: metric {name!r} must be a number or an array of numbers or bools, "
            f"got {type(value).__name__} of dtype {a.dtype}"
        )
    flat = [_float_json(v) for v in a.astype(np.float64).ravel().tolist()]
    return np.array(flat, dtype=object).reshape(a.shape).tolist()


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`: the strings ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"`` back to floats, in scalars and nested lists (other values unchanged)."""
    if isinstance(value, str):
        return NONFINITE_NAMES.get(value, value)
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file written by :class:`MetricsWriter`, in order, with
    non-finite floats decoded (see the module docstring). Arrays come back as nested lists
    (``np.asarray(record["losses"])`` makes them arrays again). Blank lines are skipped; a
    line that is not a JSON object raises ``ValueError`` naming its number."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"read_metrics: {path}, line {number}: not JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"read_metrics: {path}, line {number}: not a JSON object")
            records.append({k: decode_value(v) for k, v in record.items()})
    return records


def _check_ends_with_newline(full: str, shown: str) -> None:
    with open(full, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            raise ValueError(
                f"MetricsWriter: {shown} ends with an incomplete line (a run stopped while "
                "writing it?); repair or move the file, then append"
            )


def _import_tensorboardx():
    try:
        import tensorboardX
    except ImportError as e:
        raise ImportError(
            f"MetricsWriter: tensorboard_dir needs tensorboardX, which is not installed: {_EXTRA}"
        ) from e
    return tensorboardX


class MetricsWriter:
    """Writes a train step's metrics, one step at a time, to a JSON Lines file and/or a
    TensorBoard log folder.

    Usage::

        names = model.task_names
        with mtl.MetricsWriter("run.jsonl", tensorboard_dir="tb", task_names=names) as log:
            for batch in batches:
                state, metrics = step(state, batch)
                log.write(metrics)

    Args:
      path: the JSONL file (see the module docstring for the format), or ``None`` for
        TensorBoard only.
      mode: what to do with an existing ``path``: ``"new"`` (default) refuses it
        (``FileExistsError``): nothing of a user's file is ever replaced unless asked;
        ``"append"`` adds lines after its last one (e.g. resuming a run; the file must end
        with a complete line); ``"overwrite"`` replaces it.
      tensorboard_dir: a folder (created if needed) for TensorBoard event files, or ``None``.
        Needs ``tensorboardX`` (``pip install 'mtljax[tensorboard]'``), imported only then.
        Each writer writes its own event file (named after the time, the host, the process
        and a random token), so an existing log is never replaced. Scalars and bools become
        one scalar each (tag: the metric's name); a 1-D metric one scalar per entry, tagged
        ``name/<task>`` when ``task_names`` is given and the lengths match, else
        ``name/<index>``; a metric with more axes (the pairwise cosines) a histogram of its
        finite entries. ``step`` is the x-axis.
      task_names: names for the entries of per-task (1-D) metrics in TensorBoard tags.

    Each :meth:`write` copies the metrics to the host (one transfer), which waits for the
    step that computed them: write every ``k`` steps to keep the device busy in between.
    Under several processes (``jax.distributed``), create the writer on one process only
    (``jax.process_index() == 0``); the metrics of :class:`mtljax.DataParallelStep` are
    replicated, so any process holds all of them.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        mode: str = "new",
        tensorboard_dir: str | os.PathLike | None = None,
        task_names: Sequence[str] | None = None,
    ):
        if path is None and tensorboard_dir is None:
            raise ValueError("MetricsWriter: give a JSONL path, a tensorboard_dir, or both")
        if mode not in MODES:
            raise ValueError(f"MetricsWriter: mode must be one of {MODES}, got {mode!r}")
        if task_names is not None:
            if isinstance(task_names, str) or not all(isinstance(n, str) for n in task_names):
                raise ValueError(
                    f"MetricsWriter: task_names must be a sequence of strings, got {task_names!r}"
                )
            task_names = tuple(task_names)
        self.task_names = task_names
        self.path = None
        self._file = None
        self._tb = None
        full = None
        if path is not None:
            shown = os.fspath(path)
            full = paths.check_output_file(path, "MetricsWriter: path")
            if os.path.exists(full):
                if mode == "new":
                    raise FileExistsError(
                        f"MetricsWriter: {shown} exists; pass mode='append' to add to it or "
                        "mode='overwrite' to replace it"
                    )
                if mode == "append":
                    _check_ends_with_newline(full, shown)
        tb_full = None
        tbx = None
        if tensorboard_dir is not None:
            tb_full = paths.check_output_dir(tensorboard_dir, "MetricsWriter: tensorboard_dir")
            tbx = _import_tensorboardx()
        if tbx is not None:
            # tensorboardX names event files by the second and the host, and opens them with
            # "wb": two writers started in the same second would share (and truncate) one
            # file, so each gets its own suffix. Created before the JSONL file is opened, so
            # that a failure here leaves a file to overwrite untouched.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:12]}"
            self._tb = tbx.SummaryWriter(logdir=tb_full, filename_suffix=suffix)
        if full is not None:
            open_mode = {"new": "x", "append": "a", "overwrite": "w"}[mode]
            try:
                self._file = open(full, open_mode, encoding="utf-8")
            except BaseException:
                self.close()
                raise
            self.path = full
        self.tensorboard_dir = tb_full

    # ------------------------------------------------------------------ writing

    def write(self, metrics: Mapping[str, Any], *, step: int | None = None) -> dict[str, Any]:
        """Writes one step's metrics; returns the JSON object written.

        ``metrics``: a mapping from names to numbers, bools or arrays of them (JAX arrays
        included), e.g. the metrics of a :class:`mtljax.TrainStep`. ``step``: the step number
        written as the record's ``"step"``; by default ``metrics["step"]`` (which a train step
        reports)."""
        if self._file is None and self._tb is None:
            raise ValueError("MetricsWriter: this writer is closed")
        host = self._host(metrics)
        record = self._record(host, step)
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            self._write_tensorboard(host, record["step"])
        return record

    @staticmethod
    def _host(metrics: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"MetricsWriter: metrics must be a mapping from names to values, got "
                f"{type(metrics).__name__}"
            )
        for k in metrics:
            if not isinstance(k, str):
                raise TypeError(f"MetricsWriter: metric names must be strings, got {k!r}")
        return jax.device_get(dict(metrics))

    def _record(self, host: dict[str, Any], step: int | None) -> dict[str, Any]:
        if step is None:
            if "step" not in host:
                raise ValueError(
                    "MetricsWriter: the metrics have no 'step'; pass write(metrics, step=...)"
                )
            step = host["step"]
        s = np.asarray(step)
        if s.shape != () or not (jnp.issubdtype(s.dtype, jnp.integer)):
            raise ValueError(f"MetricsWriter: step must be one integer, got {step!r}")
        record = {"step": int(s)}
        for name, value in host.items():
            if name != "step":
                record[name] = encode_value(name, value)
        return record

    def _tags(self, name: str, n: int) -> list[str]:
        if self.task_names is not None and len(self.task_names) == n:
            return [f"{name}/{t}" for t in self.task_names]
        return [f"{name}/{i}" for i in range(n)]

    def _write_tensorboard(self, host: dict[str, Any], step: int) -> None:
        for name, value in host.items():
            if name == "step":
                continue
            a = np.asarray(value).astype(np.float64)
            if a.ndim == 0:
                self._tb.add_scalar(name, float(a), step)
            elif a.ndim == 1:
                for tag, v in zip(self._tags(name, a.shape[0]), a.tolist(), strict=True):
                    self._tb.add_scalar(tag, v, step)
            else:
                finite = a[np.isfinite(a)]
                if finite.size:
                    self._tb.add_histogram(name, finite, step)

    # ------------------------------------------------------------------ closing

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (JSONL lines are flushed as written)."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Flushes and closes the file and the TensorBoard writer (closing twice is fine)."""
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    @property
    def closed(self) -> bool:
        return self._file is None and self._tb is None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MetricsWriter(path={self.path!r}, tensorboard_dir={self.tensorboard_dir!r}, "
            f"closed={self.closed})"
        )


__all__ = ["MetricsWriter", "decode_value", "encode_value", "read_metrics"]
