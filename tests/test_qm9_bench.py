"""QM9 benchmark suites: their definitions, the plateau learning-rate schedule, the published
Δm% (recomputed from the published per-target tables), the rank correlation, and one tiny
end-to-end suite run on a slice of the bundled data."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtljax as mtl
from mtljax._src.bench import published as P
from mtljax._src.bench import report as R
from mtljax._src.bench import run as run_lib
from mtljax._src.bench import suites as S
from mtljax._src.bench.stats import delta_m
from mtljax._src.problems import qm9 as Q

HAS_QM9 = importlib.util.find_spec("qm9pack") is not None


# ----------------------------------------------------------------------------------------------
# Suites


def test_qm9_paper_suite_is_the_published_protocol():
    suite = S.get_suite("qm9-paper")
    (spec,) = suite.problems
    assert spec.name == "qm9" and suite.seeds == 3
    assert spec.options == {"model": "mpnn", "batch_size": 120, "epochs": 300}
    assert spec.steps is None and spec.eval_every == "epoch"
    assert spec.plateau == S.Plateau(initial_lr=1e-3, factor=0.7, patience=5, min_lr=1e-5)
    want = {"ew", "uw", "dwa", "rlw", "mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "famo"}
    want |= {"fairgrad", "db_mtl", "upgrad"}
    assert want <= set(spec.methods)
    assert set(spec.methods) <= set(mtl.methods.names())
    assert spec.method_args["cagrad"] == {"c": 0.4}
    assert spec.method_args["famo"] == {"gamma": 1e-3}
    assert spec.method_args["fairgrad"] == {"alpha": 2.0}
    # the defaults the suite relies on: Adam 1e-3 and batch 120 are the problem's
    assert Q.qm9.__kwdefaults__["learning_rate"] == 1e-3
    assert Q.qm9.__kwdefaults__["batch_size"] == 120


def test_qm9_quick_suite_is_cpu_sized_and_says_it_is_not_comparable():
    suite = S.get_suite("qm9-quick")
    (spec,) = suite.problems
    assert suite.seeds >= 2
    assert {"ew", "uw", "famo", "nash_mtl", "upgrad"} <= set(spec.methods)
    assert spec.options["model"] == "mpnn-light"
    assert spec.options["num_train"] <= 5000 and spec.steps <= 500
    assert "NOT comparable" in suite.description
    assert spec.plateau is not None


def test_eval_every_epoch_is_the_problems_steps_per_epoch():
    problem = mtl.problems.get("uw_noise", num_train=512, num_validation=256, num_test=256)
    spec = S.ProblemSpec("uw_noise", eval_every="epoch")
    assert run_lib._eval_every(spec, dataclasses.replace(problem, steps_per_epoch=7)) == 7
    with pytest.raises(ValueError, match="no epochs"):
        run_lib._eval_every(spec, dataclasses.replace(problem, steps_per_epoch=None))
    assert run_lib._eval_every(S.ProblemSpec("uw_noise", eval_every=5), problem) == 5


# ----------------------------------------------------------------------------------------------
# Plateau schedule


def _replay(plateau, scores):
    state, lrs = S.plateau_init(plateau), []
    for s in scores:
        lrs.append(state.lr)
        state = S.plateau_step(plateau, state, s)
    return lrs, state


def test_plateau_reduces_after_patience_non_improving_evaluations():
    pl = S.Plateau(initial_lr=1.0, factor=0.5, patience=2, min_lr=0.0, threshold=0.0)
    # improves, then 3 evaluations without improvement: the third exceeds patience 2
    lrs, state = _replay(pl, [5.0, 4.0, 4.0, 4.5, 4.0, 9.0])
    assert lrs == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert state.lr == 0.5 and state.best == 4.0 and state.bad == 1
    # an improvement resets the count
    lrs, _ = _replay(pl, [5.0, 6.0, 6.0, 4.0, 6.0, 6.0, 6.0])
    assert lrs == [1.0] * 7
    assert _replay(pl, [5.0, 6.0, 6.0, 4.0, 6.0, 6.0, 6.0, 6.0])[1].lr == 0.5


def test_plateau_threshold_and_min_lr():
    pl = S.Plateau(initial_lr=1.0, factor=0.1, patience=0, min_lr=0.05, threshold=0.1)
    # 9.5 is not 10 % below 10: no improvement; patience 0 reduces at once, floored at min_lr
    lrs, state = _replay(pl, [10.0, 9.5, 8.0, float("nan"), 7.0])
    assert lrs == [1.0, 1.0, 0.1, 0.1, 0.05]
    assert state.lr == 0.05 and state.best == 7.0
    with pytest.raises(ValueError, match="factor"):
        S.Plateau(initial_lr=1.0, factor=1.5)
    with pytest.raises(ValueError, match="min_lr"):
        S.Plateau(initial_lr=1e-3, min_lr=1e-2)


def test_lr_scale_in_the_optimizer_state_scales_adam_without_recompiling():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.3, -0.1, 2.0])}
    opt = run_lib.with_lr_scale(optax.adam(1e-3))
    state = run_lib.set_lr_scale(opt.init(params), 0.7)
    traces = []

    @jax.jit
    def update(g, s):
        traces.append(None)
        return opt.update(g, s, params)

    upd, state = update(grads, state)
    want, _ = optax.adam(0.7e-3).update(grads, optax.adam(0.7e-3).init(params), params)
    np.testing.assert_allclose(upd["w"], want["w"], rtol=1e-6)
    upd, _ = update(grads, run_lib.set_lr_scale(state, 0.2))
    assert len(traces) == 1


def test_progress_shows_time_per_epoch_and_estimated_total(monkeypatch):
    from mtljax._src import display

    now = [0.0]
    monkeypatch.setattr(display.time, "perf_counter", lambda: now[0])
    bar = display.Progress(1000, enabled=False)  # started at t = 0
    assert bar.timing() == ""
    bar.epoch(100)
    bar.advance(250)
    now[0] = 30.0
    # 30 s for 250 steps: 12 s per 100-step epoch, 1000 steps in 2 minutes
    assert bar.timing() == "12s/epoch, total ≈ 2m00s"


def test_sampler_ms_times_the_sampler_alone():
    calls = []

    def sample(key):
        calls.append(None)
        return {"x": jax.random.normal(key, (64, 8)), "i": jnp.arange(3)}

    ms = run_lib.sampler_ms(sample, jax.random.split(jax.random.key(0), 20), repeats=2)
    assert ms > 0 and len(calls) == 1  # traced once, inside one compiled scan


# ----------------------------------------------------------------------------------------------
# Published numbers and rank correlation


def test_published_delta_m_recomputed_from_the_per_target_tables():
    hib = {t: False for t in Q.TARGETS}
    base = dict(Q.PUBLISHED_STL_MAE)
    # Nash-MTL App. D.1 Table 6, LS row, against the BASE vector: Table 1's 177.6
    ls = dict(zip(Q.TARGETS, P.QM9_ROWS["ew"][0], strict=True))
    assert delta_m(ls, base, hib, Q.TARGETS) == pytest.approx(177.6, abs=0.3)
    assert P.DELTA_M["qm9"]["ew"].delta_m == 177.6
    # every row: the published tables round the per-target MAEs (3-4 digits), hence 0.6
    for method, (row, source) in P.QM9_ROWS.items():
        got = delta_m(dict(zip(Q.TARGETS, row, strict=True)), base, hib, Q.TARGETS)
        assert got == pytest.approx(P.DELTA_M["qm9"][method].delta_m, abs=0.6), method
        assert source == P.DELTA_M["qm9"][method].source
    assert "reprint" in P.FAIRGRAD or "reprinted" in P.FAIRGRAD


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 12):
        a = rng.normal(size=n)
        b = np.round(rng.normal(size=n), 1)  # ties
        b[: n // 2] = b[0]
        assert P.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert P.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_compare_lists_the_pairs_ordered_the_other_way():
    ours = {"ew": 10.0, "nash_mtl": 5.0, "famo": 7.0, "not_published": 1.0, "uw": float("nan")}
    c = P.compare("qm9", ours)
    assert c["methods"] == ["ew", "nash_mtl", "famo"]
    # published: famo 58.5 < nash 62.0 < ew 177.6; ours: nash < famo < ew
    assert c["disagreeing_pairs"] == [["nash_mtl", "famo"]]
    assert c["spearman"] == pytest.approx(0.5)
    assert P.compare("multidigits", ours) is None


# ----------------------------------------------------------------------------------------------
# A tiny suite run


def test_report_fields_on_a_cheap_problem_with_published_single_task_maes():
    """The reporting path of a problem with published single-task MAEs (Δm% against them,
    the published comparison, the data share, the plateau's history), on a small regression
    problem standing in for QM9 (the end-to-end run below checks it on QM9)."""
    base = mtl.problems.get("uw_noise", num_train=512, num_validation=256, num_test=256)
    pub = {t: 0.5 for t in base.task_names}
    problem = dataclasses.replace(base, name="qm9", info={"published_stl_mae": pub})
    pl = S.Plateau(initial_lr=1e-3, factor=0.5, patience=0, min_lr=4e-4)
    sec = run_lib.run_problem(problem, ["ew", "famo"], steps=6, eval_every=2, seeds=2, plateau=pl)
    hib = {t: problem.metrics[t][1] for t in problem.task_names}
    for m in ("ew", "famo"):
        e = sec["methods"][m]
        per_seed = [delta_m(r["test"], pub, hib, problem.main_tasks) for r in e["runs"]]
        assert e["delta_m_published"]["mean"] == pytest.approx(np.mean(per_seed))
        assert sec["data"]["share"][m] == pytest.approx(sec["data"]["sample_ms"] / e["step_ms"])
        for run in e["runs"]:
            assert run["history"]["learning_rate"] == _replay(pl, run["history"]["score"])[0]
    c = sec["published"]
    assert c["methods"] == ["ew", "famo"]
    assert c["published_delta_m"] == {"ew": 177.6, "famo": 58.5}
    dm = [sec["methods"][m]["delta_m"]["mean"] for m in ("ew", "famo")]
    assert c["spearman"] == pytest.approx(1.0 if dm[0] > dm[1] else -1.0)
    assert (c["disagreeing_pairs"] == []) == (dm[0] > dm[1])
    text = R.leaderboard_text(
        {
            "problems": {"qm9": sec},
            "suite": "t",
            "wall_s": 1.0,
            "device": "cpu",
            "jax_version": jax.__version__,
        }
    )
    assert "Δm% vs published STL" in text and "Spearman" in text and "building a batch" in text


@pytest.mark.skipif(not HAS_QM9, reason='needs qm9pack (pip install -e ".[qm9]")')
def test_tiny_qm9_suite_reports_published_comparison_and_data_share(cache_dir):
    quick = S.get_suite("qm9-quick").problems[0]
    opts = {"model": "mpnn-light", "max_molecules": 600, "num_validation": 100, "num_test": 100}
    pl = S.Plateau(initial_lr=1e-3, factor=0.5, patience=0, min_lr=4e-4)
    spec = dataclasses.replace(
        quick, options={**opts, "batch_size": 8}, steps=3, eval_every=1, methods=("ew",), plateau=pl
    )
    report = run_lib.run_suite(S.Suite("tiny", (spec,), seeds=1), progress=False)
    sec = report["problems"]["qm9"]
    ew = sec["methods"]["ew"]
    assert set(ew["test"]) == set(Q.TARGETS)
    # Δm% against the published single-task MAEs, recomputed from the reported test MAEs
    hib = {t: False for t in Q.TARGETS}
    test = ew["runs"][0]["test"]
    assert ew["delta_m_published"]["mean"] == pytest.approx(
        delta_m(test, Q.PUBLISHED_STL_MAE, hib, Q.TARGETS)
    )
    assert sec["published"]["methods"] == ["ew"]
    assert sec["published"]["published_delta_m"] == {"ew": 177.6}
    # the data-wait share: sampler time over step time, for the baselines and every method
    data = sec["data"]
    assert data["sample_ms"] > 0 and set(data["share"]) == {"single-task", "ew"}
    assert data["share"]["ew"] == pytest.approx(data["sample_ms"] / ew["step_ms"])
    # the plateau schedule: one learning rate per evaluation, replayed from the scores
    for run in [ew["runs"][0], *(sec["baselines"][t]["runs"][0] for t in Q.TARGETS[:2])]:
        hist = run["history"]
        assert hist["learning_rate"] == _replay(pl, hist["score"])[0]
    text = R.leaderboard_text(report)
    assert "Δm% vs published STL" in text and "Spearman" in text and "building a batch" in text
