"""The correlation sweep's bookkeeping (benchmarks/mmoe_correlation.py): the learning rate is
chosen on validation only, and the spread table reports the runs' quantiles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mmoe_correlation.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("mmoe_correlation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(arch, p, lr, val, test):
    return {
        "arch": arch,
        "correlation": p,
        "learning_rate": lr,
        "validation_mse": val,
        "final_mse": list(test),
    }


def test_learning_rate_is_chosen_on_validation_not_test(sweep):
    runs = [
        # Cell 1: 1e-3 is best on validation although 1e-2 is best on test.
        _run("mmoe", 0.5, 1e-3, 0.10, [0.30, 0.30]),
        _run("mmoe", 0.5, 1e-2, 0.20, [0.01, 0.01]),
        # Cell 2: a diverged rate (NaN) is never chosen.
        _run("mmoe", 1.0, 1e-3, 0.15, [0.2, 0.2]),
        _run("mmoe", 1.0, 1e-2, float("nan"), [0.1, 0.1]),
    ]
    chosen, text = sweep.select_learning_rates(runs)
    by_cell = {(r["arch"], r["correlation"]): r["learning_rate"] for r in chosen}
    assert by_cell == {("mmoe", 0.5): 1e-3, ("mmoe", 1.0): 1e-3}
    rows = text.splitlines()[2:]  # below the title and the header
    assert [r.split()[2].endswith("*") for r in rows] == [True, True]
    assert not any(r.split()[3].endswith("*") for r in rows)


def test_spread_table_gives_the_runs_quantiles(sweep):
    values = np.arange(1.0, 11.0) / 10.0  # 0.1 .. 1.0
    results = [_run("shared_bottom", 0.5, 1e-3, 0.0, values)]
    text = sweep.spread_table(results, ["shared_bottom"], [0.5])
    row = text.splitlines()[-1].split()
    assert row[:2] == ["shared_bottom", "0.5"]
    expected = np.quantile(values, (0.1, 0.25, 0.5, 0.75, 0.9)).tolist() + [1.0]
    np.testing.assert_allclose([float(x) for x in row[2:]], expected, atol=1e-4)


def test_main_runs_a_cell_with_the_chosen_optimizer(sweep, tmp_path):
    out = sweep.main(
        [
            "--archs",
            "shared_bottom",
            "--correlations",
            "1.0",
            "--seeds",
            "2",
            "--steps",
            "4",
            "--checkpoints",
            "2",
            "--num-test",
            "16",
            "--optimizer",
            "sgd",
            "--learning-rates",
            "0.0",
            "--out",
            str(tmp_path / "sweep.json"),
        ]
    )
    assert out["config"]["optimizer"] == "sgd"
    (cell,) = out["results"]
    assert len(cell["curve"]) == 2 and len(cell["final_mse"]) == 2
    # SGD at rate 0 leaves the parameters where they started: the curve is flat.
    np.testing.assert_allclose(cell["curve"][0], cell["curve"][1], rtol=1e-6)
    assert (tmp_path / "sweep.json").exists()


@pytest.mark.parametrize(
    "task_args, task_kwargs",
    [
        ([], {}),
        (["--scale", "2.5"], {"scale": 2.5}),
        (
            ["--sines", "normal", "--alpha-scale", "3", "--num-sines", "4"],
            {"sines": "normal", "alpha_scale": 3.0, "num_sines": 4},
        ),
    ],
)
def test_eval_train_reads_the_fixed_training_set(sweep, tmp_path, task_args, task_kwargs):
    """The training MSE at rate 0 is the initial model's on the training set drawn from the
    tasks the flags describe (the scale c and the sines included)."""
    import jax

    from mtljax._src.problems import mmoe_synthetic as ms

    args = ["--archs", "shared_bottom", "--correlations", "1.0", "--seeds", "2", "--steps", "2"]
    args += ["--checkpoints", "1", "--num-test", "16", "--num-train", "32", "--optimizer", "sgd"]
    args += ["--learning-rates", "0.0", "--out", str(tmp_path / "s.json")]
    out = sweep.main(args + task_args + ["--fixed-data", "--eval", "train"])
    for s, got in enumerate(out["results"][0]["final_mse"]):
        k_task, k_train, _, k_init = jax.random.split(jax.random.key(s), 4)
        train = ms.sample_data(k_train, ms.make_tasks(k_task, 1.0, **task_kwargs), 32)
        model, params = ms.build_model("shared_bottom", k_init)
        np.testing.assert_allclose(got, float(ms.mse(model, params, train).mean()), rtol=1e-5)
    with pytest.raises(SystemExit):
        sweep.main(args + ["--eval", "train"])


def test_first_seed_splits_a_sweep_into_calls(sweep):
    """Seeds 1, 2 run on their own give the same runs as within seeds 0, 1, 2 (same tasks,
    data, initialisation and minibatch keys), so a long sweep can be split over calls."""
    kw = dict(
        steps=4,
        batch_size=8,
        num_train=32,
        num_test=16,
        learning_rate=1e-2,
        optimizer="adam",
        method="ew",
        sines="range",
        num_sines=5,
        online=True,
        checkpoints=2,
    )
    whole = sweep.run_cell("mmoe", 0.5, 3, **kw)
    tail = sweep.run_cell("mmoe", 0.5, 2, first_seed=1, **kw)
    head = sweep.run_cell("mmoe", 0.5, 2, **kw)
    np.testing.assert_allclose(tail["final_mse"], whole["final_mse"][1:], rtol=1e-5)
    assert not np.allclose(tail["final_mse"], head["final_mse"], rtol=1e-3)
