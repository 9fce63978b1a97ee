"""Quality of the layer-subset Gramian: the trained Δm% with weights from the last shared layer
against weights from the exact Gramian.

``benchmarks/gramian_cost.py`` measures what the layer-subset Gramian saves per step and how
close one update is to the exact method's; this script measures what it does to the trained
model. Each weighting method whose update is ``Jᵀw`` (UPGrad, MGDA, Nash-MTL, IMTL-G, CAGrad by
default) trains with its weights ``w = φ(G)`` taken from:

* ``exact``: ``G = J Jᵀ``, the Gramian of the Jacobian w.r.t. all shared parameters
  (``gramian="jacobian"``);
* ``last``: ``G_S = J_S J_Sᵀ`` of the last shared layer ``S`` only (``params="last"``, formed
  from that layer's Jacobian, ``gramian="jacobian"``); the update stays ``∇(w·L)`` over all
  parameters;
* ``feature``: the Gramian of the Jacobian w.r.t. the shared representation
  (``mode="feature"``), another approximation of ``G``, for comparison (the train step
  refuses a layer subset at feature level).

The problem, its options, steps, evaluation interval and method arguments are those of a
benchmark suite (``quick``: multidigits, the MLP trunk 90→128→128 with four linear heads, its
last shared layer the 128→128 one, 16,512 of the 28,160 shared parameters, 600 Adam steps;
``qm9-quick``: the light MPNN on 2,000 molecules, 120 steps with its plateau schedule). Every
path runs in one :func:`mtljax.bench.run_problem` call, so all of them share the single-task
baselines, and each seed gives every path the same initial parameters and batches. Δm% and the
model selection on validation are the runner's. Reported per (method, path): Δm% as mean ±
standard deviation over seeds, the paired difference to ``exact`` on each seed (mean ±
standard deviation), and the median step time (indicative on a shared CPU; Δm% does not
depend on timing). ``ew`` and the runner's ``ew [main only]`` are reference rows.

Usage: ``python benchmarks/gramian_quality.py --seeds 3 --out q.json --markdown q.md``;
``--suite qm9-quick --methods upgrad --seeds 2`` for QM9.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np

from mtljax import methods as methods_lib
from mtljax import problems as problems_lib
from mtljax._src.bench import report as report_lib
from mtljax._src.bench import run as run_lib
from mtljax._src.bench.suites import MAIN_ONLY, get_suite

PATHS = {
    "exact": ({"params": "all"}, {"gramian": "jacobian"}),
    "last": ({"params": "last"}, {"gramian": "jacobian"}),
    "feature": ({"params": "all"}, {"mode": "feature", "gramian": "jacobian"}),
}
METHODS = ("upgrad", "mgda", "nash_mtl", "imtl_g", "cagrad")


def build(suite: str, methods, paths, references, seeds: int, steps: int | None):
    """``(problem section of run_problem, labels {(method, path): label})``."""
    spec = get_suite(suite).problems[0]
    problem = problems_lib.get(spec.name, seed=0, **dict(spec.options))
    built, method_args, step_args, labels = {}, {}, {}, {}
    for name in methods:
        given = run_lib._default_args(name, problem, spec.method_args.get(name, {}))
        for path in paths:
            margs, sargs = PATHS[path]
            label = f"{name} [{path}]"
            built[label] = methods_lib.get(name, **given, **margs)
            method_args[label] = {**spec.method_args.get(name, {}), **margs}
            step_args[label] = sargs
            labels[(name, path)] = label
    for name in references:
        given = run_lib._default_args(name, problem, spec.method_args.get(name, {}))
        built[name] = methods_lib.get(name, **given)
        method_args[name] = dict(spec.method_args.get(name, {}))
    section = run_lib.run_problem(
        problem,
        built,
        steps=steps or spec.steps or problem.steps,
        eval_every=run_lib._eval_every(spec, problem),
        seeds=seeds,
        method_args=method_args,
        init=run_lib._params_of_seed(spec, problem),
        progress=True,
        plateau=spec.plateau,
        step_args=step_args,
    )
    return section, labels


def _std(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.std(v, ddof=1)) if v.size > 1 else math.nan


def rows(section, labels, references):
    """One row per (method, path) and per reference method: Δm% over seeds and, for a path
    other than ``exact``, its paired difference to ``exact`` seed by seed."""
    methods = section["methods"]
    out = []
    for (name, path), label in labels.items():
        if label not in methods:
            out.append({"method": name, "path": path, "failed": section["failed"].get(label)})
            continue
        dm = methods[label]["delta_m"]["values"]
        row = {
            "method": name,
            "path": path,
            "delta_m": dm,
            "delta_m_mean": float(np.mean(dm)),
            "delta_m_std": _std(dm),
            "step_ms": methods[label]["step_ms"],
        }
        exact = labels.get((name, "exact"))
        if path != "exact" and exact in methods:
            diff = np.asarray(dm) - np.asarray(methods[exact]["delta_m"]["values"])
            row["minus_exact"] = diff.tolist()
            row["minus_exact_mean"] = float(diff.mean())
            row["minus_exact_std"] = _std(diff)
        out.append(row)
    for name in [*references, MAIN_ONLY]:
        if name in methods:
            dm = methods[name]["delta_m"]["values"]
            out.append(
                {
                    "method": name,
                    "path": "reference",
                    "delta_m": dm,
                    "delta_m_mean": float(np.mean(dm)),
                    "delta_m_std": _std(dm),
                    "step_ms": methods[name]["step_ms"],
                }
            )
    return out


def table(rows_) -> str:
    lines = [
        "| method | Gramian | Δm% (mean ± std) | Δm% per seed | − exact, paired (mean ± std) "
        "| step ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows_:
        if "delta_m" not in r:
            lines.append(f"| {r['method']} | {r['path']} | failed: {r['failed']} | | | |")
            continue
        seeds = " / ".join(f"{x:+.2f}" for x in r["delta_m"])
        diff = (
            f"{r['minus_exact_mean']:+.2f} ± {r['minus_exact_std']:.2f}"
            if "minus_exact" in r
            else "-"
        )
        lines.append(
            f"| {r['method']} | {r['path']} | {r['delta_m_mean']:+.2f} ± {r['delta_m_std']:.2f} "
            f"| {seeds} | {diff} | {r['step_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="quick", help="the suite whose first problem to run")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--references", nargs="*", default=["ew"], help="methods run as they are")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: the suite's")
    ap.add_argument("--out", default=None, help="JSON: the rows and the whole problem section")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    section, labels = build(
        args.suite, args.methods, args.paths, args.references, args.seeds, args.steps
    )
    result = rows(section, labels, args.references)
    text = table(result)
    head = (
        f"{section['problem']} ({args.suite} suite), {len(section['seeds'])} seeds "
        f"{section['seeds']}, {section['steps']} steps; device {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}"
    )
    print(head)
    print(text)
    if section["failed"]:
        print("failed:", section["failed"])
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(head + "\n\n" + text + "\n")
    if args.out:
        with open(args.out, "w") as fh:
            data = {"suite": args.suite, "rows": result, "section": section}
            json.dump(report_lib._finite_or_none(data), fh, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
