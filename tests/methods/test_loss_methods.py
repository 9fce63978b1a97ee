"""Losses-only methods (DWA, RLW, GLS, FAMO, STCH): each one's defining property, checked
against a direct computation, plus the contract every method must meet."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src.methods.gls import geometric_mean
from mtljax._src.methods.stch import smooth_tchebycheff

NAMES = ("dwa", "rlw", "gls", "famo", "stch")


def weights_sequence(method, losses_seq, key=None):
    """Runs ``method.weights`` on successive loss vectors; returns the weights and last state."""
    state = method.init(len(losses_seq[0]))
    fn = jax.jit(lambda l, s, k: method.weights(l, None, s, k))
    out = []
    for i, l in enumerate(losses_seq):
        k = None if key is None else jax.random.fold_in(key, i)
        w, state = fn(jnp.asarray(l, jnp.float32), state, k)
        out.append(np.asarray(w))
    return out, state


# ----------------------------------------------------------------------------------------------
# DWA


def test_dwa_weights_from_hand_computed_ratios():
    seq = [[2.0, 1.0, 4.0], [1.5, 0.9, 1.0], [1.2, 0.3, 0.9], [1.0, 0.2, 0.8]]
    ws, _ = weights_sequence(mtl.methods.dwa(), seq)
    np.testing.assert_allclose(ws[0], np.ones(3))
    np.testing.assert_allclose(ws[1], np.ones(3))
    for t in (2, 3):
        r = np.asarray(seq[t - 1]) / np.asarray(seq[t - 2])
        e = np.exp(r / 2.0)
        np.testing.assert_allclose(ws[t], 3 * e / e.sum(), rtol=1e-6)
        np.testing.assert_allclose(ws[t].sum(), 3.0, rtol=1e-6)
    # The task whose loss fell least (task 0 at t=2: ratio 0.75 vs 0.9 and 0.25) weighs most.
    assert np.argmax(ws[2]) == 1


def test_dwa_temperature_and_epoch_average():
    seq = np.abs(np.random.default_rng(0).normal(size=(9, 2))) + 0.5
    ws, _ = weights_sequence(mtl.methods.dwa(temperature=5.0, steps_per_epoch=3), seq)
    for t in range(6):  # two epochs without a ratio
        np.testing.assert_allclose(ws[t], np.ones(2))
    r = seq[3:6].mean(0) / seq[0:3].mean(0)  # the ratio of the two epochs' mean losses
    e = np.exp(r / 5.0)
    for t in range(6, 9):  # constant within the third epoch
        np.testing.assert_allclose(ws[t], 2 * e / e.sum(), rtol=1e-6)


def test_dwa_zero_previous_loss_counts_as_ratio_one():
    ws, _ = weights_sequence(mtl.methods.dwa(), [[0.0, 1.0], [0.5, 1.0], [0.5, 1.0]])
    np.testing.assert_allclose(ws[2], np.ones(2), rtol=1e-6)  # ratios (1 by rule, 1)


# ----------------------------------------------------------------------------------------------
# RLW


@pytest.mark.parametrize(
    "distribution", ["normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli"]
)
def test_rlw_reproducible_random_and_on_simplex(distribution):
    method = mtl.methods.rlw(distribution)
    losses = jnp.ones(3)
    fn = jax.jit(jax.vmap(lambda k: method.weights(losses, None, (), k)[0]))
    keys = jax.random.split(jax.random.key(0), 3000)
    ws = np.asarray(fn(keys))
    np.testing.assert_allclose(ws.sum(1), 1.0, rtol=1e-5)
    assert np.all(ws >= 0)
    np.testing.assert_array_equal(ws, fn(keys))  # same keys, same weights
    assert len({tuple(np.round(w, 6)) for w in ws[:50]}) > 1  # different keys, different weights
    np.testing.assert_allclose(ws.mean(0), np.full(3, 1 / 3), atol=0.03)  # exchangeable tasks
    if distribution == "constrained_bernoulli":
        assert np.all(np.sort(ws, 1)[:, :-1] == 0)
    if distribution == "bernoulli":  # a uniform split over the selected tasks
        for w in ws[:50]:
            nz = w[w > 0]
            np.testing.assert_allclose(nz, 1.0 / nz.size, rtol=1e-6)


def test_rlw_default_is_softmax_of_a_standard_normal():
    key = jax.random.key(7)
    w, _ = mtl.methods.rlw().weights(jnp.ones(3), None, (), key)
    np.testing.assert_allclose(w, jax.nn.softmax(jax.random.normal(key, (3,))), rtol=1e-6)


def test_rlw_needs_a_key():
    with pytest.raises(ValueError, match="key"):
        mtl.aggregate(mtl.methods.rlw(), jnp.eye(2), jnp.ones(2), ())


# ----------------------------------------------------------------------------------------------
# GLS


def test_gls_weights_are_the_gradient_of_the_geometric_mean():
    losses = jnp.asarray([0.3, 2.0, 7.5, 1e-3])
    w, _ = mtl.methods.gls().weights(losses, None, (), None)
    g = jax.grad(lambda l: jnp.prod(l) ** (1 / 4))(losses)
    np.testing.assert_allclose(w, g, rtol=1e-5)
    np.testing.assert_allclose(w, geometric_mean(losses) / (4 * losses), rtol=1e-5)
    # G is 1-homogeneous: Σ Lᵢ ∂G/∂Lᵢ = G.
    np.testing.assert_allclose(jnp.dot(w, losses), geometric_mean(losses), rtol=1e-5)


def test_gls_non_positive_losses_get_zero_weight():
    losses = jnp.asarray([0.0, -1.0, 2.0, 0.5])
    w, _ = mtl.methods.gls().weights(losses, None, (), None)
    g = jax.grad(lambda l: geometric_mean(l, 1e-8))(jnp.asarray([0.5e-8, 0.5e-8, 2.0, 0.5]))
    np.testing.assert_allclose(w[2:], g[2:], rtol=1e-5)
    np.testing.assert_array_equal(w[:2], 0.0)


# ----------------------------------------------------------------------------------------------
# FAMO


def softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def test_famo_first_weights_and_logit_update_by_hand():
    beta, gamma = 0.1, 0.05
    method = mtl.methods.famo(gamma=gamma, optimizer=optax.sgd(beta))
    seq = np.asarray([[2.0, 0.5, 1.0], [1.0, 0.45, 0.5], [0.6, 0.4, 0.2]], np.float32)
    ws, state = weights_sequence(method, seq)
    # Step 0: ξ = 0, z uniform; w ∝ z / ℓ, normalised.
    np.testing.assert_allclose(ws[0], (1 / seq[0]) / np.sum(1 / seq[0]), rtol=1e-6)
    # Step t: ξ ← ξ − β(J_zᵀ δ + γ ξ), δ = log ℓ(t−1) − log ℓ(t); then w ∝ softmax(ξ)/ℓ(t).
    xi = np.zeros(3)
    for t in (1, 2):
        delta = np.log(seq[t - 1]) - np.log(seq[t])
        z = softmax(xi)
        jac = np.diag(z) - np.outer(z, z)
        xi = xi - beta * (jac.T @ delta + gamma * xi)
        w = softmax(xi) / seq[t]
        np.testing.assert_allclose(ws[t], w / w.sum(), rtol=1e-5)
        np.testing.assert_allclose(ws[t].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(state.logits, xi, rtol=1e-5, atol=1e-7)
    # Task 2's log-loss fell most and task 1's least: the logits rank them accordingly.
    assert np.argmin(xi) == 2 and np.argmax(xi) == 1


def test_famo_default_steps_logits_with_adam_and_respects_min_losses():
    seq = [[2.0, 1.0], [1.0, 0.9]]
    _, state = weights_sequence(mtl.methods.famo(), seq)
    # Adam's first step moves each logit by β against the sign of its gradient.
    delta = np.log(seq[0]) - np.log(seq[1])
    direction = 0.5 * (delta - delta.mean())
    np.testing.assert_allclose(state.logits, -0.025 * np.sign(direction), rtol=1e-3)
    # A floor ℓ*: weights ∝ 1/(ℓ − ℓ*) at the first step.
    floored = mtl.methods.famo(min_losses=(-1.0, 0.5))
    w, _ = floored.weights(jnp.asarray([1.0, 1.0]), None, floored.init(2), None)
    np.testing.assert_allclose(w, [0.2, 0.8], rtol=1e-5)  # ∝ 1/(2, 0.5)


def run_separable(method, steps=300, lr=2e-4):
    """SGD on ℓ₁ = x², ℓ₂ = 100 y² (no shared curvature): log-loss decrease per task."""
    c = jnp.asarray([1.0, 100.0])
    opt = optax.sgd(lr)

    def step(carry, _):
        theta, state, opt_state = carry
        losses, vjp = jax.vjp(lambda th: c * th**2, theta)
        w, state = method.weights(losses, None, state, None)
        updates, opt_state = opt.update(vjp(w)[0], opt_state, theta)
        return (optax.apply_updates(theta, updates), state, opt_state), jnp.log(losses)

    theta = jnp.ones(2)
    carry = (theta, method.init(2), opt.init(theta))
    _, logs = jax.jit(lambda c0: jax.lax.scan(step, c0, None, length=steps))(carry)
    return np.asarray(logs[-101] - logs[-1])


def test_famo_equalises_the_rate_of_decrease_of_log_losses():
    ew_rates = run_separable(mtl.methods.ew("mean"))
    famo_rates = run_separable(mtl.methods.famo())
    assert ew_rates[1] / ew_rates[0] > 50  # equal weights: the stiff task races ahead
    np.testing.assert_allclose(famo_rates[0], famo_rates[1], rtol=0.02)
    assert np.all(famo_rates > 0)


def test_famo_next_batch_variant_moves_logits_at_the_next_call():
    """Without ``after_update`` (as in ``aggregate``), the default method follows the
    next-batch rule: each call first moves ξ for the previous call."""
    seq = np.abs(np.random.default_rng(3).normal(size=(6, 3))).astype(np.float32) + 0.2
    ws_default, s_default = weights_sequence(mtl.methods.famo(), seq)
    ws_next, s_next = weights_sequence(mtl.methods.famo(update="next_batch"), seq)
    np.testing.assert_array_equal(np.stack(ws_default), np.stack(ws_next))
    np.testing.assert_array_equal(s_default.logits, s_next.logits)
    assert mtl.methods.famo().after_update is not None
    assert mtl.methods.famo(update="next_batch").after_update is None


def _famo_linear_problem(num_tasks=3, n=8, steps=6, seed=0, fresh=True):
    """A shared ``W`` (4×2) and one bias per task, per-task MSE, tasks of different scales;
    ``steps`` mini-batches of ``n`` examples (fresh ones, or the same one again)."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(num_tasks, 4, 2)) * np.array([0.3, 1.0, 3.0])[:num_tasks, None, None]
    batches = []
    for i in range(steps):
        r = np.random.default_rng(seed + 1 + (i if fresh else 0))
        x = r.normal(size=(n, 4))
        y = np.einsum("ni,tio->tno", x, w_true) + 0.3 * r.normal(size=(num_tasks, n, 2))
        batches.append({"x": x.astype(np.float32), "y": y.astype(np.float32)})
    model, params, _ = linear_model(num_tasks)
    return model, params, batches


def famo_algorithm_1(params, batches, alpha, beta, gamma, eps=1e-8):
    """FAMO's Algorithm 1 in float64 for the linear model with SGD(α) and plain-gradient logit
    steps (β): the losses after each update are taken on the same batch."""
    w_mat = np.asarray(params.shared["w"], np.float64)
    b = np.asarray(params.specific, np.float64)
    xi = np.zeros(b.shape[0])

    def losses_and_err(w_mat, b, batch):
        x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
        err = (x @ w_mat)[None] + b[:, None, :] - y  # (T, n, 2)
        return np.mean(err**2, axis=(1, 2)), err, x

    logits, weights = [], []
    for batch in batches:
        loss, err, x = losses_and_err(w_mat, b, batch)
        z = softmax(xi)
        c = z / (loss + eps)
        w = c / c.sum()
        scale = 2.0 / err[0].size
        g_w = scale * np.einsum("t,ni,tno->io", w, x, err)
        g_b = scale * w[:, None] * err.sum(axis=1)
        w_mat, b = w_mat - alpha * g_w, b - alpha * g_b
        after, _, _ = losses_and_err(w_mat, b, batch)
        delta = np.log(loss + eps) - np.log(after + eps)
        xi = xi - beta * ((np.diag(z) - np.outer(z, z)) @ delta + gamma * xi)
        logits.append(xi.copy())
        weights.append(w)
    return np.stack(logits), np.stack(weights)


def _train_famo(method, model, params, batches, alpha):
    opt = optax.sgd(alpha)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt)
    logits, weights = [], []
    for batch in batches:
        state, metrics = step(state, batch)
        logits.append(np.asarray(state.method_state.logits))
        weights.append(np.asarray(metrics["weights"]))
    assert int(state.skipped) == 0
    return np.stack(logits), np.stack(weights), step


def test_famo_train_step_follows_algorithm_1_on_fresh_mini_batches():
    alpha, beta, gamma = 0.1, 2.0, 0.01
    model, params, batches = _famo_linear_problem(fresh=True)
    method = mtl.methods.famo(gamma=gamma, optimizer=optax.sgd(beta))
    logits, weights, step = _train_famo(method, model, params, batches, alpha)
    ref_logits, ref_weights = famo_algorithm_1(params, batches, alpha, beta, gamma)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-3, atol=1e-5)
    assert np.abs(ref_logits[-1]).max() > 0.05  # the logits did move
    assert step.jitted._cache_size() == 1
    # The next-batch rule on the same fresh batches is another trajectory.
    next_logits, _, _ = _train_famo(
        mtl.methods.famo(gamma=gamma, optimizer=optax.sgd(beta), update="next_batch"),
        model,
        params,
        batches,
        alpha,
    )
    assert np.abs(next_logits[-1] - ref_logits[-1]).max() > 0.02


def test_famo_rules_agree_on_a_full_batch():
    """On one fixed batch the losses after an update are the next step's losses: both rules
    give the same weights, the next-batch logits one update behind."""
    model, params, batches = _famo_linear_problem(fresh=False, steps=8)
    same, w_same, _ = _train_famo(mtl.methods.famo(), model, params, batches, 0.1)
    nxt, w_next, _ = _train_famo(mtl.methods.famo(update="next_batch"), model, params, batches, 0.1)
    np.testing.assert_allclose(w_same, w_next, rtol=1e-5)
    np.testing.assert_allclose(same[:-1], nxt[1:], rtol=1e-5, atol=1e-7)
    assert np.abs(same[-1]).max() > 0.05


# ----------------------------------------------------------------------------------------------
# STCH


def test_stch_weights_are_the_gradient_of_t_times_the_smooth_tchebycheff_value():
    # The authors' scale: T · g_μ (their code multiplies the smooth Tchebycheff loss by T).
    losses = jnp.asarray([0.4, 1.3, 0.9])
    pref, ideal = jnp.asarray([0.2, 0.5, 0.3]), jnp.asarray([0.1, 0.0, -0.2])
    for mu in (0.05, 0.5, 3.0):
        m = mtl.methods.stch(mu=mu, preference=pref.tolist(), ideal=ideal.tolist())
        w, _ = m.weights(losses, None, m.init(3), None)
        g = jax.grad(lambda l, mu=mu: 3 * smooth_tchebycheff(l, mu, pref, ideal))(losses)
        np.testing.assert_allclose(w, g, rtol=1e-5)
    m = mtl.methods.stch(mu=0.7, log_losses=True)
    w, _ = m.weights(losses, None, m.init(3), None)
    g = jax.grad(lambda l: 3 * smooth_tchebycheff(jnp.log(l), 0.7, jnp.ones(3), jnp.zeros(3)))(
        losses
    )
    np.testing.assert_allclose(w, g, rtol=1e-5)


def test_stch_approaches_the_tchebycheff_max_as_mu_vanishes():
    losses = jnp.asarray([0.4, 1.3, 0.9])
    pref = jnp.asarray([2.0, 0.5, 1.0])  # λ(L − z) = (0.8, 0.65, 0.9): task 2 is the worst
    worst = float(jnp.max(pref * losses))
    values = [float(smooth_tchebycheff(losses, mu, pref, jnp.zeros(3))) for mu in (1, 0.1, 1e-3)]
    assert values[0] > values[1] > values[2] >= worst
    assert values[2] - worst < 1e-2
    m = mtl.methods.stch(mu=1e-3, preference=pref.tolist())
    w, _ = m.weights(losses, None, m.init(3), None)
    np.testing.assert_allclose(w, [0.0, 0.0, 3.0], atol=1e-6)  # T λ₂ on the worst task
    m = mtl.methods.stch(mu=1e3)  # large μ: nearly equal unit weights, summing to T
    w, _ = m.weights(losses, None, m.init(3), None)
    np.testing.assert_allclose(w, np.ones(3), rtol=1e-3)


def test_stch_warmup_estimates_the_ideal_point():
    seq = np.asarray([[2.0, 1.0], [1.0, 3.0], [1.0, 1.0], [0.5, 1.0]], np.float32)
    ws, state = weights_sequence(mtl.methods.stch(log_losses=True, warmup_steps=2), seq)
    np.testing.assert_allclose(ws[0], 1 / seq[0], rtol=1e-6)  # ∇ Σ log Lᵢ during warm-up
    np.testing.assert_allclose(ws[1], 1 / seq[1], rtol=1e-6)
    z = np.log(seq[:2].mean(0))  # = log(1.5, 2)
    for t in (2, 3):
        g = jax.grad(lambda l: 2 * smooth_tchebycheff(jnp.log(l), 1.0, jnp.ones(2), jnp.asarray(z)))
        np.testing.assert_allclose(ws[t], g(jnp.asarray(seq[t])), rtol=1e-5)
    assert int(state.count) == 4


@pytest.mark.parametrize("log_losses", [False, True])
def test_stch_scale_is_continuous_at_the_end_of_the_warm_up(log_losses):
    """With the losses at their warm-up mean, the first weights after the warm-up are the
    warm-up's (``p = 1/T``): the authors' factor T keeps the step size."""
    losses = np.asarray([0.5, 2.0, 7.0], np.float32)
    pref = [0.5, 1.0, 2.0]
    m = mtl.methods.stch(preference=pref, log_losses=log_losses, warmup_steps=3)
    ws, state = weights_sequence(m, [losses] * 5)
    df = 1 / losses if log_losses else np.ones(3)
    for t in range(5):  # λᵢ ∂fᵢ/∂Lᵢ before the boundary and after it
        np.testing.assert_allclose(ws[t], np.asarray(pref) * df, rtol=1e-5)
    np.testing.assert_allclose(ws[3].sum(), ws[2].sum(), rtol=1e-5)
    # One task above its warm-up mean: T λ p after the warm-up, not λ p.
    moved = losses * np.asarray([1.0, 1.5, 1.0], np.float32)
    w, _ = m.weights(jnp.asarray(moved), None, state, None)
    f = np.log(moved) if log_losses else moved
    z = np.log(losses) if log_losses else losses
    p = softmax(np.asarray(pref) * (f - z))
    dfm = 1 / moved if log_losses else np.ones(3)
    np.testing.assert_allclose(w, 3 * np.asarray(pref) * p * dfm, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# DWA's epochs from the problem


def test_runner_and_bench_pass_the_problems_steps_per_epoch(monkeypatch):
    from mtljax._src import runner
    from mtljax._src.bench import run as bench

    problem = mtl.problems.get("uw_noise", num_train=1000, batch_size=64, num_test=100)
    assert problem.steps_per_epoch == 16  # ⌈1000 / 64⌉
    assert bench._default_args("dwa", problem, {}) == {"steps_per_epoch": 16}
    assert bench._default_args("dwa", problem, {"steps_per_epoch": 3}) == {"steps_per_epoch": 3}
    assert "steps_per_epoch" not in bench._default_args("uw", problem, {})
    online = mtl.problems.get("mmoe_synthetic", online=True, num_test=100)
    assert online.steps_per_epoch is None
    assert bench._default_args("dwa", online, {}) == {}
    assert mtl.problems.get("toy2d").steps_per_epoch == 1
    # The command-line runner builds dwa with the problem's epoch.
    built = []
    real_get = mtl.methods.get

    def spy(name, **kwargs):
        built.append((name, kwargs.get("steps_per_epoch")))
        return real_get(name, **kwargs)

    monkeypatch.setattr(runner.methods_lib, "get", spy)
    runner.run_training(
        "uw_noise",
        "dwa",
        steps=2,
        problem_args={"num_train": 1000, "batch_size": 64, "num_test": 100},
        progress=False,
    )
    assert built == [("dwa", 16)]


# ----------------------------------------------------------------------------------------------
# Contract: every losses-only method


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_needs_losses_only(name):
    assert name in mtl.methods.names()
    method = mtl.methods.get(name)
    assert method.name == name and method.needs == "losses" and method.weights is not None


def linear_model(num_tasks=3):
    """Shared ``W`` (4×2), one bias per task, MSE per task: a tiny plain-JAX model."""

    def losses_fn(shared, specific, batch):
        pred = batch["x"] @ shared["w"]  # (n, 2)
        err = pred[None] + specific[:, None, :] - batch["y"]  # (T, n, 2)
        return jnp.mean(err**2, axis=(1, 2))

    params = mtl.Params({"w": jnp.full((4, 2), 0.1, jnp.float32)}, jnp.zeros((num_tasks, 2)))
    kx, ky = jax.random.split(jax.random.key(3))
    batch = {"x": jax.random.normal(kx, (8, 4)), "y": jax.random.normal(ky, (num_tasks, 8, 2))}
    names = tuple(f"t{i}" for i in range(num_tasks))
    return mtl.Model(names, losses_fn), params, batch


def test_train_path_gradient_is_the_weighted_loss_gradient():
    """Through ``mtljax.gradients`` (the train step's path), every method's update is
    ``∇ Σᵢ wᵢ Lᵢ`` for the weights it reports, with one backward pass."""
    model, params, batch = linear_model()
    methods = [mtl.methods.get(name) for name in NAMES]

    @jax.jit
    def all_gradients(params, states, key):
        return [
            mtl.gradients(model, m, params, s, batch, key)
            for m, s in zip(methods, states, strict=True)
        ]

    states = [m.init(3) for m in methods]
    for i in range(3):
        outs = all_gradients(params, states, jax.random.key(i))
        states = [state for _, state, _ in outs]
        for name, (grads, _, metrics) in zip(NAMES, outs, strict=True):
            w = metrics["weights"]
            assert np.all(np.isfinite(w)), name
            direct = jax.grad(lambda p, w=w: jnp.dot(w, model.losses(p, batch)))(params)
            np.testing.assert_allclose(grads.shared["w"], direct.shared["w"], rtol=1e-5)
            np.testing.assert_allclose(grads.specific, direct.specific, rtol=1e-5, atol=1e-7)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, outs[0][0])
    assert all_gradients._cache_size() == 1


BAD = [
    ("dwa", {"temperature": 0.0}, "temperature"),
    ("dwa", {"temperature": float("nan")}, "temperature"),
    ("dwa", {"steps_per_epoch": 0}, "steps_per_epoch"),
    ("dwa", {"steps_per_epoch": 2.5}, "steps_per_epoch"),
    ("famo", {"update": "same_step"}, "update"),
    ("rlw", {"distribution": "gaussian"}, "distribution"),
    ("rlw", {"distribution": "dirichlet", "alpha": -1.0}, "alpha"),
    ("rlw", {"distribution": "bernoulli", "p": 0.0}, "p"),
    ("gls", {"eps": 0.0}, "eps"),
    ("famo", {"learning_rate": -0.1}, "learning_rate"),
    ("famo", {"gamma": -1.0}, "gamma"),
    ("famo", {"min_losses": float("inf")}, "min_losses"),
    ("famo", {"eps": 0.0}, "eps"),
    ("stch", {"mu": 0.0}, "mu"),
    ("stch", {"preference": [1.0, -1.0]}, "preference"),
    ("stch", {"ideal": [0.0, float("nan")]}, "ideal"),
    ("stch", {"warmup_steps": -1}, "warmup_steps"),
    ("stch", {"ideal": 0.0, "warmup_steps": 3}, "warmup_steps"),
]


@pytest.mark.parametrize(("name", "kwargs", "param"), BAD)
def test_bad_hyper_parameters_raise(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        mtl.methods.get(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("famo", {"min_losses": [0.0, 0.0]}), ("stch", {"preference": [1.0, 2.0]})],
)
def test_per_task_vectors_must_match_the_number_of_tasks(name, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        mtl.methods.get(name, **kwargs).init(3)


def _famo_first_weights(losses: np.ndarray, floors: np.ndarray, eps: float) -> np.ndarray:
    """FAMO's first weights (``ξ = 0``): ``wᵢ ∝ 1/ℓ̃ᵢ``, ``ℓ̃ = max(ℓ − ℓ*, 0) + ε``."""
    inv = 1.0 / (np.maximum(losses - floors, 0.0) + eps)
    return inv / inv.sum()


def _stch_weights(losses, mu, pref, ideal):
    """``wᵢ = T λᵢ pᵢ``, ``p = softmax(λ(L − z*)/μ)``."""
    s = pref * (losses - ideal) / mu
    p = np.exp(s - s.max())
    return len(losses) * pref * p / p.sum()


@pytest.mark.parametrize("per_task", [True, False], ids=["per_task", "scalar"])
def test_per_task_arguments_keep_float64_under_x64(per_task):
    """Under ``jax_enable_x64`` FAMO's ``min_losses`` and STCH's ``preference`` and ``ideal``
    reach a float64 computation without passing through float32: losses 1e-6 above floors of
    0.1–0.3 (float32 would move ``ℓ̃`` by 1e-3 of itself) and preferences like 0.1 (1e-8) give
    the float64 weights to rounding."""
    floors = np.array([0.1, 0.2, 0.3]) if per_task else np.full(3, 0.1)
    famo_losses = floors + np.array([1e-6, 2e-6, 3e-6])
    pref = np.array([0.1, 0.3, 0.7])
    ideal = np.array([0.1, 0.2, 0.3]) if per_task else np.full(3, 0.1)
    stch_losses = np.array([1.0, 2.0, 3.0])
    with jax.enable_x64(True):
        famo = mtl.methods.famo(min_losses=tuple(floors) if per_task else 0.1)
        stch = mtl.methods.stch(
            mu=0.5, preference=tuple(pref), ideal=tuple(ideal) if per_task else 0.1
        )
        for method, losses, want in (
            (famo, famo_losses, _famo_first_weights(famo_losses, floors, 1e-8)),
            (stch, stch_losses, _stch_weights(stch_losses, 0.5, pref, ideal)),
        ):
            w, _ = jax.jit(lambda l, s, m=method: m.weights(l, None, s, None))(
                jnp.asarray(losses, jnp.float64), method.init(3)
            )
            assert w.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(w), want, rtol=1e-12)
