"""A seeded corpus of hard inputs for the equal-projection methods (IMTL-G, ConFIG), their float64
references written from the papers' definitions, and the accuracy rule the tests apply.

Each case is a float64 Jacobian ``J`` (T × P). A method runs on ``J`` (or its Gramian) rounded
to the dtype under test, and its update ``x`` is compared with the float64 reference ``x_ref``.
The case fails when ``‖x − x_ref‖ / ‖x_ref‖`` exceeds all of

* ``TOL[dtype]``;
* ten times the case's *sensitivity*: how far the reference moves when its input is rounded
  to float32 (float32 runs) or moved by random fractions of half an ulp (either dtype), when
  the unit gradients the papers' formulas take are so rounded, and when the reference weights
  are applied to the rounded rows (the update is a sum ``Jᵀw``);
* ``10·T·ε·Σ|wᵢ|‖gᵢ‖ / ‖x_ref‖``, the rounding of such a sum itself.

So a case is judged by what rounding its input makes uncertain, not by a fixed bar. The
papers' properties are judged alike (:func:`_lost`). :func:`ambiguous` marks the cases whose
answer hinges on a rank decision within 100× rounding; the tests require finite updates there.

Families (``cases``):

* ``reproducer``: three gradients about 120° apart plus a common part 1.4e-3 of their norm
  (near Pareto-stationarity; the equal projections are about 0.0014);
* ``cone``: T = 3..6 gradients summing to zero plus a common part 1e-4..1e-1 of their mean norm;
* ``opposite``: a pair at π − δ, δ ∈ [1e-4, 1e-1] (with or without a third gradient);
* ``rank_deficient``: T = 4..6 gradients in a 3-dimensional space (T > rank);
* ``collinear``: T = 3..5 gradients within an angle 1e-5..1e-1 of one direction, norms 0.1..10;
* ``scales``: conflicting gradients with row norms 1e-8..1e8;
* ``ill_conditioned``: unit-gradient matrices with σ_min/σ_max = 1e-7..1e-2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mtljax as mtl

P = 8
TOL = {"float32": 1e-4, "float64": 1e-10}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


class Case(NamedTuple):
    family: str
    j: np.ndarray  # float64, (T, P)
    rank: int  # the rank of J by construction


def _orthonormal(rng, p, k):
    q, _ = np.linalg.qr(rng.normal(size=(p, k)))
    return q.T  # (k, p): orthonormal rows


def _log_uniform(rng, lo, hi, size=None):
    return 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), size)


def _reproducer(rng):
    q = _orthonormal(rng, P, 3)
    phi = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.normal(scale=0.02, size=3)
    norms = 1.0 + 0.05 * rng.normal(size=3)
    rows = np.cos(phi)[:, None] * q[0] + np.sin(phi)[:, None] * q[1] + 1.4e-3 * q[2]
    return norms[:, None] * rows


def _cone(rng):
    t = int(rng.integers(3, 7))
    x = rng.normal(size=(t - 1, P)) * _log_uniform(rng, 0.1, 10.0, (t - 1, 1))
    x = np.concatenate([x, -x.sum(0, keepdims=True)])
    e = _orthonormal(rng, P, 1)[0]
    common = _log_uniform(rng, 1e-4, 1e-1) * np.linalg.norm(x, axis=1).mean()
    return x + common * e


def _opposite(rng):
    q = _orthonormal(rng, P, 2)
    delta = _log_uniform(rng, 1e-4, 1e-1)
    a, b = _log_uniform(rng, 0.1, 10.0, 2)
    pair = np.stack([a * q[0], -b * (np.cos(delta) * q[0] + np.sin(delta) * q[1])])
    if rng.random() < 0.5:
        return pair
    return np.concatenate([pair, rng.normal(size=(1, P))])


def _rank_deficient(rng):
    t = int(rng.integers(4, 7))
    basis = _orthonormal(rng, P, 3)
    return (rng.normal(size=(t, 3)) * _log_uniform(rng, 0.1, 10.0, (t, 1))) @ basis


def _collinear(rng):
    t = int(rng.integers(3, 6))
    g = rng.normal(size=P)
    theta = _log_uniform(rng, 1e-5, 1e-1)
    rows = g + theta * np.linalg.norm(g) * rng.normal(size=(t, P)) / np.sqrt(P)
    return rows * _log_uniform(rng, 0.1, 10.0, (t, 1))


def _scales(rng):
    t = int(rng.integers(3, 6))
    j = rng.normal(size=(t, P))
    j[-1] = -j[0] + 0.5 * j[-1]  # a conflict
    return j * _log_uniform(rng, 1e-8, 1e8, (t, 1))


def _ill_conditioned(rng):
    t = int(rng.integers(3, 7))
    ratio = _log_uniform(rng, 1e-7, 1e-2)
    s = ratio ** np.linspace(0.0, 1.0, t)
    a = _orthonormal(rng, t, t)
    b = _orthonormal(rng, P, t)
    return (a * s) @ b * _log_uniform(rng, 0.1, 10.0, (t, 1))


FAMILIES: dict[str, Callable] = {
    "reproducer": _reproducer,
    "cone": _cone,
    "opposite": _opposite,
    "rank_deficient": _rank_deficient,
    "collinear": _collinear,
    "scales": _scales,
    "ill_conditioned": _ill_conditioned,
}


def cases(per_family: int = 30, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    out = []
    for family, make in FAMILIES.items():
        for _ in range(per_family):
            j = make(rng)
            out.append(Case(family, j, 3 if family == "rank_deficient" else min(j.shape)))
    return out


def ambiguous(case: Case, method: str, dtype: str) -> bool:
    """Whether the case's answer hinges on a rank decision within 100× rounding: a singular
    value that is not zero by construction lies at ``≤ 100·T·ε·σ_max`` (of ``dtype``) in the
    matrix the method must factor (ConFIG: the unit gradients ``U``; IMTL-G: the centred cosine
    matrix ``(I − 𝟙𝟙ᵀ/T)K``, whose null space holds its solution). Counting such a singular
    value as zero or not changes the answer by O(1); no method with a rank decision at rounding
    level is continuous there, and the reference makes none."""
    j, t = case.j, len(case.j)
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    if method == "config":
        s = np.linalg.svd(u, compute_uv=False)
        return bool(s[case.rank - 1] <= 100 * t * EPS[dtype] * s[0])
    a = (np.eye(t) - 1.0 / t) @ (u @ u.T)
    s = np.linalg.svd(a, compute_uv=False)
    # Structural null space: K's (T − rank), or the one direction K⁻¹𝟙 when K is invertible;
    # the entries of the matrix are cosines, so its scale is at least 1.
    small = s[case.rank - 2] if case.rank == t else s[case.rank - 1]
    return bool(small <= 100 * t * EPS[dtype] * max(s[0], 1.0))


# ----------------------------------------------------------------------------------------------
# float64 references, from the papers' definitions


def imtl_g_reference(gramian: np.ndarray) -> np.ndarray:
    """IMTL-G's ``α`` (Liu et al. 2021, §3.2): ``Σα = 1`` and equal projections ``uᵢ · d`` of
    ``d = Σ αᵢ gᵢ``, from the Gramian (``uᵢ · d = (Gα)ᵢ / nᵢ``). Solved by least squares in
    float64 over ``β = Nα`` (coefficients on the unit gradients, ``K`` their cosines):
    ``(K₁ − Kᵢ) β = 0`` for ``i ≥ 2`` and ``Σₖ βₖ / nₖ = 1`` (that row scaled by the smallest
    norm); the minimum-norm solution where it is not unique."""
    n = np.sqrt(np.diagonal(gramian))
    return imtl_g_reference_units(n, gramian / np.outer(n, n))


def imtl_g_reference_units(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """:func:`imtl_g_reference` from the norms ``n`` and the unit gradients' Gramian ``K``."""
    lo = n.min()
    a = np.concatenate([k[0] - k[1:], (lo / n)[None]])
    rhs = np.zeros(len(a))
    rhs[-1] = lo
    beta = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return beta / n


def config_reference(
    j: np.ndarray, units: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(w, g)``: ConFIG's update (Liu, Chu & Thuerey 2025) ``g = (Σᵢ gᵢ · g_u) g_u`` with
    ``g_u = U⁺𝟙 / ‖U⁺𝟙‖``, the unit gradients as the rows of ``U`` (``numpy.linalg.pinv``,
    float64), and weights ``w`` with ``g = Jᵀw`` (from ``U⁺ = Uᵀ(UUᵀ)⁺``). ``units``: ``U``
    given (rounded unit gradients) instead of computed from ``J``."""
    n = np.linalg.norm(j, axis=1)
    u = j / n[:, None] if units is None else units
    gc = np.linalg.pinv(u) @ np.ones(len(j))
    length = np.linalg.norm(gc)
    gu = gc / length
    beta = np.linalg.pinv(u @ u.T) @ np.ones(len(j))
    scale = (j @ gu).sum() / length
    return scale * beta / n, (j @ gu).sum() * gu


# ----------------------------------------------------------------------------------------------
# Running a method on the corpus


def _perturbations(x: np.ndarray, dtype: str, rng) -> list[np.ndarray]:
    """The inputs the float64 reference is recomputed on to measure the case's sensitivity:
    ``x`` rounded to float32 (float32 runs), and ``x`` with each entry moved by a random
    fraction of half a unit in the last place of ``dtype`` (three draws)."""
    half = 0.5 * EPS[dtype]
    out = [x * (1.0 + half * rng.uniform(-1.0, 1.0, x.shape)) for _ in range(3)]
    if dtype == "float32":
        out.append(np.asarray(x.astype(np.float32), np.float64))
    return out


def _unit_roundings(j: np.ndarray, dtype: str, rng) -> list[np.ndarray]:
    """The unit gradients ``U`` as a computation in ``dtype`` holds them: rounded to float32
    (float32 runs), and with their rows' lengths moved by random fractions of half an ulp
    (three draws), not renormalised. The papers' formulas take ``U`` as input, and no
    computation in ``dtype`` keeps its rows at length 1 exactly; a relative change ``δ`` of the
    row lengths moves ``U⁺𝟙`` by ``U⁺ diag(δ) 𝟙``."""
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    half = 0.5 * EPS[dtype]
    out = [u * (1.0 + half * rng.uniform(-1.0, 1.0, (len(u), 1))) for _ in range(3)]
    if dtype == "float32":
        out.append(np.asarray(u.astype(np.float32), np.float64))
    return out


@functools.cache
def _aggregate_fn(method: mtl.Method):
    def one(j):
        losses = jnp.ones(j.shape[0], j.dtype)
        return mtl.aggregate(method, j, losses, method.init(j.shape[0]))[0]

    return jax.jit(jax.vmap(one))


@functools.cache
def _weights_fn(method: mtl.Method):
    def one(g):
        losses = jnp.ones(g.shape[0], g.dtype)
        return mtl.weights_from_gramian(method, g, losses, method.init(g.shape[0]))[0]

    return jax.jit(jax.vmap(one))


def run_batched(fn, xs: list[np.ndarray], dtype: str) -> list[np.ndarray]:
    """``fn`` (vmapped) on each input cast to ``dtype``, batched by shape; float64 numpy out."""
    out: list = [None] * len(xs)
    with jax.enable_x64(dtype == "float64"):
        for shape in sorted({x.shape for x in xs}):
            idx = [i for i, x in enumerate(xs) if x.shape == shape]
            res = np.asarray(fn(jnp.asarray(np.stack([xs[i] for i in idx]), dtype)), np.float64)
            for b, i in enumerate(idx):
                out[i] = res[b]
    return out


class Outcome(NamedTuple):
    family: str
    ambiguous: bool  # see :func:`ambiguous`
    error: float  # ‖x − x_ref‖ / ‖x_ref‖ for the update x
    bar: float  # the relative error allowed: max(TOL, 10 × sensitivity, the sum's rounding)
    failed: bool  # error > bar
    property_failed: bool  # a property of the paper that holds for the reference, lost


def _judge(case, method, x, ref, perturbed, dtype, scale, lost) -> Outcome:
    """``perturbed``: the reference's updates under rounding of its input (its sensitivity);
    ``scale``: ``Σ|wᵢ|‖gᵢ‖``, whose rounding ``10 T ε scale`` no float sum of the rows avoids."""
    size = max(float(np.linalg.norm(ref)), 1e-300)
    err = float(np.linalg.norm(x - ref)) / size
    sens = max(float(np.linalg.norm(p - ref)) for p in perturbed) / size
    bar = max(TOL[dtype], 10 * sens, 10 * len(case.j) * EPS[dtype] * scale / size)
    return Outcome(case.family, ambiguous(case, method, dtype), err, bar, err > bar, lost)


def _lost(defect, x, ref, perturbed, tol) -> bool:
    """Whether ``x`` loses a property the reference has (``defect(ref) ≤ tol``): its defect
    exceeds ``tol`` and the reference's by more than ten times what rounding the reference's
    input changes it by (the same rule as for the error)."""
    d_ref = defect(ref)
    if d_ref > tol:
        return False
    spread = max(abs(defect(p) - d_ref) for p in perturbed)
    return bool(defect(x) > max(tol, d_ref + 10 * spread))


def _projection_spread(u, scale, x):
    return np.ptp(u @ x) / scale


def _cosines(j, n, x):
    return (j @ x) / (n * max(np.linalg.norm(x), 1e-300))


def _conflict(j, n, x):
    return -np.min(_cosines(j, n, x))


def _cosine_spread(j, n, x):
    cos = _cosines(j, n, x)
    return np.ptp(cos) / max(np.abs(cos).mean(), 1e-300)


def evaluate_imtl_g(
    method: mtl.Method, corpus: list[Case], dtype: str, source: str = "gramian"
) -> list[Outcome]:
    """IMTL-G on the corpus; the update is ``d = Σ αᵢ gᵢ``.

    ``source="gramian"``: the method's weights from the Gramian rounded to ``dtype`` (its
    input as a Gramian method), ``d`` formed in float64; sensitivity from the rounded Gramian.
    ``source="jacobian"``: ``mtl.aggregate`` on the Jacobian rounded to ``dtype`` (Gramian and
    ``Jᵀα`` in ``dtype``); sensitivity from the rounded Jacobian and unit gradients.
    Properties: ``Σα = 1`` (to ``10³ ε Σ|αᵢ|``) and equal projections ``uᵢ · d`` (spread
    ``≤ 10³ ε Σ|αᵢ|‖gᵢ‖``, judged by :func:`_lost`)."""
    eps = EPS[dtype]
    rng = np.random.default_rng(1)
    grams = [c.j @ c.j.T for c in corpus]
    alphas = run_batched(_weights_fn(method), grams, dtype)
    if source == "jacobian":
        ds = run_batched(_aggregate_fn(method), [c.j for c in corpus], dtype)
    else:
        ds = [a @ c.j for a, c in zip(alphas, corpus, strict=True)]
    out = []
    for case, g, alpha, d in zip(corpus, grams, alphas, ds, strict=True):
        j = case.j
        n = np.linalg.norm(j, axis=1)
        u = j / n[:, None]
        a_ref = imtl_g_reference(g)
        d_ref = a_ref @ j
        scale = float(np.abs(a_ref) @ n)
        perturbed = []
        if source == "jacobian":
            for jp in _perturbations(j, dtype, rng):
                perturbed += [imtl_g_reference(jp @ jp.T) @ jp, a_ref @ jp]
            for up in _unit_roundings(j, dtype, rng):
                perturbed.append(imtl_g_reference_units(n, up @ up.T) @ j)
        else:
            for gp in _perturbations(g, dtype, rng):
                perturbed.append(imtl_g_reference(0.5 * (gp + gp.T)) @ j)
        lost = abs(alpha.sum() - 1) > 1e3 * eps * max(1.0, np.abs(alpha).sum())
        spread = functools.partial(_projection_spread, u, scale)
        lost |= _lost(spread, d, d_ref, perturbed, 1e3 * eps)
        out.append(_judge(case, "imtl_g", d, d_ref, perturbed, dtype, scale, lost))
    return out


def evaluate_config(method: mtl.Method, corpus: list[Case], dtype: str) -> list[Outcome]:
    """ConFIG on the corpus: ``mtl.aggregate`` on the Jacobian rounded to ``dtype``; sensitivity
    from the rounded Jacobian and unit gradients. Properties (judged by :func:`_lost`): no
    conflict (``min cos(gᵢ, g) > 0``) and equal cosines (relative spread ≤ 1e-3)."""
    rng = np.random.default_rng(1)
    gs = run_batched(_aggregate_fn(method), [c.j for c in corpus], dtype)
    out = []
    for case, g in zip(corpus, gs, strict=True):
        j = case.j
        n = np.linalg.norm(j, axis=1)
        w_ref, g_ref = config_reference(j)

        perturbed = []
        for jp in _perturbations(j, dtype, rng):
            perturbed += [config_reference(jp)[1], w_ref @ jp]
        for up in _unit_roundings(j, dtype, rng):
            perturbed.append(config_reference(j, units=up)[1])
        scale = float(np.abs(w_ref) @ n)
        lost = _lost(functools.partial(_conflict, j, n), g, g_ref, perturbed, 0.0)
        lost |= _lost(functools.partial(_cosine_spread, j, n), g, g_ref, perturbed, 1e-3)
        out.append(_judge(case, "config", g, g_ref, perturbed, dtype, scale, lost))
    return out


def summary(outcomes: list[Outcome]) -> dict[str, tuple[int, int, int, int]]:
    """``family -> (cases, failures, property failures, failures of ambiguous cases)``."""
    fams: dict[str, list[int]] = {}
    for o in outcomes:
        s = fams.setdefault(o.family, [0, 0, 0, 0])
        s[0] += 1
        s[1] += int(o.failed)
        s[2] += int(o.property_failed)
        s[3] += int(o.failed and o.ambiguous)
    return {k: tuple(v) for k, v in fams.items()}
