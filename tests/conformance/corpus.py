"""Adversarial inputs for the methods, generated from seeds (float64 numpy only).

A :class:`Case` is a short sequence of steps, each a Jacobian ``(T, P)`` and a loss vector
``(T,)``, so that methods with state are judged on the state they carry from one step to the
next. Two corpora:

* :func:`jacobian_corpus`, for the methods that look at the gradients: nearly opposite pairs
  (angle ``π − δ``, ``δ`` from 1e-4 to 1e-1), near-Pareto-stationary cones (a positive
  combination of the rows within ``η`` of 0), rank-deficient Jacobians (``T > rank``),
  near-collinear rows, row scales up to ``10^{±8}``, Gramians of condition number up to 1e12,
  and plain random rows;
* :func:`loss_corpus`, for the methods that look at the losses only: loss scales up to
  ``10^{±8}``, equal, nearly equal and tiny losses, fast and slow decreases. Its Jacobian is the
  identity padded with zeros, so that the direction ``Jᵀw`` *is* the weight vector.

This module imports numpy only: the benchmark ``benchmarks/solver_accuracy.py`` loads it by path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DELTAS = (1e-4, 1e-3, 1e-2, 1e-1)  # nearly opposite pairs: angle π − δ
ETAS = (1e-4, 1e-3, 1e-2, 1e-1)  # near-stationary cones: distance of the hull to 0
CONDITIONS = (1e4, 1e8, 1e12)  # condition numbers of the Gramian
ROW_EXPONENTS = (4, 8)  # row scales spread over 10^{±e}
COLLINEAR = (1e-4, 1e-2)  # near-collinear rows: relative spread


class Case(NamedTuple):
    """One input sequence: ``jacobians`` ``(S, T, P)`` and ``losses`` ``(S, T)``, float64."""

    family: str
    label: str
    jacobians: np.ndarray
    losses: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.family}[{self.label}]" if self.label else self.family


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _orthonormal(rng: np.random.Generator, p: int, k: int) -> np.ndarray:
    """``k`` orthonormal columns in ``ℝᵖ``."""
    q, r = np.linalg.qr(rng.normal(size=(p, k)))
    return q * np.sign(np.diagonal(r))


def _norms(rng: np.random.Generator, t: int, spread: float = 1.0) -> np.ndarray:
    return 10.0 ** rng.uniform(-spread, spread, size=t)


def _random_rows(rng: np.random.Generator, t: int, p: int) -> np.ndarray:
    """Rows with a random share of a common component: some pairs conflict, others agree."""
    common = rng.normal(size=p)
    share = rng.uniform(0.0, 1.5, size=(t, 1))
    return rng.normal(size=(t, p)) + share * common


def random_jacobian(rng: np.random.Generator, t: int, p: int) -> np.ndarray:
    return _random_rows(rng, t, p) * _norms(rng, t)[:, None]


def opposite_jacobian(rng: np.random.Generator, t: int, p: int, delta: float) -> np.ndarray:
    """Two rows at angle ``π − δ`` with norms a decade apart at most; the others random."""
    basis = _orthonormal(rng, p, 2)
    u, v = basis[:, 0], basis[:, 1]
    pair = np.stack([u, -np.cos(delta) * u + np.sin(delta) * v])
    rows = np.concatenate([pair, _random_rows(rng, t - 2, p)]) if t > 2 else pair
    rows = rows * _norms(rng, t)[:, None]
    return rows[rng.permutation(t)]


def stationary_jacobian(rng: np.random.Generator, t: int, p: int, eta: float) -> np.ndarray:
    """A positive combination of the rows is ``η`` (relative) from 0: ``gᵢ = vᵢ + η e`` with
    ``Σ λᵢ vᵢ = 0`` for a random ``λ`` on the simplex and ``e`` orthogonal to every ``vᵢ``."""
    basis = _orthonormal(rng, p, min(t, p - 1) + 1)
    e, span = basis[:, 0], basis[:, 1:]
    v = rng.normal(size=(t, span.shape[1])) @ span.T
    lam = rng.dirichlet(np.ones(t))
    v = v - lam @ v
    scale = np.linalg.norm(v, axis=1).mean()
    rows = v + eta * scale * e
    return rows * _norms(rng, t)[:, None]


def rank_deficient_jacobian(rng: np.random.Generator, t: int, p: int, rank: int) -> np.ndarray:
    """``T`` rows in a random ``rank``-dimensional subspace."""
    return rng.normal(size=(t, rank)) @ _orthonormal(rng, p, rank).T * _norms(rng, t)[:, None]


def collinear_jacobian(rng: np.random.Generator, t: int, p: int, spread: float) -> np.ndarray:
    """Rows within a relative ``spread`` of one direction (no conflict), norms a decade apart."""
    u = _unit(rng.normal(size=p))
    rows = u + spread * rng.normal(size=(t, p)) / np.sqrt(p)
    return rows * _norms(rng, t)[:, None]


def scaled_jacobian(rng: np.random.Generator, t: int, p: int, exponent: float) -> np.ndarray:
    """Random rows with norms spread evenly (in log scale) over ``10^{±exponent}``."""
    exps = np.linspace(-exponent, exponent, t)[rng.permutation(t)]
    rows = _random_rows(rng, t, p)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True) * (10.0**exps)[:, None]


def conditioned_jacobian(rng: np.random.Generator, t: int, p: int, cond: float) -> np.ndarray:
    """``J = Q₁ diag(σ) Q₂ᵀ`` with ``σ`` log-spaced so that ``cond(JJᵀ) = cond``."""
    sigma = np.logspace(0.0, -0.5 * np.log10(cond), t)
    q1 = _orthonormal(rng, t, t)
    q2 = _orthonormal(rng, p, t)
    return q1 @ np.diag(sigma) @ q2.T


def _families(t: int, p: int):
    """``(family, label, generator)`` for every case of the Jacobian corpus."""
    out = [("random", f"{k}", lambda r: random_jacobian(r, t, p)) for k in range(3)]
    for d in DELTAS:
        out.append(("opposite", f"δ={d:g}", lambda r, d=d: opposite_jacobian(r, t, p, d)))
    for e in ETAS:
        out.append(("stationary", f"η={e:g}", lambda r, e=e: stationary_jacobian(r, t, p, e)))
    ranks = sorted({max(1, t // 2), t - 1}) if t > 1 else []
    for k in ranks:
        out.append(("rank", f"r={k}", lambda r, k=k: rank_deficient_jacobian(r, t, p, k)))
    if t == 2:  # a second rank-1 pair, so that both signs of the product are likely drawn
        out.append(("rank", "r=1b", lambda r: rank_deficient_jacobian(r, t, p, 1)))
    for s in COLLINEAR:
        out.append(("collinear", f"s={s:g}", lambda r, s=s: collinear_jacobian(r, t, p, s)))
    for e in ROW_EXPONENTS:
        out.append(("scales", f"1e±{e}", lambda r, e=e: scaled_jacobian(r, t, p, e)))
    for c in CONDITIONS:
        out.append(("condition", f"{c:.0e}", lambda r, c=c: conditioned_jacobian(r, t, p, c)))
    return out


def jacobian_corpus(
    seed: int, num_tasks: int, dim: int, *, steps: int = 2, repeats: int = 1
) -> list[Case]:
    """The adversarial Jacobian corpus: ``repeats`` draws of every family, ``steps`` steps each
    (independent draws with the same parameters), losses uniform in [0.5, 2]."""
    if dim < num_tasks + 1:
        raise ValueError(f"dim must exceed num_tasks, got dim={dim}, num_tasks={num_tasks}")
    rng = np.random.default_rng([seed, num_tasks, dim])
    cases = []
    for rep in range(repeats):
        for family, label, make in _families(num_tasks, dim):
            js = np.stack([make(rng) for _ in range(steps)])
            losses = rng.uniform(0.5, 2.0, size=(steps, num_tasks))
            name = label if repeats == 1 else f"{label}#{rep}"
            cases.append(Case(family, name, js, losses))
    return cases


def identity_jacobian(num_tasks: int, dim: int) -> np.ndarray:
    """``[I_T | 0]``: the direction ``Jᵀw`` of a weighting is ``w`` padded with zeros."""
    return np.eye(num_tasks, dim)


def loss_corpus(
    seed: int, num_tasks: int, dim: int, *, steps: int = 4, repeats: int = 1
) -> list[Case]:
    """Loss sequences for the losses-only methods (the Jacobian is :func:`identity_jacobian`)."""
    rng = np.random.default_rng([seed, num_tasks, dim, 1])
    t = num_tasks

    def decay(rates):
        return np.exp(-np.outer(np.arange(steps), rates)) * rng.uniform(0.5, 2.0, size=t)

    families = {
        "random": lambda: rng.uniform(0.1, 10.0, size=(steps, t)),
        "scales": lambda: (
            10.0 ** np.linspace(-8, 8, t)[rng.permutation(t)]
            * rng.uniform(0.5, 2.0, size=(steps, t))
        ),
        "equal": lambda: np.ones((steps, t)),
        "near_equal": lambda: 1.0 + 1e-6 * rng.normal(size=(steps, t)),
        "decay": lambda: decay(rng.uniform(0.0, 1.0, size=t)),
        "rates_far_apart": lambda: decay(10.0 ** rng.uniform(-4, 0, size=t)),
        "tiny": lambda: 1e-20 * rng.uniform(0.5, 2.0, size=(steps, t)),
    }
    cases = []
    for rep in range(repeats):
        for family, make in families.items():
            losses = make()
            js = np.broadcast_to(identity_jacobian(t, dim), (steps, t, dim)).copy()
            cases.append(Case(family, "" if repeats == 1 else f"#{rep}", js, losses))
    return cases
