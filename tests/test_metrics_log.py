"""mtljax.MetricsWriter: JSONL round trips of a train step's metrics, non-finite values,
refusal of existing files, and TensorBoard scalars (when tensorboardX is installed)."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import mtljax as mtl
from tests.helpers import tiny_batch, tiny_model


def _strict_loads(line: str):
    """``json.loads`` refusing the non-standard NaN / Infinity tokens."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def _run_steps(n: int, *, nan_at: int | None = None):
    """``n`` UPGrad steps of the tiny model; the batch of step ``nan_at`` holds a NaN."""
    model, params = tiny_model()
    method = mtl.methods.upgrad()
    opt = optax.sgd(0.05)
    step = mtl.make_train_step(model, method, opt, nonfinite="skip")
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    out = []
    for i in range(n):
        batch = tiny_batch(seed=i)
        if i == nan_at:
            batch = {**batch, "x": batch["x"].at[0, 0].set(jnp.nan)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mtl.SkippedStepWarning)
            state, metrics = step(state, batch)
        out.append(metrics)
    return model, out


def _assert_same(read: dict, metrics: dict) -> None:
    """The record read back holds every metric, value for value (floats compared exactly as
    float64; NaN where NaN)."""
    assert read["step"] == int(metrics["step"])
    assert set(read) == set(metrics)
    for name, value in metrics.items():
        want = np.asarray(value)
        got = np.asarray(read[name])
        assert got.shape == want.shape, name
        if want.dtype == np.bool_:
            assert got.dtype == np.bool_, name
            np.testing.assert_array_equal(got, want)
        elif np.issubdtype(want.dtype, np.integer):
            assert np.issubdtype(got.dtype, np.integer), name
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))


def test_train_step_metrics_round_trip(tmp_path):
    path = tmp_path / "run.jsonl"
    _, steps = _run_steps(3)
    with mtl.MetricsWriter(path) as log:
        written = [log.write(m) for m in steps]
    assert log.closed
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert [_strict_loads(line) for line in lines] == written
    records = mtl.read_metrics(path)
    assert [r["step"] for r in records] == [0, 1, 2]
    for read, metrics in zip(records, steps, strict=True):
        _assert_same(read, metrics)
    # Metrics of several dtypes and shapes came through: (T,) floats, a (T, T) matrix,
    # bools, an int32 iteration count.
    assert np.asarray(records[0]["cosines"]).shape == (3, 3)
    assert isinstance(records[0]["solver_converged"], bool)
    assert isinstance(records[0]["solver_iterations"], int)


def test_non_finite_values_are_strict_json_and_read_back_exactly(tmp_path):
    path = tmp_path / "nf.jsonl"
    _, steps = _run_steps(2, nan_at=1)
    assert not np.all(np.isfinite(np.asarray(steps[1]["losses"])))  # the step saw the NaN
    extra = {
        "step": 7,
        "nan": float("nan"),
        "vec": np.array([1.5, np.inf, -np.inf, np.nan], np.float32),
        "half": jnp.array([np.inf, 0.1], jnp.float16),
        "bf16": jnp.array([-np.inf, 3.0, 0.1], jnp.bfloat16),
        "f64": np.array([[1e-310, np.nan], [np.finfo(np.float64).max, -0.0]]),
        "tiny32": np.float32(np.finfo(np.float32).tiny),
    }
    with mtl.MetricsWriter(path) as log:
        for m in (*steps, extra):
            log.write(m)
    text = path.read_text()
    for line in text.splitlines():
        _strict_loads(line)  # no NaN / Infinity tokens
    assert '"NaN"' in text and '"Infinity"' in text and '"-Infinity"' in text
    records = mtl.read_metrics(path)
    for read, metrics in zip(records[:2], steps, strict=True):
        _assert_same(read, metrics)
    last = records[2]
    assert last["step"] == 7 and math.isnan(last["nan"])
    np.testing.assert_array_equal(np.asarray(last["vec"]), np.asarray(extra["vec"], np.float64))
    np.testing.assert_array_equal(
        np.asarray(last["half"], np.float16), np.asarray(extra["half"])
    )  # float16 0.1 read back as the same float16
    np.testing.assert_array_equal(
        np.asarray(last["bf16"]).astype(ml_dtypes.bfloat16), np.asarray(extra["bf16"])
    )
    np.testing.assert_array_equal(np.asarray(last["f64"]), extra["f64"])
    assert math.copysign(1.0, last["f64"][1][1]) == -1.0  # -0.0 keeps its sign
    assert np.float32(last["tiny32"]) == extra["tiny32"]


def test_an_existing_file_is_refused_unless_asked(tmp_path):
    path = tmp_path / "run.jsonl"
    original = b'{"step": 0, "loss": 1.0}\n'
    path.write_bytes(original)
    with pytest.raises(FileExistsError, match="mode='append'.*mode='overwrite'"):
        mtl.MetricsWriter(path)
    assert path.read_bytes() == original
    with mtl.MetricsWriter(path, mode="append") as log:
        log.write({"loss": jnp.float32(0.5)}, step=1)
    assert path.read_bytes().startswith(original)
    assert [r["step"] for r in mtl.read_metrics(path)] == [0, 1]
    with mtl.MetricsWriter(path, mode="overwrite") as log:
        log.write({"loss": 2.0}, step=5)
    assert mtl.read_metrics(path) == [{"step": 5, "loss": 2.0}]
    # A file whose last line was cut short is not appended to (nor changed).
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(original + b'{"step": 1, "lo')
    with pytest.raises(ValueError, match="incomplete line"):
        mtl.MetricsWriter(broken, mode="append")
    assert broken.read_bytes() == original + b'{"step": 1, "lo'
    with pytest.raises(ValueError, match="line 2: not JSON"):
        mtl.read_metrics(broken)


def test_bad_arguments_and_values_raise(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        mtl.MetricsWriter(tmp_path / "a.jsonl", mode="replace")
    with pytest.raises(ValueError, match="give a JSONL path, a tensorboard_dir, or both"):
        mtl.MetricsWriter()
    with pytest.raises(ValueError, match="is a folder"):
        mtl.MetricsWriter(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        mtl.MetricsWriter(tmp_path / "missing" / "a.jsonl")
    with pytest.raises(ValueError, match="task_names"):
        mtl.MetricsWriter(tmp_path / "b.jsonl", task_names="abc")
    assert not os.path.exists(tmp_path / "a.jsonl") and not os.path.exists(tmp_path / "b.jsonl")
    path = tmp_path / "c.jsonl"
    log = mtl.MetricsWriter(path)
    with pytest.raises(ValueError, match="no 'step'"):
        log.write({"loss": 1.0})
    with pytest.raises(ValueError, match="step must be one integer"):
        log.write({"loss": 1.0}, step=1.5)
    with pytest.raises(ValueError, match="step must be one integer"):
        log.write({"loss": 1.0, "step": jnp.arange(2)})
    with pytest.raises(TypeError, match="metric 'name' must be a number"):
        log.write({"name": "upgrad"}, step=0)
    with pytest.raises(TypeError, match="metric names must be strings"):
        log.write({0: 1.0}, step=0)
    with pytest.raises(TypeError, match="must be a mapping"):
        log.write([1.0], step=0)
    log.close()
    assert path.read_text() == ""  # nothing half-written by the refused calls
    with pytest.raises(ValueError, match="closed"):
        log.write({"loss": 1.0}, step=0)
    log.close()  # closing twice is fine


def test_missing_tensorboardx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX fails
    path = tmp_path / "run.jsonl"
    with pytest.raises(ImportError, match=r"mtljax\[tensorboard\]"):
        mtl.MetricsWriter(path, tensorboard_dir=tmp_path / "tb")
    assert not path.exists()  # refused before creating anything


def _events(folder) -> list:
    """The events of every TensorBoard event file under ``folder``, read from the TFRecord
    framing (length, its CRC, data, its CRC) with tensorboardX's protobuf classes."""
    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(name, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def _same(got: float, want: float) -> bool:
    return got == want or (math.isnan(got) and math.isnan(want))


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    tb = tmp_path / "tb"
    model, steps = _run_steps(2, nan_at=1)
    assert np.isnan(np.asarray(steps[1]["losses"])).all()  # NaN scalars are written too
    with mtl.MetricsWriter(tensorboard_dir=tb, task_names=model.task_names) as log:
        assert log.path is None and log.tensorboard_dir == str(tb)
        for m in steps:
            log.write(m)
    # Both at once: the same steps in a JSONL file and a second event file.
    path = tmp_path / "run.jsonl"
    with mtl.MetricsWriter(path, tensorboard_dir=tb, task_names=model.task_names) as log:
        for m in steps:
            log.write(m)
    for read, metrics in zip(mtl.read_metrics(path), steps, strict=True):
        _assert_same(read, metrics)
    assert len(glob.glob(os.path.join(tb, "events.out.tfevents.*"))) == 2  # none replaced
    scalars, histograms = {}, {}
    for event in _events(tb):
        for v in event.summary.value:
            if v.HasField("histo"):
                histograms[(v.tag, event.step)] = v.histo
            else:
                scalars[(v.tag, event.step)] = v.simple_value
    for metrics in steps:
        s = int(metrics["step"])
        for i, task in enumerate(model.task_names):
            for name in ("losses", "weights", "grad_norms"):
                want = float(np.asarray(metrics[name])[i])
                assert _same(scalars[(f"{name}/{task}", s)], want), (name, task, s)
        assert scalars[("solver_converged", s)] == float(metrics["solver_converged"])
        assert _same(scalars[("update_norm", s)], float(metrics["update_norm"]))
        assert ("step", s) not in scalars
    # The (T, T) cosines: a histogram of the finite entries.
    cos = np.asarray(steps[0]["cosines"])
    h = histograms[("cosines", 0)]
    assert h.num == cos.size
    assert h.min == pytest.approx(cos.min()) and h.max == pytest.approx(cos.max())
