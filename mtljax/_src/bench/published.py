"""Published multi-task results to compare a benchmark with, each number with its source.

QM9 (11 targets, Δm% against the single-task MAEs ``BASE`` of the Nash-MTL code,
:data:`mtljax._src.problems.qm9.PUBLISHED_STL_MAE`; lower is better):

* Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022: Table 1 (MR, Δm%) and
  App. D.1 Table 6 (per-target test MAE, 3 seeds); "LS" is equal weighting (``ew``), "IMTL-G"
  the gradient part of IMTL (``imtl_g``).
* Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023: Table 2 (it reprints
  Nash-MTL's baselines and adds FAMO; γ = 0.001).
* Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024: FairGrad's row as
  **reprinted** in Table 6 of Qin et al., "NTKMTL" ("results taken from its original paper");
  the FairGrad paper's own table was not consulted.

DB-MTL (Lin et al.) reports QM9 against its own single-task baselines (Δp, LibMTL, batch 128),
so its number is not on this scale and is left out. The methods SI, GradDrop and others that
mtljax does not have are left out as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from mtljax._src.bench.stats import _ranks

NASH = "Navon et al., ICML 2022 (Nash-MTL), Table 1 / App. D.1 Table 6"
FAMO = "Liu et al., NeurIPS 2023 (FAMO), Table 2"
FAIRGRAD = (
    "Ban & Ji, ICML 2024 (FairGrad), reprinted in Qin et al. (NTKMTL) Table 6, "
    "'results taken from its original paper'"
)


class Published(NamedTuple):
    """One published Δm% and where it was printed."""

    delta_m: float
    source: str


# Δm% (lower is better) by mtljax method name.
DELTA_M: dict[str, dict[str, Published]] = {
    "qm9": {
        "ew": Published(177.6, NASH),
        "rlw": Published(203.8, NASH),
        "dwa": Published(175.3, NASH),
        "uw": Published(108.0, NASH),
        "mgda": Published(120.5, NASH),
        "pcgrad": Published(125.7, NASH),
        "cagrad": Published(112.8, NASH),
        "imtl_g": Published(77.2, NASH),
        "nash_mtl": Published(62.0, NASH),
        "famo": Published(58.5, FAMO),
        "fairgrad": Published(57.9, FAIRGRAD),
    }
}

# Per-target test MAE rows (QM9 target order of mtljax._src.problems.qm9.TARGETS, the papers'
# units: energies in meV): Nash-MTL App. D.1 Table 6, FAMO Table 2, FairGrad via NTKMTL Table 6.
QM9_ROWS: dict[str, tuple[tuple[float, ...], str]] = {
    "ew": ((0.106, 0.325, 73.57, 89.67, 5.19, 14.06, 143.4, 144.2, 144.6, 140.3, 0.128), NASH),
    "rlw": ((0.113, 0.340, 76.95, 92.76, 5.86, 15.46, 156.3, 157.1, 157.6, 153.0, 0.137), NASH),
    "dwa": ((0.107, 0.325, 74.06, 90.61, 5.09, 13.99, 142.3, 143.0, 143.4, 139.3, 0.125), NASH),
    "uw": ((0.386, 0.425, 166.2, 155.8, 1.06, 4.99, 66.4, 66.78, 66.80, 66.24, 0.122), NASH),
    "mgda": ((0.217, 0.368, 126.8, 104.6, 3.22, 5.69, 88.37, 89.4, 89.32, 88.01, 0.120), NASH),
    "pcgrad": (
        (0.106, 0.293, 75.85, 88.33, 3.94, 9.15, 116.36, 116.8, 117.2, 114.5, 0.110),
        NASH,
    ),
    "cagrad": (
        (0.118, 0.321, 83.51, 94.81, 3.21, 6.93, 113.99, 114.3, 114.5, 112.3, 0.116),
        NASH,
    ),
    "imtl_g": (
        (0.136, 0.287, 98.31, 93.96, 1.75, 5.69, 101.4, 102.4, 102.0, 100.1, 0.096),
        NASH,
    ),
    "nash_mtl": (
        (0.102, 0.248, 82.95, 81.89, 2.42, 5.38, 74.5, 75.02, 75.10, 74.16, 0.093),
        NASH,
    ),
    "famo": ((0.15, 0.30, 94.0, 95.2, 1.63, 4.95, 70.82, 71.2, 71.2, 70.3, 0.10), FAMO),
    "fairgrad": (
        (0.117, 0.253, 87.57, 84.00, 2.15, 5.07, 70.89, 71.17, 71.21, 70.88, 0.095),
        FAIRGRAD,
    ),
}


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; NaN
    with fewer than 2 values or a constant ranking."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman: need two equal-length vectors, got {a.shape}, {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    den = np.sqrt(np.sum(ra**2) * np.sum(rb**2))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def compare(problem: str, ours: Mapping[str, float]) -> dict[str, Any] | None:
    """Our Δm% against the published one over the methods both have: ``spearman`` (rank
    correlation), ``disagreeing_pairs`` (``[a, b]`` ordered one way by the papers and the
    other way here), each method's numbers and source. ``None`` without published numbers."""
    table = DELTA_M.get(problem)
    if not table:
        return None
    common = [m for m in ours if m in table and np.isfinite(ours[m])]
    pub = [table[m].delta_m for m in common]
    mine = [float(ours[m]) for m in common]
    pairs = [
        [common[i], common[j]]
        for i in range(len(common))
        for j in range(i + 1, len(common))
        if (pub[i] - pub[j]) * (mine[i] - mine[j]) < 0
    ]
    return {
        "methods": common,
        "published_delta_m": {m: table[m].delta_m for m in common},
        "delta_m": dict(zip(common, mine, strict=True)),
        "published_rank": dict(zip(common, _ranks(pub).tolist(), strict=True)),
        "rank": dict(zip(common, _ranks(mine).tolist(), strict=True)),
        "spearman": spearman(mine, pub),
        "disagreeing_pairs": pairs,
        "sources": {m: table[m].source for m in common},
    }
