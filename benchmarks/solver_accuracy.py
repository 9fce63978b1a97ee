"""Accuracy, iterations and speed of the Gramian methods on the adversarial corpus.

The corpus and the float64 references are the conformance suite's
(``tests/conformance/corpus.py`` and ``tests/conformance/references.py``, numpy and scipy
only, loaded here by path so that the benchmark neither imports the test package nor inherits
its compiler flags): nearly opposite pairs, near-Pareto-stationary cones, rank-deficient and
near-collinear Jacobians, row scales up to 10^{±8} and Gramians of condition number up to 1e12,
drawn ``--repeats`` times per family at each task count.

Each method receives the Gramian rounded to the dtype (``mtljax.weights_from_gramian``, the
whole corpus in one jitted ``lax.map``: a ``vmap`` batches the solvers' Cholesky
factorisations, and jaxlib 0.10's CPU LAPACK kernels split a batch over the intra-op thread
pool they run on and wait for it, which deadlocks when as many batched factorisations run at
once as the pool has threads, as at T = 100 on two cores); a case fails when the relative error
of its direction ``Jᵀw`` exceeds both the tolerance (1e-4 in float32, 1e-8 in float64) and 10×
the change that rounding the input alone causes in the reference (``references.judge``). That
change is estimated from random perturbations and from a worst-case perturbation found by
linearising the reference (``references.worst_case_sensitivity``): one column per input entry
up to ``--max-columns`` entries (default 256: the Gramian's T(T+1)/2 entries up to T = 22,
ConFIG's T × (2T + 2) Jacobian up to T = 10), beyond that one column per group of entries, in
four passes of at most ``--max-columns`` groups each; the random draws alone can under-read
it several times. Per method and task count the table gives the failure rate, the worst
relative error, the worst ratio of the error to what the judge allows, the median and largest
solver iterations, the share of converged solves and the largest final residual (from the
``SolverInfo`` in the method's state, where it keeps one), and the time of one jitted call
(after warm-up), timed on every case: the median over the cases and the slowest case. The
float64 references are small dense problems: OpenBLAS runs single-threaded here
(``OPENBLAS_NUM_THREADS=1`` unless set), which on a shared machine makes them tens of times
faster than with threads that contend for the cores.

Usage: ``python benchmarks/solver_accuracy.py`` (T = 2, 10, 40, 100), ``--quick`` for a small
run, ``--out solver_accuracy.json`` for the figures as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mtljax as mtl  # noqa: E402

_CONFORMANCE = Path(__file__).resolve().parents[1] / "tests" / "conformance"


def _load(name: str):
    """A module of the conformance suite, by path (it imports numpy and scipy only)."""
    spec = importlib.util.spec_from_file_location(
        f"_conformance_{name}", _CONFORMANCE / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _load("corpus")
references = _load("references")

# The methods that run a solver or a factorisation, with a float64 reference and the
# hyper-parameters given to both (the conformance suite's); ConFIG receives the Jacobian, the
# others the Gramian.
METHODS: dict[str, dict] = {
    "mgda": {},
    "upgrad": {},
    "dualproj": {},
    "cagrad": {"c": 0.4, "rescale": False},
    "nash_mtl": {},
    "fairgrad": {"alpha": 2.0},
    "imtl_g": {},
    "config": {},
    "aligned_mtl": {},
    "pcgrad": {},
}


def dims(t: int) -> int:
    return 2 * t + 2


def _call(method):
    """``(g_or_j, loss, state) -> (output, state)``: a weighting method's weights from the
    Gramian, or a Jacobian method's direction from the Jacobian (ConFIG)."""
    if method.weights is not None:
        return lambda g, loss, s: mtl.weights_from_gramian(method, g, loss, s)
    return lambda j, loss, s: mtl.aggregate(method, j, loss, s)


def _inputs(method, case) -> np.ndarray:
    j = case.jacobians[0]
    return references.gramians(j) if method.weights is not None else j


def run_corpus(method, inputs: np.ndarray, losses: np.ndarray, t: int, dtype: str):
    """The method's weights (or direction) and solver figures on every case (one jitted call
    mapping over the cases' ``inputs`` and ``losses``)."""
    call = _call(method)

    def one(x, loss):
        out, state = call(x, loss, method.init(t))
        return out, mtl.solver_info(state)

    with jax.enable_x64(dtype == "float64"):
        w, info = jax.jit(lambda xs, ls: jax.lax.map(lambda a: one(*a), (xs, ls)))(
            jnp.asarray(inputs, dtype), jnp.asarray(losses, dtype)
        )
        w = np.asarray(w, np.float64)
        info = None if info is None else tuple(np.asarray(a) for a in info)
    return w, info


def time_calls(
    method, inputs: np.ndarray, losses: np.ndarray, t: int, dtype: str, reps: int
) -> list[float]:
    """Milliseconds of one jitted call on each case: the median of ``reps`` calls, after two
    warm-up calls on the first case (one compilation serves every case: same shapes)."""
    with jax.enable_x64(dtype == "float64"):
        fn = jax.jit(_call(method))
        state = method.init(t)
        args = [
            (jnp.asarray(x, dtype), jnp.asarray(loss, dtype))
            for x, loss in zip(inputs, losses, strict=True)
        ]
        for _ in range(2):
            jax.block_until_ready(fn(*args[0], state))
        per_case = []
        for x, loss in args:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, loss, state))
                times.append(time.perf_counter() - t0)
            per_case.append(1e3 * statistics.median(times))
    return per_case


def measure(name: str, t: int, dtype: str, repeats: int, reps: int, seed: int) -> dict:
    kwargs = METHODS[name]
    cases = corpus.jacobian_corpus(seed, t, dims(t), steps=1, repeats=repeats)
    method = mtl.methods.get(name, **kwargs)
    inputs = np.stack([_inputs(method, c) for c in cases])
    losses = np.stack([c.losses[0] for c in cases])
    w, info = run_corpus(method, inputs, losses, t, dtype)
    verdicts = []
    for i, c in enumerate(cases):
        verdicts += references.judge(
            name, c.name, c.jacobians, c.losses, w[i : i + 1], kwargs, dtype, seed=i
        )
    judged = [v for v in verdicts if v.outcome != "undefined"]
    failed = [v for v in judged if v.outcome in ("fail", "nonfinite")]
    errors = [v.error for v in judged]
    excess = [v.error / v.allowed for v in judged]
    row = {
        "method": name,
        "T": t,
        "dtype": dtype,
        "cases": len(judged),
        "undefined": len(verdicts) - len(judged),
        "failures": len(failed),
        "failure_rate": len(failed) / max(len(judged), 1),
        "worst_error": max(errors, default=float("nan")),
        "worst_excess": max(excess, default=float("nan")),
        "failed_cases": sorted({v.case for v in failed}),
    }
    ms = time_calls(method, inputs, losses, t, dtype, reps)
    slowest = int(np.argmax(ms))
    row.update(
        ms_per_call=float(np.median(ms)),
        ms_per_call_max=float(ms[slowest]),
        slowest_case=cases[slowest].name,
    )
    if info is not None:
        iters, conv, residual = info
        row.update(
            iterations_median=float(np.median(iters)),
            iterations_max=int(np.max(iters)),
            converged=float(np.mean(conv)),
            residual_max=float(np.max(residual)),
        )
    return row


def fmt(x, spec):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def print_tables(rows: list[dict]) -> None:
    """One markdown table per method: a row per task count (and dtype)."""
    for name in dict.fromkeys(r["method"] for r in rows):
        print(f"\n### `{name}`\n")
        print(
            "| T | dtype | failures | worst error | worst error / allowed | iterations "
            "(median / max) | converged | worst solver residual | ms per call (median / max) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["method"] == name):
            its = (
                f"{fmt(r.get('iterations_median'), 'g')} / {fmt(r.get('iterations_max'), 'd')}"
                if "iterations_max" in r
                else "–"
            )
            conv = fmt(r.get("converged"), ".0%") if "converged" in r else "–"
            print(
                f"| {r['T']} | {r['dtype']} | {r['failures']}/{r['cases']} "
                f"({r['failure_rate']:.0%}) | {fmt(r['worst_error'], '.1e')} | "
                f"{fmt(r['worst_excess'], '.2g')} | {its} | {conv} | "
                f"{fmt(r.get('residual_max'), '.1e')} | {r['ms_per_call']:.3g} / "
                f"{r['ms_per_call_max']:.3g} (`{r['slowest_case']}`) |"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40, 100])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3, help="draws of every corpus family")
    p.add_argument("--reps", type=int, default=5, help="timed calls per case")
    p.add_argument("--methods", nargs="*", default=None, help=f"default: {' '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--max-columns",
        type=int,
        default=references.MAX_COLUMNS,
        help="largest number of columns the judge linearises per pass for its worst-case "
        f"sensitivity (default {references.MAX_COLUMNS}: one per entry for a Gramian up to "
        "T = 22; beyond, groups of entries)",
    )
    p.add_argument("--quick", action="store_true", help="T = 2 and 10, one draw per family")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    references.MAX_COLUMNS = args.max_columns
    if args.quick:
        args.tasks, args.repeats, args.reps = [2, 10], 1, 3
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"no reference for {unknown}; choose from {list(METHODS)}")
    rows = []
    for name in methods:
        for t in args.tasks:
            for dtype in args.dtypes:
                rows.append(measure(name, t, dtype, args.repeats, args.reps, args.seed))
                print(
                    f"{name} T={t} {dtype}: {rows[-1]['failures']}/{rows[-1]['cases']} fail",
                    file=sys.stderr,
                )
    print(f"device: {jax.devices()[0]}  jax {jax.__version__}  repeats={args.repeats}")
    print_tables(rows)
    if args.out:
        meta = {
            "device": str(jax.devices()[0]),
            "jax": jax.__version__,
            "repeats": args.repeats,
            "max_columns": args.max_columns,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
