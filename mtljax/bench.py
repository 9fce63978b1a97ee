"""Fair benchmarks of multi-task methods: single-task baselines, Δm%, seeds, validation-based
model selection, leaderboards and plots. ``python -m mtljax bench --suite quick`` runs one.

See :mod:`mtljax._src.bench` for the protocol.
"""

from mtljax._src.bench import (
    MAIN_ONLY,
    SINGLE_TASK,
    SUITES,
    ProblemSpec,
    Suite,
    auxiliary_report,
    delta_m,
    figures,
    format_table,
    get_suite,
    leaderboard_text,
    mean_se,
    plot_delta_m,
    plot_problem,
    plot_report,
    problem_table,
    run_problem,
    run_suite,
    single_task_method,
    to_json,
    write_json,
)

__all__ = [
    "MAIN_ONLY",
    "SINGLE_TASK",
    "SUITES",
    "ProblemSpec",
    "Suite",
    "auxiliary_report",
    "delta_m",
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
