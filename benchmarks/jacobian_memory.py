"""Peak memory of a Jacobian-based train step vs chunk size (compiled memory analysis).

Model (as in ``step_cost.py``): MLP encoder 128→H→H→256 (ReLU), T linear heads, per-task MSE,
batch B; an mtljax train step with UPGrad-like Gramian weighting (``imtl_g`` by default, any
weighting method that needs the Gramian works) and SGD. Three ways to get the Gramian:

* ``jacobian``: the ``T × P`` Jacobian from ``vmap`` of ``T`` VJPs (the default);
* ``jacobian, chunk c``: the same Jacobian, its VJPs ``c`` tasks at a time (``lax.map``):
  bounds the backward passes' intermediates, but the ``T × P`` Jacobian is still formed;
* ``gramian, chunk c``: ``gramian_chunk_size=c``: ``c`` rows of the Jacobian at a time, the
  Gramian's columns from ``c`` JVPs; ``T × P`` never exists (about +50% compute: ``T`` JVPs on
  top of the ``T`` VJPs, and one more VJP for the update).
* ``layerwise``: ``gramian="layerwise"`` (:func:`mtljax.gramian_layerwise`): the Gramian
  accumulated layer by layer from each dense layer's input activations and the ``T`` output
  cotangents, without per-task weight gradients where that takes fewer multiply-adds; the
  update is one VJP of ``w · losses``.

For each, XLA's compiled memory analysis of the whole step (``jit(step).lower(...).compile()
.memory_analysis()``): temporaries, and the peak estimate ``arguments + outputs + temporaries
− aliased``; with ``--time``, the median step time too. ``T × P × 4 bytes`` is printed for
reference.

Usage: ``python benchmarks/jacobian_memory.py --tasks 40 --hidden 512 --batch 256 \\
--chunks 1 4 10 40 [--time] [--out memory.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtljax as mtl


def make_model(num_tasks: int, hidden: int, d_in: int = 128, d_rep: int = 256):
    sizes = (d_in, hidden, hidden, d_rep)
    keys = jax.random.split(jax.random.key(0), len(sizes))
    encoder = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys[:-1], sizes[:-1], sizes[1:], strict=True)
    ]
    heads_params = {
        "w": jax.random.normal(keys[-1], (d_rep, num_tasks)) / np.sqrt(d_rep),
        "b": jnp.zeros(num_tasks),
    }

    def encode(shared, batch):
        h = batch["x"]
        for layer in shared:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return h

    def heads(specific, z, batch):
        pred = z @ specific["w"] + specific["b"]
        return jnp.mean((pred - batch["y"]) ** 2, axis=0)

    model = mtl.Model.from_encoder_heads(encode, heads, [f"t{i}" for i in range(num_tasks)])
    return model, mtl.Params(encoder, heads_params)


def measure(
    model, params, batch, method, *, chunk=None, gramian_chunk=None, gramian="jacobian", reps=0
):
    opt = optax.sgd(1e-3)
    step = mtl.make_train_step(
        model, method, opt, chunk_size=chunk, gramian_chunk_size=gramian_chunk, gramian=gramian
    )
    state = mtl.init_train_state(model, params, method, opt, jax.random.key(0))
    compiled = jax.jit(step._step).lower(state, batch).compile()
    mem = compiled.memory_analysis()
    row = {
        "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        "peak_bytes": None
        if mem is None
        else int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        ),
    }
    if reps:
        s, _ = compiled(state, batch)
        jax.block_until_ready(s)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            s, _ = compiled(state, batch)
            jax.block_until_ready(s)
            times.append(time.perf_counter() - t0)
        row["ms"] = 1e3 * statistics.median(times)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 10, 20])
    parser.add_argument("--method", default="imtl_g", help="a weighting method on the Gramian")
    parser.add_argument("--time", action="store_true", help="also time the steps")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)

    model, params = make_model(args.tasks, args.hidden)
    kx, ky = jax.random.split(jax.random.key(1))
    batch = {
        "x": jax.random.normal(kx, (args.batch, 128)),
        "y": jax.random.normal(ky, (args.batch, args.tasks)),
    }
    method = mtl.methods.get(args.method)
    p = sum(x.size for x in jax.tree_util.tree_leaves(params.shared))
    reps = args.reps if args.time else 0
    rows = [{"how": "jacobian", "chunk": None, **measure(model, params, batch, method, reps=reps)}]
    for c in args.chunks:
        rows.append(
            {
                "how": "jacobian",
                "chunk": c,
                **measure(model, params, batch, method, chunk=c, reps=reps),
            }
        )
    for c in args.chunks:
        rows.append(
            {
                "how": "gramian",
                "chunk": c,
                **measure(model, params, batch, method, gramian_chunk=c, reps=reps),
            }
        )

    rows.append(
        {
            "how": "layerwise",
            "chunk": None,
            **measure(model, params, batch, method, gramian="layerwise", reps=reps),
        }
    )

    mib = 2.0**20
    print(
        f"{jax.devices()[0].platform}: T={args.tasks} H={args.hidden} B={args.batch} "
        f"P(shared)={p:,}  T×P×4 bytes = {args.tasks * p * 4 / mib:.1f} MiB  "
        f"method={args.method}"
    )
    header = f"{'how':<10} {'chunk':>6} {'temp MiB':>10} {'peak MiB':>10}"
    print(header + (f" {'step ms':>9}" if reps else ""))
    for r in rows:
        line = (
            f"{r['how']:<10} {str(r['chunk'] or 'all'):>6} "
            f"{(r['temp_bytes'] or 0) / mib:>10.1f} {(r['peak_bytes'] or 0) / mib:>10.1f}"
        )
        print(line + (f" {r['ms']:>9.2f}" if reps else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "config": vars(args),
                    "shared_params": p,
                    "device": str(jax.devices()[0]),
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
