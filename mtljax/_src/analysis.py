"""Task relations: gradient conflicts, inter-task affinity, task groupings, negative transfer.

When does multi-task learning help? Three views, all from quantities the train step already has:

* **Gradient conflict** (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020):
  tasks ``i`` and ``j`` conflict when ``cos(gᵢ, gⱼ) < 0``; their gradient-magnitude similarity
  is ``Φ(gᵢ, gⱼ) = 2‖gᵢ‖‖gⱼ‖ / (‖gᵢ‖² + ‖gⱼ‖²)`` (1 for equal norms, → 0 as one dominates).
  Both come from the Gramian ``G = J Jᵀ`` of the per-task gradients of the shared parameters.
* **Inter-task affinity** (Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
  Learning", NeurIPS 2021): the relative change of task ``j``'s loss after a lookahead step of
  the shared parameters along task ``i``'s gradient,
  ``Zᵢⱼ = 1 − Lⱼ(θₛ − η∇_{θₛ}Lᵢ, θⱼ) / Lⱼ(θₛ, θⱼ)``, on the same batch, averaged over training.
  ``Zᵢⱼ > 0``: a step for ``i`` also lowers ``j``'s loss.
* **Negative transfer**: a task's metric under multi-task training against its single-task
  baseline (:func:`negative_transfer`).

:func:`suggest_groups` turns an affinity matrix into a grouping of tasks into networks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src import base, engine
from mtljax._src.model import Batch, Model, Params
from mtljax._src.train import TrainState, TrainStep, pairwise_cosines

PyTree = Any

# ----------------------------------------------------------------------------------------------
# Gradient conflict


def magnitude_similarity(norms: jax.Array) -> jax.Array:
    """``Φᵢⱼ = 2‖gᵢ‖‖gⱼ‖ / (‖gᵢ‖² + ‖gⱼ‖²)`` (Yu et al. 2020, Def. 2); 1 where both are zero."""
    norms = jnp.asarray(norms)
    num = 2.0 * norms[..., :, None] * norms[..., None, :]
    den = norms[..., :, None] ** 2 + norms[..., None, :] ** 2
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


def _off_diagonal_mean(x: jax.Array) -> jax.Array:
    t = x.shape[-1]
    mask = ~jnp.eye(t, dtype=bool)
    return jnp.sum(jnp.where(mask, x, 0.0), axis=(-2, -1)) / max(t * (t - 1), 1)


def conflict_stats(gram: jax.Array) -> dict[str, jax.Array]:
    """Conflict statistics of one set of task gradients, from their Gramian ``G`` (T×T).

    Returns (jittable):

    * ``cosines``: ``cos(gᵢ, gⱼ) = Gᵢⱼ / √(Gᵢᵢ Gⱼⱼ)`` (0 where a gradient is zero, NaN where
      one is not finite);
    * ``grad_norms``: ``‖gᵢ‖ = √Gᵢᵢ``;
    * ``conflicting``: ``cos(gᵢ, gⱼ) < 0`` (boolean, False on the diagonal);
    * ``conflict_fraction``: the fraction of the ``T(T−1)/2`` pairs that conflict (NaN when a
      cosine is);
    * ``magnitude_similarity``: ``Φᵢⱼ`` (see :func:`magnitude_similarity`);
    * ``mean_cosine``: the mean of the off-diagonal cosines.
    """
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"conflict_stats: the Gramian must be square (T, T), got {gram.shape}")
    t = gram.shape[0]
    cos = pairwise_cosines(gram)
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    conflicting = (cos < 0) & ~jnp.eye(t, dtype=bool)
    pairs = max(t * (t - 1) // 2, 1)
    return {
        "cosines": cos,
        "grad_norms": norms,
        "conflicting": conflicting,
        "conflict_fraction": jnp.where(
            jnp.all(jnp.isfinite(cos)), jnp.sum(jnp.triu(conflicting, 1)) / pairs, jnp.nan
        ),
        "magnitude_similarity": magnitude_similarity(norms),
        "mean_cosine": _off_diagonal_mean(cos),
    }


def gradient_stats(
    model: Model, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> dict[str, jax.Array]:
    """:func:`conflict_stats` of the task gradients w.r.t. all shared parameters on ``batch``,
    plus ``losses``. One forward pass and ``T`` VJPs (jittable)."""
    losses, jac = engine.task_jacobian(model, params, batch, chunk_size=chunk_size)
    stats = conflict_stats(base.gramian(jac, model.num_tasks))
    stats["losses"] = losses
    return stats


def summarize_conflicts(cosines: Any, grad_norms: Any | None = None) -> dict[str, Any]:
    """Conflict statistics accumulated over training, from per-step cosines.

    Args:
      cosines: ``(S, T, T)`` pairwise cosines of ``S`` steps (e.g. the ``"cosines"`` metric
        stacked by :meth:`mtljax.TrainStep.scan`).
      grad_norms: optional ``(S, T)`` gradient norms (the ``"grad_norms"`` metric).

    Returns numpy arrays: ``mean_cosine`` (T×T, averaged over steps), ``conflict_rate`` (T×T,
    the fraction of steps in which each pair conflicts), ``conflict_fraction`` (``(S,)``, the
    fraction of conflicting pairs at each step) and its mean ``mean_conflict_fraction``; with
    ``grad_norms`` also ``magnitude_similarity`` (T×T, averaged over steps) and
    ``magnitude_similarity_steps`` (``(S, T, T)``).
    """
    cos = np.asarray(cosines, np.float64)
    if cos.ndim == 2:
        cos = cos[None]
    if cos.ndim != 3 or cos.shape[1] != cos.shape[2]:
        raise ValueError(f"summarize_conflicts: cosines must be (S, T, T), got {cos.shape}")
    s, t, _ = cos.shape
    off = ~np.eye(t, dtype=bool)
    conflicting = (cos < 0) & off
    iu = np.triu_indices(t, 1)
    pairs = max(len(iu[0]), 1)
    frac = conflicting[:, iu[0], iu[1]].sum(axis=1) / pairs
    out: dict[str, Any] = {
        "mean_cosine": cos.mean(axis=0),
        "conflict_rate": conflicting.mean(axis=0),
        "conflict_fraction": frac,
        "mean_conflict_fraction": float(frac.mean()) if s else float("nan"),
    }
    if grad_norms is not None:
        norms = np.asarray(grad_norms, np.float64).reshape(s, t)
        phi = np.asarray(magnitude_similarity(jnp.asarray(norms)), np.float64)
        out["magnitude_similarity_steps"] = phi
        out["magnitude_similarity"] = phi.mean(axis=0)
    return out


# ----------------------------------------------------------------------------------------------
# Inter-task affinity


def lookahead_affinity(
    model: Model,
    params: Params,
    batch: Batch,
    learning_rate: float | jax.Array,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """Inter-task affinity of one step (Fifty et al. 2021, Eq. 2), all pairs in one pass:

    ``Zᵢⱼ = 1 − Lⱼ(θₛ − η gᵢ, θⱼ) / Lⱼ(θₛ, θⱼ)``, ``gᵢ = ∇_{θₛ} Lᵢ(θₛ, θᵢ)`` on ``batch``.

    The per-task Jacobian ``J`` (rows ``gᵢ``) comes from one forward pass and ``T`` VJPs; the
    ``T`` lookahead forward passes are one ``vmap`` over ``i`` of the loss vector at
    ``θₛ − η Jᵢ``. Row ``i`` is the step's source task, column ``j`` the task it affects.
    Jittable; returns ``f32[T, T]`` (0 where ``Lⱼ = 0``). The lookahead is a plain gradient
    step of size ``η`` on the shared parameters; task-specific parameters stay fixed.
    """
    losses, jac = engine.task_jacobian(model, params, batch, chunk_size=chunk_size)

    def lookahead(g_i):
        shared = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params.shared, g_i)
        return model.losses_fn(shared, params.specific, batch)

    if chunk_size is None or chunk_size >= model.num_tasks:
        after = jax.vmap(lookahead)(jac)
    else:
        after = jax.lax.map(lookahead, jac, batch_size=int(chunk_size))
    ratio = after / jnp.where(losses != 0, losses, 1.0)[None, :]
    return jnp.where(losses[None, :] != 0, 1.0 - ratio, 0.0)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _affinity_scan(step, sample, every, chunk_size, state, keys, learning_rate):
    """The scan of :func:`train_with_affinity`, compiled once per (step, sample, every)."""
    model = step.model
    t = model.num_tasks

    def body(carry, k):
        st, i = carry
        batch = sample(k)
        z = jax.lax.cond(
            i % every == 0,
            lambda: lookahead_affinity(
                model, st.params, batch, learning_rate, chunk_size=chunk_size
            ).astype(jnp.float32),
            lambda: jnp.zeros((t, t), jnp.float32),
        )
        st, metrics = step.jitted(st, batch)
        return (st, i + 1), (z, metrics)

    (state, _), (zs, metrics) = jax.lax.scan(body, (state, jnp.zeros((), jnp.int32)), keys)
    return state, zs, metrics


class AffinityRun(NamedTuple):
    """Result of :func:`train_with_affinity`.

    Attributes:
      state: the final train state.
      affinity: ``Ẑ``, the mean of the per-step affinities (T×T).
      steps: ``(K,)`` the steps at which the affinity was measured.
      history: ``(K, T, T)`` the per-step affinities.
      metrics: the train step's metrics for every step, stacked.
    """

    state: TrainState
    affinity: np.ndarray
    steps: np.ndarray
    history: np.ndarray
    metrics: dict[str, np.ndarray]


def train_with_affinity(
    step: TrainStep,
    state: TrainState,
    sample: Callable[[jax.Array], Batch],
    keys: jax.Array,
    *,
    learning_rate: float,
    every: int = 1,
    chunk_size: int | None = None,
) -> AffinityRun:
    """Trains for ``len(keys)`` steps in one ``lax.scan`` and measures the inter-task affinity
    every ``every`` steps on that step's batch, before the update (Fifty et al. 2021, §3).

    ``learning_rate`` is the lookahead step size ``η`` (Fifty et al. use the model's learning
    rate). Returns an :class:`AffinityRun` with ``Ẑ`` the average over the measured steps.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"train_with_affinity: every must be an int ≥ 1, got {every!r}")
    if not isinstance(step, TrainStep):
        raise TypeError(f"train_with_affinity: expected a TrainStep, got {type(step).__name__}")
    t = step.model.num_tasks
    n = len(keys)
    step.model.check(state.params, jax.eval_shape(sample, keys[0]))
    lr = jnp.asarray(learning_rate, jnp.float32)
    state, zs, metrics = _affinity_scan(step, sample, every, chunk_size, state, keys, lr)
    idx = np.arange(0, n, every)
    history = np.asarray(zs)[idx]
    return AffinityRun(
        state=state,
        affinity=history.mean(axis=0) if len(idx) else np.zeros((t, t)),
        steps=idx,
        history=history,
        metrics=jax.tree_util.tree_map(np.asarray, metrics),
    )


# ----------------------------------------------------------------------------------------------
# Task groupings


class Grouping(NamedTuple):
    """A grouping of tasks into networks, as chosen by :func:`suggest_groups`.

    Attributes:
      groups: the groups (tuples of task names), one network each; at most the budget.
      score: the total affinity ``Σⱼ max_{g ∋ j} S(j | g)``.
      assignment: ``{task: the group whose network serves it}``.
      task_scores: ``{task: S(task | its group)}``.
      search: ``"exhaustive"`` or ``"local"`` (see :func:`suggest_groups`).
    """

    groups: tuple[tuple[str, ...], ...]
    score: float
    assignment: dict[str, tuple[str, ...]]
    task_scores: dict[str, float]
    search: str


MAX_GROUPING_TASKS = 16


def group_scores(affinity: Any) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Every non-empty group of tasks and ``S(j | g)`` for each: ``(groups, f64[G, T])``.

    ``S(j | g) = mean_{i ∈ g, i ≠ j} Zᵢⱼ``, the average affinity onto ``j`` from the other
    members of ``g`` (Fifty et al. 2021, §3.2); ``0`` for ``j`` alone (a single-task network
    neither gains nor loses) and ``−∞`` for ``j ∉ g``.
    """
    z = np.asarray(affinity, np.float64)
    t = z.shape[0]
    if t > MAX_GROUPING_TASKS:
        raise ValueError(
            f"task groupings enumerate all 2^T − 1 groups; T = {t} > {MAX_GROUPING_TASKS} is "
            "too many"
        )
    codes = np.arange(1, 2**t)
    member = ((codes[:, None] >> np.arange(t)[None, :]) & 1).astype(bool)
    order = np.lexsort((codes, member.sum(axis=1)))  # by size, then by code
    member = member[order]
    groups = [tuple(int(i) for i in np.flatnonzero(m)) for m in member]
    m = member.astype(np.float64)
    inflow = m @ z - m * np.diagonal(z)[None, :]  # Σ_{i ∈ g, i ≠ j} Zᵢⱼ
    others = m.sum(axis=1, keepdims=True) - 1.0
    scores = np.where(others > 0, inflow / np.maximum(others, 1.0), 0.0)
    return groups, np.where(member, scores, -np.inf)


def _objective(scores: np.ndarray, uncovered: float) -> np.ndarray:
    """``Σⱼ max_g S(j | g)`` over the last two axes ``(..., groups, T)``."""
    best = scores.max(axis=-2)
    return np.where(np.isfinite(best), best, uncovered).sum(axis=-1)


def _local_search(
    scores: np.ndarray, k: int, z: np.ndarray, starts: int = 32, max_rounds: int = 100
) -> list[int]:
    """Greedy selection of ``k`` groups, improved by best-improvement swaps of one group at a
    time, restarted from each of the ``starts`` best single groups; the best result wins.

    The greedy pass counts an uncovered task as alone (score 0); the swaps count it with a
    large penalty, so that the result covers every task.
    """
    n, t = scores.shape
    penalty = -1e6 * (1.0 + np.abs(z).max())

    def with_each_candidate(fixed: list[int]) -> np.ndarray:
        current = scores[fixed] if fixed else np.full((0, t), -np.inf)
        return np.concatenate(
            [np.broadcast_to(current, (n, *current.shape)), scores[:, None]], axis=1
        )

    def improve(chosen: list[int]) -> tuple[list[int], float]:
        while len(chosen) < k:
            gain = _objective(with_each_candidate(chosen), 0.0)
            gain[chosen] = -np.inf
            chosen.append(int(np.argmax(gain)))
        best = float(_objective(scores[chosen], penalty))
        for _ in range(max_rounds):
            improved = False
            for pos in range(k):
                rest = chosen[:pos] + chosen[pos + 1 :]
                total = _objective(with_each_candidate(rest), penalty)
                total[chosen] = -np.inf
                cand = int(np.argmax(total))
                if total[cand] > best + 1e-12:
                    chosen[pos], best, improved = cand, float(total[cand]), True
            if not improved:
                break
        return chosen, best

    first = np.argsort(-_objective(scores[:, None], 0.0), kind="stable")[:starts]
    results = [improve([int(g)]) for g in first]
    return max(results, key=lambda r: r[1])[0]


def suggest_groups(
    affinity: Any,
    num_groups: int,
    task_names: Sequence[str] | None = None,
    *,
    max_combinations: int = 2_000_000,
) -> Grouping:
    """Chooses ``num_groups`` groups of tasks (one network each) that maximise the total
    affinity onto every task, as in Fifty et al. 2021, §3.2.

    Every task must belong to at least one group and is served by the group where its score
    ``S(j | g)`` (see :func:`group_scores`) is highest; groups may overlap. The objective
    ``Σⱼ max_{g ∋ j} S(j | g)`` is maximised exactly over all sets of ``num_groups`` distinct
    groups when there are at most ``max_combinations`` of them (Fifty et al. solve the same
    problem by branch and bound); otherwise by local search: a greedy choice (one group at a
    time, the one that raises the objective most) improved by swapping single groups while
    that helps, restarted from several first groups. Ties go to the earlier candidate:
    smaller groups first.
    Groups that serve no task are dropped, so fewer than ``num_groups`` may come back.
    """
    z = np.asarray(affinity, np.float64)
    if z.ndim != 2 or z.shape[0] != z.shape[1]:
        raise ValueError(f"suggest_groups: affinity must be square (T, T), got {z.shape}")
    t = z.shape[0]
    names = tuple(task_names) if task_names is not None else tuple(f"task{i}" for i in range(t))
    if len(names) != t:
        raise ValueError(f"suggest_groups: {len(names)} task names for {t} tasks")
    if not np.all(np.isfinite(z)):
        raise ValueError("suggest_groups: the affinity matrix has non-finite entries")
    groups, scores = group_scores(z)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer):
        raise TypeError(f"suggest_groups: num_groups must be an int, got {num_groups!r}")
    if not 1 <= num_groups <= len(groups):
        raise ValueError(
            f"suggest_groups: num_groups must be in 1..{len(groups)}, got {num_groups}"
        )
    num_groups = int(num_groups)
    if math.comb(len(groups), num_groups) <= max_combinations:
        best, best_score = None, -np.inf
        combos = itertools.combinations(range(len(groups)), num_groups)
        while True:
            block = np.asarray(list(itertools.islice(combos, 65_536)), np.int64)
            if block.size == 0:
                break
            total = _objective(scores[block], -np.inf)  # −∞ when a task is uncovered
            k = int(np.argmax(total))
            if total[k] > best_score:
                best, best_score = block[k], float(total[k])
        chosen = [int(i) for i in best]
        search = "exhaustive"
    else:
        chosen = _local_search(scores, num_groups, z)
        search = "local"
    sel = scores[chosen]
    serving = np.argmax(sel, axis=0)
    # Groups that serve no task (the budget was larger than needed) are dropped.
    used = sorted(set(serving.tolist()))
    chosen = [chosen[i] for i in used]
    sel = scores[chosen]
    serving = np.argmax(sel, axis=0)
    assignment = {names[j]: tuple(names[i] for i in groups[chosen[serving[j]]]) for j in range(t)}
    task_scores = {names[j]: float(sel[serving[j], j]) for j in range(t)}
    return Grouping(
        groups=tuple(tuple(names[i] for i in groups[k]) for k in chosen),
        score=float(sum(task_scores.values())),
        assignment=assignment,
        task_scores=task_scores,
        search=search,
    )


# ----------------------------------------------------------------------------------------------
# Negative transfer


def check_directions(owner: str, higher_is_better: Iterable[Any]) -> None:
    """Every ``higher_is_better`` entry must be a bool (``"False"`` or ``0.5`` would otherwise
    be read by truthiness)."""
    bad = [h for h in higher_is_better if not isinstance(h, bool | np.bool_)]
    if bad:
        raise ValueError(f"{owner}: higher_is_better entries must be bools, got {bad!r}")


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``s/√n`` over seeds; NaN when any seed's value is not finite
    (a diverged seed is not averaged away), and ``se`` NaN for a single seed."""
    v = np.asarray(values, np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def negative_transfer(
    mtl: Mapping[str, Sequence[float] | float],
    single_task: Mapping[str, Sequence[float] | float],
    higher_is_better: Mapping[str, bool],
) -> dict[str, dict[str, Any]]:
    """Per task, the multi-task metric against its single-task baseline.

    Args:
      mtl: ``{task: metric}`` of the multi-task model (one value, or one per seed).
      single_task: ``{task: metric}`` of each task's single-task model (idem).
      higher_is_better: ``{task: bool}``.

    Returns ``{task: {...}}`` with ``mtl`` and ``single_task`` (means over seeds; NaN when a
    seed's value is not finite), their standard errors, ``relative_change``
    ``= (−1)^{h}(M_mtl − M_st)/|M_st| × 100`` (positive = worse, the sign convention of Δm%),
    ``hurts`` (the mean is worse than the baseline), ``significant`` (worse by more than twice
    the combined standard error, when both have several seeds) and ``finite`` (every seed's
    value of both is finite; otherwise ``hurts`` and ``significant`` are False and say nothing).
    The three mappings must name the same tasks.
    """
    check_directions("negative_transfer", higher_is_better.values())
    tasks = set(higher_is_better)
    for what, given in (("mtl", mtl), ("single_task", single_task)):
        if set(given) != tasks:
            missing, extra = sorted(tasks - set(given)), sorted(set(given) - tasks)
            raise ValueError(
                f"negative_transfer: {what} must have one entry per task of higher_is_better "
                f"({sorted(tasks)}); missing {missing}, unexpected {extra}"
            )
    out: dict[str, dict[str, Any]] = {}
    for task, hib in higher_is_better.items():
        m, m_se = mean_and_se(np.atleast_1d(mtl[task]))
        b, b_se = mean_and_se(np.atleast_1d(single_task[task]))
        sign = -1.0 if hib else 1.0
        rel = sign * (m - b) / abs(b) * 100.0 if b != 0 else float("nan")
        worse_by = sign * (m - b)
        se = math.hypot(m_se, b_se) if math.isfinite(m_se) and math.isfinite(b_se) else None
        out[task] = {
            "mtl": m,
            "mtl_se": m_se,
            "single_task": b,
            "single_task_se": b_se,
            "relative_change": rel,
            "hurts": bool(worse_by > 0),
            "significant": bool(se is not None and worse_by > 2 * se),
            "finite": bool(math.isfinite(m) and math.isfinite(b)),
        }
    return out


__all__ = [
    "AffinityRun",
    "Grouping",
    "conflict_stats",
    "gradient_stats",
    "group_scores",
    "lookahead_affinity",
    "magnitude_similarity",
    "negative_transfer",
    "suggest_groups",
    "summarize_conflicts",
    "train_with_affinity",
]
