"""The command-line runner: train one (problem, method) pair, or a benchmark suite."""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mtljax import methods as methods_lib
from mtljax import problems as problems_lib
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


class Progress:
    """A minimal progress bar on stderr (silent when ``enabled`` is False)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < 0.2:
            return
        self.last = now
        frac = done / max(self.total, 1)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {rate:7.1f} it/s {extra}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _tolist(x: Any) -> Any:
    return np.asarray(x).tolist()


def _by_task(names: Sequence[str], values: Any) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, np.asarray(values).tolist(), strict=True)}


# ----------------------------------------------------------------------------------------------
# Training one pair


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
) -> dict[str, Any]:
    """Trains ``method_name`` on ``problem_name``; returns a JSON-serialisable result."""
    problem = problems_lib.get(problem_name, seed=seed, **(problem_args or {}))
    method = methods_lib.get(method_name, **(method_args or {}))
    steps = problem.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {steps}")
    model = problem.model
    names = model.task_names
    key_train, key_data = jax.random.split(jax.random.key(seed))
    state = init_train_state(model, problem.params, method, problem.optimizer, key_train)
    step = make_train_step(model, method, problem.optimizer, mode=mode, chunk_size=chunk_size)
    sample = jax.jit(problem.sample)
    data_keys = jax.random.split(key_data, steps)

    log_every = log_every or max(1, steps // 100)
    history: dict[str, list] = {"step": [], "losses": [], "weights": []}
    times: list[float] = []
    bar = Progress(steps, f"{problem_name}/{method_name}", progress)
    t_compile = 0.0
    metrics: dict[str, Any] = {}
    for i in range(steps):
        batch = sample(data_keys[i])
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state.params)
        dt = time.perf_counter() - t0
        if i == 0:
            t_compile = dt
        else:
            times.append(dt)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            losses = np.asarray(metrics["losses"])
            history["step"].append(i + 1)
            history["losses"].append(losses.tolist())
            if "weights" in metrics:
                history["weights"].append(_tolist(metrics["weights"]))
            bar.update(i + 1, f"mean loss {float(np.mean(losses)):.4g}")

    result: dict[str, Any] = {
        "problem": problem_name,
        "method": method_name,
        "method_args": method_args or {},
        "problem_args": problem_args or {},
        "seed": seed,
        "steps": steps,
        "mode": mode,
        "task_names": list(names),
        "final": {"train_losses": _by_task(names, metrics["losses"])},
        "history": {k: v for k, v in history.items() if v},
        "median_step_ms": 1e3 * float(np.median(times)) if times else float("nan"),
        "first_step_s": t_compile,
        "skipped_steps": int(state.skipped),
        "params_sha256": params_sha256(state.params),
        "info": problem.info,
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
    }
    if "weights" in metrics:
        result["final"]["weights"] = _by_task(names, metrics["weights"])
    if "grad_norms" in metrics:
        result["final"]["grad_norms"] = _by_task(names, metrics["grad_norms"])
        result["final"]["cosines"] = _tolist(metrics["cosines"])
    learned = method_state_summary(method_name, state.method_state, names)
    if learned:
        result["final"]["method_state"] = learned
    if problem.evaluate is not None:
        ev = jax.jit(problem.evaluate)(state.params)
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


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


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
        headers.append(field)
        cols.append(values)
    rows = [[n, *(c[n] for c in cols)] for n in names]
    head = (
        f"{result['problem']} / {result['method']}  steps={result['steps']}  "
        f"seed={result['seed']}  median step {result['median_step_ms']:.3g} ms  "
        f"params sha256 {result['params_sha256'][:12]}"
    )
    return head + "\n" + format_table(headers, rows)


# ----------------------------------------------------------------------------------------------
# Suites

SUITES: dict[str, list[tuple[str, str, dict[str, Any], int]]] = {
    # (problem, method, method args, steps)
    "quick": [
        ("gradnorm_toy", "ew", {}, 600),
        ("gradnorm_toy", "uw", {}, 600),
        ("gradnorm_toy", "gradnorm", {}, 600),
        ("uw_noise", "ew", {}, 1500),
        ("uw_noise", "uw", {"learning_rate": 1e-2}, 1500),
        ("uw_noise", "gradnorm", {}, 1500),
    ],
}
SUITES["full"] = [(p, m, a, 5 * s) for p, m, a, s in SUITES["quick"]]


def run_suite(name: str, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    runs = []
    for problem, method, args, steps in SUITES[name]:
        runs.append(
            run_training(
                problem, method, steps=steps, seed=seed, method_args=args, progress=progress
            )
        )
    return {"suite": name, "seed": seed, "runs": runs}


def suite_table(report: dict[str, Any]) -> str:
    rows = []
    for r in report["runs"]:
        ev = r["final"].get("eval", {})
        metric = next(iter(ev), None)
        mean_eval = float(np.mean(list(ev[metric].values()))) if metric else float("nan")
        rows.append(
            [
                r["problem"],
                r["method"],
                r["steps"],
                float(np.mean(list(r["final"]["train_losses"].values()))),
                mean_eval,
                r["median_step_ms"],
            ]
        )
    return format_table(
        ["problem", "method", "steps", "mean train loss", "mean test metric", "step ms"], rows
    )


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
    t.add_argument("--out", default=None, help="write the JSON result here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser(
        "bench",
        help="run a benchmark suite",
        description="Run a suite of (problem, method) pairs and print a table.",
    )
    b.add_argument("--suite", default="quick", help=f"one of: {', '.join(SUITES)}")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=None, help="write the JSON report here")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            result = run_training(
                args.problem,
                args.method,
                steps=args.steps,
                seed=args.seed,
                method_args=parse_method_args(args.method_arg),
                problem_args=parse_method_args(args.problem_arg),
                mode=args.mode,
                chunk_size=args.chunk_size,
                progress=not args.no_progress,
            )
            print(summary_table(result))
        else:
            result = run_suite(args.suite, seed=args.seed, progress=not args.no_progress)
            print(suite_table(result))
    except (ValueError, TypeError) as e:
        parser.exit(2, f"error: {e}\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


__all__ = ["main", "run_training", "run_suite", "params_sha256"]
