"""MGDA, UPGrad, DualProj, Nash-MTL, CAGrad and FairGrad as methods: the contract (aggregate,
weights from a Gramian, jit, vmap), the properties their papers claim, degenerate inputs and
hyper-parameter checks.

Each method runs once on a batch of Jacobians (one vmapped, jitted function: one compilation)
holding random problems, transformed copies of the first one (permuted, row-scaled, scaled)
and degenerate ones; the tests read that batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src import solvers
from mtljax._src.methods.dualproj import _dualproj
from mtljax._src.methods.mgda import _mgda
from mtljax._src.methods.nash_mtl import NashMTLState
from mtljax._src.methods.upgrad import _upgrad
from tests.helpers import max_abs_diff, tiny_batch, tiny_model

# `--dist loadgroup` keeps this module on one worker: cached batches of solves.
pytestmark = pytest.mark.xdist_group("solver_methods")

T, P = 4, 8
PERM = np.array([2, 0, 3, 1])
ROW_SCALE = np.array([1e-2, 1.0, 10.0, 1e3])
GLOBAL_SCALE = 1e3
FAIR_ALPHA = 2.0

CONFIGS = {
    "mgda": ("mgda", {}),
    "mgda_l2": ("mgda", {"normalization": "l2"}),
    "upgrad": ("upgrad", {}),
    "dualproj": ("dualproj", {}),
    "nash_mtl": ("nash_mtl", {}),
    "cagrad": ("cagrad", {}),
    "fairgrad": ("fairgrad", {"alpha": FAIR_ALPHA}),
}
NON_CONFLICTING = ("mgda", "mgda_l2", "upgrad", "dualproj", "nash_mtl")


def _batch():
    """Jacobians ``(B, T, P)`` and positive losses ``(B, T)``, with named entries."""
    rng = np.random.default_rng(0)
    random = []
    for k in range(4):
        j = rng.normal(size=(T, P))
        if k % 2:
            j = j + 1.5 * rng.normal(size=(1, P))
        random.append(j * 10.0 ** rng.uniform(-1, 1, size=(T, 1)))
    j0 = random[0]
    entries = {f"random{k}": j for k, j in enumerate(random)}
    entries["permuted"] = j0[PERM]
    entries["row_scaled"] = j0 * ROW_SCALE[:, None]
    entries["scaled"] = j0 * GLOBAL_SCALE
    other = rng.normal(size=(T, P))
    entries["zero_row"] = np.concatenate([other[:1], np.zeros((1, P)), other[2:]])
    entries["all_zero"] = np.zeros((T, P))
    entries["identical"] = np.concatenate([other[:1], other[:1], other[2:]])
    entries["opposite"] = np.concatenate([other[:1], -other[:1], other[2:]])
    entries["scales"] = np.diag([1e-10, 1e-3, 1e3, 1e10]) @ other
    entries["huge"] = 1e15 * other
    entries["tiny"] = 1e-15 * other
    entries["no_conflict"] = np.abs(other)  # positive entries: no two gradients conflict
    names = list(entries)
    js = np.stack(list(entries.values()))
    losses = rng.uniform(0.5, 2.0, size=(len(names), T))
    losses[names.index("permuted")] = losses[0][PERM]
    return names, js, losses


NAMES, JS, LOSSES = _batch()
RANDOM = [i for i, n in enumerate(NAMES) if n.startswith("random")]
DEGENERATE = [NAMES.index(n) for n in ("zero_row", "all_zero", "identical", "opposite")]
ALL_INPUTS = list(range(len(NAMES)))


@functools.cache
def method(config):
    name, kwargs = CONFIGS[config]
    return mtl.methods.get(name, **kwargs)


@functools.cache
def batched(config):
    m = method(config)

    def run(j, losses, state):
        d, new_state = mtl.aggregate(m, j, losses, state)
        w, _ = mtl.weights_from_gramian(m, mtl.gramian(j), losses, state)
        return d, w, new_state

    return jax.jit(jax.vmap(run))


@functools.cache
def results(config):
    """``(d, w)`` in float64 numpy for the whole batch (float32 computations)."""
    m = method(config)
    state = jax.tree_util.tree_map(lambda x: jnp.stack([x] * len(NAMES)), m.init(T))
    d, w, _ = batched(config)(jnp.asarray(JS, jnp.float32), jnp.asarray(LOSSES, jnp.float32), state)
    return np.asarray(d, np.float64), np.asarray(w, np.float64)


def entry(config, name):
    d, w = results(config)
    k = NAMES.index(name)
    return JS[k], d[k], w[k]


# ----------------------------------------------------------------------------------------------
# Contract


@pytest.mark.parametrize("config", list(CONFIGS))
def test_finite_and_aggregate_matches_gramian_weights(config):
    d, w = results(config)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
    # aggregate's direction is Jᵀw with w the weights computed from the Gramian alone.
    for k in RANDOM + DEGENERATE:
        terms = np.abs(w[k]) @ np.abs(JS[k])  # the size of the terms of the sum Σᵢ wᵢgᵢ
        np.testing.assert_allclose(d[k], JS[k].T @ w[k], rtol=1e-4, atol=1e-5 * terms.max())


def test_one_task():
    # Every method is defined for one task: d = g for MGDA, UPGrad and DualProj;
    # g/‖g‖ for Nash-MTL; (1 + c) g for CAGrad; ‖g‖^{-2α/(1+α)} g for FairGrad.
    g = np.array([[3.0, 4.0, 0.0]])
    loss = jnp.ones(1)

    @jax.jit
    def run(j):
        out = {}
        for config in CONFIGS:
            m = method(config)
            out[config] = mtl.aggregate(m, j, loss, m.init(1))[0]
        return out

    out = {k: np.asarray(v) for k, v in run(jnp.asarray(g, jnp.float32)).items()}
    for config in ("mgda", "upgrad", "dualproj"):
        np.testing.assert_allclose(out[config], g[0], rtol=1e-6)
    np.testing.assert_allclose(out["mgda_l2"], g[0] / 5.0, rtol=1e-6)
    np.testing.assert_allclose(out["nash_mtl"], g[0] / 5.0, rtol=1e-6)
    np.testing.assert_allclose(out["cagrad"], 1.4 * g[0], rtol=1e-6)
    expo = -2 * FAIR_ALPHA / (1 + FAIR_ALPHA)
    np.testing.assert_allclose(out["fairgrad"], 5.0**expo * g[0], rtol=1e-5)


def test_registry():
    names = mtl.methods.names()
    for name in ("mgda", "upgrad", "dualproj", "nash_mtl", "cagrad", "fairgrad"):
        assert name in names
        m = mtl.methods.get(name)
        assert m.name == name and m.needs == "gramian" and m.weights is not None
        assert m.min_tasks == 1
    heads = {n: mtl.methods.get(n).head_grads for n in ("mgda", "upgrad", "nash_mtl")}
    assert heads == {"mgda": "unit", "upgrad": "unit", "nash_mtl": "weighted"}


# ----------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("config", NON_CONFLICTING)
def test_non_conflicting(config):
    # gᵢ · d ≥ 0 for every task, on random and degenerate inputs (to the solver's precision).
    d, w = results(config)
    for k in RANDOM + DEGENERATE:
        j = JS[k]
        size = np.abs(w[k]) @ np.linalg.norm(j, axis=1)
        assert np.all(j @ d[k] >= -1e-5 * np.linalg.norm(j, axis=1) * size), NAMES[k]


def test_mgda_common_descent():
    # The min-norm point d satisfies gᵢ · d ≥ ‖d‖², with equality where αᵢ > 0.
    for k in RANDOM:
        j, d, w = JS[k], *(r[k] for r in results("mgda"))
        assert np.all(j @ d >= d @ d - 1e-5 * np.max(np.linalg.norm(j, axis=1)) ** 2)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_permutation_equivariance(config):
    _, d, w = entry(config, "random0")
    _, d_perm, w_perm = entry(config, "permuted")
    np.testing.assert_allclose(w_perm, w[PERM], rtol=1e-4, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(d_perm, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())


def _scaling_expectations(config, w, w_scaled, w_rows):
    """Each method's behaviour when J → cJ (w_scaled) and J → diag(c)J (w_rows)."""
    c, rows = GLOBAL_SCALE, ROW_SCALE
    if config in ("mgda", "upgrad", "dualproj", "cagrad"):
        return {"global": (w_scaled, w)}  # scale-free weights: d scales linearly with J
    if config == "mgda_l2":
        # d is the min-norm point of the unit gradients: unchanged by any row scaling.
        return {"global": (w_scaled * c, w), "rows": (w_rows * rows, w)}
    if config == "nash_mtl":
        # αᵢ ∝ 1/‖gᵢ‖ under row scaling: the direction does not change.
        return {"global": (w_scaled * c, w), "rows": (w_rows * rows, w)}
    expo = 2 * FAIR_ALPHA / (1 + FAIR_ALPHA)  # fairgrad: w ∝ ‖g‖^{-2α/(1+α)}
    return {"global": (w_scaled * c**expo, w)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_scaling(config):
    _, _, w = entry(config, "random0")
    _, _, w_scaled = entry(config, "scaled")
    _, _, w_rows = entry(config, "row_scaled")
    for kind, (got, want) in _scaling_expectations(config, w, w_scaled, w_rows).items():
        np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=kind)


def test_upgrad_and_dualproj_give_the_mean_without_conflict():
    # With no conflict every gradient is its own projection, and so is the mean gradient.
    for config in ("upgrad", "dualproj"):
        _, _, w = entry(config, "no_conflict")
        np.testing.assert_allclose(w, np.full(T, 1 / T), rtol=1e-5)


def test_nash_bargaining_direction():
    for k in RANDOM:
        j, d, w = JS[k], *(r[k] for r in results("nash_mtl"))
        np.testing.assert_allclose(w * (j @ d), 1.0, atol=3e-5)


def test_degenerate_cases_are_sensible():
    # Opposite gradients: MGDA, UPGrad and DualProj never increase either loss; a zero gradient
    # gets no Nash-MTL or FairGrad weight; all-zero gradients give a zero direction.
    j, d, _ = entry("mgda", "opposite")
    assert abs(j[0] @ d) < 1e-5 * np.linalg.norm(j[0]) ** 2
    for config in ("nash_mtl", "fairgrad"):
        _, _, w = entry(config, "zero_row")
        assert w[1] == 0 and np.all(w[[0, 2, 3]] > 0)
    for config in CONFIGS:
        _, d, _ = entry(config, "all_zero")
        np.testing.assert_array_equal(d, 0.0)
    # Identical rows in UPGrad: the two copies get the same weight.
    _, _, w = entry("upgrad", "identical")
    np.testing.assert_allclose(w[0], w[1], rtol=1e-5)


def test_mgda_loss_normalizations():
    # "loss": gᵢ/Lᵢ, "loss+": gᵢ/(Lᵢ‖gᵢ‖). d = Σ wᵢgᵢ is the min-norm point of the normalised
    # gradients ĝᵢ = gᵢ/dᵢ: ĝᵢ · d ≥ ‖d‖², and Σ wᵢdᵢ = 1.
    variants = ("loss", "loss+")
    methods = [mtl.methods.mgda(v) for v in variants]

    @jax.jit
    def run(g, losses):
        return [m.weights(losses, g, (), None)[0] for m in methods]

    for k in RANDOM[:2]:
        j, losses = JS[k], LOSSES[k]
        out = run(jnp.asarray(j @ j.T, jnp.float32), jnp.asarray(losses, jnp.float32))
        for variant, w in zip(variants, out, strict=True):
            w = np.asarray(w, np.float64)
            scale = losses * (np.linalg.norm(j, axis=1) if variant == "loss+" else 1.0)
            g_hat = j / scale[:, None]
            d = j.T @ w
            np.testing.assert_allclose(w @ scale, 1.0, rtol=1e-5)
            assert np.all(g_hat @ d >= d @ d - 1e-5 * np.max(np.sum(g_hat**2, axis=1)))


def test_cagrad_rescale():
    # The authors' code divides d by 1 + c²; one task: d = (1 + c) g.
    g = jnp.asarray([[4.0]])
    w = mtl.methods.cagrad(0.5).weights(jnp.ones(1), g, (), None)[0]
    w_scaled = mtl.methods.cagrad(0.5, rescale=True).weights(jnp.ones(1), g, (), None)[0]
    np.testing.assert_allclose(w, [1.5], rtol=1e-6)
    np.testing.assert_allclose(w_scaled, [1.5 / 1.25], rtol=1e-6)


def test_cagrad_reports_its_solve():
    # The state is the last solve's SolverInfo: converged, with the iterations it took and its
    # duality gap; c = 0 (the mean gradient) needs no iterations.
    m = mtl.methods.cagrad()
    state = m.init(T)
    assert isinstance(state, mtl.SolverState)
    assert int(state.solver.iterations) == 0 and bool(state.solver.converged)
    _, _, states = batched("cagrad")(
        jnp.asarray(JS, jnp.float32),
        jnp.asarray(LOSSES, jnp.float32),
        jax.tree_util.tree_map(lambda x: jnp.stack([x] * len(NAMES)), state),
    )
    info = states.solver
    assert np.all(np.asarray(info.converged))
    for k in RANDOM:
        assert 0 < int(info.iterations[k]) < 100 and float(info.residual[k]) < 1e-5
    gs = jnp.asarray(np.stack([j @ j.T for j in JS[RANDOM]]), jnp.float32)
    mean = jax.vmap(lambda g: mtl.methods.cagrad(0.0).weights(jnp.ones(T), g, state, None)[1])(gs)
    assert np.all(np.asarray(mean.solver.iterations) == 0)


def test_nash_update_weights_every_and_warm_start():
    m = mtl.methods.nash_mtl(update_weights_every=3)
    step = jax.jit(lambda g, s: m.weights(jnp.ones(T), g, s, None))
    state = m.init(T)
    assert isinstance(state, NashMTLState)
    np.testing.assert_array_equal(state.alpha, 1.0)
    gs = [jnp.asarray(JS[k] @ JS[k].T, jnp.float32) for k in (0, 1, 2, 3, 0, 1)]
    history = []
    for g in gs:
        w, state = step(g, state)
        history.append(np.asarray(w))
        np.testing.assert_array_equal(state.alpha, w)
    assert int(state.step) == 6
    # Steps 0 and 3 solve; the others reuse the last solution.
    np.testing.assert_array_equal(history[1], history[0])
    np.testing.assert_array_equal(history[2], history[0])
    np.testing.assert_array_equal(history[4], history[3])
    _, _, fresh = entry("nash_mtl", "random3")
    np.testing.assert_allclose(history[3], fresh, rtol=1e-5)


def test_nash_and_fairgrad_report_their_solves():
    # The state keeps the last solve's SolverInfo: converged, at rounding level, on random and
    # degenerate inputs alike.
    for config in ("nash_mtl", "fairgrad"):
        m = method(config)
        state = m.init(T)
        assert isinstance(state, NashMTLState if config == "nash_mtl" else mtl.SolverState)
        assert mtl.solver_info(state) == mtl.SolverInfo.initial()
        batch = jax.tree_util.tree_map(lambda x: jnp.stack([x] * len(NAMES)), state)
        _, _, new = batched(config)(jnp.asarray(JS, jnp.float32), jnp.asarray(LOSSES), batch)
        info = mtl.solver_info(new)
        assert np.all(np.asarray(info.converged)), config
        assert np.all(np.asarray(info.residual) <= 16 * np.finfo(np.float32).eps), config
        assert 0 < np.max(np.asarray(info.iterations)) <= 25, config


def test_nash_keeps_the_last_solve_between_updates():
    m = mtl.methods.nash_mtl(update_weights_every=3)
    step = jax.jit(lambda g, s: m.weights(jnp.ones(T), g, s, None))
    state = m.init(T)
    infos = []
    for k in (0, 1, 2, 3):
        _, state = step(jnp.asarray(JS[k] @ JS[k].T, jnp.float32), state)
        infos.append(state.solver)
    assert bool(infos[0].converged) and int(infos[0].iterations) > 0
    # Steps 1 and 2 reuse step 0's weights, and report step 0's solve; step 3 solves again.
    for k in (1, 2):
        for a, b in zip(infos[k], infos[0], strict=True):
            np.testing.assert_array_equal(a, b)
    assert bool(infos[3].converged)
    assert float(infos[3].residual) != float(infos[0].residual)


def test_nash_state_is_float64_under_x64():
    # Under jax_enable_x64 the weights are kept in float64 (float32 otherwise, as the default
    # float dtype), and the state's types never change between steps: one compilation.
    with jax.enable_x64(True):
        m = mtl.methods.nash_mtl()
        state = m.init(T)
        assert state.alpha.dtype == jnp.float64
        step = jax.jit(lambda j, s: mtl.aggregate(m, j, jnp.ones(T), s))
        for k in RANDOM:
            d, state = step(jnp.asarray(JS[k], jnp.float64), state)
            assert state.alpha.dtype == jnp.float64 and d.dtype == jnp.float64
            # αᵢ (gᵢ · d) = 1 to float64 precision, out of reach of float32 weights.
            np.testing.assert_allclose(state.alpha * (JS[k] @ np.asarray(d)), 1.0, atol=1e-12)
            assert bool(state.solver.converged) and float(state.solver.residual) < 1e-14
        assert step._cache_size() == 1
        # A float32 computation under x64 keeps the float64 state.
        _, state32 = step(jnp.asarray(JS[0], jnp.float32), state)
        assert state32.alpha.dtype == jnp.float64
    assert mtl.methods.nash_mtl().init(T).alpha.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Solver reports (MGDA, UPGrad, DualProj)

QP_METHODS = ("mgda", "mgda_l2", "upgrad", "dualproj")


@pytest.mark.parametrize("config", QP_METHODS)
def test_qp_methods_keep_their_solver_info(config):
    # The state is the last solve's SolverInfo: converged, with a residual at rounding level,
    # on random and degenerate inputs (and the initial value before any solve).
    m = method(config)
    init = m.init(T)
    assert isinstance(init, mtl.SolverState)
    for got, want in zip(init.solver, mtl.SolverInfo.initial(), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    state = jax.tree_util.tree_map(lambda x: jnp.stack([x] * len(NAMES)), m.init(T))
    _, _, new_state = batched(config)(
        jnp.asarray(JS, jnp.float32), jnp.asarray(LOSSES, jnp.float32), state
    )
    info = jax.tree_util.tree_map(np.asarray, new_state.solver)
    assert np.all(info.converged), info
    assert np.all((info.residual >= 0) & (info.residual <= 1e3 * np.finfo(np.float32).eps))
    assert np.all(info.iterations >= 0)
    if config.startswith("mgda"):  # the interior point iterates on every random input
        assert np.all(info.iterations[RANDOM] > 0)
    else:  # pivots where gradients conflict; without conflict (v = u is exact) no pivot,
        # only the pass that tests and certifies the start: one iteration
        assert np.any(info.iterations > 1)
        assert info.iterations[NAMES.index("no_conflict")] == 1


TRAIN_T = 6  # tiny_model's task 0 conflicts with tasks 1 and 2 (cosines −0.33, −0.27)
E0 = (1.0,) + (0.0,) * (TRAIN_T - 1)  # DualProj projects g₀


def _qp_method(name, capped):
    """MGDA, UPGrad or DualProj (``u = e₀``), with the solver capped at one iteration (one
    pivot, one interior-point iteration) when ``capped``."""
    kw = {"max_iter": 1} if capped else {}
    project = functools.partial(solvers.project_dual_cone, **kw)
    return {
        "mgda": lambda: _mgda("none", functools.partial(solvers.min_norm_simplex, **kw)),
        "upgrad": lambda: _upgrad(None, project),
        "dualproj": lambda: _dualproj(E0, project),
    }[name]()


@functools.cache
def _train(name, capped=False, unconverged="report", steps=1):
    """``(state, new_state, metrics)`` after ``steps`` train steps on tiny_model."""
    method = _qp_method(name, capped)
    model, params = tiny_model(TRAIN_T)
    opt = optax.sgd(0.1)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, unconverged=unconverged)
    new, metrics = state, None
    for _ in range(steps):
        new, metrics = step(new, tiny_batch(TRAIN_T))
    return state, new, metrics


@pytest.mark.parametrize("name", ["mgda", "upgrad", "dualproj"])
def test_train_step_reports_the_solve(name):
    _, new, metrics = _train(name)
    assert metrics["solver_iterations"].dtype == jnp.int32
    assert int(metrics["solver_iterations"]) > 1
    assert bool(metrics["solver_converged"])
    assert 0 <= float(metrics["solver_residual"]) <= 1e3 * np.finfo(np.float32).eps
    assert new.method_state.solver.converged


def test_unconverged_solve_is_reported_skipped_or_raised():
    # MGDA's interior point capped at one iteration does not converge on these gradients.
    # "report" applies the step and reports the solve.
    state, new, metrics = _train("mgda", capped=True)
    assert not bool(metrics["solver_converged"]) and int(metrics["solver_iterations"]) == 1
    assert float(metrics["solver_residual"]) > 1e-3
    assert max_abs_diff(new.params, state.params) > 0
    # "skip" leaves the parameters unchanged and counts the steps.
    state, new, metrics = _train("mgda", capped=True, unconverged="skip", steps=2)
    assert not bool(metrics["applied"]) and int(new.skipped) == 2 and int(new.step) == 2
    assert max_abs_diff(new.params, state.params) == 0
    # "raise" raises SolverError naming the step.
    with pytest.raises(mtl.SolverError, match="mgda's solver did not converge at step 0"):
        _train("mgda", capped=True, unconverged="raise")


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_unconverged_projection_is_refused(name):
    # One pivot and one interior-point iteration do not solve the projections of g₀, which
    # the default caps solve (test_train_step_reports_the_solve).
    assert bool(_train(name)[2]["solver_converged"])
    state, new, metrics = _train(name, capped=True, unconverged="skip")
    assert not bool(metrics["solver_converged"]) and not bool(metrics["applied"])
    assert int(new.skipped) == 1 and max_abs_diff(new.params, state.params) == 0
    with pytest.raises(mtl.SolverError, match=f"{name}'s solver did not converge"):
        _train(name, capped=True, unconverged="raise")


# ----------------------------------------------------------------------------------------------
# Hyper-parameters


@pytest.mark.parametrize(
    "factory,kwargs,arg",
    [
        ("mgda", {"normalization": "l1"}, "normalization"),
        ("upgrad", {"pref_vector": [1.0, -1.0]}, "pref_vector"),
        ("upgrad", {"pref_vector": [float("nan"), 1.0]}, "pref_vector"),
        ("upgrad", {"pref_vector": [0.0, 0.0]}, "pref_vector"),
        ("dualproj", {"pref_vector": "ab"}, "pref_vector"),
        ("dualproj", {"pref_vector": []}, "pref_vector"),
        ("nash_mtl", {"update_weights_every": 0}, "update_weights_every"),
        ("nash_mtl", {"update_weights_every": 1.5}, "update_weights_every"),
        ("nash_mtl", {"update_weights_every": True}, "update_weights_every"),
        ("cagrad", {"c": -0.1}, "c"),
        ("cagrad", {"c": float("inf")}, "c"),
        ("cagrad", {"c": "0.4"}, "c"),
        ("cagrad", {"rescale": "yes"}, "rescale"),
        ("fairgrad", {"alpha": 0.0}, "alpha"),
        ("fairgrad", {"alpha": -1.0}, "alpha"),
        ("fairgrad", {"alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_hyperparameters(factory, kwargs, arg):
    with pytest.raises(ValueError, match=f"{factory}: {arg}"):
        mtl.methods.get(factory, **kwargs)


def test_pref_vector_length_checked_at_init():
    for factory in ("upgrad", "dualproj"):
        m = mtl.methods.get(factory, pref_vector=[1.0, 2.0])
        with pytest.raises(ValueError, match="pref_vector has 2 entries but there are 3 tasks"):
            m.init(3)
        with pytest.raises(ValueError, match=f"{factory} needs at least 1 tasks"):
            m.init(0)


def test_pref_vector_weights_the_projections():
    # UPGrad with u = eₖ is the projection of gₖ; DualProj with u = eₖ the same.
    j = JS[0]
    g = jnp.asarray(j @ j.T, jnp.float32)
    u = np.eye(T)[2]
    ms = [mtl.methods.upgrad(pref_vector=u), mtl.methods.dualproj(pref_vector=u)]

    @jax.jit
    def run(g):
        return [m.weights(jnp.ones(T), g, (), None)[0] for m in ms]

    w_up, w_dp = (np.asarray(w, np.float64) for w in run(g))
    np.testing.assert_allclose(w_up, w_dp, rtol=1e-5, atol=1e-7)
    d = j.T @ w_up
    assert np.all(j @ d >= -1e-5 * np.linalg.norm(j, axis=1) * np.linalg.norm(d))
    assert w_up[2] >= 1 - 1e-6
