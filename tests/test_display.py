"""The runner's and the benchmarks' shared text output: tables and the progress bar."""

import builtins
import math

from mtljax._src import display


def test_table_pads_columns_and_formats_floats():
    text = display.format_table(["method", "loss"], [["ew", 0.123456], ["upgrad", math.nan]])
    lines = text.split("\n")
    assert lines == ["method  loss  ", "------  ------", "ew      0.1235", "upgrad  -     "]


def test_plain_progress_shows_rate_elapsed_and_time_left(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr(display.time, "perf_counter", lambda: next(clock))
    bar = display.Progress(40, "qm9/ew")
    bar.advance(10, "loss 1")  # 10 steps in 10 s: 30 left at 1 step/s
    bar.update(40)
    bar.close()
    err = capsys.readouterr().err
    first, last = err.split("\r")[1:3]
    assert "qm9/ew" in first and "10/40" in first and "10s elapsed, 30s left loss 1" in first
    assert "40/40" in last and "0s left" in last
    assert err.endswith("\n") and bar.done == 40


def test_silent_progress_still_counts(capsys):
    bar = display.Progress(5, enabled=False)
    bar.advance(2)
    bar.advance(3)
    bar.close()
    assert bar.done == 5 and capsys.readouterr().err == ""
