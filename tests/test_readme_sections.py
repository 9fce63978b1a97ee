"""The README's examples for model state (BatchNorm, dropout, the ResNet encoder), per-task
inputs and metrics logging run as printed, and do what the text around them says."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    """The first python block of the README section under ``### heading``."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"### {heading}\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README: no python block under '### {heading}'"
    return match.group(1)


def _run(heading: str) -> dict:
    scope: dict = {}
    exec(compile(_block(heading), f"README.md:{heading}", "exec"), scope)
    return scope


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_batchnorm_example():
    import mtljax as mtl

    scope = _run("BatchNorm, dropout and other model state")
    model, state, params = scope["model"], scope["state"], scope["params"]
    assert model.has_state and model.uses_key  # BatchNorm and dropout
    # BatchNorm's scale and shift are shared parameters; its statistics are model state.
    shared = mtl._src.tree.leaf_paths(params.shared)
    assert "encoder/stem_bn/scale" in shared and "encoder/stem_bn/bias" in shared
    assert "encoder/stem_bn/mean" in mtl._src.tree.leaf_paths(state.model_state)
    assert int(state.step) == 1 and int(state.skipped) == 0
    moved = [
        np.max(np.abs(a - b))
        for a, b in zip(_leaves(state.model_state), _leaves(model.initial_state), strict=True)
    ]
    assert min(moved) > 0  # the step updated every running statistic
    # Evaluation: running statistics, dropout off, equal to the rebuilt module in eval mode.
    module, batch = scope["module"], scope["batch"]
    module.eval()
    logits = module(batch["x"])
    import optax

    want = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(axis=1)
    np.testing.assert_allclose(scope["test_losses"], want, rtol=1e-5)


def test_per_task_inputs_example():
    import mtljax as mtl

    with warnings.catch_warnings():
        warnings.simplefilter("error", mtl.PerTaskFeaturesWarning)
        scope = _run("Per-task inputs")
    metrics, state = scope["metrics"], scope["state"]
    assert int(state.step) == 1 and np.isfinite(np.asarray(metrics["losses"])).all()
    # At parameter level the tasks' gradients interact through the shared encoder ...
    cos = np.asarray(metrics["cosines"])[~np.eye(3, dtype=bool)]
    assert np.max(np.abs(cos)) > 1e-3
    # ... at feature level (the same network as encoder and heads) they cannot, and the step
    # says so.
    from flax import nnx

    model, params = mtl.from_nnx(
        scope["PerTask"](nnx.Rngs(0)),
        task_names=("amazon", "dslr", "webcam"),
        shared="encoder",
        encode=lambda m, b: m.encoder(b["x"]),
        heads=lambda m, z, b: scope["jnp"].mean(
            (m.heads(z, per_task=True)[..., 0] - b["y"]) ** 2, axis=1
        ),
    )
    method, opt = scope["method"], scope["opt"]
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, mode="feature")
    x = jax.random.normal(jax.random.key(0), (3, 8, 16))
    with pytest.warns(mtl.PerTaskFeaturesWarning, match="mode='parameter'"):
        step(state, {"x": x, "y": np.zeros((3, 8), np.float32)})


def test_metrics_and_logging_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = _run("Metrics and logging")
    import mtljax as mtl

    records = {n: mtl.read_metrics(tmp_path / f"{n}.jsonl") for n in ("ew", "upgrad", "config")}
    keys = {n: [sorted(r) for r in rs] for n, rs in records.items()}
    assert keys["ew"] == keys["upgrad"] == keys["config"] and len(keys["ew"]) == 3
    assert [r["step"] for r in records["config"]] == [0, 1, 2]
    assert all(np.isnan(w) for w in records["config"][0]["weights"])  # a direction method
    assert records["ew"][0]["solver_iterations"] == -1
    assert records["upgrad"][0]["solver_iterations"] >= 1
    assert scope["records"] == records["config"]
