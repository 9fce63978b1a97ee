"""Multi-task regularizers on stacked task weights: pure functions and proximal operators.

Task weights are stacked along a task axis (``task_axis``, default 0): ``w: (T, …)``, e.g. the
kernel ``(T, in, out)`` of :class:`mtljax.nn.StackedLinear`, or the ``(T, d)`` matrix of ``T``
linear models. Group norms couple the tasks through the norm over the task axis (and any other
``axes`` given), so that whole features are kept or dropped for all tasks at once.

Smooth penalties go into a model as its ``regularizer`` (added to the multi-task method's
update, outside the loss vector); non-smooth ones are better handled by their proximal operator
after each update: ``make_train_step(..., prox=prox_on(lambda w: prox_l1_l2(w, lr * lam),
"specific/heads/kernel"))`` (see :func:`prox_on`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src import tree as tree_lib

Axes = int | Sequence[int]
PyTree = Any


# -- helpers -----------------------------------------------------------------------------------


def _axes(w: jax.Array, axes: Axes, name: str) -> tuple[int, ...]:
    w = jnp.asarray(w)
    if w.ndim == 0:
        raise ValueError(f"{name}: expected stacked task weights with a task axis, got a scalar")
    raw = (axes,) if isinstance(axes, int) else tuple(axes)
    if not raw:
        raise ValueError(f"{name}: axes is empty")
    out = []
    for a in raw:
        if not isinstance(a, int) or not -w.ndim <= a < w.ndim:
            raise ValueError(f"{name}: axis {a!r} is out of range for weights of shape {w.shape}")
        out.append(a % w.ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axes {raw}")
    return tuple(sorted(out))


def _nonneg(value: float | jax.Array, name: str, what: str) -> None:
    if isinstance(value, int | float) and not value >= 0:
        raise ValueError(f"{name}: {what} must be ≥ 0, got {value!r}")


def _task_matrix(w: jax.Array, task_axis: int, name: str) -> jax.Array:
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(
            f"{name}: expected stacked task weights (T, …) with at least 2 dims, got {w.shape}"
        )
    if not -w.ndim <= task_axis < w.ndim:
        raise ValueError(f"{name}: task_axis {task_axis} is out of range for shape {w.shape}")
    w = jnp.moveaxis(w, task_axis, 0)
    return w.reshape(w.shape[0], -1)


def _from_task_matrix(m: jax.Array, like: jax.Array, task_axis: int) -> jax.Array:
    moved = jnp.moveaxis(jnp.asarray(like), task_axis, 0)
    return jnp.moveaxis(m.reshape(moved.shape), 0, task_axis)


# -- block sparsity: ℓ1/ℓ2 and ℓ1/ℓ∞ -------------------------------------------------------------


def group_norms(w: jax.Array, axes: Axes = 0, ord: float = 2) -> jax.Array:
    """The norm (``ord`` 2 or ``inf``) of every group: reduces ``axes``, keeps the others."""
    ax = _axes(w, axes, "group_norms")
    w = jnp.asarray(w)
    if ord == 2:
        return jnp.sqrt(jnp.sum(w * w, axis=ax))
    if ord == jnp.inf:
        return jnp.max(jnp.abs(w), axis=ax)
    raise ValueError(f"group_norms: ord must be 2 or inf, got {ord!r}")


def l1_l2(w: jax.Array, axes: Axes = 0) -> jax.Array:
    """``‖W‖₁,₂ = Σ_g ‖W_g‖₂``: the ℓ₂ norm over ``axes`` (the task axis) summed over the rest.

    Argyriou, Evgeniou & Pontil, "Convex multi-task feature learning", Mach. Learn. 2008;
    Obozinski, Taskar & Jordan, "Joint covariate selection and joint subspace selection for
    multiple classification problems", Stat. Comput. 2010. For ``W: (T, d)`` and ``axes=0`` the
    groups are the ``d`` features, each across all tasks: a feature is used by every task or
    by none.
    """
    return jnp.sum(group_norms(w, axes, 2))


def l1_linf(w: jax.Array, axes: Axes = 0) -> jax.Array:
    """``‖W‖₁,∞ = Σ_g max |W_g|``: the ℓ∞ norm over ``axes`` summed over the other positions
    (Turlach, Venables & Wright 2005; Obozinski et al. 2010 discuss both block norms)."""
    return jnp.sum(group_norms(w, axes, jnp.inf))


def prox_l1_l2(w: jax.Array, step: float | jax.Array, axes: Axes = 0) -> jax.Array:
    """``argmin_X ½‖X − W‖² + step·‖X‖₁,₂``: group soft-thresholding,
    ``X_g = W_g · max(0, 1 − step/‖W_g‖₂)`` (exactly zero when ``‖W_g‖₂ ≤ step``)."""
    _nonneg(step, "prox_l1_l2", "step")
    ax = _axes(w, axes, "prox_l1_l2")
    w = jnp.asarray(w)
    norms = jnp.sqrt(jnp.sum(w * w, axis=ax, keepdims=True))
    scale = jnp.maximum(0.0, 1.0 - step / jnp.where(norms > 0, norms, 1.0))
    return jnp.where(norms > step, w * scale, jnp.zeros_like(w))


def project_l1_ball(v: jax.Array, radius: float | jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean projection of every vector along ``axis`` onto ``{x : ‖x‖₁ ≤ radius}``.

    Duchi, Shalev-Shwartz, Singer & Chandra, "Efficient projections onto the ℓ1-ball for
    learning in high dimensions", ICML 2008 (the sort-based algorithm, jittable).
    """
    _nonneg(radius, "project_l1_ball", "radius")
    v = jnp.moveaxis(jnp.asarray(v), axis, -1)
    a = jnp.abs(v)
    u = -jnp.sort(-a, axis=-1)
    css = jnp.cumsum(u, axis=-1)
    j = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    cond = u - (css - radius) / j > 0
    rho = jnp.maximum(jnp.sum(cond, axis=-1, keepdims=True), 1)
    theta = (jnp.take_along_axis(css, rho - 1, axis=-1) - radius) / rho.astype(v.dtype)
    proj = jnp.sign(v) * jnp.maximum(a - theta, 0.0)
    inside = jnp.sum(a, axis=-1, keepdims=True) <= radius
    out = jnp.where(inside, v, proj)
    return jnp.moveaxis(out, -1, axis)


def prox_l1_linf(w: jax.Array, step: float | jax.Array, axes: Axes = 0) -> jax.Array:
    """``argmin_X ½‖X − W‖² + step·‖X‖₁,∞``, group by group by Moreau's decomposition:
    ``prox_{s‖·‖∞}(v) = v − Π_{‖·‖₁ ≤ s}(v)``."""
    _nonneg(step, "prox_l1_linf", "step")
    ax = _axes(w, axes, "prox_l1_linf")
    w = jnp.asarray(w)
    rest = tuple(i for i in range(w.ndim) if i not in ax)
    moved = jnp.transpose(w, rest + ax)
    flat = moved.reshape(moved.shape[: len(rest)] + (-1,))
    out = flat - project_l1_ball(flat, step, axis=-1)
    out = out.reshape(moved.shape)
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(rest + ax)))


# -- low rank: trace norm ----------------------------------------------------------------------


def trace_norm(w: jax.Array, task_axis: int = 0) -> jax.Array:
    """``‖W‖_* = Σ σᵢ(W)``, the nuclear norm of the ``T × P`` matrix of stacked task weights (each
    task's weights flattened): a convex surrogate of rank that ties the tasks to a shared
    low-dimensional subspace (Argyriou et al. 2008; Yang & Hospedales 2017 for deep layers)."""
    return jnp.sum(jnp.linalg.svd(_task_matrix(w, task_axis, "trace_norm"), compute_uv=False))


def prox_trace_norm(w: jax.Array, step: float | jax.Array, task_axis: int = 0) -> jax.Array:
    """``argmin_X ½‖X − W‖² + step·‖X‖_*``: singular value soft-thresholding,
    ``U max(Σ − step, 0) Vᵀ`` (Cai, Candès & Shen 2010)."""
    _nonneg(step, "prox_trace_norm", "step")
    m = _task_matrix(w, task_axis, "prox_trace_norm")
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    out = (u * jnp.maximum(s - step, 0.0)) @ vt
    return _from_task_matrix(out, w, task_axis)


# -- mean-regularized MTL and task clustering --------------------------------------------------


def mean_regularized(w: jax.Array, task_axis: int = 0, *, mean_weight: float = 0.0) -> jax.Array:
    """``Σₜ ‖wₜ − w̄‖² + ρ‖w̄‖²`` with ``w̄ = (1/T) Σₜ wₜ``.

    Evgeniou & Pontil, "Regularized multi-task learning", KDD 2004: with ``wₜ = w₀ + vₜ`` their
    regularizer ``(λ₁/T) Σ‖vₜ‖² + λ₂‖w₀‖²`` penalises each task's deviation from a common mean;
    ``mean_weight = ρ`` adds the penalty on the mean itself.
    """
    _nonneg(mean_weight, "mean_regularized", "mean_weight")
    m = _task_matrix(w, task_axis, "mean_regularized")
    mean = jnp.mean(m, axis=0)
    return jnp.sum((m - mean) ** 2) + mean_weight * jnp.sum(mean**2)


def _membership(assignment: jax.Array, num_tasks: int, num_clusters: int | None) -> jax.Array:
    a = jnp.asarray(assignment)
    if a.ndim == 1:
        if a.shape[0] != num_tasks:
            raise ValueError(
                f"task_clustering: the assignment has {a.shape[0]} entries for {num_tasks} tasks"
            )
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(
                f"task_clustering: a hard assignment must hold integer cluster ids, got {a.dtype}"
            )
        if num_clusters is None:
            raise ValueError("task_clustering: give num_clusters with a hard (integer) assignment")
        return jax.nn.one_hot(a, num_clusters)
    if a.ndim == 2:
        if a.shape[0] != num_tasks:
            raise ValueError(
                f"task_clustering: the soft assignment has {a.shape[0]} rows for {num_tasks} tasks"
            )
        return a
    raise ValueError(
        f"task_clustering: the assignment must be (T,) integer ids or a (T, K) membership matrix, "
        f"got shape {a.shape}"
    )


def task_clustering(
    w: jax.Array,
    assignment: jax.Array,
    *,
    num_clusters: int | None = None,
    mean_weight: float = 0.0,
    between_weight: float = 0.0,
    within_weight: float = 1.0,
    task_axis: int = 0,
) -> jax.Array:
    """The clustered multi-task penalty of Jacob, Bach & Vert, "Clustered Multi-Task Learning: a
    Convex Formulation", NIPS 2008 (eq. 2–4):

        ε_M T ‖w̄‖² + ε_B Σ_c m_c ‖w̄_c − w̄‖² + ε_W Σ_c Σ_{t∈c} ‖wₜ − w̄_c‖²,

    the global mean, between-cluster and within-cluster variances (``m_c`` the size of cluster
    ``c``, ``w̄_c`` its mean). ``assignment``: integer cluster ids ``(T,)`` (with
    ``num_clusters``), or a ``(T, K)`` non-negative membership matrix whose rows sum to one (a
    soft or learned assignment; memberships weight the sums). See :func:`assign_clusters` for
    the assignment minimising the penalty at fixed weights.
    """
    for name, v in (
        ("mean_weight", mean_weight),
        ("between_weight", between_weight),
        ("within_weight", within_weight),
    ):
        _nonneg(v, "task_clustering", name)
    m = _task_matrix(w, task_axis, "task_clustering")
    t = m.shape[0]
    a = _membership(assignment, t, num_clusters).astype(m.dtype)
    sizes = jnp.sum(a, axis=0)  # (K,)
    safe = jnp.where(sizes > 0, sizes, 1.0)
    centers = (a.T @ m) / safe[:, None]  # (K, P)
    mean = jnp.mean(m, axis=0)
    between = jnp.sum(sizes * jnp.sum((centers - mean) ** 2, axis=1))
    d2 = jnp.sum((m[:, None, :] - centers[None]) ** 2, axis=-1)  # (T, K)
    within = jnp.sum(a * d2)
    return mean_weight * t * jnp.sum(mean**2) + between_weight * between + within_weight * within


def assign_clusters(
    w: jax.Array, num_clusters: int, *, task_axis: int = 0, iters: int = 50
) -> jax.Array:
    """The hard assignment ``(T,)`` minimising :func:`task_clustering` at fixed weights.

    Since between + within = the total variance ``Σₜ‖wₜ − w̄‖²``, the penalty is
    ``const + (ε_W − ε_B)·within``: for ``ε_W > ε_B`` the best assignment is the k-means
    partition of the task vectors. Lloyd's iterations from a farthest-point initialisation
    (deterministic, jittable; a local optimum, as for any k-means).
    """
    if not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(
            f"assign_clusters: num_clusters must be a positive int, got {num_clusters!r}"
        )
    m = _task_matrix(w, task_axis, "assign_clusters")
    t = m.shape[0]
    if num_clusters > t:
        raise ValueError(f"assign_clusters: {num_clusters} clusters for only {t} tasks")

    def init_step(i, idx):
        chosen = m[idx]  # (K, P): rows ≥ i are placeholders
        d2 = jnp.sum((m[:, None] - chosen[None]) ** 2, axis=-1)
        d2 = jnp.where(jnp.arange(num_clusters)[None] < i, d2, jnp.inf)
        return idx.at[i].set(jnp.argmax(jnp.min(d2, axis=1)))

    idx = jax.lax.fori_loop(1, num_clusters, init_step, jnp.zeros((num_clusters,), jnp.int32))
    centers = m[idx]

    def lloyd(_, centers):
        labels = jnp.argmin(jnp.sum((m[:, None] - centers[None]) ** 2, axis=-1), axis=1)
        a = jax.nn.one_hot(labels, num_clusters, dtype=m.dtype)
        sizes = jnp.sum(a, axis=0)
        new = (a.T @ m) / jnp.where(sizes > 0, sizes, 1.0)[:, None]
        return jnp.where(sizes[:, None] > 0, new, centers)

    centers = jax.lax.fori_loop(0, iters, lloyd, centers)
    return jnp.argmin(jnp.sum((m[:, None] - centers[None]) ** 2, axis=-1), axis=1)


# -- task relationships: matrix-variate normal prior ---------------------------------------------


def task_relationship_penalty(w: jax.Array, omega: jax.Array, task_axis: int = 0) -> jax.Array:
    """``tr(W Ω⁻¹ Wᵀ)``: the negative log-density (up to constants) of the matrix-variate normal
    prior ``W ~ MN(0, I ⊗ Ω)`` on the ``d × T`` matrix of task weights, ``Ω`` the ``T × T`` task
    covariance.

    Zhang & Yeung, "A Convex Formulation for Learning Task Relationships in Multi-Task
    Learning", UAI 2010 (MTRL): minimise ``Σ losses + (λ₁/2) tr(WWᵀ) + (λ₂/2) tr(WΩ⁻¹Wᵀ)`` over
    ``W`` and ``Ω ⪰ 0, tr Ω = 1``, alternating with :func:`update_task_covariance`. At that
    update the penalty equals the squared trace norm, ``(Σ σᵢ(W))²``.
    """
    m = _task_matrix(w, task_axis, "task_relationship_penalty")
    t = m.shape[0]
    omega = jnp.asarray(omega)
    if omega.shape != (t, t):
        raise ValueError(
            f"task_relationship_penalty: omega must be ({t}, {t}) for {t} tasks, got {omega.shape}"
        )
    gram = m @ m.T
    return jnp.trace(jnp.linalg.solve(omega, gram))


def update_task_covariance(w: jax.Array, task_axis: int = 0, *, eps: float = 0.0) -> jax.Array:
    """MTRL's closed-form task covariance: ``Ω = (WᵀW)^{1/2} / tr((WᵀW)^{1/2})`` (Zhang & Yeung
    2010, eq. 9), the minimiser of ``tr(W Ω⁻¹ Wᵀ)`` over ``Ω ⪰ 0, tr Ω = 1``; ``WᵀW`` is the
    ``T × T`` Gram matrix of the task weight vectors. ``eps > 0`` uses ``WᵀW + εI`` so that
    ``Ω`` stays invertible when tasks are linearly dependent."""
    _nonneg(eps, "update_task_covariance", "eps")
    m = _task_matrix(w, task_axis, "update_task_covariance")
    gram = m @ m.T + eps * jnp.eye(m.shape[0], dtype=m.dtype)
    vals, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    root = (vecs * jnp.sqrt(jnp.maximum(vals, 0.0))) @ vecs.T
    return root / jnp.trace(root)


# -- proximal steps on selected parameters -------------------------------------------------------


def prox_on(prox: Callable[[jax.Array], jax.Array], *paths: str) -> Callable[[PyTree], PyTree]:
    """The map applying ``prox`` to the parameters under ``paths``, for
    ``make_train_step(..., prox=...)``.

    ``paths`` are path prefixes in the parameters as :class:`mtljax.Params` names them:
    ``"specific/heads/kernel"``, ``"shared/encoder"`` (a prefix selects every leaf below it);
    ``prox`` (``array -> array`` of the same shape and dtype) is applied to each selected leaf
    separately and every other leaf is left as it is. For a penalty ``λ g`` and plain SGD at
    learning rate ``η`` give the prox of ``ηλg``, e.g.
    ``prox_on(lambda w: prox_l1_l2(w, η * λ), "specific/w")``: the train step is then proximal
    gradient descent (see :func:`mtljax.make_train_step`). Compose several with
    ``lambda p: f2(f1(p))``.

    Raises ``ValueError`` (when applied, i.e. when the step is traced) if a path selects no
    parameter, naming the parameters' paths.
    """
    if not callable(prox):
        raise TypeError(f"prox_on: prox must be a function array -> array, got {prox!r}")
    if not paths:
        raise ValueError("prox_on: give at least one parameter path, e.g. 'specific/heads'")
    for p in paths:
        if not isinstance(p, str) or not p.strip("/"):
            raise ValueError(f"prox_on: paths must be non-empty strings, got {p!r}")
    preds = [tree_lib.prefix_predicate(p) for p in paths]

    def apply(params: PyTree) -> PyTree:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [tree_lib.path_str(path) for path, _ in flat]
        for p, pred in zip(paths, preds, strict=True):
            if not any(pred(n) for n in names):
                raise ValueError(
                    f"prox_on: the path {p!r} selects no parameter; parameter paths are {names}"
                )
        leaves = [
            prox(leaf) if any(pred(n) for pred in preds) else leaf
            for n, (_, leaf) in zip(names, flat, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return apply
