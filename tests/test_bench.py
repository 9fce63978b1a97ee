"""The benchmark engine: Δm%, model selection on validation only, the report and the CLI."""

import copy
import dataclasses
import json
import math

import jax
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax import bench
from mtljax._src import runner
from tests.helpers import tiny_batch, tiny_model

# `--dist loadgroup` keeps this module on one worker: a module fixture runs the benchmark once.
pytestmark = pytest.mark.xdist_group("bench")

# ----------------------------------------------------------------------------------------------
# Δm%


def test_delta_m_hand_computed_cases():
    # Accuracy 0.90 vs 0.80 (higher is better): −12.5 %; error 1.5 vs 1.0 (lower): +50 %.
    assert bench.delta_m([0.9, 1.5], [0.8, 1.0], [True, False]) == pytest.approx(18.75)
    # Same by task name; an auxiliary task left out through `tasks`.
    m = {"acc": 0.9, "err": 1.5, "aux": 10.0}
    b = {"acc": 0.8, "err": 1.0, "aux": 1.0}
    h = {"acc": True, "err": False, "aux": False}
    assert bench.delta_m(m, b, h, ["acc", "err"]) == pytest.approx(18.75)
    assert bench.delta_m(m, b, h) == pytest.approx((-12.5 + 50 + 900) / 3)
    # The sign follows the direction: better is negative in both cases, and ×100.
    assert bench.delta_m([0.99], [0.9], [True]) == pytest.approx(-10.0)
    assert bench.delta_m([0.5], [2.0], [False]) == pytest.approx(-75.0)
    assert bench.delta_m([0.5], [2.0], [True]) == pytest.approx(75.0)
    assert bench.delta_m([3.0, 4.0], [3.0, 4.0], [True, False]) == 0.0
    with pytest.raises(ValueError, match="baseline metric is 0"):
        bench.delta_m([1.0], [0.0], [True])
    with pytest.raises(ValueError, match="one metric"):
        bench.delta_m([1.0, 2.0], [1.0], [True])


def test_delta_m_refuses_ambiguous_input_and_keeps_its_sign_for_negative_metrics():
    with pytest.raises(ValueError, match="must be bools"):
        bench.delta_m([0.9], [0.8], ["False"])  # a string would read as True
    with pytest.raises(ValueError, match="must be bools"):
        bench.delta_m({"a": 0.9}, {"a": 0.8}, {"a": 1})
    with pytest.raises(ValueError, match="named twice"):
        bench.delta_m(
            {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, {"a": True, "b": True}, ["a", "a", "b"]
        )
    with pytest.raises(ValueError, match=r"no metric, baseline or direction for \['c'\]"):
        bench.delta_m({"a": 1.0}, {"a": 1.0}, {"a": True}, ["a", "c"])
    # A negative metric, higher is better: −0.25 against −0.5 is an improvement of 50%.
    assert bench.delta_m([-0.25], [-0.5], [True]) == pytest.approx(-50.0)
    assert bench.delta_m([-0.75], [-0.5], [True]) == pytest.approx(50.0)


def test_mean_and_standard_error():
    s = bench.mean_se([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["se"] == pytest.approx(1.0 / math.sqrt(3))
    assert s["nonfinite"] == 0
    assert math.isnan(bench.mean_se([4.0])["se"])
    # A diverged seed is not averaged away: the mean is NaN and the seed is counted.
    s = bench.mean_se([1.0, float("nan"), 3.0])
    assert math.isnan(s["mean"]) and math.isnan(s["se"]) and s["nonfinite"] == 1
    assert math.isnan(s["values"][1]) and len(s["values"]) == 3


def test_single_task_baseline_trains_one_task_alone():
    model, params = tiny_model(3)
    batch = tiny_batch(3)
    method, opt = bench.single_task_method(), optax.adam(1e-2)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    state = state._replace(method_state=np.array([0.0, 1.0, 0.0], np.float32))
    step = mtl.make_train_step(model, method, opt)
    new, metrics = step(state, batch)
    np.testing.assert_array_equal(metrics["weights"], [0.0, 1.0, 0.0])
    # Only task 1's head moves; the trunk follows task 1's gradient alone.
    kern0, kern1 = (
        np.asarray(params.specific["heads"]["kernel"]),
        np.asarray(new.params.specific["heads"]["kernel"]),
    )
    np.testing.assert_array_equal(kern1[[0, 2]], kern0[[0, 2]])
    assert not np.array_equal(kern1[1], kern0[1])
    fixed = mtl.methods.fixed([0.0, 1.0, 0.0])
    ref_state = mtl.init_train_state(model, params, fixed, opt, jax.random.key(0))
    ref, _ = mtl.make_train_step(model, fixed, opt)(ref_state, batch)
    for a, b in zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(ref.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# A tiny benchmark, run once for the tests below


SMALL = {"num_train": 400, "num_validation": 150, "num_test": 150, "batch_size": 32}


@pytest.fixture(scope="module")
def counted():
    """A benchmark of EW on a small multidigits whose evaluation logs every call."""
    pytest.importorskip("sklearn")
    problem = mtl.problems.get("multidigits", **SMALL)
    log = []
    inner = problem.evaluate_split

    def evaluate_split(params, split):
        log.append(split)
        out = inner(params, split)
        if split == "test":
            # Test scores that would pick a different checkpoint if selection ever read them.
            out = dict(out, accuracy=1.0 - out["accuracy"])
        return out

    wrapped = dataclasses.replace(problem, evaluate_split=evaluate_split)
    section = bench.run_problem(wrapped, ["ew", "not_a_method"], steps=30, eval_every=10, seeds=2)
    return problem, section, log


def test_model_selection_never_reads_the_test_split(counted):
    problem, section, log = counted
    # Runs: 4 single-task baselines + EW on the main tasks only + EW, two seeds each.
    runs = (4 + 1 + 1) * 2
    assert log.count("test") == runs
    assert log.count("validation") == runs * 3  # one per 10 steps
    # Each run reads validation 3 times, then test exactly once, at its very end.
    assert all(log[k * 4 : (k + 1) * 4] == ["validation"] * 3 + ["test"] for k in range(runs))
    # The kept checkpoint is the best by the validation score of that run.
    for entry in [*section["methods"].values(), *section["baselines"].values()]:
        for run in entry["runs"]:
            h = run["history"]
            assert run["best_step"] == h["step"][int(np.argmin(h["score"]))]
            assert run["best_validation"] == h["validation"][int(np.argmin(h["score"]))]


def test_baselines_and_delta_m_against_them(counted):
    _, section, _ = counted
    assert set(section["baselines"]) == {"left", "right", "sum", "larger"}
    base = {t: section["baselines"][t]["test"]["mean"] for t in section["main_tasks"]}
    hib = {t: section["metrics"][t]["higher_is_better"] for t in section["main_tasks"]}
    for label in ("ew", bench.MAIN_ONLY):
        e = section["methods"][label]
        per_seed = [bench.delta_m(r["test"], base, hib) for r in e["runs"]]
        np.testing.assert_allclose(e["delta_m"]["values"], per_seed)
        assert e["delta_m"]["mean"] == pytest.approx(np.mean(per_seed))
        assert e["delta_m"]["se"] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2))
        assert len(e["test"]["left"]["values"]) == 2 and e["step_ms"] > 0
        assert set(e["negative_transfer"]) == set(section["tasks"])
    # Selection scores of multi-task runs are validation Δm% against the baselines.
    bval = {t: section["baselines"][t]["validation"]["mean"] for t in section["main_tasks"]}
    run = section["methods"]["ew"]["runs"][0]
    for val, score in zip(run["history"]["validation"], run["history"]["score"], strict=True):
        assert score == pytest.approx(bench.delta_m(val, bval, hib))


def test_report_structure_leaderboard_and_json(counted, tmp_path):
    _, section, _ = counted
    assert section["leaderboard"][0] in section["methods"]
    ranks = [section["methods"][m]["rank"] for m in section["leaderboard"]]
    assert ranks == sorted(ranks)
    dms = [section["methods"][m]["delta_m"]["mean"] for m in section["leaderboard"]]
    assert dms == sorted(dms)
    assert (
        "not_a_method" in section["failed"] and "valid methods" in section["failed"]["not_a_method"]
    )
    aux = section["auxiliary_report"]
    assert aux["tasks"] == ["sum", "larger"] and set(aux["by_method"]) == {"ew"}
    assert aux["by_method"]["ew"]["vs_main_only"] == pytest.approx(
        section["methods"]["ew"]["delta_m"]["mean"]
        - section["methods"][bench.MAIN_ONLY]["delta_m"]["mean"]
    )
    report = {
        "suite": "test",
        "problems": {"multidigits": section},
        "wall_s": 1.0,
        "device": "cpu",
        "jax_version": jax.__version__,
    }
    text = bench.leaderboard_text(report)
    for needle in ("single-task", "Δm% ↓", "left accuracy ↑", "sum mae ↓ (aux)", "ew", "failed"):
        assert needle in text
    path = tmp_path / "r.json"
    bench.write_json(report, path)
    loaded = json.loads(path.read_text())
    assert loaded["problems"]["multidigits"]["methods"]["ew"]["delta_m"]["mean"] == pytest.approx(
        section["methods"]["ew"]["delta_m"]["mean"]
    )
    cos = loaded["problems"]["multidigits"]["methods"]["ew"]["conflicts"]["mean_cosine"]
    assert np.asarray(cos).shape == (4, 4)


def test_step_args_reach_each_methods_train_step():
    pytest.importorskip("sklearn")
    problem = mtl.problems.get("multidigits", **SMALL)
    methods = {
        "upgrad": mtl.methods.upgrad(),
        "upgrad [feature]": mtl.methods.upgrad(),
        "ew": mtl.methods.ew(),
    }
    step_args = {"upgrad [feature]": {"mode": "feature"}, "ew": {"mode": "sideways"}}
    section = bench.run_problem(
        problem, methods, steps=20, eval_every=10, seeds=1, step_args=step_args
    )
    entries = section["methods"]
    assert entries["upgrad [feature]"]["step_args"] == {"mode": "feature"}
    assert "step_args" not in entries["upgrad"]
    # The same method, seed, batches and baselines; weights from the representation's Gramian
    # at feature level, from the shared parameters' otherwise.
    weights = [
        np.asarray(entries[k]["runs"][0]["history"]["weights"]) for k in methods if k != "ew"
    ]
    assert weights[0].shape == weights[1].shape == (2, 4)
    assert not np.allclose(weights[0], weights[1])
    # The options go to make_train_step as given: an invalid one fails that method only.
    assert "mode must be" in section["failed"]["ew"]
    with pytest.raises(ValueError, match="not methods of this run"):
        bench.run_problem(problem, methods, steps=2, eval_every=1, seeds=1, step_args={"mgda": {}})


def test_leaderboard_shows_non_finite_seeds(counted):
    _, section, _ = counted
    section = copy.deepcopy(section)
    ew = section["methods"]["ew"]
    ew["test"]["left"] = bench.mean_se([0.9, float("nan")])
    text = bench.problem_table(section)
    line = next(x for x in text.splitlines() if x.startswith("non-finite test metrics"))
    assert "ew (left in 1 of 2 seeds)" in line
    assert "non-finite" not in bench.problem_table(counted[1])


def test_cli_bench_prints_the_leaderboard_and_writes_json_and_plots(
    counted, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("matplotlib")
    _, section, _ = counted
    calls = {}

    def fake_run_suite(name, **kwargs):
        calls.update(kwargs, name=name)
        report = {
            "suite": name,
            "problems": {"multidigits": section},
            "wall_s": 1.0,
            "device": "cpu",
            "jax_version": jax.__version__,
        }
        if kwargs["plots"]:
            report["plots"] = bench.plot_report(report, kwargs["plots"])
        return report

    monkeypatch.setattr(bench, "run_suite", fake_run_suite)
    out, plots = tmp_path / "b.json", tmp_path / "plots"
    argv = ["bench", "--suite", "quick", "--seeds", "2", "--methods", "ew,uw"]
    argv += ["--out", str(out), "--plots", str(plots), "--no-progress"]
    assert runner.main(argv) == 0
    assert calls["methods"] == ["ew", "uw"] and calls["seeds"] == 2 and calls["base_seed"] == 0
    stdout = capsys.readouterr().out
    assert "single-task" in stdout and "Δm%" in stdout
    assert json.loads(out.read_text())["suite"] == "quick"
    names = sorted(p.name for p in plots.iterdir())
    assert names == [
        "multidigits_cosines.png",
        "multidigits_delta_m.png",
        "multidigits_validation.png",
        "multidigits_weights.png",
    ]


def test_suites_and_errors():
    assert {"quick", "full"} <= set(bench.SUITES)
    with pytest.raises(ValueError, match="valid suites"):
        bench.run_suite("huge")
    with pytest.raises(ValueError, match="unknown methods"):
        bench.run_suite("quick", methods=["nope"], progress=False)
    problem = mtl.problems.get("toy2d")
    with pytest.raises(ValueError, match="evaluate_split"):
        bench.run_problem(problem, ["ew"], steps=2, eval_every=1, seeds=1)
