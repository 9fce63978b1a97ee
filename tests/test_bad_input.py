"""Bad batches are refused before compilation, naming the field and the task; non-finite
losses or gradients never reach the parameters (skipped and counted, or an error naming the
task and the step)."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtljax as mtl
from mtljax._src import runner
from tests.helpers import tiny_batch, tiny_model

# `--dist loadgroup` keeps this module on one worker: module fixtures.
pytestmark = pytest.mark.xdist_group("bad_input")

T = 3


@pytest.fixture(scope="module")
def setup():
    model, params = tiny_model(T)
    return model, params, tiny_batch(T)


def with_spec(model, spec):
    return mtl.Model(
        model.task_names,
        model.losses_fn,
        model.encode_fn,
        model.heads_fn,
        model.last_shared,
        batch_spec=spec,
    )


STACKED = {
    "x": mtl.BatchField(("batch", 5), jnp.float32),
    "y": mtl.BatchField(("tasks", "batch", 2), jnp.floating),
}


def make(model, params, method=None, **kw):
    method = method or mtl.methods.ew()
    opt = optax.adam(0.01)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    return state, mtl.make_train_step(model, method, opt, **kw)


# ----------------------------------------------------------------------------------------------
# Bad batches


@pytest.mark.parametrize(
    "mutate,error,message",
    [
        (lambda b: {"x": b["x"]}, ValueError, r"missing field 'y'.*holds \['x'\]"),
        (
            lambda b: dict(b, y=b["y"][:2]),
            ValueError,
            r"'y' holds one entry per task on axis 0, for the 3 tasks \('t0', 't1', 't2'\); "
            r"got 2",
        ),
        (lambda b: dict(b, x=b["x"][:, :4]), ValueError, r"'x' has shape \(16, 4\), expected"),
        (lambda b: dict(b, x=b["x"][None]), ValueError, r"'x' has shape \(1, 16, 5\).*2 axes"),
        (
            lambda b: dict(b, y=b["y"].astype(jnp.int32)),
            TypeError,
            r"'y' has dtype int32, expected floating",
        ),
        (lambda b: dict(b, x=b["x"].astype(jnp.float16)), TypeError, "'x' has dtype float16"),
        (
            lambda b: {"x": b["x"][:0], "y": b["y"][:, :0]},
            ValueError,
            r"empty batch: field 'x' has 0 examples",
        ),
        (
            lambda b: dict(b, y=b["y"][:, :15]),
            ValueError,
            r"disagree on the number of examples: 'x' has 16 \(axis 0\), 'y' has 15 \(axis 1\)",
        ),
        (lambda b: dict(b, x=[[1.0] * 5] * 16), TypeError, "'x' must be an array, got list"),
    ],
)
def test_stacked_batch_errors_name_the_field(stacked_step, mutate, error, message):
    state, step, batch = stacked_step
    with pytest.raises(error, match=message):
        step(state, mutate(batch))
    assert step.jitted._cache_size() == 0  # refused before compilation


def test_a_good_batch_passes_the_spec(stacked_step):
    state, step, batch = stacked_step
    new, _ = step(state, batch)
    assert int(new.step) == 1


def test_every_new_batch_shape_is_checked_not_only_the_first(setup):
    """A bad batch after good ones is refused before compiling, like a bad first batch."""
    model, params, batch = setup
    state, step = make(with_spec(model, STACKED), params)
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert step.jitted._cache_size() == 1
    with pytest.raises(ValueError, match=r"'y' has shape \(3, 16, 1\), expected"):
        step(state, dict(batch, y=batch["y"][..., :1]))
    with pytest.raises(TypeError, match=r"'y' has dtype int32, expected floating"):
        step(state, dict(batch, y=batch["y"].astype(jnp.int32)))
    assert step.jitted._cache_size() == 1
    half = {"x": batch["x"][:8], "y": batch["y"][:, :8]}  # a good batch of another size
    state, _ = step(state, half)
    assert int(state.step) == 3 and step.jitted._cache_size() == 2


@pytest.fixture(scope="module")
def stacked_step(setup):
    model, params, batch = setup
    state, step = make(with_spec(model, STACKED), params)
    return state, step, batch


def per_task_model(model):
    """The same model fed ``{"x", "targets": {task: (B, 2)}}``, one target array per task."""
    spec = {
        "x": mtl.BatchField(("batch", 5), jnp.float32),
        "targets": {n: mtl.BatchField(("batch", 2), jnp.float32, task=n) for n in model.task_names},
    }

    def stacked(b):
        return {"x": b["x"], "y": jnp.stack([b["targets"][n] for n in model.task_names])}

    return mtl.Model(
        model.task_names,
        lambda s, p, b: model.losses_fn(s, p, stacked(b)),
        batch_spec=spec,
    )


def test_per_task_targets_missing_or_wrong_name_the_task(setup):
    model, params, batch = setup
    m = per_task_model(model)
    good = {"x": batch["x"], "targets": {n: batch["y"][i] for i, n in enumerate(m.task_names)}}
    state, step = make(m, params)
    missing = {"x": good["x"], "targets": {k: v for k, v in good["targets"].items() if k != "t1"}}
    with pytest.raises(
        ValueError, match=r"missing field 'targets/t1' \(the targets of task 't1'\)"
    ):
        step(state, missing)
    wrong = {"x": good["x"], "targets": dict(good["targets"], t2=good["targets"]["t2"][:, :1])}
    with pytest.raises(ValueError, match=r"'targets/t2' \(task 't2'\) has shape \(16, 1\)"):
        step(state, wrong)
    ints = {"x": good["x"], "targets": dict(good["targets"], t0=jnp.zeros((16, 2), jnp.int32))}
    with pytest.raises(TypeError, match=r"'targets/t0' \(task 't0'\) has dtype int32"):
        step(state, ints)
    assert step.jitted._cache_size() == 0
    step(state, good)


def test_spec_from_an_example(setup):
    model, params, batch = setup
    spec = mtl.batch_spec_like(batch, batch_axes={"x": 0, "y": 1}, task_axes={"x": None, "y": 0})
    assert spec["y"].shape == ("tasks", "batch", 2) and spec["x"].shape == ("batch", 5)
    assert mtl.batch_axes_of(spec) == {"x": 0, "y": 1}
    mtl.check_batch(spec, tiny_batch(T, n=7), model.task_names)  # any batch size
    with pytest.raises(ValueError, match="'y' holds one entry per task"):
        mtl.check_batch(spec, tiny_batch(4), model.task_names)
    with pytest.raises(ValueError, match="batch_axes"):
        mtl.batch_spec_like(batch, batch_axes={"z": 0})
    with pytest.raises(ValueError, match="'batch', 'tasks' or None"):
        mtl.BatchField(("rows", 5))


def test_without_a_spec(setup):
    model, params, batch = setup
    state, step = make(model, params)
    with pytest.raises(ValueError, match=r"empty batch: field 'x' has shape \(0, 5\)"):
        step(state, {"x": batch["x"][:0], "y": batch["y"][:, :0]})
    with pytest.raises(
        ValueError,
        match=r"cannot be evaluated on this batch \(x: float32\[16, 5\]\): missing key 'y'",
    ):
        step(state, {"x": batch["x"]})
    with pytest.raises(TypeError, match=r"batch field 'x' is a Python list .*jnp.asarray"):
        step(state, {"x": np.asarray(batch["x"]).tolist(), "y": batch["y"]})
    assert step.jitted._cache_size() == 0


def test_state_and_step_from_different_methods_are_refused(setup):
    model, params, batch = setup
    opt = optax.adam(0.01)
    state = mtl.init_train_state(model, params, mtl.methods.uw(), opt, jax.random.key(0))
    step = mtl.make_train_step(model, mtl.methods.gradnorm(), opt)
    with pytest.raises(ValueError, match=r"method_state does not fit method 'gradnorm'"):
        step(state, batch)
    assert step.jitted._cache_size() == 0


def test_init_train_state_checks_its_arguments(setup):
    model, params, _ = setup
    opt = optax.adam(0.01)
    with pytest.raises(TypeError, match=r"expected an mtljax Method, got function \(a factory"):
        mtl.init_train_state(model, params, mtl.methods.ew, opt, jax.random.key(0))
    with pytest.raises(TypeError, match=r"expected an mtljax Model"):
        mtl.init_train_state(params, model, mtl.methods.ew(), opt, jax.random.key(0))
    with pytest.raises(TypeError, match=r"key must be a PRNG key .*int32\[\]"):
        mtl.init_train_state(model, params, mtl.methods.ew(), opt, 0)
    with pytest.raises(ValueError, match=r"one PRNG key, got keys of shape \(2,\)"):
        mtl.init_train_state(
            model, params, mtl.methods.ew(), opt, jax.random.split(jax.random.key(0))
        )
    # Raw uint32[2] keys (jax.random.PRNGKey) are accepted as they are.
    state = mtl.init_train_state(model, params, mtl.methods.ew(), opt, jax.random.PRNGKey(0))
    assert state.key.dtype == jnp.uint32 and state.key.shape == (2,)


def test_task_names_as_a_bare_string_is_refused():
    model, _ = tiny_model(1)
    with pytest.raises(ValueError, match=r"sequence of names, got the string 'cls' .*\('cls',\)"):
        mtl.Model("cls", model.losses_fn)
    with pytest.raises(ValueError, match=r"Model.from_encoder_heads: task_names .*string 'cls'"):
        mtl.Model.from_encoder_heads(model.encode_fn, model.heads_fn, "cls")
    net = mtl.nn.HardSharing(
        mtl.nn.MLP((3, 4), rngs=nnx.Rngs(0)), mtl.nn.StackedLinear(4, 1, 1, rngs=nnx.Rngs(1))
    )
    with pytest.raises(ValueError, match=r"from_nnx: task_names .*string 'cls'"):
        mtl.from_nnx(net, task_names="cls", shared="encoder", losses=lambda m, b: 0)


# ----------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def identical(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def inject(batch, task, value):
    return dict(batch, y=batch["y"].at[task, 3, 1].set(value))


METHODS = ["ew", "uw", "gradnorm", "pcgrad", "graddrop"]


def _method(name):
    if name not in mtl.methods.names():
        pytest.skip(f"method {name!r} is not registered")
    return mtl.methods.get(name)


@pytest.mark.parametrize("name", METHODS)
def test_skip_never_touches_the_state(setup, name):
    model, params, batch = setup
    method = _method(name)
    state, step = make(model, params, method, nonfinite="skip")
    state, _ = step(state, batch)
    for value in [jnp.nan, jnp.inf, -jnp.inf]:
        new, metrics = step(state, inject(batch, 1, value))
        assert not bool(metrics["finite"])
        np.testing.assert_array_equal(metrics["task_finite"], [True, False, True])
        assert int(new.skipped) == 1 and int(new.step) == 2
        assert identical(new.params, state.params)
        assert identical(new.opt_state, state.opt_state)
        assert identical(new.method_state, state.method_state)
    after, metrics = step(new, batch)
    assert bool(metrics["finite"]) and int(after.skipped) == 1 and int(after.step) == 3
    assert not identical(after.params, state.params)


@pytest.mark.parametrize("name", ["ew", "gradnorm", "pcgrad"])
def test_raise_names_the_task_and_the_step(setup, name):
    model, params, batch = setup
    state, step = make(model, params, _method(name), nonfinite="raise")
    for _ in range(2):
        state, _ = step(state, batch)
    with pytest.raises(mtl.NonFiniteError, match=r"at step 2 in task 't2'") as e:
        step(state, inject(batch, 2, jnp.inf))
    assert e.value.step == 2 and e.value.tasks == ("t2",)
    bad = dict(batch, y=batch["y"].at[0, 0, 0].set(jnp.nan).at[2, 0, 0].set(jnp.nan))
    with pytest.raises(mtl.NonFiniteError, match=r"in tasks 't0', 't2'"):
        step(state, bad)


def test_raise_from_a_scan_names_the_first_bad_step(setup):
    model, params, batch = setup
    state, step = make(model, params, mtl.methods.ew(), nonfinite="raise")

    def sample(key):
        bad = jax.random.key_data(key)[0] % 2 == 0  # some steps get a NaN in task 0
        return dict(batch, y=batch["y"].at[0, 0, 0].set(jnp.where(bad, jnp.nan, 0.0)))

    keys = jax.random.split(jax.random.key(3), 6)
    first_bad = int(np.argmax(np.asarray(jax.random.key_data(keys))[:, 0] % 2 == 0))
    with pytest.raises(mtl.NonFiniteError, match=rf"at step {first_bad} in task 't0'"):
        step.scan(state, sample, keys)


def sqrt_model():
    """Task ``b`` has a finite loss (0) but a NaN gradient when ``z = 0``."""

    def losses_fn(shared, specific, batch):
        w = shared["w"]
        a = jnp.sum((w - 1.0) ** 2)
        b = jnp.sqrt(jnp.abs(jnp.sum(w * batch["z"])))
        return jnp.stack([a, b])

    model = mtl.Model(("a", "b"), losses_fn)
    return model, mtl.Params({"w": jnp.ones(3)}, {})


@pytest.mark.parametrize("name", ["ew", "gradnorm"])
def test_finite_losses_with_a_nonfinite_gradient(name):
    model, params = sqrt_model()
    method = mtl.methods.gradnorm(params="all") if name == "gradnorm" else mtl.methods.ew()
    state, step = make(model, params, method, nonfinite="raise")
    with pytest.raises(mtl.NonFiniteError, match="step 0 although every task's loss was finite"):
        step(state, {"z": jnp.zeros(3)})
    # ... and the skip mode keeps the state
    state, step = make(model, params, method, nonfinite="skip")
    new, metrics = step(state, {"z": jnp.zeros(3)})
    assert bool(np.all(metrics["task_finite"])) and not bool(metrics["finite"])
    assert identical(new.params, state.params)


def test_gramian_chunks_report_the_task(setup):
    model, params, batch = setup
    state, step = make(model, params, _method("pcgrad"), nonfinite="skip", gramian_chunk_size=2)
    new, metrics = step(state, inject(batch, 0, jnp.nan))
    np.testing.assert_array_equal(metrics["task_finite"], [False, True, True])
    assert identical(new.params, state.params)


def test_cli_nonfinite_raise(capsys):
    args = ["train", "--problem", "gradnorm_toy", "--method", "ew", "--steps", "3"]
    args += ["--problem-arg", "num_tasks=2", "--problem-arg", "sigmas=(1.0,1e999)"]
    args += ["--problem-arg", "num_train=200", "--problem-arg", "num_test=50"]
    with pytest.raises(SystemExit) as e:
        runner.main([*args, "--nonfinite", "raise", "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"non-finite loss or gradient at step 0 in task 'task1'", err), err


def test_bad_options(setup):
    model, params, _ = setup
    with pytest.raises(ValueError, match="nonfinite"):
        make(model, params, nonfinite="ignore")
    with pytest.raises(ValueError, match="gramian_chunk_size applies to weighting methods"):
        make(model, params, mtl.methods.uw(), gramian_chunk_size=2)
    with pytest.raises(ValueError, match="gramian_chunk_size must be a positive int"):
        make(model, params, mtl.methods.gradnorm(), gramian_chunk_size=0)
    with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
        make(model, params, compute_dtype=jnp.int32)


def test_skipped_steps_are_reported(setup):
    model, params, batch = setup
    state, step = make(model, params, nonfinite="skip")
    bad = inject(batch, 0, jnp.nan)
    with pytest.warns(mtl.SkippedStepWarning, match=r"step 0 was skipped.*state.skipped"):
        for _ in range(3):
            state, metrics = step(state, bad)
            jax.block_until_ready(metrics)
        step(state, bad)
    assert int(state.skipped) == 3
    with warnings.catch_warnings():  # once per step function
        warnings.simplefilter("error", mtl.SkippedStepWarning)
        for _ in range(2):
            state, metrics = step(state, bad)
            jax.block_until_ready(metrics)


def test_state_and_step_from_different_optimizers_are_refused(setup):
    model, params, batch = setup
    method = mtl.methods.ew()
    state = mtl.init_train_state(model, params, method, optax.adamw(0.01), jax.random.key(0))
    step = mtl.make_train_step(model, method, optax.adam(0.01))
    with pytest.raises(
        ValueError,
        match=r"opt_state does not fit this step's optimizer \(expected \(ScaleByAdamState\(.*"
        r"EmptyState\(\)\), got \(ScaleByAdamState\(.*EmptyState\(\), EmptyState\(\)\)\)",
    ):
        step(state, batch)
    assert step.jitted._cache_size() == 0
