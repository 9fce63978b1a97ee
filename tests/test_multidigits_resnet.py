"""``multidigits`` with ``arch="resnet"``: a BatchNorm + dropout encoder (``mtljax.nn.ResNet``)
trained by the train step and the runner; its statistics move, evaluation uses them, a resumed
run is bit-identical. (8 devices against 1: ``tests/test_model_state.py``'s worker.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")

import mtljax as mtl  # noqa: E402
from mtljax._src.problems import multidigits as md  # noqa: E402
from mtljax._src.problems.base import evaluation_input  # noqa: E402

# A tiny ResNet (two stages of one block) on a few pairs: the same code path as the default.
RESNET = {
    "arch": "resnet",
    "widths": (4, 8),
    "blocks": (1, 1),
    "dropout_rate": 0.2,
    "num_train": 64,
    "num_validation": 32,
    "num_test": 32,
    "batch_size": 16,
}
METHODS = ("ew", "upgrad")
_CACHE: dict = {}


def _problem():
    if "p" not in _CACHE:
        _CACHE["p"] = mtl.problems.get("multidigits", **RESNET)
    return _CACHE["p"]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _train(name, steps):
    problem = _problem()
    method = mtl.methods.get(name, like=problem.params.shared)
    opt = problem.optimizer
    state = mtl.init_train_state(problem.model, problem.params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(problem.model, method, opt)
    init = state
    for i in range(steps):
        state, metrics = step(state, problem.sample(jax.random.key(10 + i)))
    return init, state, metrics


def test_the_resnet_model_shares_bn_parameters_and_carries_statistics():
    problem = _problem()
    model = problem.model
    assert model.has_state and model.uses_key  # BatchNorm statistics; dropout
    assert model.last_shared == "encoder/stages/1/0"
    shared = mtl._src.tree.leaf_paths(problem.params.shared)
    assert "encoder/stem_bn/scale" in shared and "encoder/stages/1/0/bn2/bias" in shared
    stats = mtl._src.tree.leaf_paths(model.initial_state)
    assert "encoder/stem_bn/mean" in stats and "encoder/stages/1/0/shortcut/bn/var" in stats
    assert not [p for p in stats if p in shared]
    # The default architecture is unchanged: the MLP, without model state.
    assert not mtl.problems.get("multidigits", num_train=64, batch_size=16).model.has_state
    with pytest.raises(ValueError, match="arch must be one of mlp, resnet"):
        mtl.problems.get("multidigits", arch="vgg")


@pytest.mark.parametrize("name", METHODS)
def test_training_moves_the_batchnorm_statistics(name):
    problem = _problem()
    init, state, metrics = _train(name, 1)
    assert int(state.skipped) == 0 and bool(metrics["finite"])
    assert np.isfinite(np.asarray(metrics["losses"])).all()
    for a, b in zip(_leaves(state.model_state), _leaves(init.model_state), strict=True):
        assert np.max(np.abs(a - b)) > 1e-4  # every running mean and variance moved
    # The stem's statistics are those of one NNX forward pass in training mode on the batch.
    module = mtl.to_nnx(problem.model, init)
    module.train()
    x = problem.sample(jax.random.key(10))["x"].reshape(-1, 9, 10, 1)
    enc = module.encoder
    enc.stem_bn(enc.stem_conv(x))
    got = state.model_state["encoder"]["stem_bn"]
    np.testing.assert_allclose(got["mean"][...], enc.stem_bn.mean[...], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["var"][...], enc.stem_bn.var[...], rtol=1e-5, atol=1e-7)


def test_evaluate_uses_the_running_statistics_without_dropout():
    problem = _problem()
    _, state, _ = _train("ew", 3)
    assert evaluation_input(problem.model, state) is state
    got = problem.evaluate_split(state, "validation")
    # Reference: the module rebuilt from the train state, in evaluation mode.
    data = md.datasets(0, sizes={"train": 64, "validation": 32, "test": 32})["validation"]
    module = mtl.to_nnx(problem.model, state)
    module.eval()
    outputs = module(data["x"].reshape(-1, 9, 10, 1))
    tgt = md.targets(data["left"], data["right"], problem.task_names)
    want = md._task_losses(outputs, tgt, problem.task_names)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    np.testing.assert_array_equal(got["loss"], problem.evaluate_split(state, "validation")["loss"])
    # Parameters alone evaluate with the statistics as built, which differ.
    at_build = problem.evaluate_split(state.params, "validation")["loss"]
    assert np.max(np.abs(np.asarray(at_build) - np.asarray(got["loss"]))) > 1e-3
    # Training mode (batch statistics, dropout) gives other losses again.
    module.train()
    train_mode = md._task_losses(module(data["x"].reshape(-1, 9, 10, 1)), tgt, problem.task_names)
    assert np.max(np.abs(np.asarray(train_mode) - np.asarray(want))) > 1e-3


def test_the_runner_resumes_a_resnet_run_bit_identically(tmp_path):
    """The command line (``--arch resnet``) trains 4 steps; a run of 2 steps resumed to 4 from
    its checkpoint ends with the same parameters and the same running statistics."""
    import json

    from mtljax._src.runner import main, run_training

    args = ["train", "--problem", "multidigits", "--arch", "resnet", "--method", "ew"]
    for k, v in RESNET.items():
        if k != "arch":
            args += ["--problem-arg", f"{k}={v}"]
    out = tmp_path / "full.json"
    ckpt = ["--ckpt-dir", str(tmp_path / "full"), "--save-every", "2"]
    assert main([*args, *ckpt, "--steps", "4", "--no-progress", "--out", str(out)]) == 0
    full = json.loads(out.read_text())
    assert full["info"]["arch"] == "resnet" and full["problem_args"]["arch"] == "resnet"

    def run(steps, resume=False):
        return run_training(
            "multidigits",
            "ew",
            steps=steps,
            problem_args=RESNET,
            ckpt_dir=str(tmp_path / "half"),
            save_every=2,
            resume=resume,
            progress=False,
        )

    run(2)
    resumed = run(4, resume=True)
    assert resumed["resumed_from"] == 2 and full["resumed_from"] == 0
    assert full["skipped_steps"] == resumed["skipped_steps"] == 0
    assert resumed["params_sha256"] == full["params_sha256"]
    # The final evaluation reads the running statistics, which training (on batch statistics)
    # never reads: equal, so they were restored. (The checkpoint's bits: test_model_state.py.)
    np.testing.assert_equal(resumed["final"]["eval"], full["final"]["eval"])  # NaN == NaN
