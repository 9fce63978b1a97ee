"""Every notebook executes (at small sizes, MTLJAX_NB_QUICK=1), so that none can rot, and
checks the claims it shows with assertions, which fail the execution."""

import json
import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MTLJAX_NB_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors


def test_every_notebook_reads_the_quick_flag():
    # The suite can only execute the notebooks quickly if each one honours MTLJAX_NB_QUICK.
    assert any(p.name.startswith("01_") for p in NOTEBOOKS)
    for path in NOTEBOOKS:
        assert "MTLJAX_NB_QUICK" in path.read_text(), path.name


def test_every_notebook_asserts_and_swallows_no_exception():
    # A notebook's claims are checked by `assert` cells (run by test_notebook_runs); a cell that
    # caught exceptions could hide a failure from them.
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        assert any(re.search(r"^\s*(assert\b|np\.testing\.assert_)", c, re.M) for c in code), path
        assert not any(re.search(r"^\s*(try|except\b.*):", c, re.M) for c in code), path.name
