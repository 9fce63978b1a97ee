"""Figures of a benchmark report (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mtljax._src.bench.suites import SINGLE_TASK

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
