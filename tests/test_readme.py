"""The README's example runs as printed."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under '## Example'"
    return match.group(1)


def test_readme_example_runs():
    code = _example_block()
    assert len(code.splitlines()) <= 25, "the README example should stay short"
    scope: dict = {}
    exec(compile(code, "README.md:Example", "exec"), scope)
    metrics, state = scope["metrics"], scope["state"]
    losses = np.asarray(metrics["losses"])
    assert losses.shape == (3,) and np.isfinite(losses).all()
    assert int(state.step) == 1
    # one more step moves the parameters and keeps every loss finite
    state2, metrics2 = scope["step"](state, scope["batch"])
    assert int(state2.step) == 2 and np.isfinite(np.asarray(metrics2["losses"])).all()
    assert float(np.asarray(metrics2["losses"]).sum()) < float(losses.sum())
