"""CAGrad's conflict-averse direction: a barrier method on the second-order cone form of its dual
problem, globalised by a line search and stopped by a duality-gap certificate."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtljax._src.base import SolverInfo
from mtljax._src.solvers import double_float as df
from mtljax._src.solvers._linalg import (
    _BOUNDARY_FRACTION,
    _chol_solver,
    _dot,
    _is_f64,
    _max_step,
    normalize_gramian,
)

CAGRAD_MAX_ITER = 100
_LINE_SEARCH_MAX = 30
_MU_FACTOR = 30.0  # μ is divided by this once the iterate is centred,
_CENTRED = 0.5  # which it is when |wᵢzᵢ − μ| ≤ this·μ for every i,
_DECREMENT = 0.25  # or after a full Newton step of decrement λ² ≤ this·μ.
_RIDGE = 4.0  # the ridge εddᵀ of the model Gramian: ε = this·eps² (first pass)
_PASSES = 3  # passes at most, each with a larger ridge
_PASS_ITER = 40  # iterations after which an unconverged pass near the tip is restarted


def cagrad_tol(dtype) -> float:
    """The duality-gap tolerance of :func:`cagrad_solve`, relative to ``‖g₀‖·maxᵢ‖gᵢ‖``:
    ``1e-7`` (float32: about its ε, so that the solve goes on until rounding stops it) and
    ``8e-13`` (float64): below ``4·10³ε``, so that a converged solve's residual (the gap
    relative to the magnitude of its terms, at least 4) is at most ``10³ε``."""
    return 8e-13 if _is_f64(dtype) else 1e-7


class CAGradSolution(NamedTuple):
    """The result of :func:`cagrad_solve`.

    Attributes:
      w: the dual weights ``w ∈ Δ``.
      lam: the weights of the direction, ``d = Jᵀλ``.
      info: how the solve ended (:class:`mtljax.SolverInfo`); its residual is the duality
        gap relative to the magnitude of the terms of its evaluation, or, for an answer
        refined on its support, the largest KKT violation relative to its terms (see
        :func:`cagrad_solve`).
    """

    w: jax.Array
    lam: jax.Array
    info: SolverInfo


# ----------------------------------------------------------------------------------------------
# The barrier method


def _smoothed_norm(p, m):
    """``(s, ρ)`` with ``ρ = (m² + p)^{1/2}`` and ``s = m + ρ ≥ p^{1/2}``: the minimiser over
    ``s`` of ``c s − μ log(s² − p)`` (``m = μ/c``)."""
    root = jnp.sqrt(m * m + jnp.maximum(p, 0.0))
    return m + root, root


class _Model(NamedTuple):
    """``G`` (normalised) and its split halves, ``â = Gb/‖g₀‖``, ``c``, the ridge ``ε`` and
    ``dᵢ = ‖gᵢ‖``."""

    g: jax.Array
    g_split: tuple[jax.Array, jax.Array]
    ah: jax.Array
    c: jax.Array
    ridge: jax.Array
    norms: jax.Array

    def products(self, w):
        """``(Gw, wᵀGw)`` to relative accuracy ε."""
        u = df.dot2(self.g_split, w[None, :])
        return u, df.dot2(w, u)

    def ridged(self, w, u, p):
        """``(G'w, wᵀG'w)`` from ``(Gw, wᵀGw)``, ``G' = G + εddᵀ``."""
        dw = _dot(self.norms, w)
        return u + self.ridge * dw * self.norms, p + self.ridge * dw * dw


def _certificate(model: _Model, w, u, p, m):
    """``(s, gap, rounding)`` at ``w`` (``u = Gw``, ``p = wᵀGw``): the duality gap of the
    problem on ``G`` (in units of ``‖g₀‖·maxᵢ‖gᵢ‖``) and the rounding level of its evaluation.

    With ``p' = wᵀG'w ≥ ‖g_w‖²``, ``âᵀw + c p'^{1/2} ≥ F(w)`` bounds the optimum from above;
    for ``s ≥ p'^{1/2}`` the direction ``ĝ₀ + c g_w/s`` lies in the ball, so its worst-task
    progress ``minᵢ(â + (c/s)Gw)ᵢ`` bounds the optimum from below.
    """
    eps = jnp.finfo(w.dtype).eps
    c = model.c
    _, pm = model.ridged(w, u, p)
    # Two directions in the ball: the barrier's, s = s_μ(p'), and the full step, s = p'^{1/2}
    # (better where the path approaches the cone's tip); the better one is kept.
    s_path, _ = _smoothed_norm(pm, m)
    s_full = jnp.maximum(jnp.sqrt(jnp.maximum(pm, 0.0)), jnp.finfo(w.dtype).tiny)
    low_path = jnp.min(model.ah + (c / s_path) * u)
    low_full = jnp.min(model.ah + (c / s_full) * u)
    s = jnp.where(low_full > low_path, s_full, s_path)
    gap = df.dot2(model.ah, w) + c * s_full - jnp.maximum(low_path, low_full)
    # Rounding: of the terms (relative ε), and of w itself, whose last digit moves Gw by
    # ε|G|w ≤ εd(dᵀw) and the lower bound by c/s times that; the ridge's share:
    # c(p'^{1/2} − p^{1/2}) in the upper bound, (c/s)εdᵢ(dᵀw) in the lower one.
    dw = _dot(model.norms, w)
    dmax = jnp.max(model.norms)
    rounding = 4.0 * eps * (1.0 + c * s) + eps * (c / s) * dw * dmax
    rounding = rounding + c * (jnp.sqrt(jnp.maximum(pm, 0.0)) - jnp.sqrt(jnp.maximum(p, 0.0)))
    rounding = rounding + (c / s) * model.ridge * dw * dmax
    return s, gap, rounding


def _barrier_method(model: _Model, tol: float, max_iter: int):
    """Minimises ``âᵀw + c s`` over ``w ∈ Δ``, ``s ≥ (wᵀG'w)^{1/2}`` (see :func:`cagrad_solve`).

    Returns ``(w, s, iterations, gap, rounding)`` at the iterate of smallest gap.
    """
    ah, c = model.ah, model.c
    n = ah.shape[0]
    dtype = ah.dtype
    eps = float(jnp.finfo(dtype).eps)
    tiny = jnp.finfo(dtype).tiny
    halvings = 0.5 ** jnp.arange(_LINE_SEARCH_MAX, dtype=dtype)
    mu_min = tol / (10.0 * (n + 2))
    w0 = jnp.full((n,), 1.0 / n, dtype)
    mu0 = jnp.ones((), dtype)

    def smooth_terms(model, w, gw, mu):
        u, p = model.ridged(w, *gw)
        m = mu / c
        s, root = _smoothed_norm(p, m)
        gt = ah + (c / s) * u  # ∇(âᵀw + c s − μ log s) at s = s_μ(w)
        # The multiplier of 1ᵀw = 1 that best centres w (least squares of wᵢ(gtᵢ − ν) − μ).
        nu = (_dot(w, w * gt) - mu) / _dot(w, w)
        z = gt - nu
        eta = jnp.max(jnp.abs(w * z - mu)) / mu
        return u, p, m, s, root, gt, z, eta

    def newton_step(model, w, gw, mu):
        u, p, m, s, root, gt, z, _ = smooth_terms(model, w, gw, mu)
        gm = model.g + model.ridge * jnp.outer(model.norms, model.norms)
        # Newton-type step for Φ_μ(w) = âᵀw + c s_μ(w) − μ log s_μ(w) − μ Σ log wᵢ on 1ᵀw = 1,
        # in the scaled variable v = dw/w. Metric: W∇²(c s)W + diag(max(μ, wᵢzᵢ)), the barrier's
        # curvature at the current products wᵢzᵢ (as in primal-dual methods: a coordinate far
        # from the path is re-centred in one step), + ρwwᵀ, which changes nothing on wᵀv = 0 and
        # keeps the system well conditioned, + a relative ridge on the diagonal for rounding.
        wu = w * u
        hw = (c / s) * (w[:, None] * gm * w[None, :] - jnp.outer(wu, wu) / (s * root))
        diag = jnp.maximum(mu, w * z) + n * eps * jnp.abs(jnp.diagonal(hw))
        rho = (jnp.trace(hw) + jnp.sum(diag)) / _dot(w, w)
        mat = hw + jnp.diag(diag) + rho * jnp.outer(w, w)
        rhs = mu - w * z  # −W∇Φ_μ up to a multiple of w
        both = _chol_solver(mat)(jnp.stack([rhs, w], axis=1))
        dnu = -_dot(w, both[:, 0]) / _dot(w, both[:, 1])
        v = both[:, 0] + dnu * both[:, 1]
        lam2 = _dot(rhs, v)  # the decrement −∇Φ_μ·dw
        finite = jnp.all(jnp.isfinite(v)) & (lam2 > 0)
        # If the factorisation failed: the projected scaled gradient, still a descent direction.
        v_grad = rhs - _dot(w, rhs) / _dot(w, w) * w
        v = jnp.where(finite, v, v_grad)
        lam2 = jnp.where(finite, lam2, _dot(rhs, v_grad))
        dw = w * v

        # Armijo backtracking on Φ_μ over t₀2^{-k} (t₀ keeps w > 0), all at once; the
        # differences Φ_μ(w + t dw) − Φ_μ(w) are evaluated term by term, without cancellation.
        ts = jnp.minimum(1.0, _BOUNDARY_FRACTION * _max_step(w, dw)) * halvings
        dgd = model.ridged(dw, *model.products(dw))[1]
        dp = ts * (2.0 * df.dot2(u, dw) + ts * dgd)
        root_t = jnp.sqrt(jnp.maximum(m * m + p + dp, 0.0))
        ds = dp / jnp.maximum(root_t + root, tiny)
        steps = jnp.maximum(ts[:, None] * v, -_BOUNDARY_FRACTION)
        dphi = (
            ts * df.dot2(ah, dw)
            + c * ds
            - mu * jnp.log1p(ds / s)
            - mu * jnp.sum(jnp.log1p(steps), axis=1)
        )
        armijo = (dphi <= -1e-4 * ts * lam2) & jnp.isfinite(dphi)
        t = jnp.max(jnp.where(armijo, ts, 0.0))
        w_new = jnp.maximum(w + t * dw, 0.0)
        w_new = w_new / jnp.sum(w_new)
        w_new = jnp.where(jnp.all(w_new > 0) & jnp.all(jnp.isfinite(w_new)), w_new, w)
        # Centred for the next iteration: after a full step of small decrement (Newton's
        # quadratic convergence), when every wᵢzᵢ is close to μ, or when no step decreases Φ_μ.
        gw_new = model.products(w_new)
        eta = smooth_terms(model, w_new, gw_new, mu)[-1]
        centred = ((t == 1.0) & (lam2 <= _DECREMENT * mu)) | (eta <= _CENTRED) | (t == 0.0)
        return w_new, gw_new, m, centred

    def body(state):
        w, gw, mu, it, _, centred, best, ridge, pass_it, passes = state
        model_k = model._replace(ridge=ridge)
        # μ decreases first when the iterate is centred; one Newton step then usually
        # re-centres it.
        mu = jnp.where(centred & (mu > mu_min), jnp.maximum(mu / _MU_FACTOR, mu_min), mu)
        w_new, gw_new, m, centred = newton_step(model_k, w, gw, mu)
        p_true = gw_new[1]
        s_new, gap, rounding = _certificate(model_k, w_new, *gw_new, m)
        # The gap certifies nothing when wᵀG'w < 0 (rounding made G indefinite beyond the
        # ridge: s may be below the true ‖g_w‖), nor when s < √eps·dᵀw: the weights
        # λ = b + (r/s)w, of size r/s, then lose the balance of nearly cancelling gradients
        # to their own rounding.
        dw2 = _dot(model.norms, w_new) ** 2
        indefinite = p_true + ridge * dw2 < -16.0 * eps * eps * dw2
        gap = jnp.where(indefinite | (s_new * s_new < eps * dw2), jnp.inf, gap)
        # The best iterate: one that meets the stopping test if any does, then the smallest gap.
        met, best_met = gap <= tol + rounding, best[2] <= tol + best[3]
        better = (met & ~best_met) | ((met == best_met) & (gap < best[2]))
        best = jax.tree_util.tree_map(
            lambda new, old: jnp.where(better, new, old), (w_new, s_new, gap, rounding), best
        )
        # A pass ends once the gap is within tol, once the path has been followed down to
        # μ_min (the gap can then shrink no further), or when the iterate is not finite.
        done = (best[2] <= tol) | (centred & (mu <= mu_min)) | ~jnp.all(jnp.isfinite(w_new))
        # A new pass with a larger ridge ε (at least eps): when rounding made
        # G' indefinite (wᵀG'w < 0), or when a pass fails near the cone's tip (‖g_w‖ below
        # 4√eps·dᵀw), where the direction g_w/s is resolved only with s ≥ √eps·dᵀw.
        unconverged = (done | (pass_it + 1 >= _PASS_ITER)) & ~(best[2] <= tol + best[3])
        tip = s_new * s_new <= 16.0 * eps * dw2
        restart = (indefinite | (unconverged & tip)) & (passes < _PASSES - 1)
        restart = restart & jnp.all(jnp.isfinite(w_new))
        ridge_new = jnp.maximum(4.0 * ridge, jnp.maximum(eps, -4.0 * p_true / dw2))
        # The new pass starts from the current iterate, with μ raised to the scale of the
        # ridge's share of s (μ/c ≈ (εdᵀw²)^{1/2}).
        mu_restart = jnp.maximum(mu, c * jnp.sqrt(ridge_new * dw2))
        return (
            w_new,
            gw_new,
            jnp.where(restart, mu_restart, mu),
            it + 1,
            done & ~restart,
            centred & ~restart,
            best,
            jnp.where(restart, ridge_new, ridge),
            jnp.where(restart, 0, pass_it + 1),
            passes + restart.astype(jnp.int32),
        )

    def cond(state):
        return (state[3] < max_iter) & ~state[4]

    gw0 = model.products(w0)
    s0, gap0, rounding0 = _certificate(model, w0, *gw0, mu0 / c)
    zero = jnp.zeros((), jnp.int32)
    init = (
        w0,
        gw0,
        mu0,
        zero,
        gap0 <= tol,
        jnp.zeros((), bool),
        (w0, s0, gap0, rounding0),
        jnp.asarray(model.ridge, dtype),
        zero,
        zero,
    )
    _, _, _, iters, _, _, (w, s, gap, rounding), *_ = lax.while_loop(cond, body, init)
    return w, s, iters, gap, rounding


# ----------------------------------------------------------------------------------------------
# Active-set polish: an exact solve on a candidate support, accepted only when certified

_POLISH_TOL = 64.0  # the KKT conditions are met to this many ε of the terms' size (1 + c)


def _polish_one(model: _Model, mask, *, cos, cos_split, at):
    """The optimum on the support ``mask``, in the scale-free variables ``βᵢ = wᵢnᵢ/‖g_w‖``
    (``u = Σ βᵢĝᵢ``, ``‖u‖ = 1``), and its KKT violation relative to the terms' size.

    With every task of the support active, ``ĝᵢ·d̂ = ãᵢ + c(Kβ)ᵢ = f eᵢ`` (``K`` the cosines,
    ``ãᵢ = ĝᵢ·ĝ₀``, ``d̂ = ĝ₀ + cu``, value ``F = f n_ref``, ``eᵢ = n_ref/nᵢ ≤ 1``), so
    ``β = (f p − q)/c`` with ``p = K⁻¹e``, ``q = K⁻¹ã``, and ``βᵀKβ = 1`` is the quadratic
    ``f²eᵀp − 2f ãᵀp + ãᵀq − c² = 0``, whose larger root is the best worst-task value.
    Certified when ``β ≥ 0`` on the support, the support's equations and ``βᵀKβ = 1`` hold,
    and no task outside it is below the value, ``ĝᵢ·d̂ ≥ f eᵢ``: each to ``_POLISH_TOL·ε``
    relative to the magnitude of its terms (``|ãᵢ| + cΣⱼ|Kᵢⱼβⱼ| + |f|eᵢ``). In these units
    every task's conditions are of size about ``1 + c`` whatever its norm.

    Returns ``(β, certified, violation, next support)``: the largest relative violation, and
    the support of an active-set step (without the tasks of negative ``β``, with the task
    outside it most below the value).
    """
    n = model.norms
    c = model.c
    dtype = n.dtype
    eps = jnp.finfo(dtype).eps
    n_ref = jnp.min(jnp.where(mask, n, jnp.inf))
    e = jnp.where(n > 0, n_ref / jnp.where(n > 0, n, 1.0), 0.0)
    eye = jnp.eye(n.shape[0], dtype=dtype)
    k = jnp.where(mask[:, None] & mask[None, :], cos, eye)
    rhs = jnp.stack([jnp.where(mask, e, 0.0), jnp.where(mask, at, 0.0)], axis=1)
    sol = jnp.linalg.solve(k, rhs)
    p, q = sol[:, 0], sol[:, 1]
    qa = _dot(jnp.where(mask, e, 0.0), p)
    qb = _dot(jnp.where(mask, at, 0.0), p)
    qc = _dot(jnp.where(mask, at, 0.0), q) - c * c
    disc = qb * qb - qa * qc
    root = jnp.sqrt(jnp.maximum(disc, 0.0))
    f = jnp.where(qb >= 0, (qb + root) / qa, qc / (qb - root))
    beta = jnp.where(mask, (f * p - q) / c, 0.0)
    # The KKT conditions, evaluated without cancellation (nearly opposite gradients).
    ku = df.dot2(cos_split, beta[None, :])
    progress = at + c * ku  # ĝᵢ·d̂
    # Each condition relative to the magnitude of its terms (large where gradients cancel).
    size = jnp.abs(at) + c * _dot(jnp.abs(cos), jnp.abs(beta)) + jnp.abs(f) * e
    size = jnp.maximum(size, jnp.finfo(dtype).tiny)
    on = jnp.abs(progress - f * e) / size
    off = jnp.maximum(f * e - progress, 0.0) / size
    tiny = jnp.finfo(dtype).tiny
    negative = jnp.maximum(-beta, 0.0) / jnp.maximum(jnp.max(jnp.abs(beta)), tiny)
    violation = jnp.max(jnp.where(mask, jnp.maximum(on, negative), off))
    norm_size = jnp.maximum(_dot(jnp.abs(beta), _dot(jnp.abs(cos), jnp.abs(beta))), tiny)
    violation = jnp.maximum(violation, jnp.abs(df.dot2(beta, ku) - 1.0) / norm_size)
    ok = (disc >= 0) & (qa > 0) & jnp.all(jnp.isfinite(beta)) & (violation <= _POLISH_TOL * eps)
    ok = ok & jnp.any(beta > 0)
    # The next support of an active-set step: without the tasks of negative weight, with the
    # task outside it that is most below the value.
    below = jnp.where(mask | ~(n > 0), -jnp.inf, off)
    add = (jnp.arange(n.shape[0]) == jnp.argmax(below)) & (jnp.max(below) > _POLISH_TOL * eps)
    keep = mask & ((beta > 0) | ~jnp.isfinite(beta))
    nxt = jnp.where(jnp.any(keep) | jnp.any(add), keep | add, mask)
    return jnp.maximum(beta, 0.0), ok, jnp.where(ok, violation, jnp.inf), nxt


# Thresholds of the first candidate supports. On the conformance corpus (T = 5, 10, 40; 360
# Gramians) these two leave 22 to the exhaustive candidates, as do (1e-2, 1e-3, 1e-4, 1e-5);
# 1e-3 alone leaves 28.
_GUESS_LEVELS = (1e-2, 1e-4)


def _polish(model: _Model, w, s):
    """Candidate supports from the barrier's answer ``(w, s)``, each solved exactly
    (:func:`_polish_one`). First the supports the barrier points at: the tasks whose relative
    slack is below ``θ``, and those whose weight is above ``θ·maxᵢwᵢ``, for ``θ`` in
    :data:`_GUESS_LEVELS` (4 solves). Only if none of them is certified: the ``k`` largest
    weights and the ``k`` tasks of smallest slack, ``k = 1…T`` (``2T`` solves), then, if none
    of those is certified either, active-set steps from the task of smallest slack.
    Returns ``(β/n, certified, violation)`` of the certified candidate with the smallest KKT
    violation among those solved (``λ = b + c‖g₀‖β/n``)."""
    n = model.norms
    tn = n.shape[0]
    c = model.c
    nz = n > 0
    inv = jnp.where(nz, 1.0 / jnp.where(nz, n, 1.0), 0.0)
    cos = jnp.clip(model.g * inv[:, None] * inv[None, :], -1.0, 1.0)
    cos = jnp.where(nz[:, None] & nz[None, :], cos, 0.0)
    cos = cos.at[jnp.diag_indices(tn)].set(jnp.where(nz, 1.0, 0.0))
    cos_split = df.split(cos)
    at = model.ah * inv  # ĝᵢ·ĝ₀
    u = model.products(w)[0]
    gt = model.ah + (c / s) * u
    slack = jnp.where(nz, (gt - jnp.min(jnp.where(nz, gt, jnp.inf))) * inv / (1.0 + c), jnp.inf)
    solve = functools.partial(_polish_one, model, cos=cos, cos_split=cos_split, at=at)

    def best_of(masks):
        beta, ok, viol, _ = jax.vmap(solve)(masks)
        best = jnp.argmin(viol)
        return beta[best], ok[best], viol[best]

    levels = jnp.asarray(_GUESS_LEVELS, slack.dtype)[:, None]
    top = jnp.max(jnp.where(nz, w, 0.0))
    guesses = jnp.concatenate([slack[None] <= levels, w[None] >= levels * top]) & nz[None]
    guess = best_of(guesses)

    def exhaustive():
        ranks = jnp.arange(tn)
        by_weight = jnp.argsort(jnp.where(nz, -w, jnp.inf))
        by_slack = jnp.argsort(slack)
        orders = jnp.concatenate([by_weight[None], by_slack[None]], axis=0)  # (2, T)
        rank_of = jnp.argsort(orders, axis=1)  # position of each task in each order
        masks = (rank_of[:, None, :] <= ranks[None, :, None]) & nz[None, None, :]  # (2, T, T)
        beta, ok, viol = best_of(masks.reshape(2 * tn, tn))

        # Active-set steps from the task of smallest relative slack, for supports that mix
        # scales (a large gradient nearly orthogonal to the direction, active beside a small
        # one), at most 2T; they stop at a certified support.
        def step(state):
            k, mask, beta, ok, viol, _ = state
            b_new, ok_new, viol_new, nxt = solve(mask)
            better = ok_new & (viol_new < viol)
            pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
            return (
                k + 1,
                jnp.where(ok_new, mask, nxt),
                pick(b_new, beta),
                ok | ok_new,
                pick(viol_new, viol),
                ok_new,
            )

        def more(state):
            return (state[0] < 2 * tn) & ~state[5]

        start = (jnp.arange(tn) == by_slack[0]) & nz
        init = (jnp.zeros((), jnp.int32), start, beta, ok, viol, ok)
        return lax.while_loop(more, step, init)[2:5]

    beta, ok, viol = lax.cond(guess[1], lambda: guess, exhaustive)
    return beta * inv, ok, viol


def cagrad_solve(
    gramian: jax.Array,
    c: float | jax.Array,
    *,
    tol: float | None = None,
    ridge: float | None = None,
    max_iter: int = CAGRAD_MAX_ITER,
) -> CAGradSolution:
    """CAGrad's direction ``d = Jᵀλ`` and dual weights ``w``, with a convergence report.

    With ``b = 1/T``, ``g₀ = Jᵀb`` (the mean gradient) and ``r = c‖g₀‖``, the direction
    maximises ``minᵢ gᵢ·d`` over the ball ``‖d − g₀‖ ≤ r``; the dual problem is
    ``min_{w ∈ Δ} F(w) = g_wᵀg₀ + r‖g_w‖`` (``g_w = Jᵀw``), and ``d = g₀ + r g_w/‖g_w‖``.

    Only the Gramian is used: ``g_wᵀg₀ = wᵀGb``, ``‖g_w‖² = wᵀGw``. In units of
    ``‖g₀‖·maxᵢ‖gᵢ‖`` (``G`` divided by its largest diagonal entry, ``â = Gb/‖g₀‖``) the dual
    is the second-order cone program ``min âᵀw + c s`` over ``w ∈ Δ``, ``s ≥ ‖g_w‖``. It is
    solved by a barrier method: for decreasing ``μ``, Newton steps on
    ``Φ_μ = âᵀw + c s − μ log(s² − ‖g_w‖²) − μ Σᵢ log wᵢ`` (``1ᵀw = 1``), where the best ``s``
    has the closed form ``s_μ(w) = μ/c + ((μ/c)² + ‖g_w‖²)^{1/2} > ‖g_w‖``: the non-smooth tip
    of the cone (``g_w = 0``, e.g. for opposite gradients) is approached along the central path
    and never reached. The barrier's curvature in the Newton system uses the current products
    ``wᵢzᵢ`` (``zᵢ`` the estimated multipliers of ``w ≥ 0``), so that after each decrease of
    ``μ`` (by 30, once the iterate is centred) one step usually re-centres the iterate. Each
    step is globalised by a backtracking line search on ``Φ_μ`` (Armijo, over ``t₀2^{-k}``),
    so iterates never swing between vertices. The products ``Gw`` and ``wᵀGw``, sums of large
    terms when gradients nearly cancel, are evaluated with error-free transformations (exact
    split products, compensated sums) to relative accuracy ``ε``.

    Every iterate gives a direction in the ball, ``d = g₀ + r g_w/s`` (``λ = b + (r/s)w``), and
    a certificate: the duality gap ``âᵀw + c‖g_w‖ − minᵢ(â + (c/s)Gw)ᵢ ≥ 0`` bounds both the
    excess of the dual value ``F(w)`` over the optimum and the shortfall of ``d``'s worst-task
    progress ``minᵢ gᵢ·d`` from the best in the ball, relative to ``‖g₀‖·maxᵢ‖gᵢ‖``. Two
    directions are tried, ``s = s_μ(w)`` and the full step ``s = ‖g_w‖``, and the better
    kept. The iterate that meets the stopping test (or else has the smallest gap) is returned.
    The stopping test, ``info.converged``: the gap is below ``tol`` (:func:`cagrad_tol`) plus
    the rounding level ``εM`` of its evaluation, with ``M = 4(1 + c s) + (c/s)(dᵀw) maxᵢ dᵢ``
    (``dᵢ = ‖gᵢ‖/maxⱼ‖gⱼ‖``; the second term for the last digit of ``w`` and of the weights
    ``λ``, of size ``r/s``), plus the ridge's share below. ``info.residual`` is the gap
    relative to that magnitude of its terms, ``gap/M``: about ``ε`` for a gap at the rounding
    level of its evaluation, at most ``tol/4 + ε`` when converged (near the cone's tip, where
    ``M`` is large, the gap itself can be up to about ``c√ε``). The solve stops when the gap is
    below ``tol``, when the
    path has been followed down to ``μ = tol/(10(T + 2))``, or after ``max_iter`` iterations
    (typically 10 to 25; up to about 60 near the cone's tip).

    Near the tip ``‖g_w‖`` is resolved from ``G`` only to ``√ε·dᵀw``: an iterate with smaller
    ``s`` certifies nothing (its large weights lose the balance of the cancelling gradients to
    their own rounding), and neither does one where ``G`` is indefinite (a Gramian rounded
    from nearly dependent gradients). ``‖g_w‖²`` is therefore taken from the model
    ``G + ε'ddᵀ``, with ``ε' = ridge`` (default ``4ε²``, negligible); a pass that ends
    unconverged at the tip, or meets ``wᵀ(G + ε'ddᵀ)w < 0``, is continued from its iterate with
    ``ε'`` raised to at least ``ε`` (and enough to make that form positive), at most twice.
    The tip's resolution then limits the gap to about ``c√ε``.

    The barrier leaves weights of about ``μ`` on inactive tasks; the certificate, relative to
    ``maxᵢ‖gᵢ‖``, cannot see them, yet when norms differ by many orders such a weight on a
    large gradient moves the direction (the optimum may put all weight on the smallest). A
    converged answer is therefore refined: the problem is solved exactly on candidate supports
    (first the tasks whose weight or relative slack passes one of two thresholds; only if none
    of these is certified, the ``k`` tasks of largest weight and of smallest slack relative to
    their norm for every ``k``, then active-set steps; :func:`_polish`), in the scale-free
    variables ``βᵢ = wᵢ‖gᵢ‖/‖g_w‖``, and the solution replaces the
    barrier's only when its KKT conditions (every task of the support attains the worst-task
    progress, ``β ≥ 0``, no other task does worse) hold to ``64ε`` of the magnitude of their
    terms; ``info.residual`` is then that largest relative violation.

    ``c ≥ 0`` may be a traced scalar. When ``r = 0`` (``c = 0`` or ``g₀ = 0``) ``λ = b``, exactly.
    ``T = 1``: ``d = (1 + c)g``. Mass of ``w`` on zero gradients, which does not change the
    direction, is left out of ``λ``. Scale invariant: ``G → kG`` gives the same ``(w, λ)``.
    Non-finite input gives ``converged = False``.
    """
    g, _ = normalize_gramian(gramian)
    n = g.shape[0]
    dtype = g.dtype
    c = jnp.asarray(c, dtype)
    if n == 1:  # d = (1 + c) g
        one = jnp.ones((1,), dtype)
        lam = jnp.where(g[0, 0] > 0, 1.0 + c, 1.0) * one
        ok = jnp.all(jnp.isfinite(lam))
        return CAGradSolution(one, lam, SolverInfo.of(0, ok, jnp.where(ok, 0.0, jnp.inf)))
    tol = cagrad_tol(dtype) if tol is None else float(tol)
    eps = float(jnp.finfo(dtype).eps)
    ridge = _RIDGE * eps * eps if ridge is None else float(ridge)
    b = jnp.full((n,), 1.0 / n, dtype)
    # Products without cancellation error: nearly opposite gradients make ``Gw`` and ``wᵀGw``
    # small sums of large terms, whose plain rounding (ε|G||w|) is magnified by c/‖g_w‖ in the
    # gradient of the dual; ``df.dot2`` gives them to relative accuracy ε.
    g_split = df.split(g)
    a = df.dot2(g_split, b[None, :])
    n0_sq = df.dot2(b, a)
    trivial = (c <= 0) | (n0_sq <= 0)  # r = 0: λ = b
    n0 = jnp.sqrt(jnp.where(trivial, 1.0, n0_sq))
    c_safe = jnp.where(trivial, 1.0, c)
    ah = jnp.where(trivial, 0.0, a / n0)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
    model = _Model(g, g_split, ah, c_safe, jnp.asarray(ridge, dtype), norms)
    w, s, iters, gap, rounding = _barrier_method(model, tol, max_iter)
    lam = b + (c_safe * n0 / s) * jnp.where(norms > 0, w, 0.0)
    met = gap <= tol + rounding
    residual = jnp.maximum(gap, 0.0) * (eps / rounding)
    # The exact solve on the barrier's support, where certified: the barrier's weights keep
    # about μ on inactive tasks, which moves the direction when norms differ by many orders.
    # Only an answer that met the stopping test is refined.
    v, polished, violation = _polish(model, w, s)
    polished = polished & met
    lam = jnp.where(polished, b + c_safe * n0 * v, lam)
    w = jnp.where(polished, v / jnp.sum(v), w)
    info = SolverInfo.of(
        jnp.where(trivial, 0, iters),
        trivial | met,
        jnp.where(trivial, 0.0, jnp.where(polished, violation, residual)),
    )
    return CAGradSolution(jnp.where(trivial, b, w), jnp.where(trivial, b, lam), info)


def cagrad_simplex(
    gramian: jax.Array,
    c: float | jax.Array,
    *,
    tol: float | None = None,
    max_iter: int = CAGRAD_MAX_ITER,
) -> tuple[jax.Array, jax.Array]:
    """CAGrad's dual problem and the weights of its direction: ``(w, λ)`` of
    :func:`cagrad_solve`, which also reports convergence.

    With ``b = 1/T``, ``g₀ = Jᵀb`` (the mean gradient) and ``r = c‖g₀‖``, ``w`` solves
    ``min_{w ∈ Δ} wᵀGb + r ‖Jᵀw‖`` and ``λ = b + (r/s) w`` with ``s ≥ ‖Jᵀw‖`` (equal at the
    optimum unless ``Jᵀw`` vanishes there), so that ``d = Jᵀλ = g₀ + r Jᵀw/s`` lies in the ball
    ``‖d − g₀‖ ≤ r`` and maximises ``minᵢ gᵢ·d`` over it, to the certified duality gap.
    """
    sol = cagrad_solve(gramian, c, tol=tol, max_iter=max_iter)
    return sol.w, sol.lam
