"""The built-in problem interface."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from mtljax._src.model import Batch, Model, Params


@dataclasses.dataclass(frozen=True)
class Problem:
    """A built-in multi-task problem, generated in code (no downloads).

    Attributes:
      name: the registry name.
      model: the multi-task model (its ``task_names`` name the tasks).
      params: initial parameters.
      sample: ``key -> batch``, jittable: a training batch (a fixed dataset samples from device
        arrays; a problem without data returns ``None``).
      evaluate: ``params -> {metric: f32[T]}`` on held-out data, or ``None``.
      optimizer: the problem's default optax optimizer for the model.
      steps: the default number of training steps.
      info: problem constants worth reporting (noise levels, scales…), JSON-serialisable.
    """

    name: str
    model: Model
    params: Params
    sample: Callable[[jax.Array], Batch]
    optimizer: optax.GradientTransformation
    steps: int
    evaluate: Callable[[Params], dict[str, jax.Array]] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.model.task_names
