"""Fair benchmarks of multi-task methods: single-task baselines, Δm%, seeds, validation-based
model selection.

For each problem, every method trains the same model, on the same batches, for the same number
of steps, from the same initial parameters of each seed. The comparison follows the protocol of
Maninis et al., "Attentive Single-Tasking of Multiple Tasks" (CVPR 2019) and Navon et al.,
"Multi-Task Learning as a Bargaining Game" (ICML 2022):

* **Single-task baselines**: one model per task, the same architecture and budget, trained on
  that task alone (the multi-task model with weights ``eₜ``: only task ``t``'s loss reaches the
  shared trunk, the other heads receive no gradient). Each baseline is a separate run from the
  seed's initial parameters.
* **Model selection on validation only**: every ``eval_every`` steps the model is scored on the
  validation split (the main tasks' validation Δm% against the baselines' validation metrics);
  the best parameters are kept, and the test split is read once, at the end, for those.
* **Δm%** (Maninis et al. 2019) over the main tasks ``t = 1..T``:

      Δm% = (1/T) Σₜ (−1)^{hₜ} (M_{m,t} − M_{b,t}) / M_{b,t} × 100,

  ``hₜ = 1`` when higher is better for task ``t``'s metric, ``M_{b,t}`` the single-task
  baseline's test metric (its mean over seeds). Lower is better; 0 is single-task
  performance. Reported as mean ± standard error over seeds.
* Auxiliary tasks are trained but excluded from Δm% and model selection; the report compares
  the main tasks with their single-task baselines, and with equal weighting of the main tasks
  alone (``ew [main only]``), to say whether the auxiliary tasks helped.

Each run between two validation evaluations is one jitted :meth:`mtljax.TrainStep.scan`. A
baseline keeps the checkpoint best on its own task's validation metric. The step time is the
median over chunks of (chunk wall time / steps), leaving out each compiled step's first chunk;
``rank`` orders methods by mean Δm%, ``mean_rank`` (MR) averages their ranks on each main
task's test metric. Gradient conflicts (pairwise cosines of the task gradients w.r.t. the
shared parameters) are measured at every evaluation on a fixed probe set of training batches.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import methods as methods_lib
from mtljax import problems as problems_lib
from mtljax._src import analysis, base, engine
from mtljax._src.base import Method, make_method
from mtljax._src.model import Params
from mtljax._src.problems.base import Problem, evaluation_input
from mtljax._src.train import TrainStep, init_train_state, make_train_step

PyTree = Any

SINGLE_TASK = "single-task"
PROBE_BATCHES = 4  # training batches in the fixed probe set of the conflict statistics
MAIN_ONLY = "ew [main only]"

# ----------------------------------------------------------------------------------------------
# Δm% and summaries


def delta_m(
    metrics: Mapping[str, float] | Sequence[float],
    baseline: Mapping[str, float] | Sequence[float],
    higher_is_better: Mapping[str, bool] | Sequence[bool],
    tasks: Sequence[str] | None = None,
) -> float:
    """``Δm% = (1/T) Σₜ (−1)^{hₜ} (M_{m,t} − M_{b,t}) / |M_{b,t}| × 100`` (lower is better).

    Maninis, Radosavovic & Kokkinos, CVPR 2019; Vandenhende et al., TPAMI 2021. The papers
    divide by ``M_{b,t}``, their metrics being positive; ``|M_{b,t}|`` keeps the sign
    meaning "worse" for a negative metric (e.g. a log-likelihood) and equals it otherwise.

    Args:
      metrics: the method's metric per task (a mapping by task name, or a sequence).
      baseline: the single-task baselines' metric per task, same form.
      higher_is_better: ``hₜ`` per task, same form.
      tasks: the tasks to average over (for mappings; default: the keys of
        ``higher_is_better``). Pass the main tasks to leave auxiliary tasks out.

    Example: accuracies 0.90 vs a baseline 0.80 (higher is better) and an error 1.5 vs 1.0
    (lower is better): ``((−12.5) + 50) / 2 = 18.75``.
    """
    if isinstance(higher_is_better, Mapping):
        tasks = tuple(higher_is_better) if tasks is None else tuple(tasks)
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"delta_m: a task is named twice in {tasks}")
        given = (metrics, baseline, higher_is_better)
        missing = [t for t in tasks if any(t not in d for d in given)]
        if missing:
            raise ValueError(f"delta_m: no metric, baseline or direction for {missing}")
        directions = [higher_is_better[t] for t in tasks]
        m = np.asarray([metrics[t] for t in tasks], np.float64)
        b = np.asarray([baseline[t] for t in tasks], np.float64)
    else:
        if tasks is not None:
            raise ValueError("delta_m: `tasks` applies to mappings only")
        directions = list(np.atleast_1d(np.asarray(higher_is_better, object)))
        m = np.asarray(metrics, np.float64)
        b = np.asarray(baseline, np.float64)
    analysis.check_directions("delta_m", directions)
    h = np.asarray(directions, bool)
    if not (m.shape == b.shape == h.shape) or m.ndim != 1 or m.size == 0:
        raise ValueError(
            f"delta_m: need one metric, baseline and direction per task; got shapes "
            f"{m.shape}, {b.shape}, {h.shape}"
        )
    if np.any(b == 0):
        raise ValueError("delta_m: a baseline metric is 0; the relative change is undefined")
    sign = np.where(h, -1.0, 1.0)
    return float(np.mean(sign * (m - b) / np.abs(b)) * 100.0)


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "se", "values", "nonfinite"}``: the mean and standard error ``s/√n`` over
    seeds (``se`` is NaN for fewer than two). A non-finite value makes both NaN: a seed that
    diverged is counted in ``nonfinite`` and shown, never averaged away."""
    v = np.asarray(values, np.float64)
    mean, se = analysis.mean_and_se(v)
    return {"mean": mean, "se": se, "values": v.tolist(), "nonfinite": int(np.sum(~np.isfinite(v)))}


def _ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values`` (lowest first), ties sharing their average rank; NaN last."""
    v = np.asarray(values, np.float64)
    v = np.where(np.isfinite(v), v, np.inf)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        tie = v == x
        ranks[tie] = ranks[tie].mean()
    return ranks


# ----------------------------------------------------------------------------------------------
# Suites


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """One problem of a suite.

    Attributes:
      name: a registered problem name.
      options: keyword options of the problem's factory.
      steps: training steps per run (rounded up to a multiple of ``eval_every``); default the
        problem's ``steps``.
      eval_every: steps between validation evaluations (one ``lax.scan`` each).
      methods: method names; ``None`` for every method of ``mtljax.methods`` but ``fixed``.
      method_args: ``{method: {hyper-parameter: value}}``; defaults otherwise.
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int | None = None
    eval_every: int = 100
    methods: tuple[str, ...] | None = None
    method_args: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named benchmark: problems and the number of seeds."""

    name: str
    problems: tuple[ProblemSpec, ...]
    seeds: int = 3
    description: str = ""


# Representative methods of each family, for the quick suite: loss weighting (EW, UW, DWA,
# FAMO), gradient-norm balancing (GradNorm) and Gramian/Jacobian aggregation (MGDA, PCGrad,
# CAGrad, Nash-MTL, UPGrad). Those not available are skipped.
QUICK_METHODS = (
    "ew",
    "uw",
    "dwa",
    "famo",
    "gradnorm",
    "mgda",
    "pcgrad",
    "cagrad",
    "nash_mtl",
    "upgrad",
)

SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        (
            ProblemSpec(
                "multidigits",
                {"num_train": 6000, "num_validation": 1500, "num_test": 1500},
                steps=600,
                eval_every=100,
                methods=QUICK_METHODS,
            ),
        ),
        seeds=3,
        description="multidigits, 10 representative methods, 3 seeds × 600 steps (2-core CPU: "
        "under 5 minutes)",
    ),
    "full": Suite(
        "full",
        (
            ProblemSpec("multidigits", {}, steps=3000, eval_every=250),
            ProblemSpec(
                "gradnorm_toy",
                {"num_tasks": 4, "sigmas": (1.0, 2.0, 4.0, 8.0), "num_train": 5000},
                steps=2000,
                eval_every=250,
            ),
            ProblemSpec("uw_noise", {}, steps=2000, eval_every=250),
            ProblemSpec("mmoe_synthetic", {}, steps=2000, eval_every=250),
        ),
        seeds=3,
        description="every method on every problem with validation splits, 3 seeds",
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]


# ----------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A progress bar over training steps: tqdm when installed, else a plain one on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = int(total), bool(enabled), 0
        self.start = time.perf_counter()
        self._tqdm = None
        self._last = 0.0
        self._label = ""
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm(total=self.total, unit="step", file=sys.stderr, leave=True)
            except ImportError:
                pass

    def label(self, text: str) -> None:
        self._label = text
        if self._tqdm is not None:
            self._tqdm.set_description_str(text, refresh=False)

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.perf_counter()
        if self.done < self.total and now - self._last < 0.5:
            return
        self._last = now
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        elapsed = now - self.start
        sys.stderr.write(f"\r[{bar}] {100 * frac:5.1f}% {elapsed:6.0f}s {self._label[:48]:<48}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# One problem


def single_task_method() -> Method:
    """Fixed weights carried in the method state (set ``state.method_state`` to the weights).

    With a one-hot ``eₜ`` it trains the model on task ``t`` alone: only ``Lₜ`` reaches the shared
    trunk and the other heads get zero gradients. Every weight vector shares one compiled step.
    """

    def init(num_tasks: int):
        return jnp.ones((num_tasks,), jnp.float32)

    def weights(losses, gramian, state, key):
        return state.astype(losses.dtype), state

    return make_method("single_task", init, needs="losses", weights=weights)


def _finite_or_none(x: Any) -> Any:
    """JSON-safe: numpy to lists, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _finite_or_none(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _probe_stats(model, params: Params, batches: PyTree) -> dict[str, jax.Array]:
    """Conflict statistics of the task gradients on the union of stacked probe batches: the
    per-batch Jacobians are averaged (the Jacobian of the mean loss), then the Gramian."""
    _, jac = jax.vmap(lambda b: engine.task_jacobian(model, params, b))(batches)
    jac = jax.tree_util.tree_map(lambda x: x.mean(axis=0), jac)
    return analysis.conflict_stats(base.gramian(jac, model.num_tasks))


class _ProblemRunner:
    """Runs (method, seed) pairs on one problem with validation-based model selection."""

    def __init__(
        self,
        problem: Problem,
        *,
        steps: int,
        eval_every: int,
        seeds: Sequence[int],
        init: Callable[[int], Params] | None,
        bar: _Progress,
    ):
        if problem.evaluate_split is None or not problem.metrics:
            raise ValueError(
                f"problem {problem.name!r} declares no validation/test evaluation "
                "(`evaluate_split` and `metrics`), which fair model selection needs"
            )
        missing = [s for s in ("validation", "test") if s not in problem.splits]
        if missing:
            raise ValueError(f"problem {problem.name!r} has no {missing} split(s)")
        if eval_every < 1:
            raise ValueError(f"eval_every must be ≥ 1, got {eval_every}")
        self.problem = problem
        self.tasks = problem.task_names
        self.main = problem.main_tasks
        self.hib = {t: bool(problem.metrics[t][1]) for t in self.tasks}
        self.eval_every = int(eval_every)
        self.chunks = max(1, math.ceil(int(steps) / self.eval_every))
        self.steps = self.chunks * self.eval_every
        self.seeds = list(seeds)
        self.bar = bar
        model = problem.model
        self._stats = jax.jit(partial(_probe_stats, model))
        self._sample = problem.sample
        self._init = init
        self._compiled: weakref.WeakSet[TrainStep] = weakref.WeakSet()
        self._seed_cache: dict[int, tuple] = {}

    def seed_setup(self, seed: int):
        """``(params, train_key, data_keys (chunks, eval_every), probe batch)`` of a seed."""
        if seed not in self._seed_cache:
            k_init, k_train, k_data, k_probe = jax.random.split(jax.random.key(seed), 4)
            if self.problem.init_params is not None:
                params = self.problem.init_params(k_init)
            elif self._init is not None:
                params = self._init(seed)
            else:
                params = self.problem.params
            data_keys = jax.random.split(k_data, self.steps).reshape(self.chunks, self.eval_every)
            probe = jax.vmap(self._sample)(jax.random.split(k_probe, PROBE_BATCHES))
            self._seed_cache[seed] = (params, k_train, data_keys, probe)
        return self._seed_cache[seed]

    def _task_values(self, values: Mapping[str, Any]) -> dict[str, float]:
        arrays = {k: np.asarray(v) for k, v in values.items()}
        out = {}
        for i, t in enumerate(self.tasks):
            metric = self.problem.metrics[t][0]
            if metric not in arrays:
                raise ValueError(
                    f"problem {self.problem.name!r}: evaluate_split gave no {metric!r} for task "
                    f"{t!r}; it gave {sorted(arrays)}"
                )
            out[t] = float(arrays[metric][i])
        return out

    def run(
        self,
        label: str,
        step: TrainStep,
        seed: int,
        score: Callable[[dict[str, float]], float],
        method_state: PyTree | None = None,
    ) -> dict[str, Any]:
        """Trains one (method, seed) pair; returns its record (JSON-friendly)."""
        problem = self.problem
        params, k_train, data_keys, probe = self.seed_setup(seed)
        state = init_train_state(problem.model, params, step.method, step.optimizer, k_train)
        if method_state is not None:
            state = state._replace(method_state=method_state)
        hist: dict[str, list] = {
            "step": [],
            "validation": [],
            "score": [],
            "train_losses": [],
            "weights": [],
            "cosines": [],
            "grad_norms": [],
            "conflict_fraction": [],
        }
        times = []
        best_score, best_params, best_step = math.inf, None, None
        self.bar.label(f"{problem.name} {label} seed {seed}")
        for c in range(self.chunks):
            t0 = time.perf_counter()
            state, metrics = step.scan(state, self._sample, data_keys[c])
            jax.block_until_ready(state.params)
            dt = time.perf_counter() - t0
            if step in self._compiled:
                times.append(dt / self.eval_every)
            else:  # the first chunk of a step compiles it: not a step time
                self._compiled.add(step)
            trained = evaluation_input(problem.model, state)
            val = self._task_values(problem.evaluate_split(trained, "validation"))
            s = float(score(val))
            stats = self._stats(state.params, probe)
            hist["step"].append((c + 1) * self.eval_every)
            hist["validation"].append(val)
            hist["score"].append(s)
            hist["train_losses"].append(np.asarray(metrics["losses"]).mean(axis=0).tolist())
            if step.method.weights is not None:  # NaN weights otherwise
                hist["weights"].append(np.asarray(metrics["weights"]).mean(axis=0).tolist())
            hist["cosines"].append(np.asarray(stats["cosines"]).tolist())
            hist["grad_norms"].append(np.asarray(stats["grad_norms"]).tolist())
            hist["conflict_fraction"].append(float(stats["conflict_fraction"]))
            if math.isfinite(s) and s < best_score:
                best_score, best_params, best_step = s, trained, (c + 1) * self.eval_every
            self.bar.advance(self.eval_every)
        if best_params is None:  # never a finite validation score: keep the last parameters
            best_params, best_step = evaluation_input(problem.model, state), self.steps
        test = problem.evaluate_split(best_params, "test")
        return {
            "seed": seed,
            "best_step": best_step,
            "best_validation": hist["validation"][hist["step"].index(best_step)],
            "test": self._task_values(test),
            "test_losses": np.asarray(test["loss"]).tolist() if "loss" in test else None,
            "step_times": times,
            "skipped_steps": int(state.skipped),
            "history": {k: v for k, v in hist.items() if v},
        }


def _median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * float(np.median(seconds)) if len(seconds) else float("nan")


def _summarize_method(
    label: str,
    runs: list[dict[str, Any]],
    runner: _ProblemRunner,
    baselines: Mapping[str, Any],
) -> dict[str, Any]:
    tasks, main, hib = runner.tasks, runner.main, runner.hib
    test = {t: mean_se([r["test"][t] for r in runs]) for t in tasks}
    entry: dict[str, Any] = {
        "method": label,
        "seeds": [r["seed"] for r in runs],
        "test": test,
        "best_step": [r["best_step"] for r in runs],
        "skipped_steps": [r["skipped_steps"] for r in runs],
    }
    entry["step_ms"] = _median_ms([x for r in runs for x in r["step_times"]])
    baseline_test = {t: baselines[t]["test"]["mean"] for t in tasks}
    per_seed = [delta_m(r["test"], baseline_test, hib, main) for r in runs]
    entry["delta_m"] = mean_se(per_seed)
    entry["negative_transfer"] = analysis.negative_transfer(
        {t: test[t]["values"] for t in tasks},
        {t: baselines[t]["test"]["values"] for t in tasks},
        hib,
    )
    cos = [c for r in runs for c in r["history"]["cosines"]]
    norms = [g for r in runs for g in r["history"]["grad_norms"]]
    conf = analysis.summarize_conflicts(np.asarray(cos), np.asarray(norms))
    entry["conflicts"] = {
        "mean_cosine": conf["mean_cosine"].tolist(),
        "conflict_rate": conf["conflict_rate"].tolist(),
        "mean_conflict_fraction": conf["mean_conflict_fraction"],
        "magnitude_similarity": conf["magnitude_similarity"].tolist(),
    }
    entry["runs"] = runs
    return entry


def _factory_parameters(name: str) -> Mapping[str, Any]:
    factory = getattr(methods_lib, name, None)
    if factory is None:
        return {}
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}


def epoch_args(name: str, problem: Problem, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given``, plus the problem's ``steps_per_epoch`` for a method whose factory takes it
    (DWA's epoch-level rule) when the problem has epochs and ``given`` does not set it."""
    args = dict(given)
    spe = problem.steps_per_epoch
    if spe is not None and "steps_per_epoch" not in args:
        if "steps_per_epoch" in _factory_parameters(name):
            args["steps_per_epoch"] = int(spe)
    return args


def _default_args(name: str, problem: Problem, given: Mapping[str, Any]) -> dict[str, Any]:
    """A method's arguments for ``problem``: ``given``, plus what its factory cannot default:
    equal weights for ``fixed``, ``like`` (the shared parameters' structure) for methods whose
    state holds gradient-shaped arrays, and the problem's ``steps_per_epoch`` (see
    :func:`epoch_args`)."""
    args = epoch_args(name, problem, given)
    if name == "fixed" and "weights" not in args:
        args["weights"] = [1.0] * problem.model.num_tasks
    if "like" not in args and "like" in _factory_parameters(name):
        args["like"] = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), problem.params.shared
        )
    return args


def run_problem(
    problem: Problem,
    methods: Sequence[str] | Mapping[str, Method] | None = None,
    *,
    steps: int | None = None,
    eval_every: int = 100,
    seeds: int | Sequence[int] = 3,
    base_seed: int = 0,
    method_args: Mapping[str, Mapping[str, Any]] | None = None,
    init: Callable[[int], Params] | None = None,
    progress: bool | _Progress = False,
) -> dict[str, Any]:
    """Benchmarks methods on one problem against single-task baselines.

    Args:
      problem: a :class:`mtljax.problems.Problem` with ``evaluate_split`` and ``metrics``.
      methods: method names (built with their defaults, or ``method_args``) or
        ``{label: Method}``; ``None`` for every method of ``mtljax.methods`` but ``fixed``
        (``fixed`` named explicitly without arguments gets equal weights; methods whose
        factory takes ``like`` get the structure of the shared parameters).
      steps: training steps per run (``None``: the problem's own ``steps``), rounded up to a
        multiple of ``eval_every``.
      eval_every: steps between validation evaluations.
      seeds: a number of seeds (``base_seed, base_seed + 1, …``) or the seeds themselves.
      base_seed: the first seed when ``seeds`` is a number.
      method_args: ``{name: {argument: value}}`` for the factories of methods given by name;
        a factory that takes ``steps_per_epoch`` (``dwa``) gets the problem's unless given.
      init: ``seed -> initial Params`` for problems without ``init_params``.
      progress: show a progress bar.

    Returns the problem's section of the report: ``tasks``, ``main_tasks``, ``auxiliary``,
    ``metrics``, ``baselines`` (per task), ``methods`` (per method: per-task test metrics and
    Δm% as mean ± standard error over seeds, median step time, rank, mean rank over the main
    tasks ``mean_rank``, conflict statistics, negative transfer, and every run with its
    validation history), ``leaderboard`` (method labels by rank), ``auxiliary_report`` and
    ``failed`` (``{label: error}``).
    """
    if isinstance(seeds, int):
        seed_list = list(range(base_seed, base_seed + seeds))
    else:
        seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("run_problem: need at least one seed")
    steps = problem.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"run_problem: steps must be ≥ 1, got {steps}")
    method_args = dict(method_args or {})
    failed: dict[str, str] = {}
    built: dict[str, Method] = {}
    if isinstance(methods, Mapping):
        built = dict(methods)
    else:
        names = (
            [m for m in methods_lib.names() if m != "fixed"] if methods is None else list(methods)
        )
        for name in names:
            try:
                args = _default_args(name, problem, method_args.get(name, {}))
                built[name] = methods_lib.get(name, **args)
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                failed[name] = f"{type(e).__name__}: {e}"

    t = problem.model.num_tasks
    n_runs = (t + (1 if problem.auxiliary else 0) + len(built)) * len(seed_list)
    own_bar = not isinstance(progress, _Progress)
    runner_steps = max(1, math.ceil(steps / eval_every)) * eval_every
    bar = _Progress(n_runs * runner_steps, bool(progress)) if own_bar else progress
    try:
        runner = _ProblemRunner(
            problem, steps=steps, eval_every=eval_every, seeds=seed_list, init=init, bar=bar
        )
        section = _run_problem(problem, runner, built, failed, method_args)
    finally:
        if own_bar:
            bar.close()
    return section


def _run_problem(problem, runner, built, failed, method_args) -> dict[str, Any]:
    tasks, main, hib = runner.tasks, runner.main, runner.hib
    t0 = time.perf_counter()
    # Single-task baselines: one separate model per task, all on one compiled step.
    stl = single_task_method()
    stl_step = make_train_step(problem.model, stl, problem.optimizer)
    baselines: dict[str, Any] = {}
    for i, task in enumerate(tasks):
        onehot = jnp.zeros((len(tasks),), jnp.float32).at[i].set(1.0)
        sign = -1.0 if hib[task] else 1.0
        runs = [
            runner.run(
                f"{SINGLE_TASK}:{task}",
                stl_step,
                seed,
                lambda val, task=task, sign=sign: sign * val[task],
                method_state=onehot,
            )
            for seed in runner.seeds
        ]
        baselines[task] = {
            "test": mean_se([r["test"][task] for r in runs]),
            "validation": mean_se([r["best_validation"][task] for r in runs]),
            "best_step": [r["best_step"] for r in runs],
            "step_ms": _median_ms([x for r in runs for x in r["step_times"]]),
            "runs": runs,
        }
    base_val = {task: baselines[task]["validation"]["mean"] for task in tasks}

    def selection_score(val: dict[str, float]) -> float:
        return delta_m(val, base_val, hib, main)

    entries: dict[str, dict[str, Any]] = {}
    if problem.auxiliary:
        weights = jnp.asarray([0.0 if x in problem.auxiliary else 1.0 for x in tasks])
        runs = [
            runner.run(MAIN_ONLY, stl_step, seed, selection_score, method_state=weights)
            for seed in runner.seeds
        ]
        entries[MAIN_ONLY] = _summarize_method(MAIN_ONLY, runs, runner, baselines)
        entries[MAIN_ONLY]["reference"] = True

    for label, method in built.items():
        done = runner.bar.done
        try:
            step = make_train_step(problem.model, method, problem.optimizer)
            runs = [runner.run(label, step, seed, selection_score) for seed in runner.seeds]
            entries[label] = _summarize_method(label, runs, runner, baselines)
            entries[label]["args"] = dict(method_args.get(label, {}))
        except Exception as e:  # noqa: BLE001 - reported, the others still run
            failed[label] = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            runner.bar.advance(len(runner.seeds) * runner.steps - (runner.bar.done - done))

    # Ranks: by mean Δm% (lower is better); mean rank over the main tasks' test metrics.
    labels = list(entries)
    dm = [entries[m]["delta_m"]["mean"] for m in labels]
    for m, r in zip(labels, _ranks(dm), strict=True):
        entries[m]["rank"] = float(r)
    per_task = []
    for task in main:
        sign = -1.0 if hib[task] else 1.0
        per_task.append(_ranks([sign * entries[m]["test"][task]["mean"] for m in labels]))
    if labels:
        mr = np.mean(per_task, axis=0)
        for m, r in zip(labels, mr, strict=True):
            entries[m]["mean_rank"] = float(r)
    leaderboard = sorted(labels, key=lambda m: (entries[m]["rank"], m))

    section = {
        "problem": problem.name,
        "info": problem.info,
        "tasks": list(tasks),
        "main_tasks": list(main),
        "auxiliary": list(problem.auxiliary),
        "metrics": {
            task: {"name": problem.metrics[task][0], "higher_is_better": hib[task]}
            for task in tasks
        },
        "seeds": runner.seeds,
        "steps": runner.steps,
        "eval_every": runner.eval_every,
        "baselines": baselines,
        "methods": entries,
        "leaderboard": leaderboard,
        "failed": failed,
        "wall_s": time.perf_counter() - t0,
    }
    section["auxiliary_report"] = auxiliary_report(section)
    return section


def auxiliary_report(section: Mapping[str, Any]) -> dict[str, Any] | None:
    """Did the auxiliary tasks help the main tasks? ``None`` without auxiliary tasks.

    For every method: each main task's relative change against its single-task baseline
    (negative = better, as Δm%) and whether the main tasks gained on average (``helped``:
    Δm% < 0). With ``ew [main only]`` (equal weights on the main tasks, auxiliary ones off) it
    also gives ``vs_main_only``, the method's Δm% minus the main-only run's: negative when
    training with the auxiliary tasks beat training on the main tasks alone.
    """
    if not section.get("auxiliary"):
        return None
    entries = section["methods"]
    ref = entries.get(MAIN_ONLY)
    ref_dm = ref["delta_m"]["mean"] if ref else float("nan")
    by_method = {}
    for label, e in entries.items():
        if label == MAIN_ONLY:
            continue
        by_method[label] = {
            "delta_m": e["delta_m"]["mean"],
            "vs_single_task": {
                t: e["negative_transfer"][t]["relative_change"] for t in section["main_tasks"]
            },
            "helped": bool(e["delta_m"]["mean"] < 0),
            "vs_main_only": e["delta_m"]["mean"] - ref_dm,
        }
    ew = by_method.get("ew")
    return {
        "tasks": section["auxiliary"],
        "main_only_delta_m": ref_dm,
        "ew_delta_m": ew["delta_m"] if ew else None,
        "ew_helped_vs_single_task": ew["helped"] if ew else None,
        "ew_helped_vs_main_only": bool(ew["vs_main_only"] < 0) if ew and ref else None,
        "by_method": by_method,
    }


# ----------------------------------------------------------------------------------------------
# A suite


def _params_of_seed(name: str, options: dict[str, Any]) -> Callable[[int], Params]:
    """Initial parameters of a problem without ``init_params``: those of its seed-``s`` build."""

    def init(seed: int) -> Params:
        return problems_lib.get(name, seed=seed, **options).params

    return init


def run_suite(
    suite: str | Suite,
    *,
    seeds: int | None = None,
    base_seed: int = 0,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    progress: bool = True,
    plots: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs a benchmark suite (``"quick"``, ``"full"`` or a :class:`Suite`).

    ``seeds``, ``methods`` and ``steps`` override the suite's. With ``plots`` a directory,
    writes PNG plots there (needs matplotlib). Returns the JSON-serialisable report; print it
    with :func:`leaderboard_text`.
    """
    suite = get_suite(suite) if isinstance(suite, str) else suite
    n_seeds = suite.seeds if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"seeds must be ≥ 1, got {n_seeds}")
    available = set(methods_lib.names())
    if methods is not None:
        unknown = [m for m in methods if m not in available]
        if unknown:
            raise ValueError(
                f"unknown methods {unknown}; valid methods: {', '.join(methods_lib.names())}"
            )
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if plots is not None:
        _pyplot()  # fail now, not after the runs, when matplotlib is missing
    t_start = time.perf_counter()
    prepared, skipped = [], {}
    for spec in suite.problems:
        if spec.name not in problems_lib.names():
            skipped[spec.name] = "not a registered problem in this installation"
            continue
        problem = problems_lib.get(spec.name, seed=base_seed, **dict(spec.options))
        if problem.evaluate_split is None or not problem.metrics:
            skipped[spec.name] = "declares no validation/test evaluation (evaluate_split, metrics)"
            continue
        names = (
            list(methods)
            if methods is not None
            else (
                [m for m in spec.methods if m in available]
                if spec.methods is not None
                else [m for m in methods_lib.names() if m != "fixed"]
            )
        )
        unavailable = [m for m in (spec.methods or ()) if m not in available]
        n_steps = steps or spec.steps or problem.steps
        prepared.append((spec, problem, names, unavailable, n_steps))
    total = 0
    for spec, problem, names, _, n_steps in prepared:
        runs = problem.model.num_tasks + (1 if problem.auxiliary else 0) + len(names)
        total += runs * n_seeds * math.ceil(n_steps / spec.eval_every) * spec.eval_every
    bar = _Progress(total, progress)
    sections = {}
    try:
        for spec, problem, names, unavailable, n_steps in prepared:
            init = None
            if problem.init_params is None:
                init = _params_of_seed(spec.name, dict(spec.options))
            section = run_problem(
                problem,
                names,
                steps=n_steps,
                eval_every=spec.eval_every,
                seeds=n_seeds,
                base_seed=base_seed,
                method_args=spec.method_args,
                init=init,
                progress=bar,
            )
            section["options"] = dict(spec.options)
            section["unavailable_methods"] = unavailable
            sections[spec.name] = section
    finally:
        bar.close()
    report = {
        "suite": suite.name,
        "description": suite.description,
        "seeds": n_seeds,
        "base_seed": base_seed,
        "problems": sections,
        "skipped_problems": skipped,
        "wall_s": time.perf_counter() - t_start,
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
    }
    if plots is not None:
        report["plots"] = plot_report(report, plots)
    return report


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _pm(stat: Mapping[str, Any], digits: int = 4, fixed: int | None = None) -> str:
    mean, se = stat.get("mean"), stat.get("se")
    if mean is None or not math.isfinite(mean):
        return "-"
    m = f"{mean:.{fixed}f}" if fixed is not None else f"{mean:.{digits}g}"
    if se is None or not math.isfinite(se):
        return m
    s = f"{se:.{fixed}f}" if fixed is not None else f"{se:.2g}"
    return f"{m} ± {s}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def problem_table(section: Mapping[str, Any]) -> str:
    """The leaderboard of one problem as text."""
    tasks, main = section["tasks"], section["main_tasks"]
    metrics = section["metrics"]
    arrow = {True: "↑", False: "↓"}

    def head(t):
        aux = "" if t in main else " (aux)"
        return f"{t} {metrics[t]['name']} {arrow[metrics[t]['higher_is_better']]}{aux}"

    headers = ["rank", "method", "Δm% ↓", *(head(t) for t in tasks), "MR", "step ms"]
    rows = []
    base = section["baselines"]
    rows.append(
        [
            "-",
            SINGLE_TASK,
            "0",
            *(_pm(base[t]["test"]) for t in tasks),
            "-",
            _fmt(float(np.mean([base[t]["step_ms"] for t in tasks]))),
        ]
    )
    for label in section["leaderboard"]:
        e = section["methods"][label]
        rows.append(
            [
                f"{e['rank']:g}",
                label,
                _pm(e["delta_m"], fixed=2),
                *(_pm(e["test"][t]) for t in tasks),
                f"{e.get('mean_rank', float('nan')):.1f}",
                _fmt(e["step_ms"], 3),
            ]
        )
    aux = "; auxiliary: " + ", ".join(section["auxiliary"]) if section["auxiliary"] else ""
    n_seeds = len(section["seeds"])
    title = (
        f"{section['problem']}: main tasks {', '.join(main)}{aux}; {n_seeds} "
        f"seed{'s' if n_seeds != 1 else ''} × {section['steps']} steps, model selected on "
        "validation every "
        f"{section['eval_every']} steps; test metrics mean ± s.e."
    )
    lines = [title, format_table(headers, rows)]
    ar = section.get("auxiliary_report")
    if ar and ar.get("ew_delta_m") is not None:
        verdict = "helped" if ar["ew_helped_vs_main_only"] else "did not help"
        lines.append(
            f"auxiliary tasks ({', '.join(ar['tasks'])}): EW on all tasks Δm% "
            f"{ar['ew_delta_m']:+.2f} vs EW on the main tasks only {ar['main_only_delta_m']:+.2f}"
            f" — the auxiliary tasks {verdict} the main tasks under EW; methods whose main "
            "tasks beat their single-task baselines (Δm% < 0): "
            + (", ".join(m for m, v in ar["by_method"].items() if v["helped"]) or "none")
        )
    hurt = []
    for label in section["leaderboard"]:
        nt = section["methods"][label].get("negative_transfer", {})
        sig = [t for t in main if nt.get(t, {}).get("significant")]
        if sig:
            hurt.append(f"{label} ({', '.join(sig)})")
    if hurt:
        lines.append(
            "negative transfer (main task worse than single-task by > 2 s.e.): " + "; ".join(hurt)
        )
    nonfinite = []
    for label in section["leaderboard"]:
        e = section["methods"][label]
        counts = {t: e["test"][t].get("nonfinite", 0) for t in tasks}
        bad = [f"{t} in {k}" for t, k in counts.items() if k]
        if bad:
            nonfinite.append(f"{label} ({', '.join(bad)} of {len(e['seeds'])} seeds)")
    if nonfinite:
        lines.append("non-finite test metrics (means shown as '-'): " + "; ".join(nonfinite))
    if section["failed"]:
        lines.append("failed: " + "; ".join(f"{m}: {msg}" for m, msg in section["failed"].items()))
    return "\n".join(lines)


def leaderboard_text(report: Mapping[str, Any]) -> str:
    """The whole report as text: one leaderboard per problem."""
    parts = [problem_table(s) for s in report["problems"].values()]
    for name, why in report.get("skipped_problems", {}).items():
        parts.append(f"skipped {name}: {why}")
    parts.append(
        f"suite {report['suite']}: {report['wall_s']:.0f} s on {report['device']} "
        f"(jax {report['jax_version']})"
    )
    return "\n\n".join(parts)


def to_json(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with NaN/inf as ``null`` (strict JSON)."""
    return _finite_or_none(dict(report))


def write_json(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(to_json(report), f, indent=1, allow_nan=False)


# ----------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: install it with `pip install 'mtljax[bench]'` (or "
            "`pip install matplotlib`)"
        ) from e
    return plt


def _curve(entry: Mapping[str, Any], key: str, pick: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Mean over seeds of a per-evaluation history quantity: ``(steps, values)``."""
    runs = entry["runs"]
    steps = np.asarray(runs[0]["history"]["step"])
    vals = np.asarray([[pick(v) for v in r["history"][key]] for r in runs], np.float64)
    return steps, vals.mean(axis=0)


def plot_delta_m(section: Mapping[str, Any], ax=None):
    """A bar chart of Δm% (mean ± standard error over seeds) by method, best first."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.5 * len(section["leaderboard"]) + 2), 4))
    labels = section["leaderboard"]
    mean = [section["methods"][m]["delta_m"]["mean"] for m in labels]
    se = [section["methods"][m]["delta_m"]["se"] for m in labels]
    se = [s if s is not None and math.isfinite(s) else 0.0 for s in se]
    colors = ["tab:green" if (v is not None and v < 0) else "tab:red" for v in mean]
    ax.bar(range(len(labels)), mean, yerr=se, color=colors, capsize=3)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_ylabel("Δm% vs single-task (lower is better)")
    ax.set_title(f"{section['problem']}: Δm% over {', '.join(section['main_tasks'])}")
    return ax


def _line_style(cmap: Any, k: int) -> dict[str, Any]:
    """Colour and dash of curve ``k``: 20 colours, then the same colours dotted and dash-dotted,
    so that no two of up to 60 methods share both."""
    return {"color": cmap(k % 20), "linestyle": ("-", ":", "-.")[(k // 20) % 3]}


def figures(section: Mapping[str, Any]) -> dict[str, Any]:
    """The plots of one problem as matplotlib figures, by name: ``delta_m`` (Δm% with error
    bars), ``validation`` (per-task validation curves, mean over seeds, single-task baselines
    dashed), ``weights`` (task weights over training, for methods that report weights) and
    ``cosines`` (mean pairwise gradient cosines per method, and the fraction of conflicting
    pairs over training)."""
    plt = _pyplot()
    tasks = section["tasks"]
    entries = section["methods"]
    labels = section["leaderboard"]
    name = section["problem"]
    out = {}

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels) + 2), 4.5))
    plot_delta_m(section, ax)
    fig.tight_layout()
    out["delta_m"] = fig

    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[0, i]
        for k, label in enumerate(labels):
            steps, v = _curve(entries[label], "validation", lambda d, t=task: d[t])
            ax.plot(steps, v, lw=1.2, label=label, **_line_style(cmap, k))
        steps, v = _curve(section["baselines"][task], "validation", lambda d, t=task: d[t])
        ax.plot(steps, v, "k--", lw=1.5, label=SINGLE_TASK)
        m = section["metrics"][task]
        aux = " (aux)" if task in section["auxiliary"] else ""
        ax.set_title(f"{task}{aux}: validation {m['name']}")
        ax.set_xlabel("step")
    axes[0, -1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out["validation"] = fig

    weighted = [m for m in labels if "weights" in entries[m]["runs"][0]["history"]]
    if weighted:
        cols = min(4, len(weighted))
        rows = math.ceil(len(weighted) / cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False, sharex=True
        )
        for k, label in enumerate(weighted):
            ax = axes[k // cols, k % cols]
            for i, task in enumerate(tasks):
                steps, v = _curve(entries[label], "weights", lambda w, i=i: w[i])
                ax.plot(steps, v, label=task)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title(label, fontsize=9)
        for k in range(len(weighted), rows * cols):
            axes[k // cols, k % cols].axis("off")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{name}: task weights during training (mean over seeds)")
        fig.tight_layout()
        out["weights"] = fig

    t = len(tasks)
    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    if pairs and labels:
        fig, (ax0, ax1) = plt.subplots(
            1,
            2,
            figsize=(12, max(3.5, 0.32 * len(labels) + 1.5)),
            gridspec_kw={"width_ratios": [1, 1.3]},
        )
        mat = np.asarray(
            [[entries[m]["conflicts"]["mean_cosine"][i][j] for i, j in pairs] for m in labels]
        )
        im = ax0.imshow(mat, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax0.set_xticks(
            range(len(pairs)),
            [f"{tasks[i]}·{tasks[j]}" for i, j in pairs],
            rotation=45,
            ha="right",
            fontsize=8,
        )
        ax0.set_yticks(range(len(labels)), labels, fontsize=8)
        ax0.set_title("mean cos(gᵢ, gⱼ) over training")
        fig.colorbar(im, ax=ax0)
        for k, label in enumerate(labels):
            steps, v = _curve(entries[label], "conflict_fraction", lambda x: x)
            ax1.plot(steps, v, label=label, **_line_style(cmap, k))
        ax1.set_xlabel("step")
        ax1.set_ylabel("fraction of conflicting pairs")
        ax1.legend(fontsize=7, ncol=2)
        fig.suptitle(f"{name}: gradient conflicts (shared parameters, probe batch)")
        fig.tight_layout()
        out["cosines"] = fig
    return out


def plot_problem(section: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Writes the :func:`figures` of one problem as ``<problem>_<name>.png``; returns the
    paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for key, fig in figures(section).items():
        paths.append(os.path.join(out_dir, f"{section['problem']}_{key}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Writes every problem's plots (PNG) to ``out_dir``; returns their paths."""
    paths = []
    for section in report["problems"].values():
        paths.extend(plot_problem(section, out_dir))
    return paths


__all__ = [
    "MAIN_ONLY",
    "SINGLE_TASK",
    "SUITES",
    "ProblemSpec",
    "Suite",
    "auxiliary_report",
    "delta_m",
    "figures",
    "format_table",
    "get_suite",
    "leaderboard_text",
    "mean_se",
    "plot_delta_m",
    "plot_problem",
    "plot_report",
    "problem_table",
    "run_problem",
    "run_suite",
    "single_task_method",
    "to_json",
    "write_json",
]
