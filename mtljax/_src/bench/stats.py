"""Δm% (Maninis et al. 2019), means with standard errors and ranks over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtljax._src import analysis


def delta_m(
    metrics: Mapping[str, float] | Sequence[float],
    baseline: Mapping[str, float] | Sequence[float],
    higher_is_better: Mapping[str, bool] | Sequence[bool],
    tasks: Sequence[str] | None = None,
) -> float:
    """``Δm% = (1/T) Σₜ (−1)^{hₜ} (M_{m,t} − M_{b,t}) / |M_{b,t}| × 100`` (lower is better).

    Maninis, Radosavovic & Kokkinos, CVPR 2019; Vandenhende et al., TPAMI 2021. The papers
    divide by ``M_{b,t}``, their metrics being positive; ``|M_{b,t}|`` keeps the sign
    meaning "worse" for a negative metric (e.g. a log-likelihood) and equals it otherwise.

    Args:
      metrics: the method's metric per task (a mapping by task name, or a sequence).
      baseline: the single-task baselines' metric per task, same form.
      higher_is_better: ``hₜ`` per task, same form.
      tasks: the tasks to average over (for mappings; default: the keys of
        ``higher_is_better``). Pass the main tasks to leave auxiliary tasks out.

    Example: accuracies 0.90 vs a baseline 0.80 (higher is better) and an error 1.5 vs 1.0
    (lower is better): ``((−12.5) + 50) / 2 = 18.75``.
    """
    if isinstance(higher_is_better, Mapping):
        tasks = tuple(higher_is_better) if tasks is None else tuple(tasks)
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"delta_m: a task is named twice in {tasks}")
        given = (metrics, baseline, higher_is_better)
        missing = [t for t in tasks if any(t not in d for d in given)]
        if missing:
            raise ValueError(f"delta_m: no metric, baseline or direction for {missing}")
        directions = [higher_is_better[t] for t in tasks]
        m = np.asarray([metrics[t] for t in tasks], np.float64)
        b = np.asarray([baseline[t] for t in tasks], np.float64)
    else:
        if tasks is not None:
            raise ValueError("delta_m: `tasks` applies to mappings only")
        directions = list(np.atleast_1d(np.asarray(higher_is_better, object)))
        m = np.asarray(metrics, np.float64)
        b = np.asarray(baseline, np.float64)
    analysis.check_directions("delta_m", directions)
    h = np.asarray(directions, bool)
    if not (m.shape == b.shape == h.shape) or m.ndim != 1 or m.size == 0:
        raise ValueError(
            f"delta_m: need one metric, baseline and direction per task; got shapes "
            f"{m.shape}, {b.shape}, {h.shape}"
        )
    if np.any(b == 0):
        raise ValueError("delta_m: a baseline metric is 0; the relative change is undefined")
    sign = np.where(h, -1.0, 1.0)
    return float(np.mean(sign * (m - b) / np.abs(b)) * 100.0)


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "se", "values", "nonfinite"}``: the mean and standard error ``s/√n`` over
    seeds (``se`` is NaN for fewer than two). A non-finite value makes both NaN: a seed that
    diverged is counted in ``nonfinite`` and shown, never averaged away."""
    v = np.asarray(values, np.float64)
    mean, se = analysis.mean_and_se(v)
    return {"mean": mean, "se": se, "values": v.tolist(), "nonfinite": int(np.sum(~np.isfinite(v)))}


def _ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values`` (lowest first), ties sharing their average rank; NaN last."""
    v = np.asarray(values, np.float64)
    v = np.where(np.isfinite(v), v, np.inf)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        tie = v == x
        ranks[tie] = ranks[tie].mean()
    return ranks
