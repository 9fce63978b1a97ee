"""The two-objective 2-D toy of CAGrad (Liu et al. 2021), scaled as in Nash-MTL and FAMO.

The parameter is a point ``x = (x₁, x₂)``, shared by both tasks. With
``c₁(x) = max(tanh(x₂/2), 0)`` and ``c₂(x) = max(tanh(−x₂/2), 0)``, the objectives of
Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning"
(NeurIPS 2021), are

    hᵢ(x) = log max(|aᵢ(x)|, 5·10⁻⁶) + 6,   a₁ = −(x₁ + 7)/2 + tanh(x₂),
                                            a₂ = −(x₁ − 3)/2 − tanh(x₂) + 2,
    gᵢ(x) = ((x₁ ∓ 7)² + 0.1 (x₂ + 8)²) / 10 − 20     (− for task 1, + for task 2),
    fᵢ(x) = c₁(x) hᵢ(x) + c₂(x) gᵢ(x).

Above the x₁ axis the log terms carve narrow valleys (where ``aᵢ = 0``) that trap
gradient descent; below it two quadratic bowls centred at ``x₁ = ±7`` meet. Navon et al.,
"Multi-Task Learning as a Bargaining Game" (ICML 2022, Appendix B) and Liu et al., "FAMO:
Fast Adaptive Multitask Optimization" (NeurIPS 2023) scale the first objective by 0.1,
``ℓ₁ = 0.1 f₁``, ``ℓ₂ = f₂``, so that the losses differ in scale, and run Adam (learning rate
1e-3) for 35 000 steps from five starts.

Pareto set (derived from the definition; scaling a loss does not change it). Below the axis
``c₁ = 0`` and ``fᵢ = c₂ gᵢ``. Stationarity of ``α∇f₁ + (1−α)∇f₂`` gives, from the
``x₁``-component, ``α = (x₁ + 7)/14`` (so ``|x₁| ≤ 7``), and then from the ``x₂``-component

    c₂′(x₂) ḡ + c₂(x₂) · 0.02 (x₂ + 8) = 0,   ḡ = (49 − x₁²)/10 + 0.01 (x₂ + 8)² − 20,

with ``c₂′ = −(1 − c₂²)/2``. Its root ``x₂*(x₁)`` is ``−8.3551`` at ``x₁ = 0`` (the value
CAGrad's figure draws as a flat front) and ``−8.4345`` at ``|x₁| = 7``: the front is the
slightly curved arc ``{(x₁, x₂*(x₁)) : |x₁| ≤ 7}``, whose end points are the optima of
the single tasks (``ℓ₁``'s at ``x₁ = 7``, ``ℓ₂``'s at ``x₁ = −7``).

A run *reaches the front* (:func:`on_front`, ``ToyRun.reached``) when it ends within ``tol``
(0.05) of the arc and away from its end points, ``|x₁| ≤ 7 − END_MARGIN``. A method that
collapses onto one task ends at that task's optimum: Pareto optimal, but no trade-off between
the tasks. It approaches that end point gradually, so the end points are widened to
``|x₁| > 7 − END_MARGIN`` (:func:`at_task_optimum`). The margin (0.5) separates the registered
methods' runs that end inside the front (``|x₁| ≤ 6.2`` after 35 000 steps: MGDA's from
``(0, 0)`` at ``x₁ ≈ 6.1``, every other one at ``|x₁| ≤ 5.3``) from those that collapse
(``|x₁| ≥ 6.9``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtljax._src import base
from mtljax._src.model import Model, Params
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import register
from mtljax._src.train import gradients

STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
SCALE = 0.1  # ℓ₁ = SCALE · f₁ (Nash-MTL, FAMO)
STEPS = 35_000
LEARNING_RATE = 1e-3
LOG_FLOOR = 5e-6  # the floor of |aᵢ| inside the logarithm
FRONT_X2_AT_0 = -8.355109776756292  # x₂*(0)
END_MARGIN = 0.5  # |x₁| > 7 − END_MARGIN on the front counts as a single task's optimum
TASK_NAMES = ("l1", "l2")


def objectives(x: jax.Array) -> jax.Array:
    """The unscaled objectives ``(f₁, f₂)`` at ``x`` of shape ``(..., 2)``; shape ``(..., 2)``."""
    x = jnp.asarray(x)
    x1, x2 = x[..., 0], x[..., 1]
    c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0.0)
    c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)
    a1 = -0.5 * (x1 + 7.0) + jnp.tanh(x2)
    a2 = -0.5 * (x1 - 3.0) - jnp.tanh(x2) + 2.0
    h1 = jnp.log(jnp.maximum(jnp.abs(a1), LOG_FLOOR)) + 6.0
    h2 = jnp.log(jnp.maximum(jnp.abs(a2), LOG_FLOOR)) + 6.0
    bowl = 0.1 * (x2 + 8.0) ** 2
    g1 = ((x1 - 7.0) ** 2 + bowl) / 10.0 - 20.0
    g2 = ((x1 + 7.0) ** 2 + bowl) / 10.0 - 20.0
    return jnp.stack([c1 * h1 + c2 * g1, c1 * h2 + c2 * g2], axis=-1)


def losses(x: jax.Array, scale: float = SCALE) -> jax.Array:
    """The task losses ``(ℓ₁, ℓ₂) = (scale · f₁, f₂)`` at ``x`` of shape ``(..., 2)``."""
    f = objectives(x)
    return f * jnp.asarray([scale, 1.0], f.dtype)


def loss_lower_bounds(scale: float = SCALE) -> tuple[float, float]:
    """Lower bounds of ``(ℓ₁, ℓ₂)`` used by FAMO on this toy: ``fᵢ ≥ −20 > −21``."""
    return (-21.0 * scale, -21.0)


def landscape(
    n: int = 200, lim: float = 11.0, scale: float = SCALE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X₁, X₂, L)`` on an ``n × n`` grid of ``[−lim, lim]²`` for contour plots; ``L`` is
    ``(n, n, 2)``: the two losses at every grid point."""
    grid = np.linspace(-lim, lim, n)
    x1, x2 = np.meshgrid(grid, grid)
    values = losses(jnp.stack([jnp.asarray(x1), jnp.asarray(x2)], -1), scale)
    return x1, x2, np.asarray(values)


def _front_condition(x2: np.ndarray, x1: np.ndarray) -> np.ndarray:
    c2 = np.tanh(-0.5 * x2)
    dc2 = -0.5 * (1.0 - c2**2)
    gbar = (49.0 - x1**2) / 10.0 + 0.01 * (x2 + 8.0) ** 2 - 20.0
    return dc2 * gbar + c2 * 0.02 * (x2 + 8.0)


def front_x2(x1: Any) -> np.ndarray:
    """``x₂*(x₁)``, the Pareto set's ``x₂`` above each ``x₁`` (``x₁`` clipped to ``[−7, 7]``).

    Bisection on ``[−10, −7]``, where the stationarity condition changes sign once.
    """
    x1 = np.clip(np.asarray(x1, np.float64), -7.0, 7.0)
    lo = np.full_like(x1, -10.0)
    hi = np.full_like(x1, -7.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        neg = _front_condition(mid, x1) < 0
        lo = np.where(neg, mid, lo)
        hi = np.where(neg, hi, mid)
    return 0.5 * (lo + hi)


def pareto_front(n: int = 101) -> np.ndarray:
    """``n`` points ``(x₁, x₂*(x₁))`` of the Pareto set, ``x₁`` from −7 to 7; shape ``(n, 2)``."""
    x1 = np.linspace(-7.0, 7.0, n)
    return np.stack([x1, front_x2(x1)], -1)


def distance_to_front(x: Any) -> np.ndarray:
    """Distance of points ``(..., 2)`` to the Pareto set (dense polyline approximation)."""
    x = np.asarray(x, np.float64)
    front = pareto_front(1401)
    d = np.linalg.norm(x[..., None, :] - front, axis=-1)
    return d.min(-1)


def on_front(x: Any, tol: float = 0.05, end_margin: float = END_MARGIN) -> np.ndarray:
    """Whether points ``(..., 2)`` have reached the Pareto front: within ``tol`` of the Pareto
    set and not at a single task's optimum, ``|x₁| ≤ 7 − end_margin`` (``end_margin = 0``
    admits the end points themselves)."""
    x = np.asarray(x, np.float64)
    return (distance_to_front(x) <= tol) & (np.abs(x[..., 0]) <= 7.0 - end_margin)


def at_task_optimum(x: Any, tol: float = 0.05, end_margin: float = END_MARGIN) -> np.ndarray:
    """Whether points ``(..., 2)`` lie within ``tol`` of the Pareto set at one of its end points,
    the single tasks' optima (``ℓ₁``'s at ``x₁ = 7``, ``ℓ₂``'s at ``x₁ = −7``), widened to
    ``|x₁| > 7 − end_margin``: where a method that collapses onto one task ends."""
    x = np.asarray(x, np.float64)
    return (distance_to_front(x) <= tol) & (np.abs(x[..., 0]) > 7.0 - end_margin)


def make_model(scale: float = SCALE) -> Model:
    """The toy as an mtljax model: shared parameters ``{"x": x}``, no task-specific ones."""
    return Model(
        TASK_NAMES,
        lambda shared, specific, batch: losses(shared["x"], scale),
        last_shared="x",
    )


def paper_settings(name: str, scale: float = SCALE) -> dict[str, Any]:
    """Keyword arguments a method's paper uses on this toy beyond its factory defaults.

    Two papers ran this toy with other settings than their defaults: CAGrad's toy example
    uses ``c = 0.5`` (its default 0.4 is the NYUv2/Cityscapes value), and FAMO's uses decay
    ``γ = 0`` and the losses' lower bounds (its losses are negative here, while FAMO's default
    floor is 0).
    """
    if name == "cagrad":
        return {"c": 0.5}
    if name == "famo":
        return {"gamma": 0.0, "min_losses": loss_lower_bounds(scale)}
    return {}


def build_method(name: str, scale: float = SCALE) -> base.Method | None:
    """``mtljax.methods.get(name)`` with :func:`paper_settings` and, for a factory that takes
    ``like`` (a method whose state has the shape of the shared parameters), this toy's shared
    parameters. ``None`` when the factory needs arguments the toy cannot choose (``fixed``)."""
    import inspect

    from mtljax import methods

    kwargs = paper_settings(name, scale)
    signature = inspect.signature(getattr(methods, name))
    if "like" in signature.parameters:
        kwargs["like"] = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in kwargs
    ]
    return None if required else methods.get(name, **kwargs)


@register("toy2d")
def toy2d(
    *,
    seed: int = 0,
    start: int = 0,
    scale: float = SCALE,
    learning_rate: float = LEARNING_RATE,
) -> Problem:
    """The 2-D two-objective toy (module docstring), from ``STARTS[start]``.

    The only parameter is the shared point ``x``; there are no task-specific parameters and no
    data (the batch is ``None``). ``info`` holds the five starts, the scale, the Pareto front's
    ``x₂*(0)`` and the losses' lower bounds; use :func:`run` to train a method from every
    start at once and :func:`landscape`, :func:`pareto_front` to plot.
    """
    del seed  # deterministic
    if not isinstance(start, int) or not 0 <= start < len(STARTS):
        raise ValueError(f"toy2d: start must be an index in [0, {len(STARTS)}), got {start!r}")
    if not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"toy2d: scale must be > 0, got {scale!r}")
    model = make_model(float(scale))
    x0 = jnp.asarray(STARTS[start], jnp.float32)
    return Problem(
        name="toy2d",
        model=model,
        params=Params({"x": x0}, ()),
        sample=lambda key: None,
        optimizer=optax.adam(learning_rate),
        steps=STEPS,
        steps_per_epoch=1,
        evaluate=None,
        info={
            "starts": [list(s) for s in STARTS],
            "start": start,
            "scale": float(scale),
            "front_x2_at_0": FRONT_X2_AT_0,
            "front_x1_range": [-7.0, 7.0],
            "loss_lower_bounds": list(loss_lower_bounds(float(scale))),
        },
    )


class ToyRun(NamedTuple):
    """Trajectories of one method from several starts.

    Attributes:
      positions: ``(S, N, 2)``: the start, ``x`` after every ``every`` steps, and the end point
        (``N = 1 + ⌈steps / every⌉``).
      final: ``(S, 2)``: ``x`` after the last step.
      final_losses: ``(S, 2)``: the losses there.
      reached: ``(S,)``: whether ``final`` reached the front (:func:`on_front`: within ``tol``
        of the Pareto set, away from the single tasks' optima).
      at_task_optimum: ``(S,)``: whether ``final`` lies within ``tol`` of the Pareto set at a
        single task's optimum (:func:`at_task_optimum`): the run collapsed onto one task.
      distance: ``(S,)``: distance of ``final`` to the Pareto set (end points included).
      skipped: ``(S,)``: steps skipped for non-finite losses or gradients.
      vmapped: whether the starts ran as one ``vmap`` (else one after another).
    """

    positions: np.ndarray
    final: np.ndarray
    final_losses: np.ndarray
    reached: np.ndarray
    at_task_optimum: np.ndarray
    distance: np.ndarray
    skipped: np.ndarray
    vmapped: bool


def _simulate(model, method, optimizer, x0, key, steps: int, every: int):
    """One start: ``steps`` steps of (method → optimizer) as a ``lax.scan``."""
    params = Params({"x": x0}, ())
    carry = (params, optimizer.init(params), method.init(model.num_tasks), key, jnp.int32(0))

    def step(carry, _):
        params, opt_state, mstate, key, skipped = carry
        key, sub = jax.random.split(key)
        grads, new_mstate, metrics = gradients(model, method, params, mstate, None, sub)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        leaves = jax.tree_util.tree_leaves((metrics["losses"], grads))
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))
        new = (new_params, new_opt_state, new_mstate)
        old = (params, opt_state, mstate)
        kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
        return (*kept, key, skipped + jnp.where(ok, 0, 1)), None

    def block(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=every)
        return carry, carry[0].shared["x"]

    carry, xs = jax.lax.scan(block, carry, None, length=steps // every)
    parts = [x0[None], xs]
    if steps % every:
        carry, _ = jax.lax.scan(step, carry, None, length=steps % every)
        parts.append(carry[0].shared["x"][None])
    return jnp.concatenate(parts, axis=0), carry[0].shared["x"], carry[4]


def run(
    method: base.Method,
    *,
    steps: int = STEPS,
    starts: Sequence[Sequence[float]] = STARTS,
    scale: float = SCALE,
    learning_rate: float = LEARNING_RATE,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    every: int = 10,
    tol: float = 0.05,
    end_margin: float = END_MARGIN,
) -> ToyRun:
    """Trains ``method`` on the toy from every start; returns the trajectories.

    Each run is ``steps`` steps of :func:`mtljax.gradients` (which computes exactly what the
    method needs, as in real training) followed by Adam(``learning_rate``), compiled as one
    ``lax.scan``; the starts run together under ``jax.vmap`` (one after another if the method
    cannot be vmapped). Steps with non-finite losses or gradients are skipped and counted.
    ``every`` sets how often the position is recorded; ``tol`` and ``end_margin`` decide
    whether an end point reached the front (:func:`on_front`).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"toy2d.run: steps must be a positive int, got {steps!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"toy2d.run: every must be a positive int, got {every!r}")
    every = min(every, steps)
    model = make_model(float(scale))
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    x0 = jnp.asarray(np.asarray(starts, np.float32).reshape(-1, 2))
    keys = jax.random.split(jax.random.key(seed), x0.shape[0])

    def one(x, k):
        return _simulate(model, method, opt, x, k, steps, every)

    try:
        positions, final, skipped = jax.jit(jax.vmap(one))(x0, keys)
        vmapped = True
    except Exception:  # a method without a batching rule: run the starts one by one
        outs = [jax.jit(one)(x, k) for x, k in zip(x0, keys, strict=True)]
        positions, final, skipped = (jnp.stack(v) for v in zip(*outs, strict=True))
        vmapped = False
    positions, final = np.asarray(positions), np.asarray(final)
    return ToyRun(
        positions=positions,
        final=final,
        final_losses=np.asarray(losses(jnp.asarray(final), scale)),
        reached=on_front(final, tol, end_margin),
        at_task_optimum=at_task_optimum(final, tol, end_margin),
        distance=distance_to_front(final),
        skipped=np.asarray(skipped),
        vmapped=vmapped,
    )
