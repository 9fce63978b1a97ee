"""Running a benchmark: single-task baselines, every method over seeds on one problem, with
model selection on validation, and whole suites. The protocol is :mod:`mtljax._src.bench`'s."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtljax import methods as methods_lib
from mtljax import problems as problems_lib
from mtljax._src import analysis, base, engine
from mtljax._src.base import Method, make_method
from mtljax._src.bench import published as published_lib
from mtljax._src.bench.plots import _pyplot, plot_report
from mtljax._src.bench.stats import _ranks, delta_m, mean_se
from mtljax._src.bench.suites import (
    MAIN_ONLY,
    PROBE_BATCHES,
    SINGLE_TASK,
    Plateau,
    Suite,
    get_suite,
    plateau_init,
    plateau_step,
)
from mtljax._src.display import Progress
from mtljax._src.model import Params
from mtljax._src.problems.base import Problem, evaluation_input
from mtljax._src.train import TrainStep, init_train_state, make_train_step

PyTree = Any

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


def with_lr_scale(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` followed by an injectable scale (1 at init) of its updates: the runner's
    handle on the learning rate of a :class:`~mtljax._src.bench.suites.Plateau` schedule."""
    return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def set_lr_scale(opt_state: PyTree, scale: float) -> PyTree:
    """The state of a :func:`with_lr_scale` optimizer with its scale set to ``scale`` (same
    shape and dtype: the compiled step is reused)."""
    inner, inj = opt_state
    hp = dict(inj.hyperparams)
    hp["step_size"] = jnp.asarray(scale, jnp.asarray(hp["step_size"]).dtype)
    return (inner, inj._replace(hyperparams=hp))


def _batch_checksum(batch: PyTree) -> jax.Array:
    """A scalar that depends on every leaf of a batch (keeps a timed sampler from being
    optimised away)."""
    leaves = jax.tree_util.tree_leaves(batch)
    return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)


def _index(inputs: PyTree, i) -> PyTree:
    """``inputs[i]`` of every leaf of a pytree of per-step data inputs."""
    return jax.tree_util.tree_map(lambda x: x[i], inputs)


@dataclasses.dataclass(frozen=True)
class _EpochSample:
    """``(data_key, step) -> batch`` as the one-argument sampler that a scan over per-step
    inputs calls. Equal for the same ``sample_at``, so compiled scans are reused."""

    sample_at: Callable[[jax.Array, jax.Array], PyTree]

    def __call__(self, inputs: tuple[jax.Array, jax.Array]) -> PyTree:
        key, step = inputs
        return self.sample_at(key, step)


def sampler_ms(sample: Callable[[Any], PyTree], keys: PyTree, repeats: int = 3) -> float:
    """Milliseconds per batch of ``sample`` alone, run as the train step runs it: one compiled
    ``lax.scan`` over ``keys`` (per-step inputs: an array or a pytree of arrays with a leading
    step axis; median of ``repeats`` timed runs after a compiling one)."""
    count = jax.tree_util.tree_leaves(keys)[0].shape[0]

    @jax.jit
    def scan(keys):
        return jax.lax.scan(lambda c, k: (c + _batch_checksum(sample(k)), None), 0.0, keys)[0]

    jax.block_until_ready(scan(keys))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(scan(keys))
        times.append((time.perf_counter() - t0) / count)
    return 1e3 * float(np.median(times))


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
        bar: Progress,
        plateau: Plateau | None = None,
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
        self.plateau = plateau
        model = problem.model
        self._stats = jax.jit(partial(_probe_stats, model))
        # Per-step data inputs: the step's own key, or (data key, step) for a problem that
        # shuffles per epoch (``Problem.sample_at``).
        if problem.sample_at is None:
            self._sample = problem.sample
        else:
            self._sample = _EpochSample(problem.sample_at)
        self._init = init
        self._compiled: weakref.WeakSet[TrainStep] = weakref.WeakSet()
        self._seed_cache: dict[int, tuple] = {}

    def seed_setup(self, seed: int):
        """``(params, train_key, data inputs (chunks, eval_every), probe batch)`` of a seed:
        the data inputs are ``self._sample``'s per-step arguments, a pytree of arrays."""
        if seed not in self._seed_cache:
            k_init, k_train, k_data, k_probe = jax.random.split(jax.random.key(seed), 4)
            if self.problem.init_params is not None:
                params = self.problem.init_params(k_init)
            elif self._init is not None:
                params = self._init(seed)
            else:
                params = self.problem.params
            shape = (self.chunks, self.eval_every)
            if self.problem.sample_at is None:
                data_keys = jax.random.split(k_data, self.steps).reshape(shape)
            else:
                steps = jnp.arange(self.steps, dtype=jnp.int32).reshape(shape)
                data_keys = (jnp.broadcast_to(k_data, shape), steps)
            probe = jax.vmap(self.problem.sample)(jax.random.split(k_probe, PROBE_BATCHES))
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
        sched = plateau_init(self.plateau) if self.plateau is not None else None
        hist: dict[str, list] = {
            "step": [],
            "validation": [],
            "score": [],
            "train_losses": [],
            "weights": [],
            "cosines": [],
            "grad_norms": [],
            "conflict_fraction": [],
            "learning_rate": [],
        }
        times = []
        best_score, best_params, best_step = math.inf, None, None
        self.bar.label(f"{problem.name} {label} seed {seed}")
        for c in range(self.chunks):
            t0 = time.perf_counter()
            state, metrics = step.scan(state, self._sample, _index(data_keys, c))
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
            if sched is not None:  # the rate of the next chunk, set in the optimizer state
                hist["learning_rate"].append(sched.lr)
                sched = plateau_step(self.plateau, sched, s)
                scale = sched.lr / self.plateau.initial_lr
                state = state._replace(opt_state=set_lr_scale(state.opt_state, scale))
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
    progress: bool | Progress = False,
    plateau: Plateau | None = None,
    step_args: Mapping[str, Mapping[str, Any]] | None = None,
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
      plateau: a :class:`~mtljax._src.bench.suites.Plateau` learning-rate schedule, stepped
        at every evaluation on the run's selection score; the learning rate of each chunk
        goes to the run's ``history["learning_rate"]``. ``None``: the problem's optimizer.
      step_args: ``{label: {argument: value}}``, keyword arguments of
        :func:`~mtljax.make_train_step` for that method's train step (``mode="feature"``,
        ``gramian="jacobian"``…), recorded in its entry as ``step_args`` (a value that is not
        a JSON scalar by its ``repr``). The single-task baselines keep the defaults, so
        methods trained along different paths are compared with the same baselines.

    Returns the problem's section of the report: ``tasks``, ``main_tasks``, ``auxiliary``,
    ``metrics``, ``baselines`` (per task), ``methods`` (per method: per-task test metrics and
    Δm% as mean ± standard error over seeds, median step time, rank, mean rank over the main
    tasks ``mean_rank``, conflict statistics, negative transfer, and every run with its
    validation history), ``leaderboard`` (method labels by rank), ``auxiliary_report`` and
    ``failed`` (``{label: error}``), ``data`` (the share of the step time spent building
    batches: :func:`sampler_ms` against each method's step time) and, for a problem whose
    ``info`` has ``published_stl_mae``, each method's ``delta_m_published`` (Δm% against
    those single-task MAEs) and ``published`` (the comparison with the published Δm%,
    :func:`~mtljax._src.bench.published.compare`).
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
    step_args = {k: dict(v) for k, v in (step_args or {}).items()}
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
    unknown = [k for k in step_args if k not in built and k not in failed]
    if unknown:
        raise ValueError(
            f"run_problem: step_args names {unknown}, which are not methods of this run "
            f"({', '.join(built) or 'none'})"
        )

    t = problem.model.num_tasks
    n_runs = (t + (1 if problem.auxiliary else 0) + len(built)) * len(seed_list)
    own_bar = not isinstance(progress, Progress)
    runner_steps = max(1, math.ceil(steps / eval_every)) * eval_every
    bar = Progress(n_runs * runner_steps, enabled=bool(progress)) if own_bar else progress
    try:
        runner = _ProblemRunner(
            problem,
            steps=steps,
            eval_every=eval_every,
            seeds=seed_list,
            init=init,
            bar=bar,
            plateau=plateau,
        )
        section = _run_problem(problem, runner, built, failed, method_args, step_args)
    finally:
        if own_bar:
            bar.close()
    return section


def _run_problem(problem, runner, built, failed, method_args, step_args) -> dict[str, Any]:
    tasks, main, hib = runner.tasks, runner.main, runner.hib
    t0 = time.perf_counter()
    # Single-task baselines: one separate model per task, all on one compiled step.
    stl = single_task_method()
    optimizer = problem.optimizer
    if runner.plateau is not None:
        optimizer = with_lr_scale(optimizer)
    stl_step = make_train_step(problem.model, stl, optimizer)
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
            options = step_args.get(label, {})
            step = make_train_step(problem.model, method, optimizer, **options)
            runs = [runner.run(label, step, seed, selection_score) for seed in runner.seeds]
            entries[label] = _summarize_method(label, runs, runner, baselines)
            entries[label]["args"] = dict(method_args.get(label, {}))
            if options:  # JSON-friendly: other values (a dtype, a prox) by their repr
                entries[label]["step_args"] = {
                    k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                    for k, v in options.items()
                }
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
    section["data"] = _data_wait(problem, runner, entries, baselines)
    pub_stl = (problem.info or {}).get("published_stl_mae")
    if pub_stl:
        for e in entries.values():
            per_seed = [delta_m(r["test"], pub_stl, hib, main) for r in e["runs"]]
            e["delta_m_published"] = mean_se(per_seed)
        section["published"] = published_lib.compare(
            problem.name, {m: entries[m]["delta_m"]["mean"] for m in labels}
        )
    return section


def _data_wait(problem, runner, entries, baselines) -> dict[str, Any]:
    """Batch building's share of each step: the sampler alone in a compiled scan over the
    keys of the first chunk (at most 100 of them) against the median step time."""
    first = _index(runner.seed_setup(runner.seeds[0])[2], 0)
    ms = sampler_ms(runner._sample, jax.tree_util.tree_map(lambda x: x[:100], first))
    steps = {SINGLE_TASK: float(np.nanmedian([b["step_ms"] for b in baselines.values()]))}
    steps.update({m: e["step_ms"] for m, e in entries.items()})
    share = {m: ms / t if t and math.isfinite(t) else float("nan") for m, t in steps.items()}
    return {"sample_ms": ms, "step_ms": steps, "share": share}


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


def _params_of_seed(spec, problem: Problem) -> Callable[[int], Params] | None:
    """``run_problem``'s ``init`` for a suite's problem: ``None`` where the problem has
    ``init_params``; otherwise the parameters of its seed-``s`` build with the spec's options."""
    if problem.init_params is not None:
        return None
    options = dict(spec.options)

    def init(seed: int) -> Params:
        return problems_lib.get(spec.name, seed=seed, **options).params

    return init


def _eval_every(spec, problem: Problem) -> int:
    """A spec's ``eval_every``; ``"epoch"`` is the problem's ``steps_per_epoch``."""
    if spec.eval_every == "epoch":
        if problem.steps_per_epoch is None:
            raise ValueError(f"problem {problem.name!r} has no epochs; give eval_every steps")
        return int(problem.steps_per_epoch)
    return int(spec.eval_every)


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
        every = _eval_every(spec, problem)
        prepared.append((spec, problem, names, unavailable, n_steps, every))
    total = 0
    for _, problem, names, _, n_steps, every in prepared:
        runs = problem.model.num_tasks + (1 if problem.auxiliary else 0) + len(names)
        total += runs * n_seeds * math.ceil(n_steps / every) * every
    bar = Progress(total, enabled=bool(progress))
    sections = {}
    try:
        for spec, problem, names, unavailable, n_steps, every in prepared:
            bar.epoch(problem.steps_per_epoch)
            section = run_problem(
                problem,
                names,
                steps=n_steps,
                eval_every=every,
                seeds=n_seeds,
                base_seed=base_seed,
                method_args=spec.method_args,
                init=_params_of_seed(spec, problem),
                progress=bar,
                plateau=spec.plateau,
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
