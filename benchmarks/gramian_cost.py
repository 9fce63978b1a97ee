"""Cost and quality of three Gramians: full Jacobian, layer subset, layer-wise.

Model: the MLP of ``benchmarks/step_cost.py`` (128→H→H→256, ReLU, T linear heads, per-task
MSE, batch B). For each ``T``, in one process:

* the Gramian alone (jitted ``losses, G``): from the full Jacobian w.r.t. the shared
  parameters (``T`` mapped backward passes, ``G = J Jᵀ``); from the last shared layer only
  (``params="last"``: the backward passes stop there); layer-wise
  (:func:`mtljax.gramian_layerwise` as the engine runs it, ``gramian="layerwise"``);
* a full UPGrad train step along each path and the plain-JAX EW step (the floor of any step);
* the multiply-adds of the Gramian's per-task part along each path (per-task weight gradients
  and their inner products, or the layer-wise products; the ``T`` backward passes through the
  activations are common to the full and the layer-wise paths and not counted);
* the quality of the update: the cosine between the shared update ``Jᵀw`` with the weights
  from each path's Gramian and the exact method's (weights from the full Gramian), for UPGrad
  and MGDA, at initialisation and after some EW steps.

Usage: ``python benchmarks/gramian_cost.py --tasks 10 40 --hidden 512 --batch 256``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

import mtljax as mtl
from mtljax._src import engine
from mtljax._src import gramian_layerwise as gl
from mtljax._src import tree as tree_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_cost  # noqa: E402  (the same model and timing as the step-cost table)

PATHS = {
    "full Jacobian": dict(subset="all", gramian="jacobian"),
    "last layer": dict(subset="last", gramian="jacobian"),
    "layer-wise": dict(subset="all", gramian="layerwise"),
}


def _gramian_fn(model, path):
    def fn(params, batch):
        q = engine.compute(model, params, batch, needs="gramian", **path)
        return q.losses, q.gramian

    return jax.jit(fn)


def _step(model, method, params, path):
    opt = optax.sgd(step_cost.LR)
    method = mtl.on_layers(method, path["subset"])
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    return mtl.make_train_step(model, method, opt, gramian=path["gramian"]).jitted, state


def _macs(model, params, batch, path, t):
    """Multiply-adds of the Gramian's per-task part along ``path``."""
    fns = model.step_fns()
    ctx = fns.enter(model.initial_state, None)
    pred = engine.subset_predicate(model, path["subset"])
    leaves = jax.tree_util.tree_flatten_with_path(params.shared)[0]
    keep = [i for i, (p, _) in enumerate(leaves) if pred(tree_lib.path_str(p))]

    def f(shared, specific):
        return fns.losses(shared, specific, batch, ctx)[0]

    policy = "auto" if path["gramian"] == "layerwise" else "exact"
    plan = gl.plan(f, params.shared, params.specific, policy=policy)
    return sum(
        (leaf.flops_layerwise if leaf.layerwise else leaf.flops_exact)
        for i, leaf in enumerate(plan.leaves)
        if i in keep
    )


def _cosines(model, params, batch, t):
    """Cosine of each path's update to the exact method's, for UPGrad and MGDA."""
    _, jac = mtl.task_jacobian(model, params, batch)
    mat = np.concatenate(
        [np.asarray(x, np.float64).reshape(t, -1) for x in jax.tree_util.tree_leaves(jac)], 1
    )
    grams = {k: _gramian_fn(model, p)(params, batch) for k, p in PATHS.items()}
    out = {}
    for name in ("upgrad", "mgda"):
        method = mtl.methods.get(name)
        state = method.init(t)
        d = {}
        for k, (losses, g) in grams.items():
            w, _ = method.weights(losses, g, state, None)
            d[k] = mat.T @ np.asarray(w, np.float64)
        ref = d["full Jacobian"]
        out[name] = {
            k: float(v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref) + 1e-300))
            for k, v in d.items()
        }
    return out


def _train_ew(model, params, batch, steps):
    opt = optax.sgd(0.05)
    state = mtl.init_train_state(model, params, mtl.methods.ew(), opt, jax.random.key(0))
    step = mtl.make_train_step(model, mtl.methods.ew(), opt)
    for _ in range(steps):
        state, _ = step(state, batch)
    return state.params


def interleaved_ms(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median milliseconds of each ``(fn, args)``, timed in rounds that run every function once,
    so that a change of the machine's load (a shared CPU) affects them alike."""
    for fn, args in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def measure(t, hidden, batch_size, reps, ew_steps):
    params = step_cost.init_params(jax.random.key(0), hidden, t)
    batch = step_cost.make_batch(jax.random.key(1), batch_size, t)
    names = tuple(f"t{i}" for i in range(t))
    model = mtl.Model.from_encoder_heads(step_cost.encode, step_cost.heads, names, last_shared="2")
    fns = {"ew": (jax.jit(step_cost.plain_ew_step), (params, batch))}
    upgrad = mtl.methods.upgrad()
    for k, path in PATHS.items():
        fns[("gramian", k)] = (_gramian_fn(model, path), (params, batch))
        fn, state = _step(model, upgrad, params, path)
        fns[("step", k)] = (fn, (state, batch))
    ms = interleaved_ms(fns, reps)
    ew = ms["ew"]
    rows = [
        {
            "T": t,
            "path": k,
            "gramian_ms": ms[("gramian", k)],
            "upgrad_step_ms": ms[("step", k)],
            "step_over_ew": ms[("step", k)] / ew,
            "gramian_macs": _macs(model, params, batch, path, t),
        }
        for k, path in PATHS.items()
    ]
    quality = {"init": _cosines(model, params, batch, t)}
    if ew_steps:
        trained = _train_ew(model, params, batch, ew_steps)
        quality[f"after {ew_steps} EW steps"] = _cosines(model, trained, batch, t)
    return {"T": t, "ew_ms": ew, "rows": rows, "cosine_to_exact": quality}


def table(results) -> str:
    lines = [
        "| T | Gramian path | Gramian ms | UPGrad step ms | step / EW | per-task MACs (G) "
        "| cos UPGrad (init / trained) | cos MGDA (init / trained) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = list(r["cosine_to_exact"].values())
        for row in r["rows"]:
            k = row["path"]
            cu = " / ".join(f"{x['upgrad'][k]:.4f}" for x in q)
            cm = " / ".join(f"{x['mgda'][k]:.4f}" for x in q)
            lines.append(
                f"| {r['T']} | {k} | {row['gramian_ms']:.1f} | {row['upgrad_step_ms']:.1f} | "
                f"{row['step_over_ew']:.2f} | {row['gramian_macs'] / 1e9:.3g} G | {cu} | {cm} |"
            )
        lines.append(f"| {r['T']} | plain JAX EW step | - | {r['ew_ms']:.1f} | 1.00 | - | - | - |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--ew-steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = [measure(t, args.hidden, args.batch, args.reps, args.ew_steps) for t in args.tasks]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(table(results))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
