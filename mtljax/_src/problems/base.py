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
      sample_at: ``(data_key, step) -> batch``, jittable, or ``None``: the batch of training
        step ``step`` of a run whose data key is ``data_key``, for a problem that passes over
        its training set epoch by epoch (a fresh shuffle per epoch, each example once, as a
        data loader with ``shuffle=True``). ``None``: step ``step`` draws ``sample`` with its
        own key. The runners train on :meth:`sample_step`, which picks between the two.
      single_device: why the problem trains on one device only (its batches cannot be split
        along an example axis), or ``None``: data-parallel runs refuse it with this reason.
      evaluate: ``params -> {metric: f32[T]}`` on held-out data, or ``None``. It receives
        what :func:`evaluation_input` gives: the trained :class:`Params`, or, for a model with
        state (BatchNorm), the whole :class:`mtljax.TrainState`, so that it evaluates with the
        running statistics (``model.eval_losses(state, batch)``, or
        ``mtljax.to_nnx(model, state).eval()``; both accept ``Params`` as well).
      optimizer: the problem's default optax optimizer for the model.
      steps: the default number of training steps.
      info: problem constants worth reporting (noise levels, scales…), JSON-serialisable.
      evaluate_split: ``(params, split) -> {metric: f32[T]}`` on a named held-out split (given
        what ``evaluate`` is given), one
        of ``splits`` (``"validation"`` for model selection, ``"test"`` read once at the
        end); a metric undefined for a task is NaN there. ``None`` when the problem has no
        separate splits. Called eagerly (it may jit internally).
      metrics: ``{task: (metric, higher_is_better)}``: the metric that scores each task, a key
        of ``evaluate_split``'s result, and its direction. Empty when not declared.
      auxiliary: tasks that are trained but are not a goal in themselves ("hints"): model
        selection and Δm% use the other (main) tasks only.
      splits: the split names ``evaluate_split`` accepts.
      init_params: ``key -> Params``: fresh initial parameters of the same model, for runs
        over several seeds on the same data; ``None`` when not provided.
      steps_per_epoch: the train steps that make one pass over the training set
        (``⌈examples / batch size⌉``; 1 for a problem without data, whose every step sees the
        whole objective); ``None`` when every batch is drawn fresh (no epochs). Methods with an
        epoch-level rule (``dwa``) get it from the benchmark runner.
    """

    name: str
    model: Model
    params: Params
    sample: Callable[[jax.Array], Batch]
    optimizer: optax.GradientTransformation
    steps: int
    evaluate: Callable[[Params], dict[str, jax.Array]] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    evaluate_split: Callable[[Params, str], dict[str, jax.Array]] | None = None
    metrics: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)
    auxiliary: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("validation", "test")
    init_params: Callable[[jax.Array], Params] | None = None
    steps_per_epoch: int | None = None
    sample_at: Callable[[jax.Array, jax.Array], Batch] | None = None
    single_device: str | None = None

    def __post_init__(self):
        names = self.model.task_names
        object.__setattr__(self, "auxiliary", tuple(self.auxiliary))
        unknown = [t for t in (*self.metrics, *self.auxiliary) if t not in names]
        if unknown:
            raise ValueError(
                f"problem {self.name!r}: tasks {unknown} in `metrics`/`auxiliary` are not among "
                f"the model's tasks {names}"
            )
        if self.auxiliary and set(self.auxiliary) == set(names):
            raise ValueError(f"problem {self.name!r}: every task is auxiliary; keep a main task")
        if self.metrics and set(self.metrics) != set(names):
            missing = [t for t in names if t not in self.metrics]
            raise ValueError(f"problem {self.name!r}: `metrics` lacks tasks {missing}")

    def sample_step(self, data_key: jax.Array, step: jax.Array) -> Batch:
        """The training batch of step ``step`` (jittable): ``sample_at(data_key, step)`` where
        the problem defines it, else ``sample(fold_in(data_key, step))``."""
        if self.sample_at is not None:
            return self.sample_at(data_key, step)
        return self.sample(jax.random.fold_in(data_key, step))

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.model.task_names

    @property
    def main_tasks(self) -> tuple[str, ...]:
        """The tasks that are not auxiliary, in the model's order."""
        return tuple(t for t in self.task_names if t not in self.auxiliary)

    def higher_is_better(self) -> tuple[bool, ...]:
        """Per task, whether its metric is better when higher (needs ``metrics``)."""
        return tuple(bool(self.metrics[t][1]) for t in self.task_names)

    def task_metrics(self, params: Params, split: str) -> dict[str, float]:
        """``{task: its metric on split}`` from :attr:`evaluate_split` and :attr:`metrics`."""
        if self.evaluate_split is None or not self.metrics:
            raise ValueError(
                f"problem {self.name!r} declares no `evaluate_split` and `metrics` (no "
                "validation/test splits to score tasks on)"
            )
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.splits)}")
        values = self.evaluate_split(params, split)
        out = {}
        for i, task in enumerate(self.task_names):
            metric = self.metrics[task][0]
            if metric not in values:
                raise ValueError(
                    f"problem {self.name!r}: evaluate_split gave no {metric!r} (task {task!r}); "
                    f"it gave {sorted(values)}"
                )
            out[task] = float(values[metric][i])
        return out


def evaluation_input(model: Model, state: Any) -> Any:
    """What a problem's ``evaluate`` and ``evaluate_split`` receive from a train state: its
    parameters, or, for a model with state (BatchNorm's running statistics), the train state
    itself."""
    return state if model.has_state else state.params
