"""Task relations: conflict statistics and inter-task affinity against direct per-pair loops."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax import analysis
from tests.helpers import tiny_batch, tiny_model

T = 3


@pytest.fixture(scope="module")
def setup():
    model, params = tiny_model(T)
    return model, params, tiny_batch(T)


def flat_task_grads(model, params, batch):
    """Per-task gradients of the shared parameters, one ``jax.grad`` per task: (T, P)."""
    rows = []
    for i in range(model.num_tasks):
        g = jax.grad(lambda s, i=i: model.losses_fn(s, params.specific, batch)[i])(params.shared)
        rows.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
    return np.stack(rows).astype(np.float64)


def pairwise_reference(g):
    """Cosines, magnitude similarity and conflicting fraction by a loop over pairs."""
    t = g.shape[0]
    cos = np.zeros((t, t))
    phi = np.ones((t, t))
    conflicts = 0
    for i in range(t):
        for j in range(t):
            ni, nj = np.linalg.norm(g[i]), np.linalg.norm(g[j])
            cos[i, j] = g[i] @ g[j] / (ni * nj) if ni * nj > 0 else 0.0
            if ni**2 + nj**2 > 0:
                phi[i, j] = 2 * ni * nj / (ni**2 + nj**2)
    for i, j in itertools.combinations(range(t), 2):
        conflicts += cos[i, j] < 0
    return cos, phi, conflicts / (t * (t - 1) / 2)


def test_conflict_stats_match_a_loop_over_pairs():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 40)) * np.array([[1.0], [3.0], [0.1], [1.0], [0.0]])  # a zero row
    g[3] = -0.7 * g[0] + 0.1 * rng.normal(size=40)  # a strongly conflicting pair
    stats = analysis.conflict_stats(jnp.asarray(g @ g.T, jnp.float32))
    cos, phi, frac = pairwise_reference(g)
    np.testing.assert_allclose(stats["cosines"], cos, atol=1e-5)
    np.testing.assert_allclose(stats["magnitude_similarity"], phi, atol=1e-5)
    np.testing.assert_allclose(stats["grad_norms"], np.linalg.norm(g, axis=1), rtol=1e-5)
    assert float(stats["conflict_fraction"]) == pytest.approx(frac)
    conflicting = np.asarray(stats["conflicting"])
    assert conflicting[0, 3] and conflicting[3, 0] and not conflicting.diagonal().any()
    assert not conflicting[4].any()  # a zero gradient conflicts with nothing


def test_gradient_stats_on_a_model_match_per_task_grads(setup):
    model, params, batch = setup
    stats = jax.jit(lambda p, b: analysis.gradient_stats(model, p, b))(params, batch)
    cos, phi, frac = pairwise_reference(flat_task_grads(model, params, batch))
    np.testing.assert_allclose(stats["cosines"], cos, atol=1e-5)
    np.testing.assert_allclose(stats["magnitude_similarity"], phi, atol=1e-5)
    assert float(stats["conflict_fraction"]) == pytest.approx(frac)
    np.testing.assert_allclose(stats["losses"], model.losses(params, batch), rtol=1e-6)


def test_summarize_conflicts_over_steps():
    rng = np.random.default_rng(1)
    cos = np.clip(rng.normal(size=(7, 3, 3)), -1, 1)
    cos = (cos + cos.transpose(0, 2, 1)) / 2
    cos[:, range(3), range(3)] = 1.0
    norms = rng.uniform(0.1, 2.0, size=(7, 3))
    out = analysis.summarize_conflicts(cos, norms)
    np.testing.assert_allclose(out["mean_cosine"], cos.mean(0))
    for i, j in itertools.combinations(range(3), 2):
        assert out["conflict_rate"][i, j] == pytest.approx(np.mean(cos[:, i, j] < 0))
        phi = 2 * norms[:, i] * norms[:, j] / (norms[:, i] ** 2 + norms[:, j] ** 2)
        assert out["magnitude_similarity"][i, j] == pytest.approx(phi.mean())
    per_step = [
        np.mean([cos[s, i, j] < 0 for i, j in itertools.combinations(range(3), 2)])
        for s in range(7)
    ]
    np.testing.assert_allclose(out["conflict_fraction"], per_step)


def direct_affinity(model, params, batch, lr):
    """``Zᵢⱼ = 1 − Lⱼ(θₛ − η gᵢ)/Lⱼ(θₛ)`` by a Python loop over (i, j)."""
    base = np.asarray(model.losses(params, batch), np.float64)
    z = np.zeros((model.num_tasks, model.num_tasks))
    for i in range(model.num_tasks):
        g = jax.grad(lambda s, i=i: model.losses_fn(s, params.specific, batch)[i])(params.shared)
        moved = jax.tree_util.tree_map(lambda p, d: p - lr * d, params.shared, g)
        for j in range(model.num_tasks):
            after = float(model.losses_fn(moved, params.specific, batch)[j])
            z[i, j] = 1.0 - after / base[j]
    return z


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_lookahead_affinity_matches_direct_per_pair_computation(setup, chunk_size):
    model, params, batch = setup
    lr = 0.05
    z = jax.jit(lambda p, b: analysis.lookahead_affinity(model, p, b, lr, chunk_size=chunk_size))(
        params, batch
    )
    np.testing.assert_allclose(z, direct_affinity(model, params, batch, lr), atol=2e-5)
    # A step on a task's own gradient lowers its own loss (small step): Zᵢᵢ > 0.
    assert np.all(np.diagonal(np.asarray(z)) > 0)


def test_affinity_accumulated_over_training_matches_a_manual_loop(setup):
    model, params, _ = setup
    method, opt = mtl.methods.ew(), optax.sgd(0.05)

    def sample(key):
        return tiny_batch(T, seed=0) | {"x": jax.random.normal(key, (16, 5))}

    keys = jax.random.split(jax.random.key(3), 6)
    step = mtl.make_train_step(model, method, opt)
    state0 = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    run = analysis.train_with_affinity(step, state0, sample, keys, learning_rate=0.05, every=2)

    state, zs = state0, []
    for k, key in enumerate(keys):
        batch = sample(key)
        if k % 2 == 0:
            zs.append(direct_affinity(model, state.params, batch, 0.05))
        state, _ = step(state, batch)
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    np.testing.assert_allclose(run.history, np.stack(zs), atol=3e-5)
    np.testing.assert_allclose(run.affinity, np.mean(zs, axis=0), atol=3e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(run.state.params),
        jax.tree_util.tree_leaves(state.params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert run.metrics["losses"].shape == (6, T)


def brute_force_grouping(z, k):
    """Best total affinity over every set of k distinct non-empty groups (a direct loop)."""
    t = z.shape[0]
    groups = [g for r in range(1, t + 1) for g in itertools.combinations(range(t), r)]

    def score(j, g):
        others = [i for i in g if i != j]
        return np.mean([z[i, j] for i in others]) if others else 0.0

    best = -np.inf
    for combo in itertools.combinations(groups, k):
        if set().union(*combo) != set(range(t)):
            continue
        best = max(best, sum(max(score(j, g) for g in combo if j in g) for j in range(t)))
    return best


def test_suggest_groups_finds_the_planted_grouping_and_the_optimum():
    # Tasks a, b help each other; c, d help each other; across the two pairs they hurt.
    z = np.array(
        [
            [0.0, 0.4, -0.3, -0.2],
            [0.5, 0.0, -0.1, -0.4],
            [-0.2, -0.3, 0.0, 0.3],
            [-0.1, -0.2, 0.6, 0.0],
        ]
    )
    names = ("a", "b", "c", "d")
    g = analysis.suggest_groups(z, 2, names)
    assert sorted(g.groups) == [("a", "b"), ("c", "d")]
    assert g.assignment["a"] == ("a", "b") and g.assignment["d"] == ("c", "d")
    assert g.score == pytest.approx(0.5 + 0.4 + 0.6 + 0.3)
    assert g.search == "exhaustive"
    # One network: all tasks together. A larger budget never leaves unused groups.
    assert analysis.suggest_groups(z, 1, names).groups == (names,)
    assert len(analysis.suggest_groups(z, 4, names).groups) <= 4
    rng = np.random.default_rng(2)
    for _ in range(3):
        zr = rng.normal(size=(4, 4))
        for k in (1, 2, 3):
            best = brute_force_grouping(zr, k)
            assert analysis.suggest_groups(zr, k).score == pytest.approx(best)
            local = analysis.suggest_groups(zr, k, max_combinations=0)  # local search
            assert local.search == "local" and local.score == pytest.approx(best)
    local = analysis.suggest_groups(z, 2, names, max_combinations=0)
    assert sorted(local.groups) == [("a", "b"), ("c", "d")]
    with pytest.raises(ValueError, match="square"):
        analysis.suggest_groups(np.zeros((2, 3)), 1)


def test_negative_transfer_flags():
    out = analysis.negative_transfer(
        {"acc": [0.80, 0.81, 0.79], "err": [1.0, 1.1, 0.9], "acc2": [0.9]},
        {"acc": [0.90, 0.91, 0.89], "err": [2.0, 2.1, 1.9], "acc2": [0.8]},
        {"acc": True, "err": False, "acc2": True},
    )
    assert out["acc"]["hurts"] and out["acc"]["significant"]
    assert out["acc"]["relative_change"] == pytest.approx((0.9 - 0.8) / 0.9 * 100)
    assert not out["err"]["hurts"] and out["err"]["relative_change"] == pytest.approx(-50.0)
    assert not out["acc2"]["hurts"] and not out["acc2"]["significant"]  # one seed: no s.e.
    assert all(v["finite"] for v in out.values())


def test_negative_transfer_refuses_mismatched_tasks_and_shows_diverged_seeds():
    with pytest.raises(ValueError, match=r"mtl .*missing \['b'\], unexpected \['typo'\]"):
        analysis.negative_transfer(
            {"a": [1.0], "typo": [1.0]}, {"a": [1.0], "b": [1.0]}, {"a": True, "b": True}
        )
    with pytest.raises(ValueError, match=r"single_task .*missing \['b'\]"):
        analysis.negative_transfer({"a": [1.0], "b": [1.0]}, {"a": [1.0]}, {"a": True, "b": True})
    with pytest.raises(ValueError, match="must be bools"):
        analysis.negative_transfer({"a": [1.0]}, {"a": [1.0]}, {"a": "False"})
    # Two of three seeds diverged: no verdict is drawn from the one that did not.
    out = analysis.negative_transfer(
        {"a": [0.5, float("nan"), float("nan")]}, {"a": [0.9, 0.91, 0.92]}, {"a": True}
    )["a"]
    assert not out["finite"] and math.isnan(out["mtl"])
    assert not out["hurts"] and not out["significant"]
    # A negative metric keeps the sign convention (positive = worse).
    out = analysis.negative_transfer({"a": [-0.75]}, {"a": [-0.5]}, {"a": True})["a"]
    assert out["relative_change"] == pytest.approx(50.0) and out["hurts"]


def test_conflict_stats_show_non_finite_gradients():
    g = np.array([[1.0, 0.0], [np.nan, 1.0], [-1.0, 0.5]])
    gram = jnp.asarray(g @ g.T, jnp.float32)
    stats = analysis.conflict_stats(gram)
    cos = np.asarray(stats["cosines"])
    assert np.isnan(cos[1]).all() and np.isnan(cos[:, 1]).all()
    assert cos[0, 2] < 0 and np.isfinite(cos[0, 2])  # the finite pair is still read
    assert np.isnan(float(stats["conflict_fraction"])) and np.isnan(float(stats["mean_cosine"]))
