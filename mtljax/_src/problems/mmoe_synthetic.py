"""MMoE's synthetic regression tasks with a controlled task correlation (Ma et al. 2018, §3.2).

Two regression tasks on ``x ~ N(0, I_d)``: with orthogonal unit vectors ``u₁, u₂``, a scale ``c``
and the correlation score ``p``,

    w₁ = c u₁,   w₂ = c (p u₁ + √(1 − p²) u₂),
    yₖ = wₖᵀx + Σᵢ₌₁ᵐ sin(αᵢ wₖᵀx + βᵢ) + εₖ,   εₖ ~ N(0, 0.01),

with ``d = 100`` and ``c = 1``. ``cos(w₁, w₂) = p``; the Pearson correlation of the labels is
close to ``p`` (a little lower for ``p < 1``, as in the paper's Figure 2).

The paper calls ``αᵢ, βᵢ`` "given parameters" without values. Two choices are offered:

* ``sines="range"`` (default): ``αᵢ = i``, ``βᵢ = (i − 1)²`` for ``i = 1..m``, the values of
  the public generator of the same construction by Hazimeh et al. (DSelect-k, NeurIPS 2021),
  with ``m = 5`` by default: with the paper's ``m = 10`` the sum has frequencies up to 10 and
  the paper's models (16-unit experts, a 113-unit shared bottom) learn nothing of it in 2000
  Adam steps (the loss stays at the label variance); they need about 2·10⁴ steps
  (``num_sines=10``);
* ``sines="normal"``: ``αᵢ, βᵢ ~ N(0, 1)`` (``alpha_scale`` scales ``α``), smooth targets that
  shared-bottom and MMoE learn close to the noise floor at every correlation.

Ma et al. generate examples "until enough data are generated": by default the problem draws a
fresh minibatch from the tasks at every step (``online=True``), and holds out fixed validation
and test sets; ``online=False`` samples minibatches from a fixed training set instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtljax._src import base, train
from mtljax._src.model import Model, Params
from mtljax._src.nn.cross_stitch import CrossStitch
from mtljax._src.nn.dselect_k import DSelectK
from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.mlp import MLP
from mtljax._src.nn.mmoe import MMoE, OMoE
from mtljax._src.nn.ple import CGC, PLE
from mtljax._src.nn.soft_sharing import SoftSharing
from mtljax._src.nn.split import from_block
from mtljax._src.nn.towers import StackedMLP
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import register

TASKS = ("task1", "task2")
ARCHS = (
    "shared_bottom",
    "omoe",
    "mmoe",
    "cgc",
    "ple",
    "dselect_k",
    "cross_stitch",
    "soft_sharing",
)


class TaskConstants(NamedTuple):
    """The two tasks: weight vectors ``w (2, d)`` and the sine parameters ``α, β (m,)``."""

    w: jax.Array
    alpha: jax.Array
    beta: jax.Array


def make_tasks(
    key: jax.Array,
    correlation: float,
    *,
    num_features: int = 100,
    scale: float = 1.0,
    num_sines: int = 5,
    sines: str = "range",
    alpha_scale: float = 1.0,
    sine_key: jax.Array | None = None,
) -> TaskConstants:
    """Draws ``u₁ ⟂ u₂`` (unit) from ``key`` and builds ``w₁, w₂`` with ``cos = p``.

    The sine parameters (shared by both tasks; see the module docstring): ``sines="range"``
    gives ``αᵢ = i``, ``βᵢ = (i − 1)²``; ``sines="normal"`` draws ``α ~ N(0, alpha_scale²)``,
    ``β ~ N(0, 1)`` from ``sine_key`` (a fixed key by default, so every seed shares them; pass
    a key to draw them per run).
    """
    p = float(correlation)
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"mmoe_synthetic: correlation must lie in [-1, 1], got {correlation!r}")
    if num_features < 2:
        raise ValueError(f"mmoe_synthetic: num_features must be ≥ 2, got {num_features}")
    if not isinstance(num_sines, int) or num_sines < 0:
        raise ValueError(f"mmoe_synthetic: num_sines must be an int ≥ 0, got {num_sines!r}")
    if sines == "range":
        i = jnp.arange(num_sines, dtype=jnp.float32)
        alpha, beta = i + 1.0, i * i
    elif sines == "normal":
        k_a, k_b = jax.random.split(jax.random.key(12345) if sine_key is None else sine_key)
        alpha = alpha_scale * jax.random.normal(k_a, (num_sines,))
        beta = jax.random.normal(k_b, (num_sines,))
    else:
        raise ValueError(f"mmoe_synthetic: sines must be 'range' or 'normal', got {sines!r}")
    g = jax.random.normal(key, (2, num_features))
    u1 = g[0] / jnp.linalg.norm(g[0])
    v = g[1] - jnp.dot(g[1], u1) * u1
    u2 = v / jnp.linalg.norm(v)
    w1 = scale * u1
    w2 = scale * (p * u1 + jnp.sqrt(max(0.0, 1.0 - p * p)) * u2)
    return TaskConstants(jnp.stack([w1, w2]), alpha, beta)


def sample_data(
    key: jax.Array, tasks: TaskConstants, num_examples: int, *, noise_std: float = 0.1
) -> dict[str, jax.Array]:
    """``{"x": (n, d), "y": (2, n)}`` from the tasks' constants (noise variance ``noise_std²``)."""
    k_x, k_e = jax.random.split(key)
    x = jax.random.normal(k_x, (num_examples, tasks.w.shape[1]))
    s = tasks.w @ x.T  # (2, n)
    waves = jnp.sum(jnp.sin(tasks.alpha[:, None, None] * s[None] + tasks.beta[:, None, None]), 0)
    y = s + waves + noise_std * jax.random.normal(k_e, s.shape)
    return {"x": x, "y": y}


def minibatch(
    key: jax.Array,
    source: dict[str, jax.Array] | TaskConstants,
    batch_size: int,
    *,
    noise_std: float = 0.1,
) -> dict[str, jax.Array]:
    """A minibatch of ``batch_size``: fresh examples when ``source`` is the tasks'
    :class:`TaskConstants` (unlimited data), else drawn with replacement from the fixed set
    ``{"x", "y"}``."""
    if isinstance(source, TaskConstants):
        return sample_data(key, source, batch_size, noise_std=noise_std)
    idx = jax.random.randint(key, (batch_size,), 0, source["x"].shape[0])
    return {"x": source["x"][idx], "y": source["y"][:, idx]}


def label_correlation(y: jax.Array) -> jax.Array:
    """Pearson correlation of the two tasks' labels ``y (2, n)``."""
    return jnp.corrcoef(y)[0, 1]


def build_module(
    arch: str,
    num_features: int,
    *,
    rngs: nnx.Rngs,
    num_experts: int = 8,
    expert_hidden: int = 16,
    tower_hidden: int = 8,
    bottom_hidden: int = 113,
    gate_bias: bool = False,
) -> nnx.Module:
    """The model for ``arch`` with Ma et al.'s sizes: single-layer experts of 16 units, towers
    with 8 hidden units, a 113-unit shared bottom (about MMoE's parameter count); the softmax
    gates of OMoE, MMoE, CGC and PLE have no bias, as in the papers, unless ``gate_bias``."""
    d, t = num_features, len(TASKS)
    tower = (tower_hidden, 1)
    if arch == "shared_bottom":
        return HardSharing(
            MLP((d, bottom_hidden), rngs=rngs, final_activation=True),
            StackedMLP((bottom_hidden, *tower), t, rngs=rngs),
        )
    if arch == "omoe":
        return OMoE(d, num_experts, (expert_hidden,), tower, t, rngs=rngs, gate_bias=gate_bias)
    if arch == "mmoe":
        return MMoE(d, num_experts, (expert_hidden,), tower, t, rngs=rngs, gate_bias=gate_bias)
    if arch in ("cgc", "ple"):
        half = max(1, num_experts // 2)
        block = CGC if arch == "cgc" else PLE
        return block(
            d, (expert_hidden,), half, max(1, half // t), tower, t, rngs=rngs, gate_bias=gate_bias
        )
    if arch == "dselect_k":
        return DSelectK(
            d, num_experts, (expert_hidden,), tower, t, k=2, rngs=rngs, entropy_weight=1e-3
        )
    if arch == "cross_stitch":
        return CrossStitch((d, bottom_hidden // 2, *tower), t, rngs=rngs)
    if arch == "soft_sharing":
        return SoftSharing((d, bottom_hidden // 2, *tower), t, rngs=rngs, penalty_weight=1e-3)
    raise ValueError(f"mmoe_synthetic: unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


def _mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((pred[..., 0] - y) ** 2, axis=-1)


def task_losses(module: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """``f32[2]``: each task's mean squared error.

    Penalties are not task losses: soft sharing's coupling penalty is the block's
    ``regularizer()`` and DSelect-k's gate entropy its ``entropy_penalty(x)``; both become the
    model's regularizer (added outside the method, see :func:`build_model`)."""
    return _mse(module(batch["x"]), batch["y"])


def _gate_entropy(module: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return module.entropy_penalty(batch["x"])


def build_model(
    arch: str, key: jax.Array | int, num_features: int = 100, **options: Any
) -> tuple[Model, Params]:
    """``(Model, Params)`` for ``arch`` (losses: per-task MSE), initialised from ``key``;
    ``options``: the sizes and ``gate_bias`` of :func:`build_module`."""
    module = build_module(arch, num_features, rngs=nnx.Rngs(key), **options)
    extra = _gate_entropy if isinstance(module, DSelectK) else None
    return from_block(module, task_names=TASKS, losses=task_losses, regularizer=extra)


def mse(model: Model, params: Params, data: dict[str, jax.Array]) -> jax.Array:
    """Per-task test MSE (without penalty terms)."""
    from mtljax._src.model import to_nnx

    return task_losses(to_nnx(model, params), data)


def fit(
    model: Model,
    params: Params,
    method: base.Method,
    optimizer: optax.GradientTransformation,
    data: dict[str, jax.Array] | TaskConstants,
    key: jax.Array,
    *,
    steps: int,
    batch_size: int,
    eval_data: dict[str, jax.Array] | None = None,
    checkpoints: int = 1,
    noise_std: float = 0.1,
) -> tuple[Params, jax.Array] | tuple[Params, jax.Array, jax.Array]:
    """Trains inside ``lax.scan``; jittable and ``vmap``-able (over seeds: params, data, key).

    ``data`` is a fixed training set ``{"x", "y"}`` (minibatches drawn from it with
    replacement) or the tasks' :class:`TaskConstants` (a fresh minibatch of ``batch_size``
    examples, label noise ``noise_std``, at every step: unlimited data). The model's
    regularizer, if any, is added as in the train step (:func:`mtljax.gradients`).

    Returns ``(params, losses (steps, T))``; with ``eval_data``, also the held-out MSE
    ``(checkpoints, T)`` measured every ``steps // checkpoints`` steps.
    """
    if steps < 1 or checkpoints < 1 or steps % checkpoints:
        raise ValueError(
            f"fit: steps ({steps}) must be a positive multiple of checkpoints ({checkpoints})"
        )

    def step(carry, k):
        p, opt_state, m_state = carry
        k_b, k_m = jax.random.split(k)
        batch = minibatch(k_b, data, batch_size, noise_std=noise_std)
        grads, m_state, metrics = train.gradients(model, method, p, m_state, batch, k_m)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state, m_state), metrics["losses"]

    def segment(carry, keys):
        carry, losses = jax.lax.scan(step, carry, keys)
        held_out = mse(model, carry[0], eval_data) if eval_data is not None else None
        return carry, (losses, held_out)

    init = (params, optimizer.init(params), method.init(model.num_tasks))
    keys = jax.random.split(key, steps).reshape(checkpoints, steps // checkpoints)
    (params, _, _), (losses, curve) = jax.lax.scan(segment, init, keys)
    losses = losses.reshape((steps,) + losses.shape[2:])
    if eval_data is None:
        return params, losses
    return params, losses, curve


@register("mmoe_synthetic")
def mmoe_synthetic(
    seed: int = 0,
    *,
    correlation: float = 0.9,
    arch: str = "mmoe",
    num_features: int = 100,
    online: bool = True,
    num_train: int = 10_000,
    num_validation: int = 2_000,
    num_test: int = 2_000,
    batch_size: int = 128,
    steps: int = 3_000,
    learning_rate: float = 1e-3,
    noise_std: float = 0.1,
    num_sines: int = 5,
    sines: str = "range",
    num_experts: int = 8,
) -> Problem:
    """MMoE's synthetic problem (Ma et al. 2018, §3.2) with ``arch`` in :data:`ARCHS`.

    Task constants, data and initial parameters are deterministic in ``seed``. ``sample``
    draws a fresh minibatch of ``batch_size`` examples from the tasks (``online=True``, the
    paper's unlimited data) or from ``num_train`` fixed training examples (``online=False``).
    ``evaluate`` gives the per-task MSE on the test split; ``evaluate_split`` on the
    ``"validation"`` or ``"test"`` split (fixed held-out examples). ``sines``/``num_sines``:
    the sine parameters (see :func:`make_tasks`).
    """
    if arch not in ARCHS:
        raise ValueError(f"mmoe_synthetic: unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    for name, v in (
        ("num_train", num_train),
        ("num_validation", num_validation),
        ("num_test", num_test),
        ("batch_size", batch_size),
        ("steps", steps),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"mmoe_synthetic: {name} must be a positive int, got {v!r}")
    k_task, k_train, k_test, k_init = jax.random.split(jax.random.key(seed), 4)
    k_val = jax.random.fold_in(k_test, 1)
    tasks = make_tasks(
        k_task, correlation, num_features=num_features, num_sines=num_sines, sines=sines
    )
    data = sample_data(k_train, tasks, num_train, noise_std=noise_std)
    splits = {
        "validation": sample_data(k_val, tasks, num_validation, noise_std=noise_std),
        "test": sample_data(k_test, tasks, num_test, noise_std=noise_std),
    }

    def init_params(key: jax.Array) -> Params:
        return build_model(arch, key, num_features, num_experts=num_experts)[1]

    model, params = build_model(arch, k_init, num_features, num_experts=num_experts)

    source = tasks if online else data
    sample = jax.jit(lambda key: minibatch(key, source, batch_size, noise_std=noise_std))

    split_mse = jax.jit(lambda p, d: mse(model, p, d))

    def evaluate_split(p: Params, split: str) -> dict[str, jax.Array]:
        if split not in splits:
            raise ValueError(f"mmoe_synthetic: unknown split {split!r}; valid: validation, test")
        return {"mse": split_mse(p, splits[split])}

    return Problem(
        name="mmoe_synthetic",
        model=model,
        params=params,
        sample=sample,
        optimizer=optax.adam(learning_rate),
        steps=steps,
        evaluate=lambda p: evaluate_split(p, "test"),
        info={
            "correlation": float(correlation),
            "arch": arch,
            "label_correlation": float(label_correlation(data["y"])),
            "num_features": num_features,
            "online": bool(online),
            "num_train": num_train if not online else None,
            "num_test": num_test,
            "sines": sines,
            "num_sines": num_sines,
        },
        evaluate_split=evaluate_split,
        metrics={t: ("mse", False) for t in TASKS},
        init_params=init_params,
        steps_per_epoch=None if online else -(-int(num_train) // int(batch_size)),
    )


__all__ = [
    "ARCHS",
    "TASKS",
    "TaskConstants",
    "build_model",
    "build_module",
    "fit",
    "label_correlation",
    "make_tasks",
    "minibatch",
    "mmoe_synthetic",
    "mse",
    "sample_data",
    "task_losses",
]
