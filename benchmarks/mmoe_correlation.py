"""Correlation sweep on MMoE's synthetic tasks (Ma et al. 2018, §5.1, Figure 4).

Trains shared-bottom, OMoE and MMoE on ``mmoe_synthetic`` at task correlations
{0.5, 0.9, 1.0} over several seeds (``vmap`` over seeds, one jitted ``lax.scan`` per run) and
reports the held-out MSE averaged over tasks and seeds, at the end and along training, and the
spread of the runs' final MSE (the paper's Figure 5 reads trainability from that spread). The
published behaviour: the shared-bottom model degrades as the correlation falls; MMoE much less
(``benchmarks/README.md``: what this sweep finds).

With several ``--learning-rates`` each (arch, correlation) cell is trained at every rate and
reports the one with the lowest final validation MSE (averaged over seeds); the test split is
never used for the choice, so no model is judged at a rate that suits another.

    python benchmarks/mmoe_correlation.py                 # 16 seeds × 5000 steps, ~5 min on 2 cores
    python benchmarks/mmoe_correlation.py --learning-rates 1e-4 1e-3 1e-2
    python benchmarks/mmoe_correlation.py --seeds 2 --steps 300 --out /tmp/sweep.json
    python benchmarks/mmoe_correlation.py --seeds 32 --first-seed 16   # seeds 16…47 only

Prints a table, writes JSON (and a PNG when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtljax as mtl
from mtljax._src.problems import mmoe_synthetic as ms

DEFAULT_ARCHS = ("shared_bottom", "omoe", "mmoe")
DEFAULT_CORRELATIONS = (0.5, 0.9, 1.0)
OPTIMIZERS = {
    "adam": optax.adam,
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
}


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def run_cell(
    arch: str,
    correlation: float,
    seeds: int,
    *,
    steps: int,
    batch_size: int,
    num_train: int,
    num_test: int,
    learning_rate: float,
    optimizer: str,
    method: str,
    sines: str,
    num_sines: int,
    online: bool,
    checkpoints: int,
    gate_bias: bool = False,
    eval_on_train: bool = False,
    first_seed: int = 0,
    scale: float = 1.0,
    alpha_scale: float = 1.0,
) -> dict:
    """Trains ``seeds`` independent runs of one (arch, correlation) cell; returns its curves.

    Run ``s`` (``first_seed ≤ s < first_seed + seeds``) draws its task vectors, data and
    initial parameters from seed ``s`` (the same for every arch and correlation: common random
    numbers), so runs split over several calls with ``first_seed`` equal one call's.
    ``eval_on_train`` (with a fixed training set) reports the MSE on that training set instead
    of the held-out one."""
    if eval_on_train and online:
        raise ValueError("run_cell: eval_on_train needs a fixed training set (online=False)")
    params, train_sets, val_sets, test_sets = [], [], [], []
    for s in range(first_seed, first_seed + seeds):
        k_task, k_train, k_test, k_init = jax.random.split(jax.random.key(s), 4)
        tasks = ms.make_tasks(
            k_task,
            correlation,
            sines=sines,
            num_sines=num_sines,
            scale=scale,
            alpha_scale=alpha_scale,
        )
        train_sets.append(tasks if online else ms.sample_data(k_train, tasks, num_train))
        val_sets.append(ms.sample_data(jax.random.fold_in(k_test, 1), tasks, num_test))
        test_sets.append(ms.sample_data(k_test, tasks, num_test))
        model, p = ms.build_model(arch, k_init, gate_bias=gate_bias)
        params.append(p)
    opt = OPTIMIZERS[optimizer](learning_rate)
    meth = mtl.methods.get(method)

    def one_run(p, data, val, test, key):
        p, _, curve = ms.fit(
            model,
            p,
            meth,
            opt,
            data,
            key,
            steps=steps,
            batch_size=batch_size,
            eval_data=data if eval_on_train else test,
            checkpoints=checkpoints,
        )
        return curve, ms.mse(model, p, val)  # (checkpoints, T), (T,)

    t0 = time.perf_counter()
    curves, val = jax.jit(jax.vmap(one_run))(
        _stack(params),
        _stack(train_sets),
        _stack(val_sets),
        _stack(test_sets),
        jax.random.split(jax.random.key(7), first_seed + seeds)[first_seed:],
    )
    curves = np.asarray(jax.block_until_ready(curves))  # (seeds, checkpoints, T)
    chunk = steps // checkpoints
    return {
        "arch": arch,
        "correlation": correlation,
        "learning_rate": learning_rate,
        "validation_mse": float(np.asarray(val).mean()),
        "final_mse": curves[:, -1].mean(axis=1).tolist(),  # per seed, averaged over tasks
        "curve": curves.mean(axis=(0, 2)).tolist(),  # averaged over seeds and tasks
        "curve_sem": (
            curves.mean(axis=2).std(axis=0, ddof=1) / np.sqrt(seeds)
            if seeds > 1
            else 0 * curves[0, :, 0]
        ).tolist(),
        "steps": [(i + 1) * chunk for i in range(checkpoints)],
        "seconds": time.perf_counter() - t0,
    }


def _final_mse_by_cell(results: list[dict]) -> dict[tuple[str, float], np.ndarray]:
    """``(arch, correlation) -> final MSE per seed``."""
    return {(r["arch"], r["correlation"]): np.asarray(r["final_mse"]) for r in results}


def table(results: list[dict], archs, correlations) -> str:
    """Mean ± standard error of the final MSE, and its ratio to correlation 1.0."""
    by = _final_mse_by_cell(results)
    head = f"{'arch':<15}" + "".join(f"{'p=' + str(c):>18}" for c in correlations)
    lines = [head + f"{'MSE(p=min)/MSE(p=max)':>24}", "-" * (15 + 18 * len(correlations) + 24)]
    for a in archs:
        row = f"{a:<15}"
        for c in correlations:
            v = by[(a, c)]
            row += f"{v.mean():>11.4f} ± {v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0:.4f}"
        lo, hi = by[(a, min(correlations))].mean(), by[(a, max(correlations))].mean()
        lines.append(row + f"{lo / hi:>24.2f}")
    return "\n".join(lines)


def ratio_table(results: list[dict], archs, correlations) -> str:
    """The degradation along training: mean MSE at the lowest correlation over that at the
    highest, at every checkpoint (where each model learns the sines, the run at the lower
    correlation lags: the ratio peaks there and falls back as both converge)."""
    lo, hi = min(correlations), max(correlations)
    by = {(r["arch"], r["correlation"]): r for r in results}
    steps = by[(archs[0], lo)]["steps"]
    lines = [
        f"MSE(p={lo}) / MSE(p={hi}) by training step",
        f"{'arch':<15}" + "".join(f"{s:>8}" for s in steps) + f"{'peak':>8}",
    ]
    for a in archs:
        r = np.asarray(by[(a, lo)]["curve"]) / np.asarray(by[(a, hi)]["curve"])
        lines.append(f"{a:<15}" + "".join(f"{v:>8.2f}" for v in r) + f"{r.max():>8.2f}")
    return "\n".join(lines)


def spread_table(results: list[dict], archs, correlations, split: str = "held-out") -> str:
    """Quantiles of the runs' final MSE (on ``split``) per cell: a model that some runs fail to
    train shows it in the upper quantiles before the mean (Ma et al., Figure 5)."""
    by = _final_mse_by_cell(results)
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    lines = [
        f"final {split} MSE across runs (quantiles)",
        f"{'arch':<15}{'p':>6}" + "".join(f"{f'q{int(100 * q)}':>9}" for q in qs) + f"{'max':>9}",
    ]
    for a in archs:
        for c in correlations:
            v = by[(a, c)]
            row = "".join(f"{x:>9.4f}" for x in np.quantile(v, qs))
            lines.append(f"{a:<15}{c:>6}{row}{v.max():>9.4f}")
    return "\n".join(lines)


def select_learning_rates(runs: list[dict]) -> tuple[list[dict], str]:
    """Per (arch, correlation), the run whose learning rate gives the lowest validation MSE
    (mean over seeds and tasks); and a table of every rate's validation MSE."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["arch"], r["correlation"]), []).append(r)
    rates = sorted({r["learning_rate"] for r in runs})
    lines = [
        "validation MSE by learning rate (* chosen)",
        f"{'arch':<15}{'p':>6}" + "".join(f"{lr:>12g}" for lr in rates),
    ]
    chosen = []
    for (a, c), rs in cells.items():
        best = min(rs, key=lambda r: np.nan_to_num(r["validation_mse"], nan=np.inf))
        chosen.append(best)
        by_lr = {r["learning_rate"]: r for r in rs}
        row = "".join(
            f"{by_lr[lr]['validation_mse']:>11.4f}{'*' if by_lr[lr] is best else ' '}"
            for lr in rates
        )
        lines.append(f"{a:<15}{c:>6}{row}")
    return chosen, "\n".join(lines)


def plot(results: list[dict], archs, correlations, path: Path, split: str = "held-out") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(archs), figsize=(4 * len(archs), 3.2), sharey=True)
    for ax, a in zip(np.atleast_1d(axes), archs, strict=True):
        for c in correlations:
            r = next(r for r in results if r["arch"] == a and r["correlation"] == c)
            ax.plot(r["steps"], r["curve"], label=f"correlation {c}")
        ax.set_title(a)
        ax.set_xlabel("training step")
        ax.set_yscale("log")
    np.atleast_1d(axes)[0].set_ylabel(f"{split} MSE (mean over tasks, seeds)")
    np.atleast_1d(axes)[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), choices=ms.ARCHS)
    ap.add_argument("--correlations", nargs="+", type=float, default=list(DEFAULT_CORRELATIONS))
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds first-seed … first-seed + seeds − 1 (to split a sweep over calls)",
    )
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-train", type=int, default=10_000)
    ap.add_argument("--num-test", type=int, default=4_000)
    ap.add_argument(
        "--learning-rates",
        "--learning-rate",
        nargs="+",
        type=float,
        default=[1e-3],
        help="learning rates; with several, each cell keeps the best on validation",
    )
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    ap.add_argument("--sines", choices=("range", "normal"), default="range")
    ap.add_argument("--num-sines", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="the tasks' scale c (|wₖ| = c)")
    ap.add_argument(
        "--alpha-scale",
        type=float,
        default=1.0,
        help="with --sines normal, α ~ N(0, alpha_scale²)",
    )
    ap.add_argument(
        "--fixed-data",
        action="store_true",
        help="sample minibatches from --num-train fixed examples (default: fresh data each step)",
    )
    ap.add_argument(
        "--eval",
        choices=("test", "train"),
        default="test",
        help="the split the curves and tables read: held-out (default) or, with --fixed-data, "
        "the training set",
    )
    ap.add_argument(
        "--gate-bias",
        action="store_true",
        help="give the softmax gates a bias (the papers' gates, the default, have none)",
    )
    ap.add_argument("--method", default="ew")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mmoe_correlation.json"))
    args = ap.parse_args(argv)
    if args.eval == "train" and not args.fixed_data:
        ap.error("--eval train needs --fixed-data (with fresh data every step there is no set)")
    if args.seeds < 1 or args.first_seed < 0:
        ap.error("--seeds must be ≥ 1 and --first-seed ≥ 0")

    runs = []
    for a in args.archs:
        for c in args.correlations:
            for lr in args.learning_rates:
                r = run_cell(
                    a,
                    c,
                    args.seeds,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    num_train=args.num_train,
                    num_test=args.num_test,
                    learning_rate=lr,
                    optimizer=args.optimizer,
                    method=args.method,
                    sines=args.sines,
                    num_sines=args.num_sines,
                    online=not args.fixed_data,
                    checkpoints=args.checkpoints,
                    gate_bias=args.gate_bias,
                    eval_on_train=args.eval == "train",
                    first_seed=args.first_seed,
                    scale=args.scale,
                    alpha_scale=args.alpha_scale,
                )
                runs.append(r)
                print(
                    f"{a:<15} p={c:<4} lr={lr:<7g} validation MSE {r['validation_mse']:.4f} "
                    f"{args.eval} MSE {np.mean(r['final_mse']):.4f} ({r['seconds']:.0f}s)",
                    flush=True,
                )
    results, lr_text = select_learning_rates(runs)
    corrs = sorted(args.correlations)
    text = (lr_text + "\n\n") if len(args.learning_rates) > 1 else ""
    if args.eval == "train":
        text += "every MSE below is on the fixed training set (--eval train), not held out\n\n"
    text += table(results, args.archs, corrs)
    text += "\n\n" + ratio_table(results, args.archs, corrs)
    split = "training-set" if args.eval == "train" else "held-out"
    text += "\n\n" + spread_table(results, args.archs, corrs, split)
    print()
    print(text)
    out = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(jax.devices()[0]),
        "results": results,
        "all_runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    png = args.out.with_suffix(".png")
    if plot(results, args.archs, corrs, png, split):
        print(f"wrote {args.out} and {png}")
    else:
        print(f"wrote {args.out} (matplotlib not installed: no plot)")
    return out


if __name__ == "__main__":
    main()
