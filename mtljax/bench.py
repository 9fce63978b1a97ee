"""Fair benchmarks of multi-task methods: single-task baselines, Δm%, seeds, validation-based
model selection, leaderboards and plots. ``python -m mtljax bench --suite quick`` runs one.

See :mod:`mtljax._src.bench` for the protocol.
"""

from mtljax._src.bench.plots import figures, plot_delta_m, plot_problem, plot_report
from mtljax._src.bench.report import leaderboard_text, problem_table, to_json, write_json
from mtljax._src.bench.run import (
    auxiliary_report,
    epoch_args,
    run_problem,
    run_suite,
    single_task_method,
)
from mtljax._src.bench.stats import delta_m, mean_se
from mtljax._src.bench.suites import MAIN_ONLY, SINGLE_TASK, SUITES, ProblemSpec, Suite, get_suite
from mtljax._src.display import format_table

__all__ = [
    "MAIN_ONLY",
    "SINGLE_TASK",
    "SUITES",
    "ProblemSpec",
    "Suite",
    "auxiliary_report",
    "delta_m",
    "epoch_args",
    "figures",
    "format_table",
    "get_suite",
    "leaderboard_text",
    "mean_se",
    "plot_delta_m",
    "plot_problem",
    "plot_report",
    "problem_table",
    "run_problem",
    "run_suite",
    "single_task_method",
    "to_json",
    "write_json",
]
