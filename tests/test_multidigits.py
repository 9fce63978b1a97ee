"""The multidigits problem: overlay rule, splits, shapes, determinism."""

import sys

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")

import mtljax as mtl  # noqa: E402
from mtljax._src.problems import multidigits as md  # noqa: E402

SMALL = {"num_train": 300, "num_validation": 100, "num_test": 120, "batch_size": 16}


def test_overlay_is_the_pixelwise_maximum_of_shifted_digits():
    left = np.zeros((3, 3))
    left[0, 0], left[2, 2] = 0.4, 0.9
    right = np.full((3, 3), 0.5)
    out = md.overlay(left, right, (1, 2))
    assert out.shape == (4, 5)
    expect = np.zeros((4, 5))
    expect[:3, :3] = left
    expect[1:, 2:] = np.maximum(expect[1:, 2:], right)
    np.testing.assert_array_equal(out, expect)
    assert out[0, 0] == 0.4 and out[2, 2] == 0.9 and out[1, 2] == 0.5 and out[3, 4] == 0.5
    assert out[0, 4] == 0.0 and out[3, 0] == 0.0  # corners outside both digits
    batch = md.overlay(np.stack([left, right]), np.stack([right, left]), (1, 2))
    assert batch.shape == (2, 4, 5)
    with pytest.raises(ValueError, match="offset"):
        md.overlay(left, right, (3, 0))


def test_splits_are_disjoint_and_deterministic_from_the_seed():
    sizes = {"train": 200, "validation": 50, "test": 60}
    a = md.datasets(0, sizes=sizes)
    b = md.datasets(0, sizes=sizes)
    c = md.datasets(1, sizes=sizes)
    pools = [set(a[s]["pool"].tolist()) for s in md.SPLITS]
    assert sum(len(p) for p in pools) == 1797
    for p, q in [(0, 1), (0, 2), (1, 2)]:
        assert not pools[p] & pools[q]
    for s in md.SPLITS:
        assert np.isin(a[s]["idx"], a[s]["pool"]).all()  # pairs use their split's images only
        assert (a[s]["idx"][:, 0] != a[s]["idx"][:, 1]).all()
        for k in ("x", "left", "right", "idx", "pool"):
            np.testing.assert_array_equal(a[s][k], b[s][k])
        assert not np.array_equal(a[s]["idx"], c[s]["idx"])
    # Each canvas is the overlay of the two images its labels come from.
    images, labels = md.load_digit_images()
    i, j = a["test"]["idx"][5]
    canvas = md.overlay(images[i], images[j], (1, 2)).ravel()
    np.testing.assert_array_equal(a["test"]["x"][5], canvas)
    assert (a["test"]["left"][5], a["test"]["right"][5]) == (labels[i], labels[j])


def test_problem_shapes_metrics_and_seeds():
    p = mtl.problems.get("multidigits", auxiliary=("sum", "equal"), **SMALL)
    assert p.task_names == ("left", "right", "sum", "equal")
    assert p.main_tasks == ("left", "right") and p.auxiliary == ("sum", "equal")
    assert p.metrics["sum"] == ("mae", False) and p.metrics["left"] == ("accuracy", True)
    batch = p.sample(jax.random.key(0))
    assert batch["x"].shape == (16, 90)
    assert set(batch["targets"]) == set(p.task_names)
    assert p.model.losses(p.params, batch).shape == (4,)
    ev = p.evaluate_split(p.params, "validation")
    assert set(ev) == {"loss", "accuracy", "mae"} and ev["accuracy"].shape == (4,)
    assert np.isnan(ev["accuracy"][2]) and np.isnan(ev["mae"][0]) and np.isfinite(ev["mae"][2])
    scores = p.task_metrics(p.params, "test")
    assert 0.0 <= scores["left"] <= 1.0 and scores["sum"] > 0
    with pytest.raises(ValueError, match="split"):
        p.task_metrics(p.params, "holdout")
    # The seed sets the initial parameters, not the data; data_seed sets the data.
    q = mtl.problems.get("multidigits", seed=1, auxiliary=("sum", "equal"), **SMALL)
    np.testing.assert_array_equal(q.sample(jax.random.key(0))["x"], batch["x"])
    leaves_p = jax.tree_util.tree_leaves(p.params)
    leaves_q = jax.tree_util.tree_leaves(q.params)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves_p, leaves_q, strict=True))
    fresh = p.init_params(jax.random.key(5))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(p.params)


def test_bad_options_and_missing_scikit_learn(monkeypatch):
    with pytest.raises(ValueError, match="auxiliary"):
        mtl.problems.get("multidigits", auxiliary=("parity",), **SMALL)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"mtljax\[bench\]"):
        md.load_digit_images()
