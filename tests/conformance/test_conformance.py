"""Every registered method (``mtljax.methods.names()``) against the properties its paper claims
and against float64 references on an adversarial corpus, in float32 and float64.

Each configuration runs one batch per (T, dtype) in :data:`RUNS` (one compilation each, see
``properties.batch``); the tests read those batches. The references and the judge are in
``references.py``, the claims and the property checks in ``properties.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import mtljax as mtl
from tests import helpers
from tests.conformance import corpus, properties, references

RUNS = ((2, "float32"), (5, "float32"), (5, "float64"))
CONFIGS = properties.configurations()
SOLVER_CONFIGS = [(n, c) for n, c in CONFIGS if c is not None and c.solver]


def params(configs) -> list:
    """The configurations as parameters; `--dist loadgroup` keeps each configuration's tests on
    one xdist worker, so that its batches (``properties.batch``, cached) are computed once."""
    return [
        pytest.param(
            n,
            c,
            id=properties.config_id(n, c),
            marks=pytest.mark.xdist_group(f"conformance-{properties.config_id(n, c)}"),
        )
        for n, c in configs
    ]


def claimed(name: str, claims):
    """The claims of a configuration; a method missing from the table fails every test."""
    if claims is None:
        properties.claims_of(name)  # raises, naming the method
    return claims


def failures(lines: list[str], limit: int = 25) -> str:
    more = f"\n… and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def test_every_registered_method_declares_its_claims():
    missing = [n for n in mtl.methods.names() if n not in properties.CLAIMS]
    assert not missing, f"methods without claims in properties.CLAIMS: {missing}"
    stale = [n for n in properties.CLAIMS if n not in mtl.methods.names()]
    assert not stale, f"claims for methods that are not registered: {stale}"
    assert set(references.REFERENCES) == set(mtl.methods.names())


# ----------------------------------------------------------------------------------------------
# Contract: finite, one compilation, vmap


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_finite_on_every_input(name, claims):
    """Finite directions, weights and states on the adversarial corpus and on degenerate
    inputs (zero, identical and opposite rows, norms from 1e-15 to 1e15, zero, negative,
    huge and tiny losses); a zero Jacobian gives a zero direction."""
    claims = claimed(name, claims)
    bad = []
    for t, dtype in RUNS:
        entries, out = properties.batch(name, claims.label, t, dtype)
        bad += [f"T={t} {dtype}: {m}" for m in properties.check_finite(entries, out)]
    assert not bad, failures(bad)


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_jit_once_and_vmap(name, claims):
    """New values and the states the method returned reuse the compilation; the vmapped batch
    equals one-by-one jitted calls (``weights_from_gramian`` for a weighting, ``aggregate`` for
    a Jacobian method): the directions agree element by element to 1e-5 at every step of the
    property cases (for iterative solvers, whose rounding vmap changes, up to 1e-6 of the
    largest element as well)."""
    claims = claimed(name, claims)
    t, dtype = 5, "float32"
    entries, out = properties.batch(name, claims.label, t, dtype)
    p = properties.dims(t)
    method = properties.build(name, claims, t, p, dtype)
    x, ls = properties.batch_inputs(entries, method, dtype)
    after = properties.after_losses(ls, dtype)
    steps = ls.shape[1]
    keys = properties.keys_for(entries, steps)
    out.fn(
        jnp.asarray(0.5 * x, dtype),
        jnp.asarray(ls[:, ::-1], dtype),
        jnp.asarray(after[:, ::-1], dtype),
        keys,
        out.states,
    )
    assert out.fn._cache_size() == 1

    weighting = method.weights is not None
    call = mtl.weights_from_gramian if weighting else mtl.aggregate
    fn = jax.jit(functools.partial(call, method))
    observe = None if method.after_update is None else jax.jit(method.after_update)
    for i, e in enumerate(entries):
        if e.role != "property" or e.tag != "base":
            continue
        state = method.init(t)
        for s in range(steps):
            key = keys[i, s] if claims.key else None
            loss = jnp.asarray(ls[i, s], dtype)
            single, state = fn(jnp.asarray(x[i, s], dtype), loss, state, key=key)
            if observe is not None:
                state = observe(loss, jnp.asarray(after[i, s], dtype), state)
            single = np.asarray(single, np.float64)
            if weighting:
                single = e.case.jacobians[s].T @ single
            want = out.directions[i, s]
            atol = 1e-6 * np.abs(want).max() if claims.solver else 0.0
            np.testing.assert_allclose(
                single, want, rtol=1e-5, atol=atol, err_msg=f"{e.case.name} step {s}"
            )
    assert fn._cache_size() == 1


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_one_task(name, claims):
    """With one task every method moves along the task's gradient (a positive multiple), or
    refuses ``T = 1`` when its paper needs several tasks."""
    claims = claimed(name, claims)
    p = 6
    method = properties.build(name, claims, 1, p, "float32")
    if method.min_tasks > 1:
        with pytest.raises(ValueError, match=f"at least {method.min_tasks} tasks"):
            method.init(1)
        return
    g = np.array([[3.0, 4.0, 0.0, -1.0, 0.5, 2.0]])
    key = jax.random.key(0) if claims.key else None
    d, _ = jax.jit(functools.partial(mtl.aggregate, method))(
        jnp.asarray(g, jnp.float32), jnp.asarray([0.7], jnp.float32), method.init(1), key=key
    )
    d = np.asarray(d, np.float64)
    assert np.all(np.isfinite(d))
    cos = d @ g[0] / (np.linalg.norm(d) * np.linalg.norm(g[0]))
    assert cos >= 1 - 1e-6, d


# ----------------------------------------------------------------------------------------------
# Properties the papers claim


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_permutation_equivariance(name, claims):
    claims = claimed(name, claims)
    if claims.permutation is None:
        pytest.skip(f"{name} does not claim permutation equivariance (random weights)")
    bad = []
    for t, dtype in RUNS:
        if claims.permutation == "two_tasks" and t != 2:
            continue
        entries, out = properties.batch(name, claims.label, t, dtype)
        if claims.per_task:
            out = _permuted_hyper_parameters(name, claims, t, dtype, entries, out)
        tol = properties.PROPERTY_TOL[dtype]
        bad += [f"T={t} {dtype}: {m}" for m in properties.check_permutation(entries, out, tol)]
    assert not bad, failures(bad)


def _permuted_hyper_parameters(name, claims, t, dtype, entries, out):
    """The outputs with the permuted cases recomputed by a method whose per-task
    hyper-parameters are permuted along with the tasks."""
    p = properties.dims(t)
    perm = properties.permutation(t)
    kwargs = claims.kwargs(t, p, dtype)
    for k in claims.per_task:
        kwargs[k] = [kwargs[k][i] for i in perm]
    method = mtl.methods.get(name, **kwargs)
    idx = [i for i, e in enumerate(entries) if e.tag == "perm"]
    sub = properties.run_entries(method, claims, [entries[i] for i in idx], dtype)
    directions = out.directions.copy()
    directions[idx] = sub.directions
    return out._replace(directions=directions)


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_scaling(name, claims):
    """``d(cJ) = c^k d(J)``; the claimed behaviour under row scaling (linear, invariant, same
    direction or line) and under scaling rows and losses together."""
    claims = claimed(name, claims)
    bad = []
    for t, dtype in RUNS:
        entries, out = properties.batch(name, claims.label, t, dtype)
        tol = properties.PROPERTY_TOL[dtype]
        msgs = properties.check_global_scaling(entries, out, claims.global_degree, tol)
        if claims.row_scaling:
            msgs += properties.check_row_scaling(entries, out, claims.row_scaling, tol)
        if claims.loss_scaling:
            msgs += properties.check_loss_scaling(entries, out, tol)
        bad += [f"T={t} {dtype}: {m}" for m in msgs]
    assert not bad, failures(bad)


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_non_conflicting(name, claims):
    """``gᵢ·d ≥ 0`` for every task, on the whole batch (``"always"``) or wherever the
    gradients are linearly independent."""
    claims = claimed(name, claims)
    if claims.non_conflicting is None:
        pytest.skip(f"{name} does not claim to be non-conflicting")
    bad = []
    for t, dtype in RUNS:
        entries, out = properties.batch(name, claims.label, t, dtype)
        tol = properties.PROPERTY_TOL[dtype]
        msgs = properties.check_non_conflicting(entries, out, claims.non_conflicting, dtype, tol)
        bad += [f"T={t} {dtype}: {m}" for m in msgs]
    assert not bad, failures(bad)


# ----------------------------------------------------------------------------------------------
# Accuracy against the float64 references


# Known failures, by (configuration, T, dtype): the cases whose every failing step is left out
# of the verdict below, each with the measured reason. They are listed in the README's solver
# accuracy section; a case not listed here fails the test, and an entry whose case no longer
# fails is reported by test_known_failures_still_fail (so the list cannot go stale).
_ALIGNED_RANK = (
    "float32 limit of the rank decision: an eigenvalue of K below the cut 4·ε₃₂·λ_max(K), "
    "which sits above what float32 rounding of G leaves for exactly dependent gradients (up to "
    "2·ε₃₂·λ_max(K)); a lower cut shrinks their update 2000-fold (test_aligned_mtl_exactly_"
    "dependent_tasks_keep_their_scale_in_float32)"
)
KNOWN_FAILURES: dict[tuple[str, int, str], dict[str, str]] = {
    ("aligned_mtl", 2, "float32"): {
        "opposite[δ=0.001]": _ALIGNED_RANK,
        "stationary[η=0.0001]": _ALIGNED_RANK,
        "condition[1e+08]": _ALIGNED_RANK,
    },
    ("aligned_mtl", 5, "float32"): {
        "opposite[δ=0.001]": _ALIGNED_RANK,
        "stationary[η=0.0001]": _ALIGNED_RANK,
    },
}


def _verdicts(name, claims, t, dtype):
    entries, out = properties.batch(name, claims.label, t, dtype)
    kwargs = claims.kwargs(t, properties.dims(t), dtype)
    verdicts = []
    for i, e in enumerate(entries):
        if e.role != "corpus":
            continue
        outputs = out.weights[i] if out.weights is not None else out.directions[i]
        verdicts += references.judge(
            name, e.case.name, e.case.jacobians, e.case.losses, outputs, kwargs, dtype, seed=i
        )
    return verdicts


@pytest.mark.parametrize(("t", "dtype"), RUNS, ids=[f"T{t}-{d}" for t, d in RUNS])
@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_matches_reference(name, claims, t, dtype):
    """Every case of the adversarial corpus: the method's output against the reference on the
    input it received; a step fails when its error exceeds both the tolerance and 10× the
    largest change that perturbing the input's entries by one unit roundoff causes in the
    reference (``references.judge``: the worst direction of a linearisation, random draws and,
    in float32, the unrounded input)."""
    claims = claimed(name, claims)
    verdicts = _verdicts(name, claims, t, dtype)
    known = KNOWN_FAILURES.get((properties.config_id(name, claims), t, dtype), {})
    bad = [
        f"{v.case} step {v.step}: {v.outcome}, error {v.error:.2e} > allowed {v.allowed:.2e} "
        f"(sensitivity {v.sensitivity:.2e})"
        for v in verdicts
        if v.outcome == "nonfinite" or (v.outcome == "fail" and v.case not in known)
    ]
    judged = [v for v in verdicts if v.outcome != "undefined"]
    assert judged, "no case has a reference answer"
    assert not bad, f"{len(bad)}/{len(verdicts)} steps fail:\n" + failures(bad)


def test_known_failures_still_fail():
    """Every entry of KNOWN_FAILURES names a configuration and a case that exist and still fail
    (a fixed case must leave the list)."""
    configs = {properties.config_id(n, c): (n, c) for n, c in CONFIGS if c is not None}
    fixed = []
    for (config, t, dtype), cases in KNOWN_FAILURES.items():
        assert (t, dtype) in RUNS and config in configs, (config, t, dtype)
        name, claims = configs[config]
        verdicts = _verdicts(name, claims, t, dtype)
        failing = {v.case for v in verdicts if v.outcome == "fail"}
        names = {v.case for v in verdicts}
        for case in cases:
            assert case in names, (config, t, dtype, case)
            if case not in failing:
                fixed.append(f"{config} T={t} {dtype} {case}")
    assert not fixed, "now passing, remove from KNOWN_FAILURES: " + ", ".join(fixed)


# ----------------------------------------------------------------------------------------------
# Solver reporting


@pytest.mark.parametrize(("name", "claims"), params(CONFIGS))
def test_solver_report_in_the_state(name, claims):
    """A method that runs an iterative solver keeps its last solve's ``SolverInfo`` in its
    state at every step; one that runs none keeps none."""
    claims = claimed(name, claims)
    bad = []
    for t, dtype in RUNS:
        entries, out = properties.batch(name, claims.label, t, dtype)
        bad += [
            f"T={t} {dtype}: {m}"
            for m in properties.check_solver_report(entries, out, claims, dtype)
        ]
    assert not bad, failures(bad)


@pytest.mark.parametrize(("name", "claims"), params(SOLVER_CONFIGS))
def test_train_step_reports_solver_metrics(name, claims):
    """The train step's metrics hold ``solver_iterations`` (int32), ``solver_converged`` (bool)
    and ``solver_residual`` (float32) for every method that runs a solver."""
    model, params = helpers.tiny_model(3)
    batch = helpers.tiny_batch(3)
    method = properties.build(name, claims, 3, 1, "float32")
    opt = optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    _, metrics = jax.eval_shape(step.jitted, state, batch)
    expected = {
        "solver_iterations": jnp.int32,
        "solver_converged": jnp.bool_,
        "solver_residual": jnp.float32,
    }
    for key, dtype in expected.items():
        assert key in metrics, f"{name}: the train step's metrics lack {key}"
        assert metrics[key].shape == () and metrics[key].dtype == dtype, (key, metrics[key])


def test_train_step_solver_metrics_are_the_states():
    """One real step (MGDA): the reported figures are those of the method's new state."""
    model, params = helpers.tiny_model(3)
    method = mtl.methods.mgda()
    opt = optax.sgd(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    state, metrics = mtl.make_train_step(model, method, opt)(state, helpers.tiny_batch(3))
    info = mtl.solver_info(state.method_state)
    assert info is not None, "mgda keeps no SolverInfo in its state"
    assert int(metrics["solver_iterations"]) == int(info.iterations) >= 1
    assert bool(metrics["solver_converged"]) == bool(info.converged) is True
    assert float(metrics["solver_residual"]) == float(info.residual)
    assert float(info.residual) <= properties.RESIDUAL_BOUND["float32"]


# ----------------------------------------------------------------------------------------------
# The references themselves: their defining conditions on the corpus


@functools.cache
def reference_cases():
    out = []
    for t in (2, 5):
        for case in corpus.jacobian_corpus(0, t, properties.dims(t)):
            out += [(case.name, j) for j in case.jacobians]
    return out


def _scale_free(j: np.ndarray) -> np.ndarray:
    return j / np.linalg.norm(j, axis=1, keepdims=True)


def test_reference_min_norm_point():
    """MGDA's reference: ``α ∈ Δ`` and ``gᵢ·d ≥ ‖d‖²`` (equality where ``αᵢ > 0``), measured in
    units of ``‖gᵢ‖·Σⱼαⱼ‖gⱼ‖`` (the size of the terms of ``gᵢ·Jᵀα``)."""
    for label, j in reference_cases():
        g = j @ j.T
        a = references.min_norm_weights(g)
        n = np.linalg.norm(j, axis=1)
        d = j.T @ a
        size = n * (a @ n)
        assert abs(a.sum() - 1) < 1e-12 and a.min() >= 0, label
        slack = (j @ d - d @ d) / size
        assert slack.min() >= -1e-10, (label, slack)
        assert np.all(np.abs(slack[a > 1e-9]) <= 1e-9), (label, slack, a)


def test_reference_dual_cone_projection():
    """UPGrad's and DualProj's reference: ``v ≥ u``, ``J Jᵀv ≥ 0`` and complementarity
    ``(vᵢ − uᵢ)(gᵢ·Jᵀv) = 0`` (the projection's KKT conditions)."""
    for label, j in reference_cases():
        g = j @ j.T
        t = len(g)
        n = np.linalg.norm(j, axis=1)
        for u in [*np.eye(t), np.full(t, 1.0 / t)]:
            v = references.dual_cone_weights(g, u)
            margin = (j @ (j.T @ v)) / (n * (np.abs(v) @ n))
            assert np.all(v - u >= 0), label
            assert margin.min() >= -1e-10, (label, margin)
            assert np.all(np.abs(margin[(v - u) > 1e-9 * np.abs(v).max()]) <= 1e-9), (label, margin)


def test_reference_cagrad_is_the_max_min_in_the_ball():
    """CAGrad's reference: ``d`` lies on the ball ``‖d − g₀‖ = c‖g₀‖`` and is ``g₀ + r·Jᵀλ/‖Jᵀλ‖``
    with ``λ ≥ 0`` on the tasks attaining ``minᵢ gᵢ·d`` only (the KKT conditions of the
    max-min over the ball); no random point of the ball does better."""
    rng = np.random.default_rng(0)
    c = 0.4
    for label, j in reference_cases():
        g = j @ j.T
        t = len(g)
        w = references.cagrad_weights(g, c)
        g0 = j.mean(0)
        r = c * np.linalg.norm(g0)
        d = j.T @ w
        lam = w - 1.0 / t
        value = (j @ d).min()
        scale = np.linalg.norm(j, axis=1).max() * (np.linalg.norm(g0) + r)
        # The reference works on G: its float64 rounding moves the result by up to ε·cond(K),
        # 1e-9 relative on the nearly opposite pairs; 1e-7 leaves room for that.
        assert abs(np.linalg.norm(d - g0) - r) <= 1e-7 * r, label
        assert lam.min() >= -1e-12 * np.abs(lam).max(), label
        active = lam > 1e-9 * lam.max()
        assert np.all((j @ d)[active] - value <= 1e-7 * scale), label
        z = rng.normal(size=(200, j.shape[1]))
        z = g0 + r * z / np.linalg.norm(z, axis=1, keepdims=True)
        assert (z @ j.T).min(axis=1).max() <= value + 1e-7 * scale, label


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_reference_potential_equations(p):
    """Nash-MTL's (``p = 1``) and FairGrad's (``p = 1/α``) reference: ``wᵢ^p (Gw)ᵢ = 1``,
    evaluated on the unit gradients (``yᵢ = ‖gᵢ‖wᵢ``: ``yᵢ^p (Ky)ᵢ = ‖gᵢ‖^{p−1}``), and ``None``
    only where 0 is in the convex hull of the unit gradients (to rounding)."""
    for label, j in reference_cases():
        g = j @ j.T
        w = references.potential_weights(g, p)
        if w is None:
            u = _scale_free(j)
            a = references.min_norm_weights(u @ u.T)
            assert np.linalg.norm(u.T @ a) <= 1e-7, label
            continue
        n, k = references.cosines(g)
        y = n * w
        ky = k @ y
        size = np.abs(k) @ y
        resid = (y**p * ky - n ** (p - 1)) / (y**p * size)
        assert np.all(w > 0) and np.abs(resid).max() <= 1e-12, (label, resid)


def test_reference_impartial_weights():
    """IMTL-G's reference: ``Σα = 1`` and equal projections ``uᵢ·Jᵀα`` (in the units of the
    terms of each projection), wherever it is defined."""
    for label, j in reference_cases():
        a = references.impartial_weights(j @ j.T)
        if a is None:
            continue
        u = _scale_free(j)
        proj = u @ (j.T @ a)
        size = np.abs(u @ j.T) @ np.abs(a)
        assert abs(a.sum() - 1) <= 1e-12 * np.abs(a).sum(), label
        assert np.ptp(proj) <= 1e-9 * size.max(), (label, proj)


def test_reference_config_equal_cosines():
    """ConFIG's reference on linearly independent gradients: equal positive cosines with every
    gradient, and length ``Σᵢ gᵢ·g_u``."""
    for label, j in reference_cases():
        g = j @ j.T
        if not properties.independent(g, "float64"):
            continue
        d = references.config_direction(j)
        u = _scale_free(j)
        cos = u @ d / np.linalg.norm(d)
        assert cos.min() > 0 and np.ptp(cos) <= 1e-8, (label, cos)
        assert abs(np.linalg.norm(d) - (j @ d).sum() / np.linalg.norm(d)) <= 1e-8 * np.linalg.norm(
            d
        )


def test_reference_aligned_components():
    """Aligned-MTL's reference: ``B`` makes the rows of ``BJ`` orthogonal with norm ``σ_min``
    (on the full-rank cases): ``BGB = σ_min² I``."""
    for label, j in reference_cases():
        g = j @ j.T
        s = np.linalg.svd(_scale_free(j), compute_uv=False)
        if s.min() < 1e-3 * s.max():
            continue
        t = len(g)
        b = np.stack([references.aligned_weights(g, e) for e in np.eye(t)], axis=1)
        bgb = b @ g @ b
        sigma2 = bgb[0, 0]
        assert np.abs(bgb - sigma2 * np.eye(t)).max() <= 1e-8 * sigma2, label


def test_reference_surgery_matches_the_vectors():
    """PCGrad's reference on ``J' = diag(n)F`` gives the weights that Algorithm 1 run on the
    gradient vectors themselves gives (the Gramian determines the result)."""
    for label, j in reference_cases():
        t = len(j)
        w = references.surgery_weights(j @ j.T)
        rows = j.copy()
        for i in range(t):
            gi = j[i].copy()
            for k in range(t):
                if k != i and gi @ j[k] < 0:
                    gi = gi - (gi @ j[k]) / (j[k] @ j[k]) * j[k]
            rows[i] = gi
        want = rows.sum(0)
        size = np.abs(w) @ np.linalg.norm(j, axis=1)
        assert np.linalg.norm(j.T @ w - want) <= 1e-9 * size, label


# ----------------------------------------------------------------------------------------------
# The judge's sensitivity


def _opposite_pair(delta: float) -> np.ndarray:
    """Two gradients of norms 1 and 2 at angle ``π − δ``: MGDA's weight is interior and its
    direction small (of order δ), so rounding the Gramian moves it a lot."""
    return np.array([[1.0, 0.0, 0.0], [-2.0 * np.cos(delta), 2.0 * np.sin(delta), 0.0]])


def _mgda_pair_sensitivity(j: np.ndarray, dtype: str) -> float:
    """MGDA on two tasks in closed form, on the Gramian rounded to ``dtype``: with
    ``a = G₁₁, b = G₂₂, c = G₁₂``, ``D = a + b − 2c``, the weight is ``α = (b − c)/D`` and the
    direction ``d = g₂ + α(g₁ − g₂)``. Relative perturbations ``(rₐ, r_b, r_c)`` (``c`` on both
    sides of the diagonal) move ``α`` by ``(−a(b − c)rₐ + b(a − c)r_b + c(b − a)r_c)/D²`` to
    first order, and ``d`` along ``g₁ − g₂`` only: over ``|r| ≤ u`` the largest relative change
    of ``d`` is ``u(|a(b − c)| + |b(a − c)| + |c(b − a)|)/D² · ‖g₁ − g₂‖/‖d‖``."""
    g = references.rounded(j @ j.T, dtype)
    a, b, c = g[0, 0], g[1, 1], g[0, 1]
    den = a + b - 2.0 * c
    alpha = (b - c) / den
    d = j.T @ np.array([alpha, 1.0 - alpha])
    slope = (abs(a * (b - c)) + abs(b * (a - c)) + abs(c * (b - a))) / den**2
    u = references.PERTURBATION[dtype]
    return u * slope * np.linalg.norm(j[0] - j[1]) / np.linalg.norm(d)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_worst_case_sensitivity_matches_the_closed_form(dtype):
    """The judge's structured sensitivity estimate on MGDA with two nearly opposite gradients
    equals the first-order worst case of the closed form; in float32, where the input can be
    perturbed by ``u``, it is at least every random perturbation's change (80 draws), which
    under-read it."""
    j = _opposite_pair(1e-3)[None]
    losses = np.ones((1, 2))
    want = _mgda_pair_sensitivity(j[0], dtype)
    worst = references.worst_case_sensitivity("mgda", j, losses, {}, dtype)
    # Float32: changes measured at r = ±uσ (second order: 1e-8); float64: a difference of step
    # 2⁻⁴⁰, which float64's rounding of the reference blurs by ≈ε₆₄/2⁻⁴⁰ ≈ 2e-4.
    rel = {"float32": 1e-6, "float64": 1e-3}[dtype]
    assert abs(worst[0] / want - 1.0) <= rel, (worst, want)
    if dtype == "float32":
        changes = []
        for seed in range(20):
            base, others = references.reference_outputs("mgda", j, losses, {}, dtype, seed)
            changes += [references.relative_error(o[0], base[0]) for o in others]
        assert max(changes) <= worst[0]
        assert np.mean(changes) < 0.5 * worst[0]
        verdict = references.judge("mgda", "pair", j, losses, [np.array([0.5, 0.5])], {}, dtype)
        assert verdict[0].sensitivity == worst[0]


def _near_collinear_pair(t: int = 8, p: int = 18, s: float = 1e-2) -> np.ndarray:
    """``t`` random gradients whose last two differ by ``s`` times a random vector: the cosine
    matrix has one eigenvalue of order ``s²``, along which ``K⁻¹`` (IMTL-G) moves under any
    perturbation, so that its first-order change lies along one direction."""
    rng = np.random.default_rng(0)
    j = rng.standard_normal((t, p))
    j[-1] = j[-2] + s * rng.standard_normal(p)
    return j[None]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grouped_worst_case_sensitivity(dtype):
    """Above ``max_columns`` entries the judge linearises groups of entries with fixed signs
    (``references.regrouped_signs``). On IMTL-G with two nearly collinear gradients among 8 (36
    Gramian entries, here in 4 or 6 groups instead of one column each), the grouped estimate
    is at most the full linearisation's (it tries vertices of the same cube, whose maximum the
    full one finds for a linearisation of rank one) and within 10% of it, while random
    perturbations (80 draws) stay below it."""
    j = _near_collinear_pair()
    losses = np.ones((1, j.shape[1]))
    full = references.worst_case_sensitivity("imtl_g", j, losses, {}, dtype)[0]
    assert full > 0.0
    grouped = []
    for k in (4, 6):
        est = references.worst_case_sensitivity("imtl_g", j, losses, {}, dtype, max_columns=k)
        assert 0.9 * full <= est[0] <= (1.0 + 1e-3) * full, (k, est[0], full)
        grouped.append(est[0])
    changes = []
    for seed in range(20):
        base, others = references.reference_outputs("imtl_g", j, losses, {}, dtype, seed)
        changes += [references.relative_error(o[0], base[0]) for o in others]
    assert max(changes) < min(grouped)
    assert np.mean(changes) < 0.5 * min(grouped)


def test_eigen_signs_lower_an_eigenvalue_the_most():
    """``references.eigen_signs``: the vertex ``−sign(K ∘ vvᵀ)`` of the cube of relative
    perturbations of ``G`` lowers the cosine matrix's eigenvalue of ``v`` by the first-order
    maximum ``u(Σᵢⱼ|Kᵢⱼvᵢvⱼ| − λ)``, more than any of 200 random vertices."""
    j = _near_collinear_pair()[0]
    g = j @ j.T
    size = 1e-7

    def smallest(x):
        return np.linalg.eigvalsh(references.cosines(x)[1])[0]

    _, k = references.cosines(g)
    lam, vec = np.linalg.eigh(k)
    v = vec[:, 0]
    r = references.eigen_signs(g, 1)[0]
    drop = smallest(g) - smallest(g * (1.0 + size * r))
    want = size * (np.sum(np.abs(k * np.outer(v, v))) - lam[0])
    assert abs(drop / want - 1.0) < 1e-3, (drop, want)
    rng = np.random.default_rng(0)
    drops = []
    for _ in range(200):
        s = np.where(rng.random(g.shape) < 0.5, -1.0, 1.0)
        s = np.triu(s) + np.triu(s, 1).T
        drops.append(smallest(g) - smallest(g * (1.0 + size * s)))
    assert max(drops) < drop


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("imtl_g", "stationary[η=0.01#2]"),
        ("imtl_g", "stationary[η=0.0001#1]"),
        ("imtl_g", "stationary[η=0.0001#2]"),
        ("config", "opposite[δ=0.0001#0]"),
        ("config", "condition[1e+12#0]"),
        ("config", "collinear[s=0.0001#0]"),
        ("aligned_mtl", "opposite[δ=0.01#1]"),
        ("aligned_mtl", "condition[1e+08#0]"),
    ],
)
def test_rank_cuts_at_100_tasks(name, case):
    """Float32 on cases of 100 tasks from ``benchmarks/solver_accuracy.py``'s corpus (seed 1),
    judged against the float64 reference. IMTL-G on near-stationary cones: a null-space cut of
    ``4·T·ε·σ_max(A)`` counted a genuine singular value of the centred cosine matrix (8e-5) as
    zero, 2.3–15× the allowance; the cut ``4·ε·‖K‖_∞`` keeps it. ConFIG on a nearly opposite
    pair: a rank cut of ``T·ε·σ_max`` dropped ``σ_min/σ_max ≈ 9e-6`` of the unit gradients and
    gave a direction 4e3 times too long (2.8e5× the allowance); ``min(T, 4√T)·ε·σ_max`` kept
    it but dropped the singular values ``9–14·ε·σ_max`` of condition 1e12 (errors 1.5–2.4× the
    allowance), which the cut ``max(4, 0.4√T)·ε·σ_max`` keeps. ConFIG on nearly collinear
    gradients: without the refinement on double-float residuals its error was 60–90× the
    allowance. Aligned-MTL: its cut ``0.1·T·ε·λ_max(K)``
    (``10·ε·λ_max`` here) dropped eigenvalues of ``7.5–8·ε·λ_max`` that a float32 eigensolver
    resolves; it is now ``4·ε·λ_max`` at every T."""
    t = 100
    c = {c.name: c for c in corpus.jacobian_corpus(1, t, 2 * t + 2, steps=1, repeats=3)}[case]
    method = mtl.methods.get(name)
    loss = jnp.asarray(c.losses[0], jnp.float32)
    if method.weights is not None:
        x = jnp.asarray(references.gramians(c.jacobians[0]), jnp.float32)
        call = functools.partial(mtl.weights_from_gramian, method)
    else:
        x = jnp.asarray(c.jacobians[0], jnp.float32)
        call = functools.partial(mtl.aggregate, method)
    out, _ = jax.jit(lambda x, loss: call(x, loss, method.init(t)))(x, loss)
    # 16 groups per pass instead of 256: every perturbation tried is still a vertex of the
    # rounding cube, so the allowance stays a lower bound of the worst case (the old cuts fail
    # it by 1.1-3e5x), at a few seconds per case instead of up to 90.
    verdict = references.judge(
        name, case, c.jacobians, c.losses, [np.asarray(out)], {}, "float32", max_columns=16
    )
    assert verdict[0].outcome == "pass", verdict


def _float32_verdict(name: str, case: str, t: int = 5, seed: int = 1, weights=None):
    """The judge's verdict on ``name``'s float32 weights for a case at T = ``t`` of
    ``benchmarks/solver_accuracy.py``'s corpus (seed ``seed``, six draws; the case's judge
    seed); ``weights(G)`` instead of the registered method, when given."""
    cases = corpus.jacobian_corpus(seed, t, properties.dims(t), steps=1, repeats=6)
    index = [c.name for c in cases].index(case)
    c = cases[index]
    if weights is None:
        method = mtl.methods.get(name)

        def weights(g):
            return mtl.weights_from_gramian(method, g, jnp.ones(t), method.init(t))[0]

    g = jnp.asarray(references.gramians(c.jacobians[0]), jnp.float32)
    # A new function each call: jit traces it again, so a patched module constant is read.
    w = jax.jit(lambda g: weights(g))(g)
    verdict = references.judge(
        name, case, c.jacobians, c.losses, [np.asarray(w)], {}, "float32", seed=index
    )
    return verdict[0]


@pytest.mark.parametrize(
    "name, case",
    [
        ("mgda", "condition[1e+12#3]"),
        ("mgda", "condition[1e+12#4]"),
        ("upgrad", "condition[1e+12#4]"),
        ("dualproj", "condition[1e+12#4]"),
    ],
)
def test_double_float_stages_on_indefinite_rounded_cosines(name, case):
    """Float32 at T = 5 on ``condition[1e12]`` draws of ``benchmarks/solver_accuracy.py``'s
    corpus (seed 1, six draws) whose float32 cosine matrix K is indefinite (smallest
    eigenvalue about −6e-8), judged against the float64 reference. The float32 solvers failed
    them (MGDA 0.58 and 0.26, UPGrad 0.20, DualProj 1.8× the allowance) where float64 on the
    same float32 K passes. The double-float stages now pass them: MGDA's no longer stops at
    the indefinite K_FF of the float32 support (#3: a coordinate leaves the free set) nor
    cycles between supports (#4: one coordinate changes sides at a time, by Wolfe's primal
    rule), and UPGrad's and DualProj's projections have the same stage."""
    verdict = _float32_verdict(name, case)
    assert verdict.outcome == "pass", verdict


def _mgda_float32_verdicts(t: int, seed: int, case: str):
    """The judge's verdicts on MGDA's float32 weights for every step of a case of the
    conformance corpus (seed ``seed``, ``properties.STEPS`` steps; the case's judge seed)."""
    cases = corpus.jacobian_corpus(seed, t, properties.dims(t), steps=properties.STEPS)
    index = [c.name for c in cases].index(case)
    c = cases[index]
    method = mtl.methods.get("mgda")
    g = jnp.asarray(references.rounded(references.gramians(c.jacobians), "float32"))
    fn = jax.vmap(lambda g: mtl.weights_from_gramian(method, g, jnp.ones(t), method.init(t))[0])
    w = np.asarray(jax.jit(fn)(g))
    return references.judge("mgda", case, c.jacobians, c.losses, list(w), {}, "float32", seed=index)


@pytest.mark.parametrize(
    "t, seed, case",
    [
        (6, 3, "condition[1e+12]"),
        (6, 4, "condition[1e+12]"),
        (6, 0, "condition[1e+08]"),
        (5, 5, "condition[1e+12]"),
    ],
)
def test_mgda_double_float_stage_on_wider_condition_draws(t, seed, case):
    """Float32 MGDA on ``condition`` draws of the conformance corpus beyond the suite's seeds
    (T = 6, seeds 0, 3 and 4; T = 5, seed 5), where the stage above failed (31×, 1.7×, 3.8×
    and 1.2× the allowance) and float64 on the same float32 K passes. Its active-set rule had
    no guarantee: it removed every negative coordinate at once, and at an indefinite K_FF the
    smallest (seed 3: K_FF of {0, 2, 4, 5} is indefinite and the answer is {2, 4, 5}; it
    removed 2 and then cycled). It is now Wolfe's primal method (the objective never
    increases); at an indefinite K_FF it removes the coordinate whose face gives the feasible
    minimiser of least objective, and a KKT point on a face that rounding left indefinite is
    certified (T = 5, seed 5: the answer's K_FF has the eigenvalue −9.1e-8), solved by a
    signed Cholesky factorisation."""
    verdicts = _mgda_float32_verdicts(t, seed, case)
    assert all(v.outcome == "pass" for v in verdicts), verdicts


def test_mgda_stage_searches_the_removal_up_to_16_tasks(monkeypatch):
    """MGDA's search for the coordinate to remove at an indefinite K_FF is what passes
    ``condition[1e12]`` at T = 6, seed 3 (above), and it runs up to 16 tasks: with the bound
    set below T the case fails again."""
    from mtljax._src.solvers import min_norm

    assert min_norm._DD_SEARCH_MAX_TASKS == 16
    monkeypatch.setattr(min_norm, "_DD_SEARCH_MAX_TASKS", 4)
    verdicts = _mgda_float32_verdicts(6, 3, "condition[1e+12]")
    assert any(v.outcome == "fail" for v in verdicts), verdicts


def test_the_dual_cone_stage_runs_up_to_16_tasks(monkeypatch):
    """UPGrad's double-float stage is what passes ``condition[1e12]`` #4 at T = 5 (above), and
    it runs up to ``DOUBLE_FLOAT_MAX_TASKS`` = 16 tasks: with the bound set below T the same
    case fails again, as it did before the stage."""
    from mtljax._src.solvers import dual_cone

    assert dual_cone.DOUBLE_FLOAT_MAX_TASKS == 16
    monkeypatch.setattr(dual_cone, "DOUBLE_FLOAT_MAX_TASKS", 4)
    verdict = _float32_verdict("upgrad", "condition[1e+12#4]")
    assert verdict.outcome == "fail", verdict


def test_dual_cone_refines_the_pivoting_solution_until_it_stops_improving(monkeypatch):
    """UPGrad in float32 at T = 6 on ``condition[1e12]`` #0 of ``benchmarks/solver_accuracy.py``'s
    corpus with seed 2: projection 5 (support {1, 3}, K_FF of condition 80) is reached through
    ill-conditioned intermediate blocks, so the tableau's inverse block is accurate only to
    ``‖I − T_FF Q_FF‖ ≈ 0.07``; one step of iterative refinement left x 2e-3 off, within the
    certificate (residual 4e-5 < 10³ε) but 1.2× the judge's allowance. Up to
    ``REFINE_STEPS`` = 3 steps (after the first, each kept where it lowers the stationarity
    error) pass it; with one step the case fails again."""
    from mtljax._src.solvers import dual_cone

    case = ("upgrad", "condition[1e+12#0]")
    assert _float32_verdict(*case, t=6, seed=2).outcome == "pass"
    assert dual_cone.REFINE_STEPS == 3
    monkeypatch.setattr(dual_cone, "REFINE_STEPS", 1)
    verdict = _float32_verdict(*case, t=6, seed=2)
    assert verdict.outcome == "fail", verdict


def test_dual_cone_takes_the_first_refinement_step_unconditionally():
    """UPGrad in float32 at T = 40 on ``condition[1e8]`` #1 of ``benchmarks/solver_accuracy.py``'s
    corpus (seed 1): the float32 stationarity residual is all rounding there, so a first
    refinement step kept only where it lowers that residual was rejected, and the answer was
    3e-3 off (1.4× the allowance); the first step is always taken (9e-5 off)."""
    verdict = _float32_verdict("upgrad", "condition[1e+08#1]", t=40, seed=1)
    assert verdict.outcome == "pass", verdict


def test_dual_cone_stage_searches_the_removal_at_an_indefinite_face(monkeypatch):
    """UPGrad in float32 at T = 5 on ``condition[1e12]`` #2 of ``benchmarks/solver_accuracy.py``'s
    corpus with seed 3 (float32 K with the eigenvalue −7.5e-9): projection 4's double-float
    stage starts on the float32 support {1, 2} (certified in float32, objective 30% above the
    optimum's), reaches {2, 3}, and the most violated multiplier 0 joins a face {0, 2, 3}
    whose K_FF is indefinite; dropping the smallest coordinate (0 again) cycled until the step
    limit, and the float32 answer stayed (error 2.8× the allowance). The stage now searches
    the removal as MGDA's does: {0, 3} is the answer. Without the search the case fails."""
    from mtljax._src.solvers import dual_cone, min_norm

    case = ("upgrad", "condition[1e+12#2]")
    assert _float32_verdict(*case, seed=3).outcome == "pass"

    def without_search(solve, x0, steps, search=False):
        return min_norm._active_set_in_double_float(solve, x0, steps)

    monkeypatch.setattr(dual_cone, "_active_set_in_double_float", without_search)
    verdict = _float32_verdict(*case, seed=3)
    assert verdict.outcome == "fail", verdict


@pytest.mark.parametrize(
    "seed, case", [(1, "condition[1e+08#2]"), (2, "condition[1e+08#0]"), (2, "condition[1e+08#1]")]
)
def test_imtl_g_solves_a_nearly_singular_cosine_matrix_in_double_float(monkeypatch, seed, case):
    """IMTL-G in float32 at T = 8 on ``condition[1e8]`` draws of
    ``benchmarks/solver_accuracy.py``'s corpus (seeds 1 and 2, six draws): K's smallest
    eigenvalue is about 1e-7, so a genuine singular value of the centred K falls under the
    null-space cut ``4·ε·‖K‖_∞`` and the two-dimensional null space gave a direction 9–155×
    the reference's (1.6–11× the judge's allowance), where float64 on the same float32 K is
    1e-10 off. Where the cut leaves more than one null direction and K is positive definite to
    a double-float Cholesky factorisation, ``β = K⁻¹𝟙`` is solved in double-float; with the
    stage's task bound set below T the cases fail again."""
    from mtljax._src.methods import imtl_g

    assert _float32_verdict("imtl_g", case, t=8, seed=seed).outcome == "pass"
    assert imtl_g.DOUBLE_FLOAT_MAX_TASKS == 16
    monkeypatch.setattr(imtl_g, "DOUBLE_FLOAT_MAX_TASKS", 4)
    # The unjitted function, so that the patched bound is read when it is traced.
    verdict = _float32_verdict(
        "imtl_g", case, t=8, seed=seed, weights=imtl_g.impartial_weights.__wrapped__
    )
    assert verdict.outcome == "fail", verdict


def test_judge_measures_a_zero_reference_direction_against_its_terms():
    """Float64, T = 3, ``rank[r=1]`` #4 of ``benchmarks/solver_accuracy.py``'s corpus (seed 1):
    one gradient opposes the two others, so MGDA's exact direction is 0 and the reference's is
    rounding noise (1e-16 of the largest gradient). The relative error compared two noises and
    failed MGDA's float64 answer (3.5×); against the size of the terms, ``Σ|wᵢ|‖gᵢ‖``, weights
    off by 1e-12 pass and a wrong direction fails. On ``scales[1e±8]`` the reference's 1e-8
    is not 0 (its terms are as small), and uniform weights still fail."""
    cases = corpus.jacobian_corpus(1, 3, properties.dims(3), steps=1, repeats=6)
    names = [c.name for c in cases]
    ref = references.REFERENCES["mgda"]

    def verdict(case, weights_of):
        index = names.index(case)
        c = cases[index]
        x, loss = references.method_input(ref, c.jacobians, c.losses, "float64")
        w = weights_of(np.asarray(references.evaluate(ref, x, loss, {})[0], np.float64))
        return references.judge(
            "mgda", case, c.jacobians, c.losses, [w], {}, "float64", seed=index
        )[0]

    zero = "rank[r=1#4]"
    assert verdict(zero, lambda w: w * (1 + 1e-12 * np.arange(3))).outcome == "pass"
    assert verdict(zero, lambda w: np.eye(3)[0]).outcome == "fail"
    assert verdict("scales[1e±8#0]", lambda w: w).outcome == "pass"
    assert verdict("scales[1e±8#0]", lambda w: np.full(3, 1 / 3)).outcome == "fail"


def test_rlw_default_weights_follow_a_softmax_of_a_standard_normal():
    """RLW's default distribution (Lin et al. 2022: ``softmax(λ̃)``, ``λ̃ ~ N(0, I)``): the
    first weight's distribution matches draws from numpy (Kolmogorov–Smirnov, 4000 samples)."""
    method = mtl.methods.rlw()
    t = 3
    keys = jax.random.split(jax.random.key(5), 4000)
    fn = jax.jit(jax.vmap(lambda k: method.weights(jnp.ones(t), None, (), k)[0]))
    ws = np.asarray(fn(keys), np.float64)
    draws = np.random.default_rng(5).normal(size=(4000, t))
    ref = np.exp(draws) / np.exp(draws).sum(1, keepdims=True)
    for i in range(t):
        assert stats.ks_2samp(ws[:, i], ref[:, i]).pvalue > 1e-3, i
    np.testing.assert_allclose(ws.sum(1), 1.0, rtol=1e-5)
