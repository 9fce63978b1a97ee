"""The benchmark suites: which problems, methods, seeds and steps each one runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

PyTree = Any

SINGLE_TASK = "single-task"
PROBE_BATCHES = 4  # training batches in the fixed probe set of the conflict statistics
MAIN_ONLY = "ew [main only]"

# ----------------------------------------------------------------------------------------------
# Suites


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """One problem of a suite.

    Attributes:
      name: a registered problem name.
      options: keyword options of the problem's factory.
      steps: training steps per run (rounded up to a multiple of ``eval_every``); default the
        problem's ``steps``.
      eval_every: steps between validation evaluations (one ``lax.scan`` each).
      methods: method names; ``None`` for every method of ``mtljax.methods`` but ``fixed``.
      method_args: ``{method: {hyper-parameter: value}}``; defaults otherwise.
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int | None = None
    eval_every: int = 100
    methods: tuple[str, ...] | None = None
    method_args: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named benchmark: problems and the number of seeds."""

    name: str
    problems: tuple[ProblemSpec, ...]
    seeds: int = 3
    description: str = ""


# Representative methods of each family, for the quick suite: loss weighting (EW, UW, DWA,
# FAMO), gradient-norm balancing (GradNorm) and Gramian/Jacobian aggregation (MGDA, PCGrad,
# CAGrad, Nash-MTL, UPGrad). Those not available are skipped.
QUICK_METHODS = (
    "ew",
    "uw",
    "dwa",
    "famo",
    "gradnorm",
    "mgda",
    "pcgrad",
    "cagrad",
    "nash_mtl",
    "upgrad",
)

SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        (
            ProblemSpec(
                "multidigits",
                {"num_train": 6000, "num_validation": 1500, "num_test": 1500},
                steps=600,
                eval_every=100,
                methods=QUICK_METHODS,
            ),
        ),
        seeds=3,
        description="multidigits, 10 representative methods, 3 seeds × 600 steps (2-core CPU: "
        "under 5 minutes)",
    ),
    "full": Suite(
        "full",
        (
            ProblemSpec("multidigits", {}, steps=3000, eval_every=250),
            ProblemSpec(
                "gradnorm_toy",
                {"num_tasks": 4, "sigmas": (1.0, 2.0, 4.0, 8.0), "num_train": 5000},
                steps=2000,
                eval_every=250,
            ),
            ProblemSpec("uw_noise", {}, steps=2000, eval_every=250),
            ProblemSpec("mmoe_synthetic", {}, steps=2000, eval_every=250),
        ),
        seeds=3,
        description="every method on every problem with validation splits, 3 seeds",
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]
