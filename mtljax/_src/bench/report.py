"""A benchmark report as text (leaderboards) and as strict JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mtljax._src.bench.suites import SINGLE_TASK
from mtljax._src.display import format_table

# ----------------------------------------------------------------------------------------------
# Output


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _pm(stat: Mapping[str, Any], digits: int = 4, fixed: int | None = None) -> str:
    mean, se = stat.get("mean"), stat.get("se")
    if mean is None or not math.isfinite(mean):
        return "-"
    m = f"{mean:.{fixed}f}" if fixed is not None else f"{mean:.{digits}g}"
    if se is None or not math.isfinite(se):
        return m
    s = f"{se:.{fixed}f}" if fixed is not None else f"{se:.2g}"
    return f"{m} ± {s}"


def _finite_or_none(x: Any) -> Any:
    """JSON-safe: numpy to lists, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _finite_or_none(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def problem_table(section: Mapping[str, Any]) -> str:
    """The leaderboard of one problem as text."""
    tasks, main = section["tasks"], section["main_tasks"]
    metrics = section["metrics"]
    arrow = {True: "↑", False: "↓"}

    units = (section.get("info") or {}).get("units") or {}

    def head(t):
        aux = "" if t in main else " (aux)"
        unit = f" [{units[t]}]" if t in units else ""
        return f"{t} {metrics[t]['name']}{unit} {arrow[metrics[t]['higher_is_better']]}{aux}"

    pub = section.get("published")
    has_pub = any("delta_m_published" in e for e in section["methods"].values())
    pub_cols = ["Δm% vs published STL ↓", "published Δm%"] if has_pub else []
    headers = ["rank", "method", "Δm% ↓", *pub_cols, *(head(t) for t in tasks), "MR", "step ms"]
    rows = []
    base = section["baselines"]
    rows.append(
        [
            "-",
            SINGLE_TASK,
            "0",
            *(["-", "-"] if has_pub else []),
            *(_pm(base[t]["test"]) for t in tasks),
            "-",
            _fmt(float(np.mean([base[t]["step_ms"] for t in tasks]))),
        ]
    )
    for label in section["leaderboard"]:
        e = section["methods"][label]
        rows.append(
            [
                f"{e['rank']:g}",
                label,
                _pm(e["delta_m"], fixed=2),
                *(
                    [
                        _pm(e.get("delta_m_published", {}), fixed=1),
                        _fmt((pub or {}).get("published_delta_m", {}).get(label)),
                    ]
                    if has_pub
                    else []
                ),
                *(_pm(e["test"][t]) for t in tasks),
                f"{e.get('mean_rank', float('nan')):.1f}",
                _fmt(e["step_ms"], 3),
            ]
        )
    aux = "; auxiliary: " + ", ".join(section["auxiliary"]) if section["auxiliary"] else ""
    n_seeds = len(section["seeds"])
    title = (
        f"{section['problem']}: main tasks {', '.join(main)}{aux}; {n_seeds} "
        f"seed{'s' if n_seeds != 1 else ''} × {section['steps']} steps, model selected on "
        "validation every "
        f"{section['eval_every']} steps; test metrics mean ± s.e."
    )
    lines = [title, format_table(headers, rows)]
    ar = section.get("auxiliary_report")
    if ar and ar.get("ew_delta_m") is not None:
        verdict = "helped" if ar["ew_helped_vs_main_only"] else "did not help"
        lines.append(
            f"auxiliary tasks ({', '.join(ar['tasks'])}): EW on all tasks Δm% "
            f"{ar['ew_delta_m']:+.2f} vs EW on the main tasks only {ar['main_only_delta_m']:+.2f}"
            f" — the auxiliary tasks {verdict} the main tasks under EW; methods whose main "
            "tasks beat their single-task baselines (Δm% < 0): "
            + (", ".join(m for m, v in ar["by_method"].items() if v["helped"]) or "none")
        )
    hurt = []
    for label in section["leaderboard"]:
        nt = section["methods"][label].get("negative_transfer", {})
        sig = [t for t in main if nt.get(t, {}).get("significant")]
        if sig:
            hurt.append(f"{label} ({', '.join(sig)})")
    if hurt:
        lines.append(
            "negative transfer (main task worse than single-task by > 2 s.e.): " + "; ".join(hurt)
        )
    nonfinite = []
    for label in section["leaderboard"]:
        e = section["methods"][label]
        counts = {t: e["test"][t].get("nonfinite", 0) for t in tasks}
        bad = [f"{t} in {k}" for t, k in counts.items() if k]
        if bad:
            nonfinite.append(f"{label} ({', '.join(bad)} of {len(e['seeds'])} seeds)")
    if nonfinite:
        lines.append("non-finite test metrics (means shown as '-'): " + "; ".join(nonfinite))
    data = section.get("data")
    if data:
        shares = [v for v in data["share"].values() if v is not None and math.isfinite(v)]
        if shares:
            lines.append(
                f"data: building a batch on device takes {data['sample_ms']:.3g} ms "
                f"({100 * min(shares):.1f}–{100 * max(shares):.1f}% of the step times)"
            )
    if pub:
        pairs = "; ".join(f"{a} vs {b}" for a, b in pub["disagreeing_pairs"]) or "none"
        lines.append(
            f"published Δm% ({len(pub['methods'])} methods in common): Spearman rank "
            f"correlation {_fmt(pub['spearman'], 3)}; pairs ordered the other way: {pairs}"
        )
    if section["failed"]:
        lines.append("failed: " + "; ".join(f"{m}: {msg}" for m, msg in section["failed"].items()))
    return "\n".join(lines)


def leaderboard_text(report: Mapping[str, Any]) -> str:
    """The whole report as text: one leaderboard per problem."""
    parts = [problem_table(s) for s in report["problems"].values()]
    for name, why in report.get("skipped_problems", {}).items():
        parts.append(f"skipped {name}: {why}")
    parts.append(
        f"suite {report['suite']}: {report['wall_s']:.0f} s on {report['device']} "
        f"(jax {report['jax_version']})"
    )
    return "\n\n".join(parts)


def to_json(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with NaN/inf as ``null`` (strict JSON)."""
    return _finite_or_none(dict(report))


def write_json(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(to_json(report), f, indent=1, allow_nan=False)
