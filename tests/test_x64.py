"""Float64 mode (``jax_enable_x64``): every method trains, in a subprocess with x64 on.

Under x64, JAX creates float64 arrays by default: batches and losses may be float64 while
Flax layers keep float32 parameters, and a method may compute its weights in either dtype.
The train step must still run (the weights are the cotangent of the losses' VJP, so they take
the losses' dtype), keep the state's dtypes from step to step, and checkpoint and resume.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mtljax as mtl
from tests.helpers import subprocess_env

# `--dist loadgroup` keeps this module on one worker: every method's float64 run happens once, in a
# subprocess started by a module fixture.
pytestmark = pytest.mark.xdist_group("x64")

_SCRIPT = r"""
import json, sys, tempfile
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import mtljax as mtl
from mtljax._src import runner
from mtljax._src.checkpoint import structure
from tests.helpers import tiny_batch, tiny_model

T = 3
out = {}
for name in mtl.methods.names():
    model, params = tiny_model(T)
    kwargs = {"weights": (1.0, 2.0, 3.0)} if name == "fixed" else {}
    method = mtl.methods.get(name, like=params.shared, **kwargs)
    opt = optax.adam(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    before = structure(state)
    step = mtl.make_train_step(model, method, opt)
    try:
        for s in range(2):
            state, metrics = step(state, tiny_batch(T, seed=s))
        out[name] = {
            "losses_dtype": str(metrics["losses"].dtype),
            "finite": bool(np.all(np.isfinite(np.asarray(metrics["losses"])))),
            "applied": int(state.step) - int(state.skipped),
            "same_types": structure(state) == before,
        }
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}

# a float64-default block's parameters are float32, as Flax's layers'
from flax import nnx
heads = mtl.nn.StackedLinear(4, 2, T, rngs=nnx.Rngs(0))
out["_stacked_dtypes"] = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(nnx.state(heads))})

# the runner (the command line's training) with a Gramian method, checkpointed and resumed
with tempfile.TemporaryDirectory() as d:
    kw = dict(problem_args={"num_tasks": 3, "sigmas": (1.0, 2.0, 4.0), "num_train": 200,
              "num_test": 50}, progress=False, ckpt_dir=d + "/ck", save_every=2)
    first = runner.run_training("gradnorm_toy", "upgrad", steps=2, **kw)
    second = runner.run_training("gradnorm_toy", "upgrad", steps=4, resume=True, **kw)
out["_runner"] = {
    "resumed_from": second["resumed_from"],
    "skipped": first["skipped_steps"] + second["skipped_steps"],
    "finite": all(np.isfinite(v) for v in second["final"]["train_losses"].values()),
}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def x64_results():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("name", mtl.methods.names())
def test_every_method_trains_in_float64_mode(x64_results, name):
    r = x64_results[name]
    assert "error" not in r, r.get("error")
    assert r["losses_dtype"] == "float64" and r["finite"]
    assert r["applied"] == 2  # no step skipped
    assert r["same_types"]  # the state keeps its dtypes from step to step


def test_stacked_blocks_keep_float32_parameters(x64_results):
    assert x64_results["_stacked_dtypes"] == ["float32"]


def test_the_runner_trains_checkpoints_and_resumes_in_float64_mode(x64_results):
    r = x64_results["_runner"]
    assert r == {"resumed_from": 2, "skipped": 0, "finite": True}
