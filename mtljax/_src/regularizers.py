"""Multi-task regularizers on stacked task weights: pure functions and proximal operators.

Task weights are stacked along a task axis (``task_axis``, default 0): ``w: (T, …)``, e.g. the
kernel ``(T, in, out)`` of :class:`mtljax.nn.StackedLinear`, or the ``(T, d)`` matrix of ``T``
linear models. Group norms couple the tasks through the norm over the task axis (and any other
``axes`` given), so that whole features are kept or dropped for all tasks at once.

Smooth penalties go into a model as its ``regularizer`` (added to the multi-task method's
update, outside the loss vector); non-smooth ones are better handled by their proximal operator
after each update: ``make_train_step(..., prox=prox_on(lambda w: prox_l1_l2(w, lr * lam),
"specific/heads/kernel"))`` (see :func:`prox_on`).

Weights must be floating point. Values are checked where they are known when the function is
called (Python numbers, concrete arrays): a negative ``step``, a cluster id out of range or a
soft assignment whose rows do not sum to 1 raise. Passed as traced values inside ``jit`` they
cannot be checked and are used as given (a negative step then expands instead of shrinking):
check them before the jitted call, or pass them as Python numbers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src import tree as tree_lib

Axes = int | Sequence[int]
PyTree = Any


# -- helpers -----------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known at trace time (``None`` under ``jit``)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (TypeError, ValueError):
        return None


def _index(a: Any, name: str, what: str) -> int:
    """``a`` as a Python int (``np.int64`` included); bools and floats are refused."""
    if isinstance(a, bool | np.bool_):
        raise TypeError(f"{name}: {what} must be an int, got {a!r}")
    try:
        return operator.index(a)
    except TypeError:
        raise TypeError(f"{name}: {what} must be an int, got {a!r}") from None


def _floating(w: Any, name: str) -> jax.Array:
    """``w`` as an array; integer or bool weights are refused (the operators would truncate
    their real-valued results back to integers)."""
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name}: weights must be floating point, got dtype {w.dtype}")
    return w


def _axes(w: jax.Array, axes: Axes, name: str) -> tuple[int, ...]:
    w = _floating(w, name)
    if w.ndim == 0:
        raise ValueError(f"{name}: expected stacked task weights with a task axis, got a scalar")
    raw = (axes,) if hasattr(axes, "__index__") else tuple(axes)
    if not raw:
        raise ValueError(f"{name}: axes is empty")
    out = []
    for a in raw:
        i = _index(a, name, "every axis")
        if not -w.ndim <= i < w.ndim:
            raise ValueError(f"{name}: axis {a!r} is out of range for weights of shape {w.shape}")
        out.append(i % w.ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axes {raw}")
    return tuple(sorted(out))


def _nonneg(value: float | jax.Array, name: str, what: str) -> None:
    """Refuses a negative (or NaN) ``value`` whenever it is known at trace time."""
    v = _concrete(value)
    if v is not None and v.size and not np.all(v >= 0):
        raise ValueError(f"{name}: {what} must be ≥ 0, got {value!r}")


def _scalar_like(value: float | jax.Array, w: jax.Array) -> jax.Array:
    """``value`` in ``w``'s floating dtype, so that a float64 step cannot promote ``w``."""
    dt = w.dtype if jnp.issubdtype(w.dtype, jnp.floating) else jnp.result_type(float)
    return jnp.asarray(value, dt)


def _compute_dtype(dtype: Any) -> Any:
    """At least float32: sorting, cumulative sums and SVDs are run there for 16-bit weights."""
    return jnp.promote_types(dtype, jnp.float32)


def _task_matrix(w: jax.Array, task_axis: int, name: str) -> jax.Array:
    w = _floating(w, name)
    if w.ndim < 2:
        raise ValueError(
            f"{name}: expected stacked task weights (T, …) with at least 2 dims, got {w.shape}"
        )
    task_axis = _index(task_axis, name, "task_axis")
    if not -w.ndim <= task_axis < w.ndim:
        raise ValueError(f"{name}: task_axis {task_axis} is out of range for shape {w.shape}")
    w = jnp.moveaxis(w, task_axis, 0)
    return w.reshape(w.shape[0], -1)


def _from_task_matrix(m: jax.Array, like: jax.Array, task_axis: int) -> jax.Array:
    moved = jnp.moveaxis(jnp.asarray(like), task_axis, 0)
    return jnp.moveaxis(m.reshape(moved.shape), 0, task_axis)


# -- block sparsity: ℓ1/ℓ2 and ℓ1/ℓ∞ -------------------------------------------------------------


def _l2_norms(w: jax.Array, axes: tuple[int, ...], keepdims: bool = False) -> jax.Array:
    """Euclidean norms over ``axes`` whose gradient at a zero group is 0 (a subgradient), not
    the ``∞ · 0 = NaN`` of ``sqrt`` at 0."""
    sq = jnp.sum(w * w, axis=axes, keepdims=keepdims)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def group_norms(w: jax.Array, axes: Axes = 0, ord: float = 2) -> jax.Array:
    """The norm (``ord`` 2 or ``inf``) of every group: reduces ``axes``, keeps the others.
    Differentiable everywhere but at zero groups, where the ℓ₂ norm's gradient is the
    subgradient 0."""
    ax = _axes(w, axes, "group_norms")
    w = jnp.asarray(w)
    if ord == 2:
        return _l2_norms(w, ax)
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
    step = _scalar_like(step, w)
    norms = _l2_norms(w, ax, keepdims=True)
    scale = jnp.maximum(0.0, 1.0 - step / jnp.where(norms > 0, norms, 1.0))
    return jnp.where(norms > step, w * scale, jnp.zeros_like(w))


def project_l1_ball(v: jax.Array, radius: float | jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean projection of every vector along ``axis`` onto ``{x : ‖x‖₁ ≤ radius}``.

    Duchi, Shalev-Shwartz, Singer & Chandra, "Efficient projections onto the ℓ1-ball for
    learning in high dimensions", ICML 2008 (the sort-based algorithm, jittable).
    """
    _nonneg(radius, "project_l1_ball", "radius")
    v = _floating(v, "project_l1_ball")
    out_dtype = v.dtype
    v = jnp.moveaxis(v, _index(axis, "project_l1_ball", "axis"), -1)
    v = v.astype(_compute_dtype(v.dtype))  # the sort and cumsum in ≥ float32
    radius = _scalar_like(radius, v)
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
    return jnp.moveaxis(out, -1, axis).astype(out_dtype)


def prox_l1_linf(w: jax.Array, step: float | jax.Array, axes: Axes = 0) -> jax.Array:
    """``argmin_X ½‖X − W‖² + step·‖X‖₁,∞``, group by group by Moreau's decomposition:
    ``prox_{s‖·‖∞}(v) = v − Π_{‖·‖₁ ≤ s}(v)``."""
    _nonneg(step, "prox_l1_linf", "step")
    ax = _axes(w, axes, "prox_l1_linf")
    w = jnp.asarray(w)
    rest = tuple(i for i in range(w.ndim) if i not in ax)
    moved = jnp.transpose(w, rest + ax)
    flat = moved.reshape(moved.shape[: len(rest)] + (-1,))
    flat = flat.astype(_compute_dtype(flat.dtype))
    out = flat - project_l1_ball(flat, step, axis=-1)
    out = out.reshape(moved.shape).astype(w.dtype)
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(rest + ax)))


# -- low rank: trace norm ----------------------------------------------------------------------


def trace_norm(w: jax.Array, task_axis: int = 0) -> jax.Array:
    """``‖W‖_* = Σ σᵢ(W)``, the nuclear norm of the ``T × P`` matrix of stacked task weights (each
    task's weights flattened): a convex surrogate of rank that ties the tasks to a shared
    low-dimensional subspace (Argyriou et al. 2008; Yang & Hospedales 2017 for deep layers)."""
    m = _task_matrix(w, task_axis, "trace_norm")
    s = jnp.linalg.svd(m.astype(_compute_dtype(m.dtype)), compute_uv=False)
    return jnp.sum(s).astype(m.dtype)


def prox_trace_norm(w: jax.Array, step: float | jax.Array, task_axis: int = 0) -> jax.Array:
    """``argmin_X ½‖X − W‖² + step·‖X‖_*``: singular value soft-thresholding,
    ``U max(Σ − step, 0) Vᵀ`` (Cai, Candès & Shen 2010)."""
    _nonneg(step, "prox_trace_norm", "step")
    m = _task_matrix(w, task_axis, "prox_trace_norm")
    u, s, vt = jnp.linalg.svd(m.astype(_compute_dtype(m.dtype)), full_matrices=False)
    out = (u * jnp.maximum(s - _scalar_like(step, s), 0.0)) @ vt
    return _from_task_matrix(out.astype(m.dtype), w, task_axis)


# -- mean-regularized MTL and task clustering --------------------------------------------------


def mean_regularized(w: jax.Array, task_axis: int = 0, *, mean_weight: float = 0.0) -> jax.Array:
    """``Σₜ ‖wₜ − w̄‖² + ρ‖w̄‖²`` with ``w̄ = (1/T) Σₜ wₜ``.

    Evgeniou & Pontil, "Regularized multi-task learning", KDD 2004: with ``wₜ = w₀ + vₜ`` their
    regularizer ``(λ₁/T) Σ‖vₜ‖² + λ₂‖w₀‖²``, minimised over the common ``w₀``, equals
    ``(λ₁/T)·[Σₜ‖wₜ − w̄‖² + ρ‖w̄‖²]`` with ``ρ = Tλ₂/(λ₁ + λ₂)``: each task's deviation from
    the mean is penalised, and ``mean_weight = ρ`` adds the penalty on the mean itself.
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
        k = _index(num_clusters, "task_clustering", "num_clusters")
        ids = _concrete(assignment)
        if ids is not None and (np.any(ids < 0) or np.any(ids >= k)):
            raise ValueError(
                f"task_clustering: cluster ids must lie in [0, {k}) for num_clusters={k}, got "
                f"{ids.tolist()}"
            )
        return jax.nn.one_hot(a, k)
    if a.ndim == 2:
        if a.shape[0] != num_tasks:
            raise ValueError(
                f"task_clustering: the soft assignment has {a.shape[0]} rows for {num_tasks} tasks"
            )
        rows = _concrete(assignment)
        if rows is not None and (
            np.any(rows < 0) or not np.allclose(rows.sum(axis=1), 1.0, rtol=0, atol=1e-5)
        ):
            raise ValueError(
                "task_clustering: a soft assignment must be non-negative with rows summing to 1, "
                f"got row sums {rows.sum(axis=1).tolist()} and minimum {rows.min()}"
            )
        return a
    raise ValueError(
        f"task_clustering: the assignment must be (T,) integer ids or a (T, K) membership matrix, "
        f"got shape {a.shape}"
    )


def _cluster_means(a: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sizes (K,), centres (K, P))`` of the tasks ``m (T, P)`` under memberships
    ``a (T, K)`` (an empty cluster's centre is 0)."""
    sizes = jnp.sum(a, axis=0)
    return sizes, (a.T @ m) / jnp.where(sizes > 0, sizes, 1.0)[:, None]


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
    Convex Formulation", NIPS 2008, at a given assignment of the tasks to clusters:

        ε_M T ‖w̄‖² + ε_B Σ_c m_c ‖w̄_c − w̄‖² + ε_W Σ_c Σ_{t∈c} ‖wₜ − w̄_c‖²,

    the global mean, between-cluster and within-cluster variances (``m_c`` the size of cluster
    ``c``, ``w̄_c`` its mean). ``assignment``: integer cluster ids ``(T,)`` in ``[0,
    num_clusters)``, or a ``(T, K)`` non-negative membership matrix whose rows sum to one (a
    soft assignment; memberships weight the sums). The assignment can be learned two ways:
    :func:`assign_clusters` alternates with the weights (k-means at fixed weights, non-convex);
    :func:`task_clustering_convex` is the paper's convex relaxation, which optimises a
    continuous cluster structure jointly with the weights.
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
    sizes, centers = _cluster_means(a, m)
    mean = jnp.mean(m, axis=0)
    between = jnp.sum(sizes * jnp.sum((centers - mean) ** 2, axis=1))
    d2 = jnp.sum((m[:, None, :] - centers[None]) ** 2, axis=-1)  # (T, K)
    within = jnp.sum(a * d2)
    return mean_weight * t * jnp.sum(mean**2) + between_weight * between + within_weight * within


def assign_clusters(
    w: jax.Array, num_clusters: int, *, task_axis: int = 0, iters: int = 50
) -> jax.Array:
    """A hard assignment ``(T,)`` minimising :func:`task_clustering` at fixed weights.

    Since between + within = the total variance ``Σₜ‖wₜ − w̄‖²``, the penalty is
    ``const + (ε_W − ε_B)·within``: for ``ε_W > ε_B`` the best assignment is the k-means
    partition of the task vectors. Lloyd's iterations are run from ``T`` farthest-point
    initialisations (task ``s`` as the first centre, ``s = 0..T−1``, under ``vmap``) and the
    partition with the lowest within-cluster sum of squares is kept: deterministic and
    jittable, and like any k-means a local optimum, not a guaranteed global one.
    """
    k = _index(num_clusters, "assign_clusters", "num_clusters")
    if k < 1:
        raise ValueError(f"assign_clusters: num_clusters must be ≥ 1, got {num_clusters!r}")
    iters = _index(iters, "assign_clusters", "iters")
    if iters < 0:
        raise ValueError(f"assign_clusters: iters must be ≥ 0, got {iters}")
    m = _task_matrix(w, task_axis, "assign_clusters")
    t = m.shape[0]
    if k > t:
        raise ValueError(f"assign_clusters: {k} clusters for only {t} tasks")

    def sq_dist(centers):
        return jnp.sum((m[:, None] - centers[None]) ** 2, axis=-1)  # (T, K)

    def from_first(first):
        def init_step(i, idx):
            d2 = jnp.where(jnp.arange(k)[None] < i, sq_dist(m[idx]), jnp.inf)
            return idx.at[i].set(jnp.argmax(jnp.min(d2, axis=1)))

        idx = jnp.zeros((k,), jnp.int32).at[0].set(first)
        idx = jax.lax.fori_loop(1, k, init_step, idx)

        def members(centers):
            return jax.nn.one_hot(jnp.argmin(sq_dist(centers), axis=1), k, dtype=m.dtype)

        def lloyd(_, centers):
            sizes, new = _cluster_means(members(centers), m)
            return jnp.where(sizes[:, None] > 0, new, centers)

        a = members(jax.lax.fori_loop(0, iters, lloyd, m[idx]))
        # The within-cluster sum of squares of this partition (about its own means).
        return jnp.argmax(a, axis=1), jnp.sum((m - a @ _cluster_means(a, m)[1]) ** 2)

    labels, within = jax.vmap(from_first)(jnp.arange(t, dtype=jnp.int32))
    return labels[jnp.argmin(within)]


def _cluster_spectrum(
    gram: jax.Array, lo: float, hi: float, total: float, iters: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Eigenvectors ``V`` of ``gram`` and the eigenvalues ``λ`` of
    ``argmin_{lo·I ⪯ Σ ⪯ hi·I, tr Σ = total} tr(Σ⁻¹ gram)``.

    ``Σ*`` shares ``gram``'s eigenvectors and ``λᵢ = clip(c·sᵢ, lo, hi)`` with ``sᵢ`` the square
    roots of ``gram``'s eigenvalues and ``c ≥ 0`` such that ``Σλᵢ = total`` (the KKT conditions
    of ``min Σ sᵢ²/λᵢ`` over the box and the trace). ``Σλ(c)`` is non-decreasing and piecewise
    linear in ``c``: bisection on ``log c`` brackets the piece, then ``c`` is solved exactly on
    it. If even ``c → ∞`` leaves trace unspent (fewer non-zero ``sᵢ`` than the trace needs),
    the rest goes to the zero directions, where it costs nothing."""
    vals, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    dt = vals.dtype
    s = jnp.sqrt(jnp.maximum(vals, 0.0))
    s_max = jnp.max(s)
    eps = jnp.finfo(dt).eps
    s = jnp.where(s > 32 * eps * s_max, s, 0.0)  # rounding noise of zero directions
    pos = s > 0
    s_min = jnp.min(jnp.where(pos, s, jnp.inf))
    tiny = jnp.finfo(dt).tiny

    def spent(log_c):
        return jnp.sum(jnp.where(pos, jnp.clip(jnp.exp(log_c) * s, lo, hi), lo))

    lo_c = jnp.log(lo / jnp.maximum(s_max, tiny)) - 1.0
    hi_c = jnp.log(hi / jnp.where(jnp.isfinite(s_min), s_min, 1.0)) + 1.0

    def bisect(_, bracket):
        a, b = bracket
        mid = 0.5 * (a + b)
        short = spent(mid) < total
        return jnp.where(short, mid, a), jnp.where(short, b, mid)

    a, b = jax.lax.fori_loop(0, iters, bisect, (lo_c, hi_c))
    c_mid = jnp.exp(0.5 * (a + b))
    # On the bracketed piece the free directions (strictly inside the box) are fixed: solve
    # Σ_free c·sᵢ + lo·#low + hi·#high = total for c.
    cs = c_mid * s
    free = pos & (cs > lo) & (cs < hi)
    fixed = jnp.sum(jnp.where(pos & (cs >= hi), hi, jnp.where(free, 0.0, lo)))
    s_free = jnp.sum(jnp.where(free, s, 0.0))
    c = jnp.where(s_free > 0, (total - fixed) / jnp.where(s_free > 0, s_free, 1.0), c_mid)
    lam = jnp.where(pos, jnp.clip(c * s, lo, hi), lo)
    # Trace left over with every non-zero direction at hi: spread it over the zero directions.
    zeros = jnp.sum(~pos)
    extra = jnp.maximum(total - jnp.sum(lam), 0.0) / jnp.maximum(zeros, 1)
    lam = jnp.where(pos, lam, jnp.minimum(lo + extra, hi))
    return vecs, lam


def _convex_clusters(
    name: str,
    w: jax.Array,
    num_clusters: int,
    between_weight: float,
    within_weight: float,
    task_axis: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(tasks (T, P) in ≥ float32, V, λ)``: the checked arguments of the convex relaxation and
    the spectrum of its minimising ``Σ`` (held constant: no gradient flows through it)."""
    m = _task_matrix(w, task_axis, name)
    t = m.shape[0]
    r = _index(num_clusters, name, "num_clusters")
    if not 1 <= r <= t:
        raise ValueError(f"{name}: num_clusters must lie in [1, {t}] for {t} tasks, got {r}")
    eb, ew = float(between_weight), float(within_weight)
    if not 0.0 < eb < ew:
        raise ValueError(
            f"{name}: the convex relaxation needs 0 < between_weight < within_weight, got "
            f"between_weight={between_weight!r}, within_weight={within_weight!r}"
        )
    lo, hi = 1.0 / ew, 1.0 / eb
    m = m.astype(_compute_dtype(m.dtype))
    centred = jax.lax.stop_gradient(m - jnp.mean(m, axis=0))  # Π W
    vecs, lam = _cluster_spectrum(centred @ centred.T, lo, hi, (t - r + 1) * lo + (r - 1) * hi)
    return m, vecs, lam


def cluster_covariance(
    w: jax.Array,
    num_clusters: int,
    *,
    between_weight: float,
    within_weight: float,
    task_axis: int = 0,
) -> jax.Array:
    """The learned cluster structure ``Σ_c (T × T)`` of :func:`task_clustering_convex`:

        Σ_c = argmin_{Σ ∈ S_c} tr(W Π Σ⁻¹ Π Wᵀ),
        S_c = {Σ ⪰ 0 : αI ⪯ Σ ⪯ βI, tr Σ = γ},

    ``α = 1/ε_W``, ``β = 1/ε_B``, ``γ = (T − r + 1)α + (r − 1)β`` for ``r`` clusters (Jacob,
    Bach & Vert 2008). For a hard partition ``Σ_c`` has eigenvalue ``β`` on the ``r − 1``
    between-cluster directions and ``α`` elsewhere; its top ``r − 1`` eigenvectors are the
    learned between-cluster subspace. A constant of the weights (no gradient flows through it).
    """
    _, vecs, lam = _convex_clusters(
        "cluster_covariance", w, num_clusters, between_weight, within_weight, task_axis
    )
    return (vecs * lam) @ vecs.T


def task_clustering_convex(
    w: jax.Array,
    num_clusters: int,
    *,
    between_weight: float,
    within_weight: float,
    mean_weight: float = 0.0,
    task_axis: int = 0,
) -> jax.Array:
    """The convex relaxation of the clustered multi-task penalty (Jacob, Bach & Vert, "Clustered
    Multi-Task Learning: a Convex Formulation", NIPS 2008):

        ε_M T ‖w̄‖² + min_{Σ ∈ S_c} tr(W Π Σ⁻¹ Π Wᵀ),

    ``Π = I − 11ᵀ/T`` the centring of the tasks and ``S_c`` the convex hull of the partitions'
    cluster matrices (:func:`cluster_covariance`). At a hard partition ``Σ`` the trace term is
    ``ε_B·between + ε_W·within`` of :func:`task_clustering`, so this is a lower bound of that
    penalty over every partition into ``r`` clusters, and convex in ``W`` (jointly with ``Σ``):
    the cluster structure is learned with the weights, with no assignment to alternate.
    Needs ``0 < ε_B < ε_W`` (``between_weight < within_weight``). Its gradient is
    ``2 Π Σ*⁻¹ Π W`` (the minimising ``Σ*`` held fixed, by the envelope theorem).
    """
    _nonneg(mean_weight, "task_clustering_convex", "mean_weight")
    m, vecs, lam = _convex_clusters(
        "task_clustering_convex", w, num_clusters, between_weight, within_weight, task_axis
    )
    mean = jnp.mean(m, axis=0)
    centred = m - mean
    trace_term = jnp.sum(centred * (((vecs / lam) @ vecs.T) @ centred))
    out = mean_weight * m.shape[0] * jnp.sum(mean**2) + trace_term
    return out.astype(jnp.asarray(w).dtype)


# -- task relationships: matrix-variate normal prior ---------------------------------------------


def task_relationship_penalty(w: jax.Array, omega: jax.Array, task_axis: int = 0) -> jax.Array:
    """``tr(W Ω⁻¹ Wᵀ)``: the negative log-density (up to constants) of the matrix-variate normal
    prior ``W ~ MN(0, I ⊗ Ω)`` on the ``d × T`` matrix of task weights, ``Ω`` the ``T × T`` task
    covariance (symmetric positive definite; checked when it is known at trace time).

    Zhang & Yeung, "A Convex Formulation for Learning Task Relationships in Multi-Task
    Learning", UAI 2010 (MTRL): minimise ``Σ losses + (λ₁/2) tr(WWᵀ) + (λ₂/2) tr(WΩ⁻¹Wᵀ)`` over
    ``W`` and ``Ω ⪰ 0, tr Ω = 1``, alternating with :func:`update_task_covariance`. At the exact
    update (``eps=0``, linearly independent tasks) the penalty equals the squared trace norm,
    ``(Σ σᵢ(W))²``.
    """
    m = _task_matrix(w, task_axis, "task_relationship_penalty")
    t = m.shape[0]
    omega = jnp.asarray(omega)
    if omega.shape != (t, t):
        raise ValueError(
            f"task_relationship_penalty: omega must be ({t}, {t}) for {t} tasks, got {omega.shape}"
        )
    known = _concrete(omega)
    if known is not None:
        known = known.astype(np.float64)
        scale = max(float(np.abs(known).max()), np.finfo(np.float64).tiny)
        if not np.allclose(known, known.T, rtol=0, atol=1e-5 * scale):
            raise ValueError("task_relationship_penalty: omega must be symmetric")
        smallest = np.linalg.eigvalsh(0.5 * (known + known.T)).min()
        if not smallest > 0:
            raise ValueError(
                "task_relationship_penalty: omega must be positive definite (its smallest "
                f"eigenvalue is {smallest:.3g}); "
                "update_task_covariance(w) with its default eps gives an invertible one"
            )
    gram = m @ m.T
    return jnp.trace(jnp.linalg.solve(omega, gram))


def update_task_covariance(w: jax.Array, task_axis: int = 0, *, eps: float = 1e-3) -> jax.Array:
    """MTRL's closed-form task covariance: ``Ω = (WᵀW)^{1/2} / tr((WᵀW)^{1/2})`` (Zhang & Yeung
    2010), the minimiser of ``tr(W Ω⁻¹ Wᵀ)`` over ``Ω ⪰ 0, tr Ω = 1``; ``WᵀW`` is the ``T × T``
    Gram matrix of the task weight vectors.

    When the tasks are linearly dependent (e.g. more tasks than weights per task) that ``Ω`` is
    singular, so the eigenvalues of ``(WᵀW)^{1/2}`` are floored at ``δ = eps · tr((WᵀW)^{1/2})
    / T`` (those of ``WᵀW`` within rounding of 0 count as 0): the directions outside the tasks'
    span then hold at most ``eps / (1 + eps)`` of ``Ω``'s trace together, whatever ``T`` is,
    the penalty at the update is within a factor ``1 + eps`` of the exact
    ``tr((WᵀW)^{1/2})²``, and tasks in general position (no eigenvalue under the floor) get
    the exact closed form. ``eps=0`` gives the exact, possibly singular, closed form. All-zero
    weights give ``Ω = I/T`` (every ``Ω`` is then a minimiser). ``Ω`` is a constant of the
    alternating scheme: no gradient flows through it.
    """
    _nonneg(eps, "update_task_covariance", "eps")
    m = jax.lax.stop_gradient(_task_matrix(w, task_axis, "update_task_covariance"))
    t = m.shape[0]
    m = m.astype(_compute_dtype(m.dtype))
    gram = m @ m.T
    vals, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    # Eigenvalues within rounding of 0 (t ulp of the largest) are the null space's.
    tol = t * jnp.finfo(vals.dtype).eps * jnp.maximum(jnp.max(vals), 0.0)
    roots = jnp.sqrt(jnp.where(vals > tol, vals, 0.0))
    floor = eps * jnp.sum(roots) / t
    root = (vecs * jnp.maximum(roots, floor)) @ vecs.T
    tr = jnp.trace(root)
    eye = jnp.eye(t, dtype=m.dtype)
    return jnp.where(tr > 0, root / jnp.where(tr > 0, tr, 1.0), eye / t)


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
