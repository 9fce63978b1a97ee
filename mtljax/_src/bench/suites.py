"""The benchmark suites: which problems, methods, seeds and steps each one runs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

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
      eval_every: steps between validation evaluations (one ``lax.scan`` each), or
        ``"epoch"`` for the problem's ``steps_per_epoch``.
      methods: method names; ``None`` for every method of ``mtljax.methods`` but ``fixed``.
      method_args: ``{method: {hyper-parameter: value}}``; defaults otherwise.
      plateau: a :class:`Plateau` learning-rate schedule stepped at every validation
        evaluation (``None``: the problem's optimizer as it is).
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int | None = None
    eval_every: int | str = 100
    methods: tuple[str, ...] | None = None
    method_args: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    plateau: Plateau | None = None


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Reduce the learning rate when the validation score stops improving (PyTorch's
    ``ReduceLROnPlateau`` in mode ``"min"`` with relative threshold, its defaults but for the
    ones given here), stepped once per validation evaluation on the run's selection score
    (the validation Δm% of a multi-task run, its task's validation metric for a single-task
    baseline).

    After each evaluation with score ``s``: ``s`` improves on the best ``b`` when
    ``s < b − threshold·|b|``; after more than ``patience`` evaluations in a row without
    improvement, ``lr ← max(factor·lr, min_lr)`` and the count restarts (no cooldown).

    The runner multiplies the problem optimizer's updates by ``lr / initial_lr`` through an
    ``optax.inject_hyperparams(optax.scale)`` appended to it, and sets that scale in the
    optimizer state between evaluations: the compiled step is the same for every
    learning rate. That equals changing the learning rate for optimizers whose learning
    rate scales the final update (Adam, SGD, ...).

    Attributes:
      initial_lr: the problem optimizer's learning rate.
      factor, patience, min_lr, threshold: as PyTorch's ``ReduceLROnPlateau``.
    """

    initial_lr: float
    factor: float = 0.1
    patience: int = 10
    min_lr: float = 0.0
    threshold: float = 1e-4

    def __post_init__(self):
        if not self.initial_lr > 0:
            raise ValueError(f"Plateau: initial_lr must be > 0, got {self.initial_lr}")
        if not 0 < self.factor < 1:
            raise ValueError(f"Plateau: factor must be in (0, 1), got {self.factor}")
        if int(self.patience) != self.patience or self.patience < 0:
            raise ValueError(f"Plateau: patience must be an integer ≥ 0, got {self.patience}")
        if not 0 <= self.min_lr <= self.initial_lr:
            raise ValueError(f"Plateau: need 0 ≤ min_lr ≤ initial_lr, got {self.min_lr}")


class PlateauState(NamedTuple):
    """Host-side state of a :class:`Plateau` schedule."""

    lr: float
    best: float
    bad: int


def plateau_init(plateau: Plateau) -> PlateauState:
    return PlateauState(float(plateau.initial_lr), math.inf, 0)


def plateau_step(plateau: Plateau, state: PlateauState, score: float) -> PlateauState:
    """One evaluation's update (a non-finite score counts as no improvement)."""
    lr, best, bad = state
    if math.isfinite(score) and (
        not math.isfinite(best) or score < best - plateau.threshold * abs(best)
    ):
        return PlateauState(lr, float(score), 0)
    bad += 1
    if bad > plateau.patience:
        new = max(lr * plateau.factor, plateau.min_lr)
        # PyTorch's eps: changes smaller than 1e-8 are ignored.
        return PlateauState(new if lr - new > 1e-8 else lr, best, 0)
    return PlateauState(lr, best, bad)


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

# QM9 (the 11 targets of Nash-MTL, FAMO and FairGrad). The paper protocol: Adam 1e-3, batch 120,
# 300 epochs, ReduceLROnPlateau(min, factor 0.7, patience 5, min_lr 1e-5) once per epoch on the
# validation Δm% (single-task runs: their task's validation MAE), model selected on validation,
# 3 seeds (Navon et al. 2022, Sec. 6.1 and App. B; experiments/quantum_chemistry/trainer.py of
# github.com/AvivNavon/nash-mtl). CAGrad c = 0.4 (Nash-MTL App. B); FAMO γ = 0.001 (Liu et al.
# 2023, App. E); FairGrad α = 2.0 (experiments/quantum_chemistry/run.sh of
# github.com/OptMN-Lab/fairgrad).
QM9_PAPER_METHODS = (
    "ew",
    "uw",
    "dwa",
    "rlw",
    "mgda",
    "pcgrad",
    "cagrad",
    "imtl",
    "imtl_g",
    "nash_mtl",
    "famo",
    "fairgrad",
    "db_mtl",
    "upgrad",
)
QM9_METHOD_ARGS = {"cagrad": {"c": 0.4}, "famo": {"gamma": 1e-3}, "fairgrad": {"alpha": 2.0}}
QM9_PLATEAU = Plateau(initial_lr=1e-3, factor=0.7, patience=5, min_lr=1e-5)
QM9_QUICK_METHODS = ("ew", "uw", "famo", "nash_mtl", "upgrad")
QM9_QUICK_STEPS, QM9_QUICK_EVAL = 120, 40

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
    "qm9-paper": Suite(
        "qm9-paper",
        (
            ProblemSpec(
                "qm9",
                {"model": "mpnn", "batch_size": 120, "epochs": 300},
                steps=None,  # 300 epochs of the 110 831 training molecules
                eval_every="epoch",  # 924 steps: ⌈110 831 / 120⌉
                methods=QM9_PAPER_METHODS,
                method_args=QM9_METHOD_ARGS,
                plateau=QM9_PLATEAU,
            ),
        ),
        seeds=3,
        description="QM9, the published protocol (MPNN, Adam 1e-3, batch 120, 300 epochs, "
        "plateau schedule on validation Δm% every epoch, 3 seeds); for an accelerator",
    ),
    "qm9-quick": Suite(
        "qm9-quick",
        (
            ProblemSpec(
                "qm9",
                {
                    "model": "mpnn-light",
                    "num_train": 2000,
                    "num_validation": 500,
                    "num_test": 1000,
                    "batch_size": 32,
                },
                steps=QM9_QUICK_STEPS,
                eval_every=QM9_QUICK_EVAL,
                methods=QM9_QUICK_METHODS,
                method_args=QM9_METHOD_ARGS,
                plateau=Plateau(initial_lr=1e-3, factor=0.7, patience=1, min_lr=1e-5),
            ),
        ),
        seeds=2,
        description="QM9 on a 2-core CPU (light MPNN, 2000 training molecules, batch 32, "
        f"{QM9_QUICK_STEPS} steps, 2 seeds): a smoke benchmark whose numbers are NOT comparable "
        "with the papers'",
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]
