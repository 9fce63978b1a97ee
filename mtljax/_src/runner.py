"""The command-line runner: train one (problem, method) pair, or a benchmark suite."""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import bench
from mtljax import methods as methods_lib
from mtljax import problems as problems_lib
from mtljax._src import base, paths
from mtljax._src.display import Progress, format_table
from mtljax._src.problems.base import evaluation_input
from mtljax._src.train import init_train_state, make_train_step

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Small utilities


def params_sha256(tree: PyTree) -> str:
    """SHA-256 over the leaves' paths, dtypes, shapes and bytes: equal iff bit-identical."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def parse_method_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["alpha=1.5", "kinds=cls"]`` -> ``{"alpha": 1.5, "kinds": "cls"}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--method-arg expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def _tolist(x: Any) -> Any:
    return np.asarray(x).tolist()


def _by_task(names: Sequence[str], values: Any) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, np.asarray(values).tolist(), strict=True)}


# ----------------------------------------------------------------------------------------------
# Training one pair


def _infer_batch_axes(problem: Any, example: Any) -> Any:
    """Each batch field's example axis: from the model's ``batch_spec``, else by convention.

    Without a spec, a field's example axis is axis 0, or axis 1 for a field stacked per task
    (leading axis of size ``T``, like the targets ``(T, B, out)`` of the built-in regression
    problems); every field must then agree on the number of examples.
    """
    from mtljax._src import model as model_lib
    from mtljax._src import tree as tree_lib

    spec = getattr(problem.model, "batch_spec", None)
    if spec is not None:
        return model_lib.batch_axes_of(spec)
    t = problem.model.num_tasks
    flat, treedef = jax.tree_util.tree_flatten_with_path(example)
    axes, sizes = [], []
    for path, leaf in flat:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"batch field {tree_lib.path_str(path)!r} is a scalar: it has no example axis"
            )
        ax = 1 if len(shape) >= 2 and shape[0] == t else 0
        axes.append(ax)
        sizes.append((tree_lib.path_str(path), shape, shape[ax]))
    if len({n for _, _, n in sizes}) > 1:
        found = ", ".join(f"{name!r} {shape}" for name, shape, _ in sizes)
        raise ValueError(
            f"cannot tell each batch field's example axis ({found}): give the problem's model "
            "a batch_spec (mtljax.BatchField) to train it on several devices"
        )
    return jax.tree_util.tree_unflatten(treedef, axes)


def _validation_metric(problem: Any, params: Any) -> float | None:
    """A scalar to rank checkpoints by (lower is better), or ``None``; ``params``: what
    :func:`~mtljax._src.problems.base.evaluation_input` gives.

    The mean over main tasks of the validation split's task metrics (negated where higher is
    better) when the problem declares them; otherwise the mean of its held-out ``evaluate``
    metric.
    """
    try:
        if (
            getattr(problem, "evaluate_split", None) is not None
            and getattr(problem, "metrics", None)
            and "validation" in getattr(problem, "splits", ())
        ):
            values = problem.task_metrics(params, "validation")
            signed = [
                -float(values[t]) if problem.metrics[t][1] else float(values[t])
                for t in problem.main_tasks
            ]
            return float(np.mean(signed))
        if problem.evaluate is not None:
            ev = jax.jit(problem.evaluate)(params)
            return float(np.mean(np.asarray(next(iter(ev.values())))))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


def _metrics_json(metrics: dict[str, Any], method: Any) -> dict[str, Any]:
    """The metrics a run records: the losses, and the weights, gradient norms and cosines
    when ``method`` computes them (every step reports them, NaN when not computed)."""
    keep = ["losses"]
    if method.weights is not None:
        keep.append("weights")
    if method.needs != "losses":
        keep += ["grad_norms", "cosines"]
    return {k: np.asarray(metrics[k]).tolist() for k in keep}


def max_seed() -> int:
    """The largest seed a JAX key takes whole: 2³² − 1, or 2⁶³ − 1 under ``jax_enable_x64``
    (a larger seed would be truncated, repeating a smaller seed's run)."""
    return 2**63 - 1 if jax.config.jax_enable_x64 else 2**32 - 1


def check_seed(seed: Any, what: str = "--seed") -> int:
    """``seed`` as an int in ``[0, max_seed()]``, or a ``ValueError`` saying the range."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= max_seed():
        raise ValueError(
            f"{what} must be an integer from 0 to {max_seed()} (a JAX key takes "
            f"{64 if jax.config.jax_enable_x64 else 32}-bit seeds: a larger one would repeat "
            f"a smaller seed's run), got {seed}"
        )
    return int(seed)


def _check_problem_args(problem_args: dict[str, Any]) -> None:
    """Options every built-in problem reads the same way, checked before the problem is built."""
    for key in ("batch_size", "num_tasks", "num_train", "num_test"):
        if key in problem_args:
            v = problem_args[key]
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"--problem-arg {key} must be a positive integer, got {v!r}")


def _close_after_error(ckpt: Any) -> None:
    """Closes a checkpointer while an error propagates; the first error is the one to report."""
    try:
        ckpt.close()
    except Exception:
        pass


def _saved_gramian_path(ckpt: Any) -> str:
    """The Gramian path a checkpoint folder's newest readable record was written with:
    ``"jacobian"`` where the record has none (written before the option, or with that path),
    ``"auto"`` for a folder without checkpoints yet (a new run)."""
    from mtljax._src.checkpoint import CheckpointDamagedError

    for step in reversed(ckpt.steps()):
        try:
            record = ckpt.record(step)
        except CheckpointDamagedError:  # the restore skips it too, and says so
            continue
        return (record.get("config") or {}).get("gramian", "jacobian")
    return "auto"


def _checkpoint_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    return "resume" if resume else "overwrite" if overwrite else "new"


def run_training(
    problem_name: str,
    method_name: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    method_args: dict[str, Any] | None = None,
    problem_args: dict[str, Any] | None = None,
    mode: str = "parameter",
    chunk_size: int | None = None,
    log_every: int = 0,
    progress: bool = True,
    ckpt_dir: str | None = None,
    save_every: int | None = None,
    keep: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    devices: int | None = None,
    fsdp: bool = False,
    nonfinite: str = "skip",
    unconverged: str = "report",
    compute_dtype: str | None = None,
    gramian_chunk_size: int | None = None,
    gramian: str | None = None,
) -> dict[str, Any]:
    """Trains ``method_name`` on ``problem_name``; returns a JSON-serialisable result.

    The batch of step ``i`` is ``problem.sample_step(data_key, i)`` (``sample_at`` of a problem
    that shuffles per epoch, else ``sample(fold_in(data_key, i))``) with ``data_key``
    derived from ``seed``: the data position is the step count, so a run resumed from a
    checkpoint (``ckpt_dir``, ``resume``) sees exactly the batches the uninterrupted run would
    have, and ends with bit-identical parameters. ``devices`` > 1 trains data-parallel on that
    many devices (the same global batches; equal to one device up to float32 rounding).

    With ``ckpt_dir``, the folder is checked and locked before anything is built or compiled
    (see :class:`mtljax.Checkpointer`); ``resume`` continues from its newest intact
    checkpoint, ``overwrite`` replaces its checkpoints, and a folder that holds checkpoints
    is refused otherwise.
    A method whose factory takes ``steps_per_epoch`` (``dwa``) gets the problem's unless
    ``method_args`` sets it. ``nonfinite`` and ``unconverged`` are
    :func:`mtljax.make_train_step`'s: what a non-finite step or a solver that did not
    converge does (``unconverged="raise"`` stops with a :class:`mtljax.SolverError` naming
    the step). ``gramian`` is :func:`mtljax.make_train_step`'s Gramian path; ``None`` (the
    default) means ``"auto"`` for a new run and, when resuming, the path the checkpoint was
    written with (``"jacobian"`` for checkpoints that do not record one), so that the resumed
    run continues bit for bit.
    """
    from mtljax._src import sharding
    from mtljax._src.checkpoint import (
        Checkpointer,
        CheckpointExistsError,
        DamagedCheckpointWarning,
    )

    seed = check_seed(seed)
    _check_problem_args(problem_args or {})
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {steps}")
    if not ckpt_dir:
        given = [
            flag
            for flag, value in (
                ("--resume", resume),
                ("--overwrite", overwrite),
                ("--save-every", save_every is not None),
                ("--keep", keep is not None),
            )
            if value
        ]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --ckpt-dir")
    else:
        ckpt_mode = _checkpoint_mode(resume, overwrite)
        if save_every is not None and save_every < 1:
            raise ValueError(f"--save-every must be ≥ 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"--keep must be ≥ 1, got {keep}")
        paths.check_output_dir(ckpt_dir, "--ckpt-dir")

    problem = problems_lib.get(problem_name, seed=seed, **(problem_args or {}))
    method = methods_lib.get(
        method_name,
        like=problem.params.shared,
        **bench.epoch_args(method_name, problem, method_args or {}),
    )
    steps = problem.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {steps}")
    ckpt = None
    if ckpt_dir:
        # Locked before the state is built and the step compiled: a second writer, or a
        # folder that cannot be used, is refused at once.
        config = {
            "problem": problem_name,
            "problem_args": problem_args or {},
            "method_args": method_args or {},
            "seed": seed,
            "mode": mode,
            "chunk_size": chunk_size,
            "gramian_chunk_size": gramian_chunk_size,
            # (only when not "jacobian": checkpoints written before the option still resume)
            **({"gramian": gramian} if gramian not in (None, "jacobian") else {}),
            "compute_dtype": None if compute_dtype is None else str(np.dtype(compute_dtype)),
        }
        try:
            ckpt = Checkpointer(
                ckpt_dir,
                keep=3 if keep is None else keep,
                method=method,
                task_names=problem.model.task_names,
                config=config,
                optimizer=problem.optimizer,
                mode=ckpt_mode,
            )
        except CheckpointExistsError as e:
            raise ValueError(
                f"{ckpt_dir} already holds checkpoints (latest: step {e.latest}); pass --resume "
                "to continue from it, --overwrite to replace them, or choose another --ckpt-dir"
            ) from None
    try:
        if gramian is None:  # a resumed run continues on its checkpoints' path
            gramian = _saved_gramian_path(ckpt) if ckpt is not None and resume else "auto"
            if ckpt is not None and gramian != "jacobian":
                ckpt.config["gramian"] = gramian
        model = problem.model
        names = model.task_names
        key_train, key_data = jax.random.split(jax.random.key(seed))
        state = init_train_state(model, problem.params, method, problem.optimizer, key_train)
        step = make_train_step(
            model,
            method,
            problem.optimizer,
            mode=mode,
            chunk_size=chunk_size,
            nonfinite=nonfinite,
            unconverged=unconverged,
            compute_dtype=compute_dtype,
            gramian_chunk_size=gramian_chunk_size,
            gramian=gramian,
        )
        data_key = np.asarray(jax.random.key_data(key_data))
        impl = str(jax.random.key_impl(key_data))

        def sample_at(kd, i):
            return problem.sample_step(jax.random.wrap_key_data(kd, impl=impl), i)

        num_devices = 1 if devices is None else int(devices)
        if num_devices > 1 or fsdp or jax.process_count() > 1:
            if problem.single_device:
                raise ValueError(
                    f"problem {problem_name!r} trains on one device only: "
                    f"{problem.single_device}; run it with devices=1 (--devices 1)"
                )
            example = jax.eval_shape(sample_at, data_key, np.int32(0))
            if not jax.tree_util.tree_leaves(example):
                raise ValueError(f"problem {problem_name!r} has no data to split across devices")
            mesh = sharding.make_mesh(num_devices if jax.process_count() == 1 else None)
            num_devices = mesh.size
            step = sharding.data_parallel(
                step, mesh, batch_axes=_infer_batch_axes(problem, example), fsdp=fsdp
            )
            state = step.place_state(state)
            sample = jax.jit(sample_at, out_shardings=step.batch_shardings(example))
        else:
            sample = jax.jit(sample_at)
        main_process = jax.process_index() == 0

        log_every = log_every or max(1, steps // 100)
        history: dict[str, list] = {"step": [], "losses": [], "weights": []}
        last_metrics: dict[str, Any] = {}
        start = 0
        if ckpt is not None:
            save_every = save_every or max(1, steps // 10)
            latest = ckpt.latest_step()
            if latest is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DamagedCheckpointWarning)
                    restored = ckpt.restore(state)
                if restored.skipped and main_process:
                    for s, reason in restored.skipped:
                        sys.stderr.write(
                            f"warning: skipped the damaged checkpoint of step {s} in {ckpt_dir} "
                            f"({reason}); moved it to {s}.damaged\n"
                        )
                    sys.stderr.write(
                        f"note: resuming from step {restored.step}, the newest intact checkpoint\n"
                    )
                state = restored.state
                start = int(restored.data_position)
                if start > steps:
                    raise ValueError(
                        f"the checkpoint in {ckpt_dir} is at step {start}, beyond --steps {steps}"
                    )
                history = {k: list(v) for k, v in restored.extra.get("history", history).items()}
                last_metrics = dict(restored.extra.get("last_metrics", {}))
                saved_devices = restored.extra.get("devices")
                if saved_devices not in (None, num_devices) and main_process:
                    sys.stderr.write(
                        f"note: resuming on {num_devices} device(s) a run saved on "
                        f"{saved_devices}: results match to float32 rounding, not bit for bit\n"
                    )
            elif resume and main_process:
                sys.stderr.write(f"note: no checkpoint in {ckpt_dir} yet; starting from step 0\n")

        times: list[float] = []
        bar = Progress(steps, f"{problem_name}/{method_name}", progress and main_process)
        t_compile = 0.0
        metrics: dict[str, Any] = {}
        solves = None  # (unconverged solves, most iterations) over this run's steps, on device
        has_solver = base.solver_info(state.method_state) is not None
        for i in range(start, steps):
            batch = sample(data_key, np.int32(i))
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            if has_solver:
                failed = jnp.sum(~metrics["solver_converged"], dtype=jnp.int32)
                iters = jnp.max(metrics["solver_iterations"])
                solves = (
                    (failed, iters)
                    if solves is None
                    else (solves[0] + failed, jnp.maximum(solves[1], iters))
                )
            jax.block_until_ready(state.params)
            dt = time.perf_counter() - t0
            if i == start:
                t_compile = dt
            else:
                times.append(dt)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                losses = np.asarray(metrics["losses"])
                history["step"].append(i + 1)
                history["losses"].append(losses.tolist())
                if method.weights is not None:
                    history["weights"].append(_tolist(metrics["weights"]))
                bar.update(i + 1, f"mean loss {float(np.mean(losses)):.4g}")
            if ckpt is not None and ((i + 1) % save_every == 0 or i + 1 == steps):
                last_metrics = _metrics_json(metrics, method)
                ckpt.save(
                    state,
                    data_position=i + 1,
                    metric=_validation_metric(
                        problem, sharding.to_host(evaluation_input(model, state))
                    ),
                    extra={
                        "history": history,
                        "last_metrics": last_metrics,
                        "devices": num_devices,
                    },
                )
        bar.close()
    except BaseException:
        if ckpt is not None:
            _close_after_error(ckpt)
        raise
    if ckpt is not None:
        ckpt.close()  # waits for the last save: a failure is raised here
    if metrics:
        last_metrics = _metrics_json(metrics, method)
    params = sharding.to_host(state.params)
    trained = params if not model.has_state else sharding.to_host(state)

    result: dict[str, Any] = {
        "problem": problem_name,
        "method": method_name,
        "method_args": method_args or {},
        "problem_args": problem_args or {},
        "seed": seed,
        "steps": steps,
        "mode": mode,
        "task_names": list(names),
        "final": {"train_losses": _by_task(names, last_metrics["losses"])},
        "history": {k: v for k, v in history.items() if v},
        "median_step_ms": 1e3 * float(np.median(times)) if times else float("nan"),
        "first_step_s": t_compile,
        "skipped_steps": int(sharding.to_host(state.skipped)),
        "params_sha256": params_sha256(params),
        "info": problem.info,
        "device": str(jax.devices()[0]),
        "devices": num_devices,
        "process_count": jax.process_count(),
        "resumed_from": start,
        "jax_version": jax.__version__,
    }
    if solves is not None:
        # Steps of this run (since the resume, when resumed) whose solve did not converge.
        result["solver"] = {
            "unconverged_steps": int(sharding.to_host(solves[0])),
            "max_iterations": int(sharding.to_host(solves[1])),
            "unconverged": unconverged,
        }
    if compute_dtype is not None:
        result["compute_dtype"] = str(np.dtype(compute_dtype))
    if "weights" in last_metrics:
        result["final"]["weights"] = _by_task(names, last_metrics["weights"])
    if "grad_norms" in last_metrics:
        result["final"]["grad_norms"] = _by_task(names, last_metrics["grad_norms"])
        result["final"]["cosines"] = last_metrics["cosines"]
    learned = method_state_summary(method_name, sharding.to_host(state.method_state), names)
    if learned:
        result["final"]["method_state"] = learned
    if problem.evaluate is not None:
        ev = jax.jit(problem.evaluate)(trained)
        result["final"]["eval"] = {k: _by_task(names, v) for k, v in ev.items()}
    return result


def method_state_summary(name: str, state: PyTree, names: Sequence[str]) -> dict[str, Any]:
    """The per-task arrays of a method's state (e.g. UW's log-variances), by field name."""
    out: dict[str, Any] = {}
    fields = getattr(state, "_fields", ())
    for field in fields:
        value = getattr(state, field)
        if hasattr(value, "shape") and value.shape == (len(names),):
            out[field] = _by_task(names, value)
    return out


# ----------------------------------------------------------------------------------------------
# Tables


def summary_table(result: dict[str, Any]) -> str:
    names = result["task_names"]
    final = result["final"]
    headers = ["task", "train loss"]
    cols = [final["train_losses"]]
    for metric, values in final.get("eval", {}).items():
        headers.append(f"test {metric}")
        cols.append(values)
    for key in ("weights", "grad_norms"):
        if key in final:
            headers.append(key.replace("_", " "))
            cols.append(final[key])
    for field, values in final.get("method_state", {}).items():
        # The method's state after the last update (GradNorm's weights for the next step), beside
        # the last step's metrics above.
        headers.append(f"state {field.replace('_', ' ')}")
        cols.append(values)
    rows = [[n, *(c[n] for c in cols)] for n in names]
    head = (
        f"{result['problem']} / {result['method']}  steps={result['steps']}  "
        f"seed={result['seed']}  median step {result['median_step_ms']:.3g} ms  "
        f"params sha256 {result['params_sha256'][:12]}"
    )
    text = head + "\n" + format_table(headers, rows)
    skipped = result.get("skipped_steps", 0)
    if skipped:
        text += (
            f"\n{skipped} of {result['steps']} steps were skipped (a non-finite loss, gradient "
            "or update left the state untouched); --nonfinite raise names the first such step "
            "and task"
        )
    solver = result.get("solver", {})
    if solver.get("unconverged_steps"):
        what = "skipped" if solver["unconverged"] == "skip" else "applied as they were"
        text += (
            f"\n{solver['unconverged_steps']} steps' solves did not converge ({what}; at most "
            f"{solver['max_iterations']} iterations); --unconverged raise names the first"
        )
    return text


# ----------------------------------------------------------------------------------------------
# Suites: the benchmark engine is mtljax.bench (single-task baselines, Δm%, seeds, validation)

SUITES = bench.SUITES


def run_suite(
    name: str,
    *,
    seed: int = 0,
    seeds: int | None = None,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    progress: bool = True,
    plots: str | None = None,
) -> dict[str, Any]:
    """Runs the benchmark suite ``name`` (see :func:`mtljax.bench.run_suite`); ``seed`` is the
    first seed, ``seeds`` how many (the suite's default when ``None``)."""
    return bench.run_suite(
        name,
        base_seed=seed,
        seeds=seeds,
        methods=methods,
        steps=steps,
        progress=progress,
        plots=plots,
    )


def suite_table(report: dict[str, Any]) -> str:
    """The report's leaderboards as text."""
    return bench.leaderboard_text(report)


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtljax",
        description="Train multi-task models with mtljax methods on built-in problems.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train one method on one problem",
        description="Train one method on one built-in problem.",
    )
    t.add_argument("--problem", required=True, help=f"one of: {', '.join(problems_lib.names())}")
    t.add_argument("--method", required=True, help=f"one of: {', '.join(methods_lib.names())}")
    t.add_argument(
        "--method-arg",
        action="append",
        metavar="NAME=VALUE",
        help="a method hyper-parameter (repeatable), e.g. alpha=1.5",
    )
    t.add_argument(
        "--problem-arg",
        action="append",
        metavar="NAME=VALUE",
        help="a problem option (repeatable), e.g. num_tasks=4",
    )
    t.add_argument(
        "--arch",
        default=None,
        help="the sharing structure, for problems that offer several (mmoe_synthetic: "
        "shared_bottom, omoe, mmoe, cgc, ple, dselect_k, cross_stitch, soft_sharing; "
        "multidigits: mlp, resnet)",
    )
    t.add_argument("--steps", type=int, default=None, help="training steps (problem default)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--mode",
        choices=("parameter", "feature"),
        default="parameter",
        help="Jacobian w.r.t. shared parameters or the shared representation",
    )
    t.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="compute the Jacobian this many tasks at a time (caps memory)",
    )
    t.add_argument(
        "--gramian-chunk-size",
        type=int,
        default=None,
        help="weighting methods: accumulate the Gramian this many tasks at a time, never "
        "forming the T x P Jacobian",
    )
    t.add_argument(
        "--gramian",
        choices=("auto", "jacobian", "layerwise"),
        default=None,
        help="weighting methods: 'layerwise' computes the Gramian layer by layer without "
        "per-task weight gradients for dense layers (exact; pays when the batch is smaller "
        "than the layers' width); 'auto' takes it where it counts fewer multiply-adds "
        "(default for a new run; --resume continues on the checkpoint's path)",
    )
    t.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="mixed precision: compute the model in this dtype (float32 master weights, "
        "float32 Jacobian and solver inputs)",
    )
    t.add_argument(
        "--nonfinite",
        choices=("skip", "raise"),
        default="skip",
        help="a non-finite loss or gradient: skip the step (counted), or stop with an error "
        "naming the task and step",
    )
    t.add_argument(
        "--unconverged",
        choices=("report", "skip", "raise"),
        default="report",
        help="a method's solver that did not converge (MGDA, CAGrad, Nash-MTL, UPGrad…): apply "
        "the step and report it (solver_converged), skip the step, or stop with an error naming "
        "the step",
    )
    t.add_argument("--out", default=None, help="write the JSON result here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = t.add_argument_group("checkpoints")
    c.add_argument("--ckpt-dir", default=None, metavar="DIR", help="save checkpoints here")
    c.add_argument(
        "--save-every", type=int, default=None, metavar="K", help="save every K steps (steps/10)"
    )
    c.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="N",
        help="keep the N latest checkpoints (+ best; default 3)",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in --ckpt-dir (if there is one)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints already in --ckpt-dir (mtljax's only) and start anew",
    )
    d = t.add_argument_group("devices")
    d.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel over N devices (simulated on a CPU-only machine); with several "
        "processes, N devices per process",
    )
    d.add_argument(
        "--fsdp", action="store_true", help="also split parameters and optimizer state (FSDP)"
    )
    d.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process: process 0's address (jax.distributed)",
    )
    d.add_argument("--num-processes", type=int, default=None, help="multi-process: how many")
    d.add_argument("--process-id", type=int, default=None, help="multi-process: this one's index")

    b = sub.add_parser(
        "bench",
        help="benchmark methods against single-task baselines",
        description=(
            "Benchmark methods on built-in problems: single-task baselines, several seeds, "
            "model selection on the validation split, test metrics, Δm%, step times; prints a "
            "leaderboard. Suites: " + "; ".join(f"{k}: {v.description}" for k, v in SUITES.items())
        ),
    )
    b.add_argument("--suite", default="quick", help=f"one of: {', '.join(SUITES)}")
    b.add_argument("--seed", type=int, default=0, help="the first seed")
    b.add_argument("--seeds", type=int, default=None, help="number of seeds (suite's default)")
    b.add_argument(
        "--methods",
        default=None,
        metavar="M1,M2,…",
        help="comma-separated methods to run (default: the suite's)",
    )
    b.add_argument("--steps", type=int, default=None, help="steps per run (suite's default)")
    b.add_argument("--out", default=None, help="write the JSON report here")
    b.add_argument(
        "--plots", default=None, metavar="DIR", help="write PNG plots here (needs matplotlib)"
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _setup_devices(args: argparse.Namespace) -> bool:
    """Multi-process wiring and simulated CPU devices, before JAX starts; True on process 0."""
    from mtljax._src import sharding

    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be ≥ 1, got {args.devices}")
    distributed = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in distributed):
        if args.coordinator is None or args.num_processes is None or args.process_id is None:
            raise ValueError(
                "multi-process runs need --coordinator, --num-processes and --process-id"
            )
        sharding.initialize_distributed(
            args.coordinator, args.num_processes, args.process_id, cpu_devices=args.devices
        )
        if args.devices is not None:
            args.devices = jax.device_count()
        return jax.process_index() == 0
    if args.devices is not None and args.devices > 1:
        sharding.set_cpu_devices(args.devices)
    return True


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path of the command can be written, checked before any work (a finished
    run must not be lost to its output path); flags that need ``--ckpt-dir`` have it."""
    if args.command == "train":
        needs_dir = [
            flag
            for flag, given in (
                ("--resume", args.resume),
                ("--overwrite", args.overwrite),
                ("--save-every", args.save_every is not None),
                ("--keep", args.keep is not None),
            )
            if given
        ]
        if needs_dir and not args.ckpt_dir:
            raise ValueError(f"{', '.join(needs_dir)} need(s) --ckpt-dir")
        _checkpoint_mode(args.resume, args.overwrite)
        check_seed(args.seed)
        if args.ckpt_dir:
            paths.check_output_dir(args.ckpt_dir, "--ckpt-dir")
    else:
        check_seed(args.seed)
        if args.seeds is not None:
            if args.seeds < 1:
                raise ValueError(f"--seeds must be ≥ 1, got {args.seeds}")
            check_seed(args.seed + args.seeds - 1, "--seed + --seeds - 1")
        if args.plots:
            paths.check_output_dir(args.plots, "--plots")
    if args.out:
        paths.check_output_file(args.out, "--out")


def write_json(path: str, result: Any) -> None:
    """Writes ``result`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    main_process = True
    try:
        check_outputs(args)
        if args.command == "train":
            main_process = _setup_devices(args)
            result = run_training(
                args.problem,
                args.method,
                steps=args.steps,
                seed=args.seed,
                method_args=parse_method_args(args.method_arg),
                problem_args={
                    **parse_method_args(args.problem_arg),
                    **({"arch": args.arch} if args.arch else {}),
                },
                mode=args.mode,
                chunk_size=args.chunk_size,
                progress=not args.no_progress,
                ckpt_dir=args.ckpt_dir,
                save_every=args.save_every,
                keep=args.keep,
                resume=args.resume,
                overwrite=args.overwrite,
                devices=args.devices,
                fsdp=args.fsdp,
                nonfinite=args.nonfinite,
                unconverged=args.unconverged,
                compute_dtype=args.compute_dtype,
                gramian_chunk_size=args.gramian_chunk_size,
                gramian=args.gramian,
            )
            if main_process:
                print(summary_table(result))
        else:
            methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
            result = run_suite(
                args.suite,
                seed=args.seed,
                seeds=args.seeds,
                methods=methods,
                steps=args.steps,
                progress=not args.no_progress,
                plots=args.plots,
            )
            print(suite_table(result))
            for path in result.get("plots", []):
                print(f"wrote {path}")
            result = bench.to_json(result)
    except (ValueError, TypeError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")
    except (FloatingPointError, RuntimeError, OSError) as e:
        parser.exit(1, f"error: {e}\n")
    if args.out and main_process:
        try:
            write_json(args.out, result)
        except OSError as e:
            sha = result.get("params_sha256") if isinstance(result, dict) else None
            saved = f" (the final checkpoint is in {args.ckpt_dir})" if _ckpt_dir(args) else ""
            parser.exit(
                1,
                f"error: could not write --out {args.out}: {e}{saved}"
                + (f"; final parameters' sha256 {sha}" if sha else "")
                + "\n",
            )
        print(f"wrote {args.out}")
    return 0


def _ckpt_dir(args: argparse.Namespace) -> str | None:
    return getattr(args, "ckpt_dir", None)


__all__ = ["main", "run_training", "run_suite", "params_sha256"]
