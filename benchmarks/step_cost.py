"""Step cost of every mtljax method against its own floor.

Model: MLP encoder 128→H→H→256 (ReLU), T linear heads, per-task MSE, batch B. Every row is
a full jitted train step (gradient + SGD update) measured in the same process:

* ``plain EW``: plain JAX ``jit(value_and_grad(sum of losses))`` + SGD, written here;
* ``plain jacrev``: plain JAX ``jit(jacrev)`` of the losses w.r.t. the shared parameters, mean
  of the rows, + SGD: the floor of every full-Jacobian method;
* ``plain EW + last-layer products``: the EW step plus the T per-task gradients of the last
  shared layer (plain ``jacrev`` of the losses w.r.t. that layer, given its input): the floor of
  GradNorm on the last shared layer;
* each mtljax method through ``mtljax.make_train_step`` (parameter level, and feature level
  for the methods that run on a Gramian or a Jacobian), with the default Gramian path
  (``gramian="auto"``: layer-wise for weighting methods on the Gramian at feature level and on
  a layer subset such as GradNorm's, and over all shared parameters where the engine's count
  of multiply-adds finds it cheaper than the formed Jacobian), and there also with
  ``gramian="jacobian"`` (mode ``… jac``).

Targets: losses-only methods ≤ 1.1× EW; every other method ≤ 1.25× its floor; feature level
≤ 1.5× EW. Optional PyTorch rows (one backward of the sum; T backward passes, LibMTL's way;
torchjd's ``mtl_backward`` with UPGrad) are added when torch / torchjd are importable.

Usage: ``python benchmarks/step_cost.py --tasks 2 10 40 --out step_cost.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtljax as mtl
from mtljax._src.train import resolve_gramian_path

LR = 1e-3


# ----------------------------------------------------------------------------------------------
# The model, as plain pytrees of arrays


def init_params(key, hidden: int, num_tasks: int, d_in: int = 128, d_rep: int = 256):
    sizes = (d_in, hidden, hidden, d_rep)
    keys = jax.random.split(key, len(sizes))
    encoder = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys[:-1], sizes[:-1], sizes[1:], strict=True)
    ]
    heads = {
        "w": jax.random.normal(keys[-1], (d_rep, num_tasks)) / np.sqrt(d_rep),
        "b": jnp.zeros(num_tasks),
    }
    return mtl.Params(encoder, heads)


def encode(shared, batch):
    h = batch["x"]
    for layer in shared:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h


def heads(specific, z, batch):
    pred = z @ specific["w"] + specific["b"]  # (B, T): T linear heads as one matmul
    return jnp.mean((pred - batch["y"]) ** 2, axis=0)


def make_batch(key, batch_size: int, num_tasks: int, d_in: int = 128):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (batch_size, d_in)),
        "y": jax.random.normal(ky, (batch_size, num_tasks)),
    }


def losses_fn(params, batch):
    return heads(params.specific, encode(params.shared, batch), batch)


# ----------------------------------------------------------------------------------------------
# Plain-JAX floors


def sgd(params, grads):
    return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)


def plain_ew_step(params, batch):
    loss, grads = jax.value_and_grad(lambda p: jnp.sum(losses_fn(p, batch)))(params)
    return sgd(params, grads), loss


def plain_jacrev_step(params, batch):
    jac = jax.jacrev(lambda s: losses_fn(mtl.Params(s, params.specific), batch))(params.shared)
    g_spec = jax.grad(lambda p: jnp.sum(losses_fn(mtl.Params(params.shared, p), batch)))(
        params.specific
    )
    g_shared = jax.tree_util.tree_map(lambda j: jnp.mean(j, axis=0), jac)
    return sgd(params, mtl.Params(g_shared, g_spec)), jac


def plain_last_layer_products(params, batch):
    """The T per-task gradients of the last shared layer, given that layer's input."""
    h = batch["x"]
    for layer in params.shared[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    h = jax.lax.stop_gradient(h)

    def f(last):
        z = jax.nn.relu(h @ last["w"] + last["b"])
        return heads(params.specific, z, batch)

    return jax.jacrev(f)(params.shared[-1])


# ----------------------------------------------------------------------------------------------
# Timing


def median_ms(fn: Callable, *args, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def method_kwargs(name: str, num_tasks: int) -> dict:
    return {"weights": [1.0] * num_tasks} if name == "fixed" else {}


def step_paths(method) -> list[tuple[str, str]]:
    """The (mode, Gramian path) rows of a method: parameter level for every method; feature
    level for the methods that run on a Gramian or a Jacobian; each with the default path
    (``gramian="auto"``), and, where that may be the layer-wise Gramian (a weighting method on
    the Gramian: at feature level, on a layer subset such as GradNorm's last shared layer, and
    over all shared parameters where the engine finds it cheaper), also with the Jacobian path
    (``gramian="jacobian"``, mode ``… jac``)."""
    modes = ["parameter"] if method.needs == "losses" else ["parameter", "feature"]
    rows = []
    for mode in modes:
        rows.append((mode, "auto"))
        auto = resolve_gramian_path(
            method, "auto", mode, chunk_size=None, gramian_chunk_size=None, constraint=None
        )
        if auto != "jacobian":
            rows.append((mode, "jacobian"))
    return rows


def mtljax_step(method, model, params, mode: str, gramian: str = "auto"):
    opt = optax.sgd(LR)
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    step = mtl.make_train_step(model, method, opt, mode=mode, gramian=gramian)
    return step.jitted, state


def measure(num_tasks: int, hidden: int, batch_size: int, reps: int, methods, torch_rows: bool):
    key = jax.random.key(0)
    params = init_params(key, hidden, num_tasks)
    batch = make_batch(jax.random.key(1), batch_size, num_tasks)
    names = tuple(f"t{i}" for i in range(num_tasks))
    model = mtl.Model.from_encoder_heads(encode, heads, names, last_shared="2")

    ew = median_ms(jax.jit(plain_ew_step), params, batch, reps=reps)
    jac = median_ms(jax.jit(plain_jacrev_step), params, batch, reps=max(3, reps // 2))
    products = median_ms(jax.jit(plain_last_layer_products), params, batch, reps=reps)
    floors = {"EW": ew, "jacrev": jac, "EW+last-layer": ew + products}
    rows = [
        {"T": num_tasks, "method": "plain JAX EW", "mode": "-", "ms": ew},
        {"T": num_tasks, "method": "plain JAX jacrev+mean", "mode": "-", "ms": jac},
        {"T": num_tasks, "method": "plain JAX last-layer products", "mode": "-", "ms": products},
    ]
    rep = jax.eval_shape(encode, params.shared, batch)
    for name in methods:
        method = mtl.methods.get(name, like=params.shared, **method_kwargs(name, num_tasks))
        if num_tasks < method.min_tasks:
            continue
        for mode, path in step_paths(method):
            if mode == "feature":  # methods with gradient-shaped state take the feature shape
                method = mtl.methods.get(name, like=rep, **method_kwargs(name, num_tasks))
            fn, state = mtljax_step(method, model, params, mode, path)
            ms = median_ms(
                fn,
                state,
                batch,
                reps=reps if method.needs == "losses" or mode == "feature" else max(3, reps // 2),
            )
            if method.needs == "losses":
                floor, target = "EW", 1.1
            elif mode == "feature":
                floor, target = "EW", 1.5
            elif method.params == "last":
                floor, target = "EW+last-layer", 1.25
            else:
                floor, target = "jacrev", 1.25
            ratio = ms / floors[floor]
            rows.append(
                {
                    "T": num_tasks,
                    "method": name,
                    "mode": mode if path == "auto" else f"{mode} jac",
                    "needs": method.needs,
                    "ms": ms,
                    "floor": floor,
                    "floor_ms": floors[floor],
                    "ratio": ratio,
                    "target": target,
                    "ok": bool(ratio <= target),
                }
            )
    if torch_rows:
        rows += torch_measurements(num_tasks, hidden, batch_size, reps)
    return rows


# ----------------------------------------------------------------------------------------------
# Optional PyTorch peers (same model, same sizes)


def torch_measurements(num_tasks, hidden, batch_size, reps):
    try:
        import torch
    except ImportError:
        return []
    out = []
    torch.manual_seed(0)
    enc = torch.nn.Sequential(
        torch.nn.Linear(128, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 256),
        torch.nn.ReLU(),
    )
    heads_t = torch.nn.ModuleList(torch.nn.Linear(256, 1) for _ in range(num_tasks))
    x, y = torch.randn(batch_size, 128), torch.randn(batch_size, num_tasks)
    params = list(enc.parameters()) + list(heads_t.parameters())
    opt = torch.optim.SGD(params, lr=LR)

    def task_losses(z):
        return [((h(z)[:, 0] - y[:, i]) ** 2).mean() for i, h in enumerate(heads_t)]

    def losses():
        return torch.stack(task_losses(enc(x)))

    def ew():
        opt.zero_grad()
        losses().sum().backward()
        opt.step()

    def t_backwards():
        opt.zero_grad()
        ls = losses()
        grads = [
            torch.autograd.grad(ls[i], list(enc.parameters()), retain_graph=True)
            for i in range(num_tasks)
        ]
        for p, *gs in zip(enc.parameters(), *grads, strict=True):
            p.grad = torch.stack(gs).mean(0)
        opt.step()

    def timed(fn):
        for _ in range(2):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    out.append({"T": num_tasks, "method": "torch EW (one backward)", "mode": "-", "ms": timed(ew)})
    out.append(
        {
            "T": num_tasks,
            "method": "torch T backwards (LibMTL-style)",
            "mode": "-",
            "ms": timed(t_backwards),
        }
    )
    try:
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = UPGrad()
        shared = list(enc.parameters())

        def jd():
            opt.zero_grad()
            z = enc(x)
            mtl_backward(task_losses(z), features=z)
            jac_to_grad(shared, agg)
            opt.step()

        out.append(
            {
                "T": num_tasks,
                "method": "torchjd 0.18 mtl_backward + UPGrad",
                "mode": "-",
                "ms": timed(jd),
            }
        )
    except Exception as e:  # torchjd absent or of another API version
        print(f"(torchjd rows skipped: {type(e).__name__}: {e})", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------


def print_table(rows):
    head = (
        f"{'T':>3}  {'method':34s} {'mode':12s} {'ms':>9s}  {'floor':14s} {'floor ms':>9s}"
        f"  {'ratio':>6s}  {'target':>6s}  ok"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "floor" in r:
            print(
                f"{r['T']:>3}  {r['method']:34s} {r['mode']:12s} {r['ms']:9.3f}  "
                f"{r['floor']:14s} {r['floor_ms']:9.3f}  {r['ratio']:6.2f}  "
                f"{r['target']:6.2f}  {'yes' if r['ok'] else 'NO'}"
            )
        else:
            print(f"{r['T']:>3}  {r['method']:34s} {r['mode']:12s} {r['ms']:9.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--methods", nargs="*", default=None, help="default: all")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    methods = args.methods or list(mtl.methods.names())
    rows = []
    for t in args.tasks:
        rows += measure(t, args.hidden, args.batch, args.reps, methods, not args.no_torch)
    print(f"device: {jax.devices()[0]}  H={args.hidden} B={args.batch}  jax {jax.__version__}")
    print_table(rows)
    if args.out:
        meta = {
            "device": str(jax.devices()[0]),
            "hidden": args.hidden,
            "batch": args.batch,
            "jax": jax.__version__,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
