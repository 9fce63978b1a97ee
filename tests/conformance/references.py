"""Float64 references for every method, written from the papers' definitions, and the judge.

Each reference maps a sequence of inputs (one per step) to the method's output at every step,
in float64 with numpy and scipy: the **weights** ``w`` of a weighting (``Jᵀw`` is the update) or
the **direction** of a method that needs the Jacobian itself. ``None`` marks a step where the
paper's definition gives no (unique) answer, e.g. Nash-MTL when a convex combination of the
gradients vanishes.

What a method is given, and so what rounding is charged to it (:data:`REFERENCES`' ``given``):

* ``"losses"``: the losses-only methods get the loss vectors;
* ``"gramian"``: the methods that look at the gradients through their inner products get the
  Gramian ``G = JJᵀ`` (``mtljax.weights_from_gramian``), as they do in the train step. Their
  references work on ``G`` alone (through any factor ``J'`` with ``J'J'ᵀ = G``); the weights are
  compared through the directions ``Jᵀw`` they give with the case's float64 ``J``, which is
  well defined where ``w`` is not (the null space of ``G`` is that of ``Jᵀ``);
* ``"jacobian"``: GradDrop, DB-MTL and ConFIG get the Jacobian.

The judge (:func:`judge`): in a given dtype the method receives the input rounded to that dtype;
its output is compared with the reference *on that rounded input*, and the sensitivity of the
reference to rounding is measured on the case itself: the largest relative change of the
reference when every entry of the input is perturbed by a relative amount of at most one unit
roundoff ``u`` (:data:`PERTURBATION`). That is the largest of the changes when the input is
replaced by the unrounded float64 one (float32 runs), perturbed at random, and perturbed in the
worst direction that a linearisation of the reference finds
(:func:`worst_case_sensitivity`), which the random draws alone under-read on ill-conditioned
cases. A step fails when its relative error exceeds both the tolerance and
``SENSITIVITY_FACTOR`` (10) times that sensitivity, or when the output is not finite.

This module imports numpy and scipy only: ``benchmarks/solver_accuracy.py`` loads it by path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import linalg, optimize
from scipy.linalg import lapack

TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
SENSITIVITY_FACTOR = 10.0
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}
# Relative size of the perturbations of the input that measure the sensitivity, |δ| ≤ u: the
# largest relative change that rounding a real number to the dtype makes.
PERTURBATION = dict(UNIT_ROUNDOFF)
PERTURBATIONS = 4  # random perturbations per case, besides the rounding itself
# Smallest step of the finite differences that linearise the reference (float64 cannot perturb
# a float64 input by ε₆₄). On the corpus the first-order estimates agree to about 1% for steps
# 2⁻³⁸ to 2⁻⁴⁶ (conditions up to 1e8); 2⁻³⁰ is already beyond the linear range of nearly
# opposite pairs, and float64's own rounding of the reference is ≈ε₆₄/2⁻⁴⁰ ≈ 2e-4 of the change.
MIN_STEP = 2.0**-40
# At most this many columns are linearised per pass: one per entry up to this many entries (a
# Gramian of up to 22 tasks at one step), beyond that one per group of entries
# (:func:`regrouped_signs`, four passes).
MAX_COLUMNS = 256
# A reference direction within ZERO_DIRECTION·ε₆₄ of the size of its terms (Σᵢ|wᵢ|‖gᵢ‖ for
# a weighting) is the zero direction to the reference's own float64 rounding (rank-deficient
# cases whose gradients positively span their range; on the corpus such references are 1e-16
# to 3e-14 of the largest gradient): the relative error would compare two rounding noises, so
# the error is measured against that size instead (:func:`direction_errors`).
ZERO_DIRECTION = 1e3
# Eigenpairs of a Gramian's cosine matrix, those of eigenvalues nearest 0, along which the worst
# case is also sought (:func:`eigen_signs`).
EIGEN_PAIRS = 8


# ----------------------------------------------------------------------------------------------
# Building blocks


class Adam:
    """Adam (Kingma & Ba, ICLR 2015, Algorithm 1) with its published defaults
    ``β₁ = 0.9, β₂ = 0.999, ε = 1e-8``: the learned-weight methods' default optimizer."""

    def __init__(self, lr: float, size: int, b1: float = 0.9, b2: float = 0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = np.zeros(size)
        self.v = np.zeros(size)
        self.t = 0

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def least_distance(j: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``z = argmin ‖z‖ s.t. Jz ≥ h`` and multipliers ``μ ≥ 0`` with ``z = Jᵀμ``; ``None`` when
    no ``z`` satisfies the constraints.

    Lawson & Hanson, *Solving Least Squares Problems* (1974), ch. 23: with ``u`` the
    non-negative least-squares solution of ``[Jᵀ; hᵀ] u ≈ e_{P+1}`` and ``r`` its residual,
    ``z = −r_{1:P} / r_{P+1}`` (``r = 0``: infeasible). Columns are scaled to unit norm first.
    """
    t, p = j.shape
    e = np.vstack([j.T, h[None, :]])
    norms = np.linalg.norm(e, axis=0)
    keep = norms > 0
    f = np.zeros(p + 1)
    f[-1] = 1.0
    u = np.zeros(t)
    if keep.any():
        sol, _ = optimize.nnls(e[:, keep] / norms[keep], f, maxiter=100 * t)
        u[keep] = sol / norms[keep]
    r = e @ u - f
    # ‖r‖² = −r_{P+1} = 1/(1 + ‖z‖²), known to an absolute ε or so: below 1e3·ε (‖z‖ ≳ 2e6)
    # the system counts as infeasible (callers scale h so that ‖z‖ is near 1).
    if -r[-1] <= 1e3 * np.finfo(np.float64).eps or not np.all(np.isfinite(r)):
        return None
    mu = u / (-r[-1])
    return j.T @ mu, mu


def rank_cut(lam: np.ndarray) -> float:
    """Eigenvalues at or below ``10·T·ε₆₄·λ_max`` count as zero: float64's rounding of a
    matrix of inner products leaves eigenvalues of that size where the vectors have none."""
    return 10.0 * len(lam) * np.finfo(np.float64).eps * max(float(np.max(lam)), 0.0)


def cosine_factor(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, F)``: the row norms ``nᵢ = √Gᵢᵢ`` and a factor ``F`` (T×T) of the cosine matrix,
    ``FFᵀ = K``, its eigenvalues at or below :func:`rank_cut` (and the negative ones of a
    rounded ``G``) set to 0. Working on ``K`` keeps gradients of very different norms exact."""
    n, k = cosines(g)
    lam, vec = np.linalg.eigh(0.5 * (k + k.T))
    lam = np.where(lam > rank_cut(lam), lam, 0.0)
    return n, vec * np.sqrt(lam)


def gram_factor(g: np.ndarray) -> np.ndarray:
    """A ``J'`` (T×T) with ``J'J'ᵀ = G`` (up to :func:`cosine_factor`'s cut): ``J' = diag(n)F``.
    Its rows have the norms and inner products of the gradients, so any method that depends on
    the gradients through ``G`` gives on ``J'`` the weights it gives on ``J``."""
    n, f = cosine_factor(g)
    return n[:, None] * f


def cosines(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, K)``: the norms ``√Gᵢᵢ`` and the cosine matrix ``Kᵢⱼ = Gᵢⱼ/(nᵢnⱼ)``."""
    n = np.sqrt(np.clip(np.diagonal(g), 0.0, None))
    inv = np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0)
    return n, g * inv[:, None] * inv[None, :]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


# ----------------------------------------------------------------------------------------------
# Gramian methods: weights from G


def min_norm_weights(g: np.ndarray) -> np.ndarray:
    """MGDA (Désidéri 2012; Sener & Koltun 2018): ``α ∈ Δ`` whose ``Jᵀα`` is the point of
    smallest norm in the convex hull of the gradients.

    That point ``d`` satisfies ``gᵢ·d ≥ ‖d‖²`` for every task; when ``d ≠ 0``, ``y = κd/‖d‖²``
    is the least-distance point of ``{y : Jy ≥ κ𝟙}`` for any ``κ > 0``, with multipliers
    ``∝ α``. ``κ`` is brought to ``‖d‖`` (so that ``‖y‖ = 1`` and the least-distance solve keeps
    its precision) by re-solving. When the hull contains 0 the weights of a vanishing
    combination are found by non-negative least squares.
    """
    j = gram_factor(g)
    t = len(g)
    n = np.linalg.norm(j, axis=1)
    if np.any(n == 0):
        zero = (n == 0).astype(float)
        return zero / zero.sum()
    kappa = n.min()
    alpha = None
    for _ in range(6):
        res = least_distance(j, np.full(t, kappa))
        if res is None:
            alpha = None
            break
        alpha = res[1] / res[1].sum()
        size = np.linalg.norm(j.T @ alpha)
        if size == 0 or abs(np.log(size / kappa)) < 1e-3:
            break
        kappa = size
    if alpha is None:
        a = np.vstack([j.T, np.ones((1, t))])
        rhs = np.zeros(a.shape[0])
        rhs[-1] = 1.0
        alpha, _ = optimize.nnls(a, rhs, maxiter=100 * t)
        alpha = alpha / alpha.sum()
    return alpha


def mgda(grams, losses, *, normalization: str = "none"):
    out = []
    for g, loss in zip(grams, losses, strict=True):
        n = np.sqrt(np.clip(np.diagonal(g), 0.0, None))
        scale = {"none": np.ones_like(n), "l2": n, "loss": loss, "loss+": loss * n}[normalization]
        inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
        out.append(min_norm_weights(g * inv[:, None] * inv[None, :]) * inv)
    return out


def dual_cone_weights(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``v`` with ``Jᵀv`` the projection of ``Jᵀu`` onto the dual cone ``{x : Jx ≥ 0}``
    (Quinton & Rey 2024). By Moreau's decomposition, ``x = Jᵀu`` minus its projection onto
    the polar cone ``{−Jᵀμ : μ ≥ 0}``: ``x = Jᵀ(u + μ)`` with
    ``μ = argmin_{μ ≥ 0} ‖Jᵀu + Jᵀμ‖`` (non-negative least squares), so ``v = u + μ``."""
    j = gram_factor(g)
    n = np.linalg.norm(j, axis=1)
    nz = n > 0
    mu = np.zeros(len(g))
    if nz.any():
        cols = j[nz].T / n[nz]
        sol, _ = optimize.nnls(cols, -(j.T @ u), maxiter=100 * len(g))
        mu[nz] = sol / n[nz]
    return u + mu


def upgrad(grams, losses, *, pref_vector: Sequence[float] | None = None):
    out = []
    for g in grams:
        t = len(g)
        u = np.full(t, 1.0 / t) if pref_vector is None else np.asarray(pref_vector, float)
        out.append(sum(u[i] * dual_cone_weights(g, np.eye(t)[i]) for i in range(t)))
    return out


def dualproj(grams, losses, *, pref_vector: Sequence[float] | None = None):
    out = []
    for g in grams:
        t = len(g)
        u = np.full(t, 1.0 / t) if pref_vector is None else np.asarray(pref_vector, float)
        out.append(dual_cone_weights(g, u))
    return out


def cagrad_weights(g: np.ndarray, c: float) -> np.ndarray:
    """CAGrad (Liu et al. 2021, eq. 3), solved in its primal form:
    ``max_d minᵢ gᵢ·d`` s.t. ``‖d − g₀‖ ≤ c‖g₀‖``, ``g₀`` the mean gradient.

    With ``d = g₀ + r z`` (``r = c‖g₀‖``, ``‖z‖ ≤ 1``, ``aᵢ = gᵢ·g₀``) the value ``t`` is
    attainable iff the least-distance point of ``{z : Jz ≥ (t − a)/r}`` has norm ≤ 1, which is
    monotone in ``t``: bisection on ``t`` to adjacent floats. The optimal ``z`` is that
    least-distance point (unique), ``z = Jᵀμ``; the weights are ``1/T + rμ``.
    """
    t = len(g)
    b = np.full(t, 1.0 / t)
    r = c * np.linalg.norm(gram_factor(g).T @ b)
    if r == 0:
        return b
    j = gram_factor(g)
    a = j @ (j.T @ b)
    n = np.linalg.norm(j, axis=1)

    def solve(level):
        res = least_distance(j, (level - a) / r)
        if res is None or np.linalg.norm(res[0]) > 1.0:
            return None
        return res

    lo, hi = np.min(a), np.min(a + r * n)
    best = solve(lo)
    top = solve(hi)
    if top is not None:
        return b + r * top[1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        res = solve(mid)
        if res is None:
            hi = mid
        else:
            lo, best = mid, res
    return b + r * best[1]


def cagrad(grams, losses, *, c: float = 0.4, rescale: bool = False):
    factor = 1.0 / (1.0 + c * c) if rescale else 1.0
    return [cagrad_weights(g, c) * factor for g in grams]


def potential_weights(g: np.ndarray, p: float) -> np.ndarray | None:
    """The ``w > 0`` with ``(Gw)ᵢ = wᵢ^{−p}`` for every task: Nash-MTL's bargaining solution
    (Navon et al. 2022, ``p = 1``: ``αᵢ (gᵢ·d) = 1``) and FairGrad's α-fair optimum (Ban & Ji
    2024, ``p = 1/α``). ``None`` when it does not exist (0 in the convex hull of the gradients).

    In ``yᵢ = ‖gᵢ‖wᵢ`` the equations read ``(Ky)ᵢ = cᵢ yᵢ^{−p}`` (``K``: the cosine matrix,
    ``cᵢ = nᵢ^{p−1}``), the stationarity conditions of the convex potential
    ``Φ(y) = ½yᵀKy + Σᵢ cᵢ hₚ(yᵢ)`` (``hₚ' = −y^{−p}``): damped Newton steps on ``Φ`` (kept
    inside ``y > 0``, Armijo backtracking), then MINPACK's hybrid method
    (``scipy.optimize.root``) on ``p log y + log(Ky) = log c`` to polish. Zero gradients take
    no part (weight 0).
    """
    n, k = cosines(g)
    nz = n > 0
    w = np.zeros(len(g))
    if not nz.any():
        return w
    n, k = n[nz], k[np.ix_(nz, nz)]
    if least_distance(gram_factor(k), np.ones(len(n))) is None:
        return None
    c = n ** (p - 1.0)

    def h(y):
        return -c * np.log(y) if p == 1.0 else -c * y ** (1.0 - p) / (1.0 - p)

    def phi(y):  # y: (..., T)
        return 0.5 * np.sum((y @ k) * y, axis=-1) + h(y).sum(axis=-1)

    halvings = 0.5 ** np.arange(40)
    y = np.full(len(n), (c.sum() / max(k.sum(), 1e-300)) ** (1.0 / (1.0 + p)))
    for _ in range(200):
        grad = k @ y - c * y**-p
        hess = k + np.diag(p * c * y ** (-p - 1.0))
        step = -np.linalg.solve(hess, grad)
        dec = -grad @ step
        if not np.isfinite(dec) or dec <= 1e-20 * max(abs(phi(y)), 1.0):
            break
        neg = step < 0
        t0 = min(1.0, 0.99 * np.min(-y[neg] / step[neg])) if neg.any() else 1.0
        ts = t0 * halvings
        f0 = phi(y)
        slack = 1e-14 * (abs(f0) + np.abs(h(y)).sum())
        ok = phi(y + ts[:, None] * step) <= f0 - 0.25 * ts * dec + slack
        if not ok.any():
            break
        new = y + ts[np.argmax(ok)] * step
        if np.max(np.abs(new - y) / y) <= 1e-15:
            break
        y = new

    def f(b):
        return p * b + np.log(np.maximum(k @ np.exp(b), 1e-300)) - np.log(c)

    def jac(b):
        e = np.exp(b)
        return p * np.eye(len(b)) + k * e[None, :] / np.maximum(k @ e, 1e-300)[:, None]

    b0 = np.log(y)
    with np.errstate(over="ignore", invalid="ignore"):  # a wild trial step is rejected below
        sol = optimize.root(f, b0, jac=jac, method="hybr", options={"xtol": 1e-15})
        ok = np.all(np.isfinite(sol.x)) and np.max(np.abs(f(sol.x))) <= np.max(np.abs(f(b0)))
    w[nz] = np.exp(sol.x if ok else b0) / n
    return w


def nash_mtl(grams, losses, **_):
    return [potential_weights(g, 1.0) for g in grams]


def fairgrad(grams, losses, *, alpha: float = 1.0):
    return [potential_weights(g, 1.0 / alpha) for g in grams]


def impartial_weights(g: np.ndarray) -> np.ndarray | None:
    """IMTL-G (Liu et al. 2021, Sec. 3.2): ``α`` with ``Σα = 1`` and equal projections
    ``uᵢ·Jᵀα`` on the unit gradients. With ``βᵢ = nᵢαᵢ``: ``Kβ = c𝟙``, so ``β ∝ K⁻¹𝟙``. The
    answer is unique iff ``K`` is invertible and ``Σ βᵢ/nᵢ ≠ 0``; ``None`` otherwise."""
    n, k = cosines(g)
    if np.any(n == 0):
        return None
    s = np.linalg.svd(k, compute_uv=False)
    if s[-1] <= 1e-14 * s[0]:
        return None
    beta = linalg.solve(k, np.ones(len(g)), assume_a="sym")
    q = beta / n
    if q.sum() == 0:
        return None
    return q / q.sum()


def imtl_g(grams, losses, **_):
    return [impartial_weights(g) for g in grams]


def imtl(grams, losses, *, learning_rate: float, init_log_scale: float = 0.0):
    """IMTL (Liu et al. 2021, Algorithm 1): IMTL-G on the gradients of the scaled losses
    ``e^{sᵢ}Lᵢ − sᵢ``, ``s`` taking one Adam step per step on ``Σ e^{sᵢ}Lᵢ − sᵢ``."""
    t = len(grams[0])
    s = np.full(t, init_log_scale)
    opt = Adam(learning_rate, t)
    out = []
    for g, loss in zip(grams, losses, strict=True):
        e = np.exp(s)
        alpha = impartial_weights(e[:, None] * g * e[None, :])
        out.append(None if alpha is None else alpha * e)
        s = opt.step(s, e * loss - 1.0)
    return out


def config_direction(j: np.ndarray) -> np.ndarray:
    """ConFIG (Liu, Chu & Thuerey, ICLR 2025, Sec. 3), from the Jacobian: with ``U`` the unit
    gradients ``uᵢ = gᵢ/‖gᵢ‖`` (zero gradients take no part), ``g_c = U⁺𝟙``,
    ``g_u = g_c/‖g_c‖`` and ``g = (Σᵢ gᵢ·g_u) g_u``.

    ``U⁺`` from the SVD of ``U`` in float64, singular values at or below
    ``max(T, P)·ε₆₄·σ_max`` counting as zero (``numpy.linalg.matrix_rank``'s convention)."""
    n = np.linalg.norm(j, axis=1)
    nz = n > 0
    if not nz.any():
        return np.zeros(j.shape[1])
    u = j[nz] / n[nz, None]
    left, sigma, right = np.linalg.svd(u, full_matrices=False)
    keep = sigma > max(u.shape) * np.finfo(np.float64).eps * sigma[0]
    g_c = right[keep].T @ ((left[:, keep].T @ np.ones(len(u))) / sigma[keep])
    size = np.linalg.norm(g_c)
    if size == 0:
        return np.zeros(j.shape[1])
    g_u = g_c / size
    return (j @ g_u).sum() * g_u


def config(jacs, losses, **_):
    return [config_direction(j) for j in jacs]


def aligned_weights(g: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Aligned-MTL (Senushkin et al., CVPR 2023, Algorithm 1): with ``G = VΣ²Vᵀ``,
    ``B = σ_min V Σ⁻¹ Vᵀ`` over the non-zero singular values, ``w = Bω``.

    The singular values of ``J' = diag(n)F`` (rank: that of the cosine matrix, see
    :func:`cosine_factor`) come from LAPACK's Jacobi SVD (``dgejsv``), which keeps its relative
    accuracy when the rows' norms differ by many orders of magnitude (Drmač & Veselić 2008)."""
    n, f = cosine_factor(g)
    rank = int(np.sum(np.linalg.norm(f, axis=0) > 0))
    if rank == 0:
        return np.zeros(len(g))
    j = n[:, None] * f
    sva, _, v, work, _, info = lapack.dgejsv(np.asfortranarray(j.T), joba=1, jobu=3)
    if info != 0:
        raise AssertionError(f"dgejsv failed: info={info}")
    sigma = sva * work[1] / work[0]
    order = np.argsort(sigma)[::-1][:rank]
    sigma, vec = sigma[order], v[:, order]
    b = sigma.min() * (vec / sigma) @ vec.T
    return b @ omega


def aligned_mtl(grams, losses, *, importance: Sequence[float] | None = None):
    t = len(grams[0])
    omega = np.ones(t) if importance is None else np.asarray(importance, float)
    return [aligned_weights(g, omega) for g in grams]


def surgery_weights(g: np.ndarray, targets: np.ndarray | None = None, beta: float = 0.0):
    """PCGrad (Yu et al. 2020, Algorithm 1) and GradVac (Wang et al. 2021, Algorithm 1) on
    the rows of a factor ``J'``, visiting the other tasks in the order ``0, 1, …, T−1``.

    PCGrad (``targets=None``): ``gᵢ' ← gᵢ' − (gᵢ'·gⱼ/‖gⱼ‖²)gⱼ`` when ``gᵢ'·gⱼ < 0``. GradVac:
    with ``φ = cos(gᵢ', gⱼ)`` and target ``φ̂ᵢⱼ``, when ``φ < φ̂ᵢⱼ``:
    ``gᵢ' ← gᵢ' + ‖gᵢ'‖(φ̂√(1−φ²) − φ√(1−φ̂²))/(‖gⱼ‖√(1−φ̂²)) gⱼ``; then
    ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ``. Pairs with a zero gradient are left alone. Returns the weights of
    ``Σᵢ gᵢ'`` (and the new targets)."""
    j = gram_factor(g)
    t = len(g)
    coef = np.eye(t)
    new = None if targets is None else np.array(targets, float)
    for i in range(t):
        for k in range(t):
            if k == i:
                continue
            gi, gk = coef[i] @ j, j[k]
            nk = np.linalg.norm(gk)
            if targets is None:
                dot = gi @ gk
                if dot < 0:
                    coef[i, k] -= dot / nk**2
                continue
            ni = np.linalg.norm(gi)
            if ni == 0 or nk == 0:
                continue
            phi = np.clip(gi @ gk / (ni * nk), -1.0, 1.0)
            goal = new[i, k]
            if phi < goal and goal < 1.0:
                num = goal * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - goal**2)
                coef[i, k] += ni * num / (nk * np.sqrt(1 - goal**2))
            new[i, k] = (1 - beta) * goal + beta * phi
    w = coef.sum(axis=0)
    return w if targets is None else (w, new)


def pcgrad(grams, losses, **_):
    return [surgery_weights(g) for g in grams]


def gradvac(grams, losses, *, beta: float):
    t = len(grams[0])
    targets = np.zeros((t, t))
    out = []
    for g in grams:
        w, targets = surgery_weights(g, targets, beta)
        out.append(w)
    return out


def gradnorm(grams, losses, *, alpha: float, learning_rate: float, params: str = "all"):
    """GradNorm (Chen et al. 2018, Sec. 3.2): the step uses the weights it starts with; then
    ``w`` takes one Adam step on ``Σᵢ |wᵢ‖gᵢ‖ − Ḡ rᵢ^α|`` (target held constant), with
    ``rᵢ = L̃ᵢ/mean L̃``, ``L̃ᵢ = Lᵢ/Lᵢ(0)``, and is renormalised to ``Σw = T``. (The corpus'
    losses are positive, the paper's domain.)"""
    t = len(grams[0])
    w = np.ones(t)
    opt = Adam(learning_rate, t)
    first = None
    out = []
    for g, loss in zip(grams, losses, strict=True):
        out.append(w.copy())
        first = loss if first is None else first
        norms = np.sqrt(np.clip(np.diagonal(g), 0.0, None))
        gw = w * norms
        ratio = loss / first
        r = ratio / ratio.mean()
        target = gw.mean() * r**alpha
        w = np.clip(opt.step(w, np.sign(gw - target) * norms), 0.0, None)
        w = t * w / w.sum() if w.sum() > 0 else np.ones(t)
    return out


# ----------------------------------------------------------------------------------------------
# Losses-only methods: weights from the losses


def ew(losses_seq, *, reduction: str = "sum"):
    t = losses_seq.shape[1]
    return [np.full(t, 1.0 if reduction == "sum" else 1.0 / t) for _ in losses_seq]


def fixed(losses_seq, *, weights: Sequence[float]):
    return [np.asarray(weights, float) for _ in losses_seq]


def uw(losses_seq, *, learning_rate: float, kinds: str = "regression", init_log_var=0.0):
    """Kendall, Gal & Cipolla 2018, eqs. 7 and 10: ``½e^{−s}L + ½s`` (regression),
    ``e^{−s}L + ½s`` (classification); weights ``c e^{−s}``, ``s`` one Adam step per step."""
    t = losses_seq.shape[1]
    c = 0.5 if kinds == "regression" else 1.0
    s = np.full(t, init_log_var)
    opt = Adam(learning_rate, t)
    out = []
    for loss in losses_seq:
        w = c * np.exp(-s)
        out.append(w)
        s = opt.step(s, 0.5 - w * loss)
    return out


def dwa(losses_seq, *, temperature: float, steps_per_epoch: int = 1):
    """Liu, Johns & Davison 2019, eq. 5: ``Lᵢ(e)`` the mean loss of epoch ``e`` (``steps_per_epoch``
    consecutive steps); ``wᵢ = 1`` in the first two epochs, then ``T softmax(r/τ)`` with
    ``rᵢ = Lᵢ(e−1)/Lᵢ(e−2)`` for every step of epoch ``e``."""
    t = losses_seq.shape[1]
    k = steps_per_epoch
    means = [losses_seq[e * k : (e + 1) * k].mean(axis=0) for e in range(len(losses_seq) // k)]
    out = []
    for step in range(len(losses_seq)):
        e = step // k
        if e < 2:
            out.append(np.ones(t))
        else:
            r = means[e - 1] / means[e - 2]
            out.append(t * softmax(r / temperature))
    return out


def gls(losses_seq, *, eps: float):
    """Chennupati et al. 2019: the gradient of ``(Πᵢ max(Lᵢ, ε))^{1/T}``."""
    out = []
    for loss in losses_seq:
        t = len(loss)
        x = np.maximum(loss, eps)
        geo = np.exp(np.mean(np.log(x)))
        out.append(np.where(loss > eps, geo / (t * x), 0.0))
    return out


def after_update_losses(losses_seq: np.ndarray) -> np.ndarray:
    """The losses on each step's batch after that step's update, for the methods that observe
    them (``Method.after_update``: FAMO's same-batch rule): halfway between the step's losses
    and the next step's, ``½(ℓₛ + ℓₛ₊₁)``; at the last step the step's own losses (no change).
    They differ from the next step's losses, so a method that used those instead (the
    next-batch rule) would not match; they follow the tasks when these are permuted and scale
    with the losses. ``losses_seq``: ``(…, S, T)``."""
    after = np.array(losses_seq, np.float64)
    after[..., :-1, :] = 0.5 * (after[..., :-1, :] + after[..., 1:, :])
    return after


def log_decrease(before, after, floor, eps: float) -> np.ndarray:
    """``log ℓ̃(before) − log ℓ̃(after)``, ``ℓ̃ = max(ℓ − ℓ*, 0) + ε``, to float64's accuracy:
    ``log1p`` of the relative change where the two are within a factor 1.5 (the logarithms'
    difference would cancel: losses of 1e-20 beside ``ε = 1e-8`` change ``ℓ̃`` by 1e-12)."""
    a = np.maximum(before - floor, 0.0)
    b = np.maximum(after - floor, 0.0)
    den = b + eps
    near = np.abs(a - b) <= 0.5 * den
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(near, np.log1p((a - b) / den), np.log(a + eps) - np.log(den))


def famo(losses_seq, *, learning_rate: float, gamma: float, eps: float, min_losses=0.0):
    """FAMO (Liu, Feng, Stone & Liu, NeurIPS 2023, Algorithm 1): ``w ∝ zᵢ/ℓ̃ᵢ`` with
    ``z = softmax(ξ)``, ``ℓ̃ = max(ℓ − ℓ*, 0) + ε``; after the model update
    ``θₜ → θₜ₊₁`` on batch ``bₜ``, ``ξ`` takes an Adam step along ``(∂z/∂ξ)ᵀδ + γξ`` with
    ``δ = log ℓ̃(θₜ; bₜ) − log ℓ̃(θₜ₊₁; bₜ)``, the same batch's losses after the update
    (:func:`after_update_losses`)."""
    t = losses_seq.shape[1]
    xi = np.zeros(t)
    opt = Adam(learning_rate, t)
    out = []
    for loss, after in zip(losses_seq, after_update_losses(losses_seq), strict=True):
        shifted = np.maximum(loss - min_losses, 0.0) + eps
        w = softmax(xi) / shifted
        out.append(w / w.sum())
        delta = log_decrease(loss, after, min_losses, eps)
        z = softmax(xi)
        jac = np.diag(z) - np.outer(z, z)
        xi = opt.step(xi, jac.T @ delta + gamma * xi)
    return out


def stch(losses_seq, *, mu: float, log_losses: bool = False, warmup_steps: int = 0):
    """Lin et al. 2024, eq. (8): the gradient of ``T·μ log Σᵢ exp(λᵢ(fᵢ − zᵢ*)/μ)`` with
    ``λ = 1``, ``z* = 0``, ``f = L``: ``w = T softmax(L/μ)``. The factor ``T`` is the scale of
    the authors' multi-task code, which multiplies the smooth Tchebycheff loss by the number
    of tasks (the method's documented scale: weights summing to ``T``, as ``ew()``'s)."""
    if log_losses or warmup_steps:
        raise NotImplementedError("the reference covers f = L, z* = 0")
    return [len(loss) * softmax(loss / mu) for loss in losses_seq]


def imtl_l(losses_seq, *, learning_rate: float, init_log_scale: float = 0.0):
    """Liu et al. 2021, Sec. 3.1: weights ``e^{s}``, ``s`` one Adam step per step on
    ``Σᵢ e^{sᵢ}Lᵢ − sᵢ``."""
    t = losses_seq.shape[1]
    s = np.full(t, init_log_scale)
    opt = Adam(learning_rate, t)
    out = []
    for loss in losses_seq:
        out.append(np.exp(s))
        s = opt.step(s, np.exp(s) * loss - 1.0)
    return out


# ----------------------------------------------------------------------------------------------
# Jacobian methods: directions from J


def db_mtl(jacs, losses, *, beta: float, beta_sigma: float, eps: float, like=None):
    """DB-MTL (Lin et al. 2023, Algorithm 1): ``ĝᵢ ← βₜĝᵢ + (1−βₜ)∇Lᵢ/(Lᵢ+ε)`` with
    ``βₜ = β/t^σ``, update ``Σᵢ (maxⱼ‖ĝⱼ‖/‖ĝᵢ‖) ĝᵢ``."""
    ema = np.zeros_like(jacs[0])
    out = []
    for step, (j, loss) in enumerate(zip(jacs, losses, strict=True), start=1):
        b = beta / step**beta_sigma
        ema = b * ema + (1 - b) * j / (loss[:, None] + eps)
        norms = np.linalg.norm(ema, axis=1)
        coef = np.where(norms > 0, norms.max() / np.where(norms > 0, norms, 1.0), 0.0)
        out.append(coef @ ema)
    return out


def graddrop_candidates(j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GradDrop (Chen et al. 2020, Algorithm 1) with leak 0 keeps, element by element, either
    every positive component or every negative one: the two possible values of each element."""
    return np.where(j > 0, j, 0.0).sum(0), np.where(j < 0, j, 0.0).sum(0)


def graddrop_error(j: np.ndarray, d: np.ndarray) -> float:
    """How far ``d`` is from the nearest output GradDrop can give, relative to ``Σᵢ|gᵢ|``."""
    pos, neg = graddrop_candidates(j)
    size = np.abs(j).sum(0)
    dist = np.minimum(np.abs(d - pos), np.abs(d - neg))
    return float(np.max(np.where(size > 0, dist / np.where(size > 0, size, 1.0), dist)))


def simplex_error(w: np.ndarray) -> float:
    """RLW (Lin et al. 2022): the weights lie on the simplex."""
    return float(max(abs(w.sum() - 1.0), max(0.0, -w.min())))


# ----------------------------------------------------------------------------------------------
# Registry and judge


class Reference(NamedTuple):
    """``given``: what the method receives (``"losses"``, ``"gramian"`` or ``"jacobian"``);
    ``fn(inputs, losses, **kwargs)`` (``fn(losses, **kwargs)`` for ``"losses"``) returns one
    output or ``None`` per step; ``membership``: instead of an output, ``fn(input, output)``
    returns how far the output is from the set of outputs the method may give (random methods,
    judged against the tolerance only)."""

    given: str
    fn: Callable
    membership: bool = False


REFERENCES: dict[str, Reference] = {
    "ew": Reference("losses", ew),
    "fixed": Reference("losses", fixed),
    "uw": Reference("losses", uw),
    "dwa": Reference("losses", dwa),
    "rlw": Reference("losses", lambda loss, w: simplex_error(w), membership=True),
    "gls": Reference("losses", gls),
    "famo": Reference("losses", famo),
    "stch": Reference("losses", stch),
    "imtl_l": Reference("losses", imtl_l),
    "gradnorm": Reference("gramian", gradnorm),
    "mgda": Reference("gramian", mgda),
    "pcgrad": Reference("gramian", pcgrad),
    "graddrop": Reference("jacobian", graddrop_error, membership=True),
    "gradvac": Reference("gramian", gradvac),
    "cagrad": Reference("gramian", cagrad),
    "nash_mtl": Reference("gramian", nash_mtl),
    "imtl_g": Reference("gramian", imtl_g),
    "imtl": Reference("gramian", imtl),
    "aligned_mtl": Reference("gramian", aligned_mtl),
    "upgrad": Reference("gramian", upgrad),
    "dualproj": Reference("gramian", dualproj),
    "config": Reference("jacobian", config),
    "fairgrad": Reference("gramian", fairgrad),
    "db_mtl": Reference("jacobian", db_mtl),
}


class Verdict(NamedTuple):
    """One step of one case: relative error, sensitivity to rounding, allowed error, outcome
    (``"pass"``, ``"fail"``, ``"undefined"``: no reference answer, ``"nonfinite"``). The
    sensitivity includes the worst-case estimate only in cases where some step's error exceeds
    the tolerance (elsewhere every step passes on the tolerance, whatever the sensitivity)."""

    case: str
    step: int
    error: float
    sensitivity: float
    allowed: float
    outcome: str


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(dtype).astype(np.float64)


def gramians(jacs: np.ndarray) -> np.ndarray:
    """``JJᵀ`` over the last two axes, in float64."""
    return np.einsum("...ip,...jp->...ij", jacs, jacs)


def method_input(reference: Reference, jacs: np.ndarray, losses: np.ndarray, dtype: str):
    """What the method receives in ``dtype``, as float64 arrays: ``(inputs, losses)``."""
    if reference.given == "gramian":
        return rounded(gramians(jacs), dtype), rounded(losses, dtype)
    return rounded(jacs, dtype), rounded(losses, dtype)


def _random_signs(rng: np.random.Generator, shape, symmetric: bool) -> np.ndarray:
    """Uniform in ``[−1, 1]``; symmetric over the last two axes when ``symmetric``."""
    r = rng.uniform(-1.0, 1.0, size=shape)
    if symmetric:
        r = np.triu(r) + np.swapaxes(np.triu(r, 1), -1, -2)
    return r


def _perturb(x: np.ndarray, rng: np.random.Generator, size: float, symmetric: bool):
    return x * (1.0 + size * _random_signs(rng, x.shape, symmetric))


def perturbed_inputs(reference, jacs, losses, dtype: str, seed: int):
    """The inputs whose references measure the sensitivity at random: in float32 the unrounded
    input, and :data:`PERTURBATIONS` random relative perturbations of every entry of the input
    by up to :data:`PERTURBATION` (a Gramian's upper triangle, mirrored)."""
    x, loss = method_input(reference, jacs, losses, dtype)
    rng = np.random.default_rng(seed)
    out = []
    if dtype == "float32":
        out.append(method_input(reference, jacs, losses, "float64"))
    sym = reference.given == "gramian"
    size = PERTURBATION[dtype]
    for _ in range(PERTURBATIONS):
        out.append((_perturb(x, rng, size, sym), _perturb(loss, rng, size, False)))
    return out


def evaluate(reference: Reference, inputs, losses, kwargs: dict):
    if reference.given == "losses":
        return reference.fn(losses, **kwargs)
    return reference.fn(inputs, losses, **kwargs)


def to_direction(reference: Reference, jacs: np.ndarray, step: int, out):
    """A weighting's output as a direction ``Jᵀw`` on the case's float64 ``J`` (the weights
    themselves for losses-only methods, judged on the weights)."""
    if out is None:
        return None
    out = np.asarray(out, np.float64)
    if reference.given == "gramian":
        return jacs[step].T @ out
    return out


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.linalg.norm(a - b)
    size = np.linalg.norm(b)
    if size == 0:
        return 0.0 if diff == 0 else np.inf
    return float(diff / size)


def direction_errors(dirs, base, finite, sizes) -> tuple[list, list]:
    """Per step, the error of the direction ``dirs[s]`` against the reference ``base[s]`` and
    whether the reference is the zero direction: relative, ``‖d − d_ref‖ / ‖d_ref‖``, except
    where ``‖d_ref‖ ≤ ZERO_DIRECTION·ε₆₄·S`` with ``S`` the size of the reference's terms
    (:func:`term_size`), where it is ``‖d − d_ref‖ / S``. NaN without a reference or where the
    output is not finite."""
    errors, zero = [], []
    for d, b, ok, size in zip(dirs, base, finite, sizes, strict=True):
        if not ok or b is None:
            errors.append(np.nan)
            zero.append(False)
            continue
        limit = ZERO_DIRECTION * UNIT_ROUNDOFF["float64"] * size
        is_zero = bool(size > 0 and np.linalg.norm(b) <= limit)
        errors.append(float(np.linalg.norm(d - b) / size) if is_zero else relative_error(d, b))
        zero.append(is_zero)
    return errors, zero


def reference_outputs(name: str, jacs, losses, kwargs: dict, dtype: str, seed: int = 0):
    """``(base, perturbed)``: the reference on the input the method receives in ``dtype``, and
    on each perturbed input (lists over steps, as directions)."""
    return _reference_outputs(name, jacs, losses, kwargs, dtype, seed)[:2]


def _reference_outputs(name: str, jacs, losses, kwargs: dict, dtype: str, seed: int = 0):
    """:func:`reference_outputs` and, per step, the size of the base direction's terms
    (:func:`term_size`)."""
    ref = REFERENCES[name]
    x, loss = method_input(ref, jacs, losses, dtype)
    raw = evaluate(ref, x, loss, kwargs)
    others = [
        evaluate(ref, px, pl, kwargs) for px, pl in perturbed_inputs(ref, jacs, losses, dtype, seed)
    ]
    steps = range(len(losses))
    base = [to_direction(ref, jacs, s, raw[s]) for s in steps]
    others = [[to_direction(ref, jacs, s, o[s]) for s in steps] for o in others]
    return base, others, [term_size(ref, jacs, s, raw[s]) for s in steps]


def term_size(ref: Reference, jacs, step: int, out) -> float:
    """The size of the terms that a direction sums: ``Σᵢ|wᵢ|‖gᵢ‖`` for a weighting's ``Jᵀw``,
    ``Σᵢ‖gᵢ‖`` for a Jacobian method's direction, 0 for a losses-only method (no direction)."""
    if out is None or ref.given == "losses":
        return 0.0
    norms = np.linalg.norm(jacs[step], axis=1)
    if ref.given == "gramian":
        return float(np.abs(np.asarray(out, np.float64)) @ norms)
    return float(np.sum(norms))


def _directions(ref: Reference, jacs, x, loss, kwargs: dict) -> list:
    out = evaluate(ref, x, loss, kwargs)
    return [to_direction(ref, jacs, s, out[s]) for s in range(len(loss))]


def _changes(base: list, dirs: list) -> np.ndarray:
    """The relative change of every step's direction (``inf`` where the reference has no
    answer any more, 0 where it had none)."""
    out = np.zeros(len(base))
    for s, (b, d) in enumerate(zip(base, dirs, strict=True)):
        if b is not None:
            out[s] = np.inf if d is None else relative_error(d, b)
    return out


def _same(base: list, dirs: list) -> bool:
    return all(
        (b is None and d is None) or (b is not None and d is not None and np.array_equal(b, d))
        for b, d in zip(base, dirs, strict=True)
    )


def worst_signs(a: np.ndarray) -> np.ndarray:
    """A sign vector ``σ ∈ {±1}ᵐ`` that (nearly) maximises ``‖Aσ‖₂`` over the cube
    ``‖r‖_∞ ≤ 1`` (whose maximum is at a vertex, ``‖Ar‖²`` being convex): the signs of ``A``'s
    top right singular vector, then ``σ ← sign(AᵀAσ)`` to a fixed point: the power method for
    the mixed norm ``‖A‖_{∞→2}`` (Boyd, "The power method for ℓᵖ norms", Linear Algebra Appl.
    9, 1974; Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, §15.2).
    No step decreases ``‖Aσ‖`` (``‖Ar‖²`` lies above its tangent at ``σ``, which the new sign
    vector maximises over the cube)."""
    m = a.shape[1]
    if not np.any(a):
        return np.ones(m)
    sign = np.where(np.linalg.svd(a, full_matrices=False)[2][0] >= 0, 1.0, -1.0)
    for _ in range(4 * m):
        new = np.where(a.T @ (a @ sign) >= 0, 1.0, -1.0)
        if np.array_equal(new, sign):
            break
        sign = new
    return sign


def _entries(ref: Reference, x, loss, groups, with_losses: bool) -> list:
    """The entries that the sensitivity perturbs, ``(is_loss, index)``: a Gramian's upper
    triangle ``(i, j)`` (mirrored to ``(j, i)`` when perturbed), a Jacobian's every entry, the
    losses when ``with_losses``; at the steps of each group, entries equal to 0 (no relative
    change) left out."""
    out = []
    for g in groups:
        if ref.given == "gramian":
            t = x.shape[-1]
            cells = [(i, j) for i in range(t) for j in range(i, t)]
        elif ref.given == "jacobian":
            cells = list(np.ndindex(x.shape[1:]))
        else:
            cells = []
        out += [(False, (g, *e)) for e in cells if np.any(x[(g, *e)])]
        for i in range(loss.shape[1] if with_losses else 0):
            if np.any(loss[g, i]):
                out.append((True, (g, i)))
    return out


def _pattern(ref: Reference, x, loss, entries, signs) -> tuple[np.ndarray, np.ndarray]:
    """The relative perturbation ``(rx, rl)`` that is ``signs[k]`` on ``entries[k]`` (and on a
    Gramian entry's mirror) and 0 elsewhere."""
    rx, rl = np.zeros_like(x), np.zeros_like(loss)
    for (is_loss, idx), c in zip(entries, signs, strict=True):
        if is_loss:
            rl[idx] = c
            continue
        rx[idx] = c
        if ref.given == "gramian":
            rx[(idx[0], idx[2], idx[1])] = c
    return rx, rl


def _labels(keys: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A partition of the entries into at most ``k`` groups that refines ``keys`` (entries of
    one key split at random into ``k // #keys`` groups) or, with more than ``k`` keys, folds
    them (key mod ``k``)."""
    _, keys = np.unique(keys, return_inverse=True)
    n = int(keys.max()) + 1
    if n >= k:
        return keys % k
    return keys * (k // n) + rng.integers(0, k // n, size=len(keys))


def _partitions(entries: list, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The partitions of :func:`regrouped_signs`' passes: by the entry's first index (the task
    ``i`` of ``Gᵢⱼ``, ``Jᵢₚ`` or a loss), by its second (``j`` or ``p``), by the pair, then
    at random."""
    first = np.array([e[1][1] for e in entries])
    second = np.array([e[1][-1] for e in entries])
    pair = first * (int(second.max()) + 1) + second
    return [
        _labels(first, k, rng),
        _labels(second, k, rng),
        _labels(pair, k, rng),
        rng.integers(0, k, size=len(entries)),
    ]


def regrouped_signs(a: np.ndarray, labels: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """One pass of the worst case above :data:`MAX_COLUMNS` entries: the entries are
    partitioned into groups (``labels``, 0 to ``m − 1``), and column ``g`` of ``a`` is the
    first-order change under the perturbation that carries the current signs on group ``g``'s
    entries and is 0 elsewhere. :func:`worst_signs` seeks signs ``σ`` over the groups, and the
    entries' signs become ``σ_{g(e)}·signs_e``; since ``a𝟙`` is the current vertex's change,
    they are kept unless ``‖aσ‖ > ‖a𝟙‖``. Passes over different partitions are a block
    coordinate ascent of ``‖Ar‖`` over the vertices of the cube ``‖r‖_∞ ≤ 1``."""
    sigma = worst_signs(a)
    if np.linalg.norm(a @ sigma) > np.linalg.norm(a.sum(axis=1)):
        return sigma[labels] * signs
    return signs


def _entry_signs(x, loss, entries) -> np.ndarray:
    """The sign of each entry (summed over the steps it covers; +1 where that is 0)."""
    total = np.array([np.sum((loss if is_loss else x)[idx]) for is_loss, idx in entries])
    return np.where(total < 0, -1.0, 1.0)


def _group_pattern(ref: Reference, x, loss, entries, members, signs: dict, steps: list):
    """The perturbation that carries each step's own ``signs[s]`` on the entries ``members``
    at that step (:func:`_pattern` for one step)."""
    rx, rl = np.zeros_like(x), np.zeros_like(loss)
    for s in steps:
        px, pl = _pattern(ref, x, loss, [entries[i] for i in members], signs[s][members])
        if len(steps) == 1:
            return px, pl
        rx[s], rl[s] = px[s], pl[s]
    return rx, rl


def eigen_signs(g: np.ndarray, count: int = EIGEN_PAIRS) -> list[np.ndarray]:
    """Relative perturbations ``R`` of a Gramian (symmetric, ``|Rᵢⱼ| = 1``) that move the
    ``count`` eigenvalues nearest 0 of its cosine matrix ``K`` the most: for an eigenpair
    ``(λ, v)``, ``Gᵢⱼ(1 + uRᵢⱼ)`` changes ``λ`` by ``u·Σᵢⱼ Kᵢⱼvᵢvⱼ(Rᵢⱼ − (Rᵢᵢ + Rⱼⱼ)/2)`` to
    first order, whose extremes over the cube ``|R| ≤ 1`` are at ``R = ±sign(K ∘ vvᵀ)``
    (the diagonal term adds ``u(1 − λ)`` in the same direction). A reference that decides a
    rank on ``K`` jumps where such a perturbation carries an eigenvalue across its cut, a jump
    that a linearisation does not see. Returns the patterns that lower the eigenvalues."""
    _, k = cosines(g)
    lam, vec = np.linalg.eigh(0.5 * (k + k.T))
    near = np.argsort(np.abs(lam))[:count]
    out = [-np.where(k * np.outer(v, v) >= 0, 1.0, -1.0) for v in vec.T[near]]
    for m in range(2, len(near) + 1):
        proj = vec[:, near[:m]] @ vec[:, near[:m]].T
        out.append(-np.where(k * proj >= 0, 1.0, -1.0))
    return out


def worst_case_sensitivity(
    name: str,
    jacs,
    losses,
    kwargs: dict,
    dtype: str,
    seed: int = 0,
    *,
    base=None,
    max_columns: int | None = None,
) -> np.ndarray:
    """Every step's largest relative change of the reference under relative perturbations of
    the input's entries by at most ``u =`` :data:`PERTURBATION`: a structured estimate of the
    worst case, of which the random draws of :func:`perturbed_inputs` only take samples.

    The reference is linearised in the relative perturbation ``r`` by forward differences of
    step ``h = max(u, MIN_STEP)``: a Gramian's upper triangle (mirrored), the losses where
    perturbing them changes the output at all, each entry at every step at once where
    perturbing the first step changes no later output (a reference without state; otherwise
    every step's entries apart). Per step, the columns ``A`` of its direction's relative change
    give a sign vector ``σ`` of (nearly) the largest ``‖Aσ‖`` (:func:`worst_signs`): a
    perturbation ``±uσ`` changes the step by ``u‖Aσ‖`` to first order, a random ``|r| ≤ u`` by
    ``‖Ar‖``, at most the maximum over the cube that ``σ`` seeks. Up to ``max_columns``
    (default :data:`MAX_COLUMNS`) entries, one column per entry; beyond, one column per group
    of entries with fixed signs, over passes of different groupings (:func:`regrouped_signs`):
    every perturbation tried is still a vertex of the cube, so the estimate stays a lower bound
    of the worst case (a looser one than the full linearisation).

    * Float32 input (``h = u``): every evaluation is itself a perturbation of size ``u``, the
      ``±uσ`` ones included, and the estimate is the largest change measured. A non-smooth
      reference (an active set, a rank decision) is taken as it is: a change of the active set
      within ``u`` is a change that rounding can cause.
    * Float64 input: ``x(1 + uσ)`` would round back to ``x``, so the estimate is the first-order
      change ``(u/h)·min(‖f(x(1 ± hσ)) − f(x)‖)/‖f(x)‖``; the smaller side keeps an active-set
      change or a jump within ``h`` on one side from counting.

    ``base``: the reference's directions on the input, when already computed.
    """
    ref = REFERENCES[name]
    k = MAX_COLUMNS if max_columns is None else max_columns
    x, loss = method_input(ref, jacs, losses, dtype)
    if base is None:
        base = _directions(ref, jacs, x, loss, kwargs)
    steps = len(loss)
    out = np.zeros(steps)
    if ref.membership or all(b is None for b in base):
        return out
    size = PERTURBATION[dtype]
    h = max(size, MIN_STEP)
    measured = h == size
    rng = np.random.default_rng([seed, 1])

    def at(rx, rl, a):
        dirs = _directions(ref, jacs, x * (1.0 + a * rx), loss * (1.0 + a * rl), kwargs)
        if measured:
            np.maximum(out, _changes(base, dirs), out=out)
        return dirs

    def first_order(dirs, s):
        """Step ``s``'s columns of relative change, as a matrix."""
        scale = h * max(np.linalg.norm(base[s]), np.finfo(float).tiny)
        return np.stack(
            [np.zeros_like(base[s]) if d[s] is None else (d[s] - base[s]) / scale for d in dirs],
            axis=1,
        )

    sym = ref.given == "gramian"
    uses_x = ref.given != "losses"
    uses_losses = True
    if uses_x:  # do the losses matter?
        uses_losses = not _same(base, at(0 * x, _random_signs(rng, loss.shape, False), h))
    tied = steps == 1
    if not tied:  # does perturbing the first step change a later step (state)?
        rx, rl = np.zeros_like(x), np.zeros_like(loss)
        rx[0] = _random_signs(rng, x[0].shape, sym) if uses_x else 0.0
        rl[0] = _random_signs(rng, loss[0].shape, False)
        tied = _same(base[1:], at(rx, rl, h)[1:])
    groups = [slice(None)] if tied else [slice(j, j + 1) for j in range(steps)]
    entries = _entries(ref, x, loss, groups, uses_losses)
    if not entries:
        return out
    live = [s for s in range(steps) if base[s] is not None]
    if len(entries) <= k:
        cols = [at(*_pattern(ref, x, loss, [e], [1.0]), h) for e in entries]
        signs = {s: worst_signs(first_order(cols, s)) for s in live}
    else:
        # One sign vector per step, starting from the entries' own signs: the first-order
        # change of a solve with G, yᵀ(G∘R)z, is largest at Rᵢⱼ = sign(Gᵢⱼ)·sign(yᵢ)·sign(zⱼ),
        # which the passes by row and by column then reach. Without state the steps' groups
        # are perturbed together (each step with its own signs), with state each step apart.
        start = _entry_signs(x, loss, entries)
        signs = {s: start for s in live}
        for labels in _partitions(entries, k, rng):
            _, labels = np.unique(labels, return_inverse=True)
            members = [np.flatnonzero(labels == g) for g in range(int(labels.max()) + 1)]
            for block in [live] if tied else [[s] for s in live]:
                dirs = [
                    at(*_group_pattern(ref, x, loss, entries, m, signs, block), h) for m in members
                ]
                for s in block:
                    signs[s] = regrouped_signs(first_order(dirs, s), labels, signs[s])
    if measured and sym:  # perturbations across a rank decision, measured (h = u)
        for s in live:
            for pattern in eigen_signs(x[s]):
                rx = np.zeros_like(x)
                rx[s] = pattern
                for sign in (1.0, -1.0):
                    at(sign * rx, np.zeros_like(loss), h)
    # The perturbations ±hσ: one with every step's own σ (no state), or one per step.
    combos = []
    for s in live:
        rx, rl = _pattern(ref, x, loss, entries, signs[s])
        if not tied:
            combos.append(([s], rx, rl))
            continue
        if not combos:
            combos.append(([], np.zeros_like(x), np.zeros_like(loss)))
        combos[0][0].append(s)
        combos[0][1][s], combos[0][2][s] = rx[s], rl[s]
    for where, rx, rl in combos:
        plus = _changes(base, at(rx, rl, h))
        minus = _changes(base, at(-rx, -rl, h))
        change = np.minimum(plus, minus) * (size / h)
        if not measured:  # (no answer at ±hσ, h ≫ u: no estimate)
            for s in where:
                if np.isfinite(change[s]):
                    out[s] = max(out[s], change[s])
    return out


def judge(
    name: str,
    case_name: str,
    jacs: np.ndarray,
    losses: np.ndarray,
    outputs: Sequence[np.ndarray],
    kwargs: dict,
    dtype: str,
    *,
    seed: int = 0,
    tolerance: float | None = None,
    max_columns: int | None = None,
) -> list[Verdict]:
    """The verdicts of one case: ``outputs`` are the method's outputs per step (weights for a
    weighting, directions for a Jacobian method), from the input :func:`method_input` gives."""
    ref = REFERENCES[name]
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    verdicts = []
    if ref.membership:
        x, loss = method_input(ref, jacs, losses, dtype)
        for s, out in enumerate(outputs):
            out = np.asarray(out, np.float64)
            if not np.all(np.isfinite(out)):
                verdicts.append(Verdict(case_name, s, np.inf, 0.0, tol, "nonfinite"))
                continue
            err = ref.fn(x[s] if ref.given != "losses" else loss[s], out)
            verdicts.append(Verdict(case_name, s, err, 0.0, tol, "fail" if err > tol else "pass"))
        return verdicts
    base, others, sizes = _reference_outputs(name, jacs, losses, kwargs, dtype, seed)
    dirs = [to_direction(ref, jacs, s, out) for s, out in enumerate(outputs)]
    finite = [bool(np.all(np.isfinite(d))) for d in dirs]
    errors, zero = direction_errors(dirs, base, finite, sizes)
    # The worst case can change a verdict only where the error exceeds the tolerance.
    worst = np.zeros(len(base))
    if any(e > tol for e in errors):  # (NaN: no reference answer or a non-finite output)
        worst = worst_case_sensitivity(
            name, jacs, losses, kwargs, dtype, seed, base=base, max_columns=max_columns
        )
    for s, err in enumerate(errors):
        if not finite[s]:
            verdicts.append(Verdict(case_name, s, np.inf, 0.0, tol, "nonfinite"))
            continue
        if base[s] is None:
            verdicts.append(Verdict(case_name, s, np.nan, np.nan, tol, "undefined"))
            continue
        if zero[s]:
            # Against the zero direction the tolerance applies to the size of the reference's
            # terms; a relative sensitivity of a rounding noise means nothing.
            verdicts.append(Verdict(case_name, s, err, 0.0, tol, "fail" if err > tol else "pass"))
            continue
        sens = max(
            (np.inf if o[s] is None else relative_error(o[s], base[s]) for o in others),
            default=0.0,
        )
        sens = max(sens, worst[s])
        allowed = max(tol, SENSITIVITY_FACTOR * sens)
        verdicts.append(
            Verdict(case_name, s, err, sens, allowed, "fail" if err > allowed else "pass")
        )
    return verdicts
