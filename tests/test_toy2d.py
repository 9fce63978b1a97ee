"""The 2-D toy of CAGrad / Nash-MTL / FAMO: definition, Pareto front, and the published
behaviour of the methods on it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtljax as mtl
from mtljax._src.problems import toy2d


def hand_objectives(x1, x2):
    """CAGrad's objectives written out in scalar math, for comparison."""
    c1 = max(math.tanh(x2 / 2), 0.0)
    c2 = max(math.tanh(-x2 / 2), 0.0)
    h1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), 5e-6)) + 6
    h2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), 5e-6)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return c1 * h1 + c2 * g1, c1 * h2 + c2 * g2


@pytest.mark.parametrize(
    "x", [(0.0, 0.0), (-8.5, 7.5), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0), (0.0, -8.0), (3.0, 2.5)]
)
def test_values_match_the_definition(x):
    f1, f2 = hand_objectives(*x)
    np.testing.assert_allclose(toy2d.objectives(jnp.asarray(x)), [f1, f2], rtol=1e-5, atol=1e-6)
    # Nash-MTL / FAMO scale the first objective by 0.1.
    np.testing.assert_allclose(toy2d.losses(jnp.asarray(x)), [0.1 * f1, f2], rtol=1e-5, atol=1e-6)


def test_specific_values():
    np.testing.assert_allclose(toy2d.losses(jnp.zeros(2)), [0.0, 0.0])
    # Below the axis: tanh(4)·g, g₁ = 49/10 − 20 at (0, −8).
    np.testing.assert_allclose(
        toy2d.objectives(jnp.asarray([0.0, -8.0])), [math.tanh(4) * -15.1] * 2, rtol=1e-6
    )


def test_gradient_against_hand_derivatives():
    # Below the axis: fᵢ = c₂ gᵢ, c₂ = tanh(−x₂/2).
    x1, x2 = 2.0, -5.0
    c2 = math.tanh(-x2 / 2)
    dc2 = -0.5 * (1 - c2**2)
    g1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    expected = [c2 * (x1 - 7) / 5, dc2 * g1 + c2 * 0.02 * (x2 + 8)]
    jac = jax.jacobian(toy2d.objectives)(jnp.asarray([x1, x2]))
    np.testing.assert_allclose(jac[0], expected, rtol=1e-5)
    # Above the axis: f₁ = c₁ h₁, h₁ = log|a₁| + 6, a₁ = −(x₁ + 7)/2 + tanh(x₂).
    x1, x2 = -3.0, 2.0
    c1 = math.tanh(x2 / 2)
    dc1 = 0.5 * (1 - c1**2)
    a1 = -(x1 + 7) / 2 + math.tanh(x2)
    h1 = math.log(abs(a1)) + 6
    expected = [c1 * (-0.5) / a1, dc1 * h1 + c1 * (1 - math.tanh(x2) ** 2) / a1]
    jac = jax.jacobian(toy2d.objectives)(jnp.asarray([x1, x2]))
    np.testing.assert_allclose(jac[0], expected, rtol=1e-5)
    np.testing.assert_allclose(jax.jacobian(toy2d.losses)(jnp.asarray([x1, x2]))[0], 0.1 * jac[0])


def test_pareto_front_is_pareto_stationary():
    np.testing.assert_allclose(toy2d.front_x2(0.0), -8.3551, atol=1e-4)
    np.testing.assert_allclose(toy2d.front_x2(0.0), toy2d.FRONT_X2_AT_0, atol=1e-9)
    assert -8.44 < toy2d.front_x2(7.0) < toy2d.front_x2(3.0) < toy2d.front_x2(0.0)
    jac_fn = jax.jit(jax.jacobian(toy2d.objectives))
    for x1 in (-7.0, -4.0, 0.0, 2.5, 6.0, 7.0):
        x = jnp.asarray([x1, toy2d.front_x2(x1)], jnp.float32)
        g1, g2 = np.asarray(jac_fn(x), np.float64)
        alpha = (x1 + 7) / 14  # from the x₁-component; the x₂-component must then vanish too
        np.testing.assert_allclose(alpha * g1 + (1 - alpha) * g2, 0.0, atol=2e-5)
    # The end points are the single tasks' optima: ℓ₁'s at x₁ = 7, ℓ₂'s at x₁ = −7.
    np.testing.assert_allclose(jac_fn(jnp.asarray([7.0, toy2d.front_x2(7.0)]))[0], 0, atol=2e-5)
    np.testing.assert_allclose(jac_fn(jnp.asarray([-7.0, toy2d.front_x2(-7.0)]))[1], 0, atol=2e-5)
    # Off the front, both losses can improve: e.g. above it, or beyond |x₁| = 7.
    assert not toy2d.on_front([0.0, -8.0]) and not toy2d.on_front([7.5, toy2d.front_x2(7.0)])
    assert toy2d.on_front(toy2d.pareto_front(7)).all()


def test_problem_registered():
    problem = mtl.problems.get("toy2d", start=3)
    assert "toy2d" in mtl.problems.names()
    assert problem.task_names == ("l1", "l2")
    np.testing.assert_allclose(problem.params.shared["x"], [-7.5, -0.5])
    assert problem.params.specific == () and problem.sample(jax.random.key(0)) is None
    assert problem.steps == 35_000 and len(problem.info["starts"]) == 5
    np.testing.assert_allclose(
        problem.model.losses(problem.params, None), toy2d.losses(jnp.asarray([-7.5, -0.5]))
    )
    x1, x2, values = toy2d.landscape(n=5)
    assert x1.shape == x2.shape == (5, 5) and values.shape == (5, 5, 2)
    with pytest.raises(ValueError, match="start"):
        mtl.problems.get("toy2d", start=5)
    with pytest.raises(ValueError, match="scale"):
        mtl.problems.get("toy2d", scale=0.0)


def test_equal_weighting_stalls_in_a_valley():
    """From (9, 9) equal weighting falls into the narrow valley of ℓ₂'s log term (a₂ = 0)
    above the axis and stays there, far from the front (FAMO's Figure 1: Adam on the average
    loss misses the front from one of the five starts)."""
    out = toy2d.run(mtl.methods.ew(), steps=5000, starts=[(9.0, 9.0)], every=500)
    x1, x2 = out.final[0]
    a2 = -(x1 - 3) / 2 - math.tanh(x2) + 2
    assert x2 > 3 and abs(a2) < 0.05 and out.distance[0] > 10
    # In the valley by step ~3000; over the last 1500 steps it barely moves.
    assert np.linalg.norm(out.positions[0, -1] - out.positions[0, -4]) < 0.1
    assert not out.reached[0] and out.vmapped and out.skipped[0] == 0


def test_run_records_trajectories():
    out = toy2d.run(mtl.methods.ew(), steps=25, every=10)
    assert out.positions.shape == (5, 4, 2)
    np.testing.assert_allclose(out.positions[:, 0], np.asarray(toy2d.STARTS))
    np.testing.assert_allclose(out.positions[:, -1], out.final)
    np.testing.assert_allclose(out.final_losses, toy2d.losses(jnp.asarray(out.final)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The full reproduction: every registered method, 35k Adam steps from the five starts.

MUST_REACH = ("mgda", "imtl_g")  # must reach the front from every start
PAPERS_REACH = ("nash_mtl", "famo")  # their papers show every start reaching it


@pytest.fixture(scope="module")
def full_runs():
    runs = {}
    for name in mtl.methods.names():
        method = toy2d.build_method(name)
        if method is None:  # a factory with required arguments (``fixed`` weights)
            continue
        try:
            runs[name] = toy2d.run(method)
        except Exception as e:  # reported by test_every_method_runs_the_full_toy
            runs[name] = e
    return runs


@pytest.mark.slow
def test_every_method_runs_the_full_toy(full_runs):
    rows, failed = [], {}
    for name, out in full_runs.items():
        if isinstance(out, Exception):
            failed[name] = f"{type(out).__name__}: {out}"
            continue
        assert out.positions.shape == (5, 3501, 2)
        assert np.all(np.isfinite(out.final)), name
        rows.append(
            f"{name:12s} "
            + " ".join(
                f"{'front' if r else 'off'}({x[0]:+.2f},{x[1]:+.2f})"
                for r, x in zip(out.reached, out.final, strict=True)
            )
        )
    print("\n" + "\n".join(rows))
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.parametrize("name", MUST_REACH + PAPERS_REACH)
def test_reaches_the_pareto_front_from_every_start(name, full_runs):
    if name not in full_runs:
        pytest.skip(f"{name} is not registered")
    out = full_runs[name]
    if isinstance(out, Exception):
        raise out
    assert out.reached.all(), f"{name} ends at {out.final.tolist()} ({out.distance.tolist()})"
