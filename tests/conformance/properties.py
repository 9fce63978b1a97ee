"""What every registered method claims, and the checks of those claims.

:data:`CLAIMS` says, for every method name of ``mtljax.methods.names()``, which configurations
the suite runs and which properties each claims, with the paper's section in a comment. A name
missing from it fails the suite: registering a method forces a decision about its claims.

The checks run on one batch per configuration, task count and dtype (:func:`run_batch`): every
case of the adversarial corpus, a few well-conditioned problems and their transformed copies
(tasks permuted, the Jacobian scaled, its rows scaled, rows and losses scaled together) and
degenerate inputs, all through one jitted, vmapped ``lax.scan`` over the steps of each case
(one compilation). A weighting receives the Gramian (``mtljax.weights_from_gramian``) and its
direction is ``Jᵀw`` with the case's float64 ``J``; a Jacobian method receives the Jacobian
(``mtljax.aggregate``). A method with an ``after_update`` hook (FAMO) is then given the losses
of the same step's batch after its update, as the train step does
(``references.after_update_losses``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mtljax as mtl
from tests.conformance import corpus, references

DTYPES = ("float32", "float64")
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
# Relative tolerance of the exact identities (permutation, scaling) on well-conditioned inputs,
# and of the non-conflict inequality, relative to the size of the terms of Jᵀw.
PROPERTY_TOL = references.TOLERANCE
# A converged solve's residual is at rounding level of the dtype the solver works in.
RESIDUAL_BOUND = {dtype: 1e3 * eps for dtype, eps in EPS.items()}
# "independent" claims hold where the unit gradients are linearly independent: the smallest
# eigenvalue of their Gramian (the cosine matrix) at least √ε of the dtype.
INDEPENDENCE = {dtype: float(np.sqrt(eps)) for dtype, eps in EPS.items()}


@dataclasses.dataclass(frozen=True)
class Claims:
    """What one configuration of a method claims.

    Attributes:
      label: the configuration's name in test ids.
      kwargs: ``(T, P, dtype) -> factory keyword arguments``; the reference receives the same.
      key: the method draws random numbers: the suite passes a key (else ``key=None``).
      permutation: ``"all"``: permuting the tasks (and the per-task hyper-parameters named in
        ``per_task``) leaves the direction unchanged; ``"two_tasks"``: only with two tasks;
        ``None``: not claimed.
      non_conflicting: ``gᵢ·d ≥ 0`` for every task: ``"always"``, ``"independent"`` (for
        linearly independent gradients), ``None``.
      global_degree: ``d(cJ) = c^k d(J)`` for ``c > 0``.
      row_scaling: under ``J → diag(k)J`` (``k > 0``): ``"linear"``, ``d`` is linear in ``k``
        (Quinton & Rey's Definition 2); ``"invariant"``, ``d`` unchanged; ``"direction"``, ``d``
        changes by a positive factor; ``"line"``, by a non-zero factor; ``None``.
      loss_scaling: ``"invariant"``: under ``(J, L) → (diag(k)J, k∘L)`` the direction changes by
        a positive factor at most; ``None``.
      solver: the method runs an iterative solver and keeps its ``SolverInfo`` in its state.
      per_task: hyper-parameters holding one value per task.
    """

    label: str = "default"
    kwargs: Callable[[int, int, str], dict] = lambda t, p, dtype: {}
    key: bool = False
    permutation: str | None = "all"
    non_conflicting: str | None = None
    global_degree: float = 1.0
    row_scaling: str | None = None
    loss_scaling: str | None = None
    solver: bool = False
    per_task: tuple[str, ...] = ()


def _fixed_weights(t: int) -> list[float]:
    return [float(x) for x in np.linspace(0.5, 2.0, t)]


def _like(p: int, dtype: str):
    return jax.ShapeDtypeStruct((p,), jnp.dtype(dtype))


# Losses-only methods: the weights do not depend on J, so d = Jᵀw is linear in J and in the
# row scales (Quinton & Rey 2024, Table 1: "Constant", "Mean", "Random" are linear under
# scaling).
_LOSSES = dict(row_scaling="linear")

CLAIMS: dict[str, tuple[Claims, ...]] = {
    # Caruana 1997: the sum of the gradients.
    "ew": (Claims(kwargs=lambda t, p, d: {"reduction": "sum"}, **_LOSSES),),
    # Fixed weights: a per-task hyper-parameter, permuted with the tasks.
    "fixed": (
        Claims(
            kwargs=lambda t, p, d: {"weights": _fixed_weights(t)}, per_task=("weights",), **_LOSSES
        ),
    ),
    # Kendall et al. 2018, eqs. 7/10; symmetric in the tasks.
    "uw": (
        Claims(kwargs=lambda t, p, d: {"kinds": "regression", "learning_rate": 1e-2}, **_LOSSES),
    ),
    # Liu et al. 2019, eq. 5 (T softmax of the loss ratios), one step per epoch.
    "dwa": (Claims(kwargs=lambda t, p, d: {"temperature": 2.0, "steps_per_epoch": 1}, **_LOSSES),),
    # Lin et al. 2022: random weights, exchangeable only in distribution.
    "rlw": (Claims(kwargs=lambda t, p, d: {}, key=True, permutation=None, **_LOSSES),),
    # Chennupati et al. 2019: the geometric mean is invariant to the scale of any one loss.
    "gls": (Claims(kwargs=lambda t, p, d: {"eps": 1e-8}, loss_scaling="invariant", **_LOSSES),),
    # Liu et al. 2023 (FAMO), Sec. 3: w ∝ z/ℓ and the log-loss decreases are scale-free.
    "famo": (
        Claims(
            kwargs=lambda t, p, d: {"learning_rate": 0.025, "gamma": 1e-3, "eps": 1e-8},
            loss_scaling="invariant",
            **_LOSSES,
        ),
    ),
    # Lin et al. 2024, eq. (8) with λ = 1, z* = 0, times T (the authors' multi-task scale).
    "stch": (
        Claims(
            kwargs=lambda t, p, d: {"mu": 1.0, "log_losses": False, "warmup_steps": 0}, **_LOSSES
        ),
    ),
    # Liu et al. 2021 (IMTL), Sec. 3.1.
    "imtl_l": (Claims(kwargs=lambda t, p, d: {"learning_rate": 1e-2}, **_LOSSES),),
    # Chen et al. 2018, Sec. 3.2: symmetric in the tasks; the first step uses w = 1 and the
    # weight update depends on J through sign(wᵢ‖gᵢ‖ − target) only (Adam's step is scale-free).
    "gradnorm": (
        Claims(kwargs=lambda t, p, d: {"alpha": 1.5, "learning_rate": 0.025, "params": "all"}),
    ),
    # Désidéri 2012 / Sener & Koltun 2018: the min-norm point is a common descent direction
    # (gᵢ·d ≥ ‖d‖²); Quinton & Rey 2024, Table 1: non-conflicting, not linear under scaling.
    # With Sener & Koltun's "l2" normalisation the direction is that of the unit gradients.
    "mgda": (
        Claims(non_conflicting="always", solver=True),
        Claims(
            label="l2",
            kwargs=lambda t, p, d: {"normalization": "l2"},
            non_conflicting="always",
            global_degree=0.0,
            row_scaling="invariant",
            solver=True,
        ),
    ),
    # Yu et al. 2020, Algorithm 1: a random visiting order (irrelevant with two tasks); the
    # documented order without a key is 0, …, T−1. Quinton & Rey, Table 1: linear under scaling.
    "pcgrad": (Claims(permutation="two_tasks", row_scaling="linear"),),
    # Chen et al. 2020, Algorithm 1: P and U do not depend on the order of the tasks, and the
    # signs and purity do not change when J is scaled.
    "graddrop": (Claims(kwargs=lambda t, p, d: {"leak": 0.0}, key=True),),
    # Wang et al. 2021, Algorithm 1: as PCGrad; each adjustment of gᵢ is proportional to ‖gᵢ'‖
    # and independent of ‖gⱼ‖, so d is linear under scaling.
    "gradvac": (
        Claims(
            kwargs=lambda t, p, d: {"beta": 0.01}, permutation="two_tasks", row_scaling="linear"
        ),
    ),
    # Liu et al. 2021 (CAGrad), eq. 3: symmetric; d(cJ) = c d(J). Quinton & Rey, Table 1:
    # neither non-conflicting nor linear under scaling.
    "cagrad": (Claims(kwargs=lambda t, p, d: {"c": 0.4, "rescale": False}, solver=True),),
    # Navon et al. 2022: αᵢ(gᵢ·d) = 1 > 0 (Sec. 3, linearly independent gradients assumed);
    # invariant to the scale of each loss (Sec. 5: gᵢ → kgᵢ gives αᵢ → αᵢ/k, the same d).
    "nash_mtl": (
        Claims(
            non_conflicting="independent", global_degree=0.0, row_scaling="invariant", solver=True
        ),
    ),
    # Liu et al. 2021 (IMTL), Sec. 3.2: equal projections on the unit gradients, a condition
    # that does not change when the rows are scaled; Σα = 1 fixes the length (and sign).
    "imtl_g": (Claims(row_scaling="line"),),
    # IMTL (Algorithm 1): IMTL-G on the scaled gradients, the same line.
    "imtl": (Claims(kwargs=lambda t, p, d: {"learning_rate": 1e-2}, row_scaling="line"),),
    # Senushkin et al. 2023, Algorithm 1: B does not change when G is scaled. Quinton & Rey,
    # Table 1: neither non-conflicting nor linear under scaling.
    "aligned_mtl": (Claims(),),
    # Quinton & Rey 2024, Sec. 3 and Table 1: non-conflicting and linear under scaling.
    "upgrad": (Claims(non_conflicting="always", row_scaling="linear", solver=True),),
    # Quinton & Rey 2024, Table 1: non-conflicting, not linear under scaling.
    "dualproj": (Claims(non_conflicting="always", solver=True),),
    # Liu, Chu & Thuerey 2024, Sec. 3: positive, equal cosines when the gradients are linearly
    # independent; d = (Σ kᵢgᵢ·g_u) g_u is linear in the row scales (Quinton & Rey, Table 1).
    # A Jacobian method (it computes U⁺𝟙 from J, not from the Gramian alone).
    "config": (Claims(non_conflicting="independent", row_scaling="linear"),),
    # Ban & Ji 2024: gᵢ·d = wᵢ^{−1/α} > 0 where the solution exists; w ∝ ‖g‖^{−2α/(1+α)}, so
    # d(cJ) = c^{(1−α)/(1+α)} d(J); α = 1 is Nash-MTL's equation (invariant to row scales).
    "fairgrad": (
        Claims(
            kwargs=lambda t, p, d: {"alpha": 1.0},
            non_conflicting="independent",
            global_degree=0.0,
            row_scaling="invariant",
            solver=True,
        ),
        Claims(
            label="alpha2",
            kwargs=lambda t, p, d: {"alpha": 2.0},
            non_conflicting="independent",
            global_degree=-1.0 / 3.0,
            solver=True,
        ),
    ),
    # Lin et al. 2023 (DB-MTL), Algorithm 1: gradients of log-losses (invariant to the scale of
    # each loss) rescaled to the largest norm (the direction ignores the rows' scales).
    "db_mtl": (
        Claims(
            kwargs=lambda t, p, d: {
                "beta": 0.9,
                "beta_sigma": 0.5,
                "eps": 1e-8,
                "like": _like(p, d),
            },
            row_scaling="direction",
            loss_scaling="invariant",
        ),
    ),
}


def claims_of(name: str) -> tuple[Claims, ...]:
    """The configurations of ``name``; a method missing from :data:`CLAIMS` fails here."""
    if name not in CLAIMS:
        raise AssertionError(
            f"{name} is registered but has no entry in tests/conformance/properties.py CLAIMS: "
            "say which properties its paper claims"
        )
    return CLAIMS[name]


def configurations() -> list[tuple[str, Claims]]:
    """Every ``(name, claims)`` to run: all registered names, each with its configurations."""
    out = []
    for name in mtl.methods.names():
        for claims in CLAIMS.get(name, (None,)):
            out.append((name, claims))
    return out


def config_id(name: str, claims: Claims | None) -> str:
    return name if claims is None or claims.label == "default" else f"{name}-{claims.label}"


def build(name: str, claims: Claims, t: int, p: int, dtype: str) -> mtl.Method:
    return mtl.methods.get(name, **claims.kwargs(t, p, dtype))


def given(method: mtl.Method) -> str:
    """What the method receives in the suite: ``"gramian"`` for every weighting (losses-only
    methods ignore it), ``"jacobian"`` for a direction method."""
    return "gramian" if method.weights is not None else "jacobian"


# ----------------------------------------------------------------------------------------------
# The batch: corpus, property cases, degenerate cases


class Entry(NamedTuple):
    """One case of the batch; ``role``: ``"corpus"``, ``"property"`` or ``"degenerate"``;
    ``tag``: the transformation of a property case (``"base"``, ``"perm"``…), its base index."""

    role: str
    case: corpus.Case
    tag: str = ""
    base: int = -1


STEPS = 2  # steps per case (losses-only methods: LOSS_STEPS, so that DWA's ratios start)
LOSS_STEPS = 4
GLOBAL_SCALE = 2.0**10
N_BASES = 2


def permutation(t: int) -> np.ndarray:
    return np.roll(np.arange(t), 1)[::-1] if t > 2 else np.array([1, 0])


def row_factors(t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two vectors of powers of two: scaling rows by them (and by their sum) is exact."""
    rng = np.random.default_rng([seed, t, 7])
    return 2.0 ** rng.integers(-6, 7, size=t), 2.0 ** rng.integers(-6, 7, size=t)


def property_entries(t: int, p: int, steps: int) -> list[Entry]:
    rng = np.random.default_rng([11, t, p])
    out = []
    perm = permutation(t)
    for b in range(N_BASES):
        js = np.stack([corpus.random_jacobian(rng, t, p) for _ in range(steps)])
        ls = rng.uniform(0.5, 2.0, size=(steps, t))
        ka, kb = row_factors(t, b)
        variants = {
            "base": (js, ls),
            "perm": (js[:, perm], ls[:, perm]),
            "scaled": (GLOBAL_SCALE * js, ls),
            "rows_a": (ka[:, None] * js, ls),
            "rows_b": (kb[:, None] * js, ls),
            "rows_sum": ((ka + kb)[:, None] * js, ls),
            "losses": (ka[:, None] * js, ka * ls),
        }
        for tag, (j, loss) in variants.items():
            out.append(Entry("property", corpus.Case("property", f"{tag}{b}", j, loss), tag, b))
    return out


def degenerate_entries(t: int, p: int, steps: int) -> list[Entry]:
    rng = np.random.default_rng([13, t, p])
    g = rng.normal(size=p)
    rows = rng.normal(size=(t, p))

    def with_rows(*first):
        j = rows.copy()
        j[: len(first)] = first
        return j

    jacobians = {
        "zero_row": with_rows(np.zeros(p)),
        "all_zero": np.zeros((t, p)),
        "identical": with_rows(g, g),
        "all_identical": np.tile(g, (t, 1)),
        "opposite": with_rows(g, -g),
        "opposite_scaled": with_rows(g, -3.0 * g),
        "collinear": np.resize(np.stack([g, 2.0 * g, 1e-3 * g]), (t, p)),
        "huge": 1e15 * rows,
        "tiny": 1e-15 * rows,
        "scales": np.logspace(-10, 10, t)[:, None] * rows,
    }
    positive = rng.uniform(0.5, 2.0, size=(steps, t))
    out = [
        Entry("degenerate", corpus.Case("degenerate", k, np.stack([j] * steps), positive))
        for k, j in jacobians.items()
    ]
    # Degenerate loss vectors (resized to T), with ordinary losses at the second step so that
    # stateful methods also go from degenerate to ordinary values and back.
    losses = {
        "losses_zero": [0.0, 0.0, 0.0],
        "losses_huge": [1e30, 3e35, 1e30],
        "losses_tiny": [1e-30, 1e-38, 1e-20],
        "losses_mixed": [1e-30, 1e30, 1.0],
        "losses_negative": [-2.0, 0.5, -1e10],
    }
    for k, values in losses.items():
        seq = np.tile(np.resize(np.asarray(values), t), (steps, 1))
        if steps > 1:
            seq[1] = np.resize([1.0, 2.0, 3.0], t)
        out.append(Entry("degenerate", corpus.Case("degenerate", k, np.stack([rows] * steps), seq)))
    return out


def corpus_entries(t: int, p: int, loss_only: bool, steps: int, seed: int = 0) -> list[Entry]:
    make = corpus.loss_corpus if loss_only else corpus.jacobian_corpus
    return [Entry("corpus", c) for c in make(seed, t, p, steps=steps)]


def dims(t: int) -> int:
    """``P`` for ``T`` tasks in the suite's Jacobians."""
    return 2 * t + 2


# ----------------------------------------------------------------------------------------------
# Running a method on a batch


class Outputs(NamedTuple):
    """The results of one batch, float64 numpy: ``directions`` ``(B, S, P)``; ``weights``
    ``(B, S, T)`` or ``None``; ``solver`` (iterations, converged, residual), each ``(B, S)``,
    or ``None``; ``states``: the final states (batched pytree, device arrays)."""

    directions: np.ndarray
    weights: np.ndarray | None
    solver: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    states: Any
    fn: Any


def _batched_fn(method: mtl.Method, use_key: bool):
    is_weighting = method.weights is not None

    def one(x, losses, after, keys, state):
        def step(state, inp):
            xi, li, ai, ki = inp
            key = ki if use_key else None
            if is_weighting:
                out, state = mtl.weights_from_gramian(method, xi, li, state, key=key)
            else:
                out, state = mtl.aggregate(method, xi, li, state, key=key)
            info = mtl.solver_info(state)
            if method.after_update is not None:
                # As the train step: after the update, the same batch's new losses.
                state = method.after_update(li, ai, state)
            return state, (out, info)

        state, (outs, infos) = jax.lax.scan(step, state, (x, losses, after, keys))
        return outs, infos, state

    return jax.jit(jax.vmap(one))


def after_losses(losses: np.ndarray, dtype: str) -> np.ndarray:
    """The losses after each step's update (``references.after_update_losses``) of the
    losses the method receives in ``dtype``, as float64 numpy (to be cast to ``dtype``)."""
    return references.after_update_losses(references.rounded(losses, dtype))


def batch_inputs(entries: list[Entry], method: mtl.Method, dtype: str):
    """The arrays the method receives (float64 numpy, to be cast to ``dtype``)."""
    js = np.stack([e.case.jacobians for e in entries])
    ls = np.stack([e.case.losses for e in entries])
    x = references.gramians(js) if given(method) == "gramian" else js
    return x, ls


def keys_for(entries: list[Entry], steps: int):
    """``(B, S)`` keys: one per case and step, shared by a property case and its transformed
    copies (a random method then draws the same numbers for them)."""
    root = jax.random.key(20260101)
    ids = [10**6 + e.base if e.role == "property" else i for i, e in enumerate(entries)]
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(root, i), steps))(
        jnp.asarray(ids)
    )


def run_entries(method: mtl.Method, claims: Claims, entries: list[Entry], dtype: str):
    """Runs the batch; returns :class:`Outputs` (one compilation per call site)."""
    x, ls = batch_inputs(entries, method, dtype)
    n, steps = ls.shape[:2]
    t = ls.shape[2]
    with jax.enable_x64(dtype == "float64"):
        fn = _batched_fn(method, claims.key)
        init = method.init(t)
        states = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), init)
        outs, infos, final = fn(
            jnp.asarray(x, dtype),
            jnp.asarray(ls, dtype),
            jnp.asarray(after_losses(ls, dtype), dtype),
            keys_for(entries, steps),
            states,
        )
        outs = np.asarray(outs, np.float64)
        solver = None
        if infos is not None:
            solver = tuple(np.asarray(a) for a in infos)
    js = np.stack([e.case.jacobians for e in entries])
    if method.weights is not None:
        weights = outs
        directions = np.einsum("bstp,bst->bsp", js, weights)
    else:
        weights, directions = None, outs
    return Outputs(directions, weights, solver, final, fn)


@functools.cache
def batch(name: str, label: str, t: int, dtype: str):
    """``(entries, outputs)`` for one configuration, task count and dtype (cached)."""
    claims = next(c for c in claims_of(name) if c.label == label)
    p = dims(t)
    method = build(name, claims, t, p, dtype)
    loss_only = method.needs == "losses"
    steps = LOSS_STEPS if loss_only else STEPS
    entries = (
        corpus_entries(t, p, loss_only, steps)
        + property_entries(t, p, steps)
        + degenerate_entries(t, p, steps)
    )
    return entries, run_entries(method, claims, entries, dtype)


# ----------------------------------------------------------------------------------------------
# Property checks: each returns a list of failure messages (empty: the property holds)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return references.relative_error(a, b)


def check_finite(entries, out: Outputs) -> list[str]:
    bad = []
    for i, e in enumerate(entries):
        if not np.all(np.isfinite(out.directions[i])):
            bad.append(f"{e.case.name}: non-finite direction")
        if out.weights is not None and not np.all(np.isfinite(out.weights[i])):
            bad.append(f"{e.case.name}: non-finite weights")
    for leaf in jax.tree_util.tree_leaves(out.states):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating):
            for i in np.nonzero(~np.all(np.isfinite(arr.reshape(len(entries), -1)), axis=1))[0]:
                bad.append(f"{entries[i].case.name}: non-finite state")
    for i, e in enumerate(entries):
        if e.case.label == "all_zero" and np.any(out.directions[i] != 0):
            bad.append(f"{e.case.name}: a zero Jacobian gives a non-zero direction")
    return bad


def _by_tag(entries) -> dict[tuple[str, int], int]:
    return {(e.tag, e.base): i for i, e in enumerate(entries) if e.role == "property"}


def check_permutation(entries, out: Outputs, tol: float) -> list[str]:
    """Permuting the tasks leaves the direction unchanged (at every step)."""
    idx = _by_tag(entries)
    bad = []
    for b in range(N_BASES):
        d, dp = out.directions[idx["base", b]], out.directions[idx["perm", b]]
        err = relative(dp, d)
        if err > tol:
            bad.append(f"base {b}: permuted tasks change the direction by {err:.2e}")
    return bad


def check_global_scaling(entries, out: Outputs, degree: float, tol: float) -> list[str]:
    idx = _by_tag(entries)
    bad = []
    for b in range(N_BASES):
        d, ds = out.directions[idx["base", b]], out.directions[idx["scaled", b]]
        err = relative(ds, GLOBAL_SCALE**degree * d)
        if err > tol:
            bad.append(f"base {b}: d(cJ) ≠ c^{degree:g} d(J) (relative error {err:.2e})")
    return bad


def _parallel(a: np.ndarray, b: np.ndarray) -> float:
    """``cos(a, b)`` for every step (``a``, ``b``: ``(S, P)``)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(na * nb, np.finfo(float).tiny)


def check_row_scaling(entries, out: Outputs, kind: str, tol: float) -> list[str]:
    idx = _by_tag(entries)
    bad = []
    for b in range(N_BASES):
        d = out.directions[idx["base", b]]
        da, db, dsum = (out.directions[idx[k, b]] for k in ("rows_a", "rows_b", "rows_sum"))
        if kind == "linear":
            err = relative(dsum, da + db)
            if err > tol:
                bad.append(f"base {b}: d(diag(a+b)J) ≠ d(diag(a)J) + d(diag(b)J) ({err:.2e})")
        elif kind == "invariant":
            err = max(relative(da, d), relative(db, d))
            if err > tol:
                bad.append(f"base {b}: scaling the rows changes the direction by {err:.2e}")
        else:
            cos = np.concatenate([_parallel(da, d), _parallel(db, d)])
            dev = 1.0 - (np.abs(cos) if kind == "line" else cos)
            if np.max(dev) > tol:
                bad.append(
                    f"base {b}: scaling the rows turns the direction (1 − cos = {dev.max():.2e})"
                )
    return bad


def check_loss_scaling(entries, out: Outputs, tol: float) -> list[str]:
    idx = _by_tag(entries)
    bad = []
    for b in range(N_BASES):
        d, dl = out.directions[idx["base", b]], out.directions[idx["losses", b]]
        dev = 1.0 - _parallel(dl, d)
        if np.max(dev) > tol:
            bad.append(
                f"base {b}: scaling losses and rows turns the direction (1 − cos = {dev.max():.2e})"
            )
    return bad


def independent(gram: np.ndarray, dtype: str) -> bool:
    _, k = references.cosines(gram)
    return bool(np.linalg.eigvalsh(k).min() >= INDEPENDENCE[dtype])


def check_non_conflicting(entries, out: Outputs, kind: str, dtype: str, tol: float) -> list[str]:
    """For every case (``"always"``) or where the gradients are linearly independent, at every
    step: a weighting's ``gᵢ·d ≥ −tol·‖gᵢ‖·Σⱼ|wⱼ|‖gⱼ‖`` on the Gramian it received; a Jacobian
    method's ``gᵢ·d ≥ −tol·‖gᵢ‖·‖d‖`` on the Jacobian it received (its direction has no
    weights; ``‖d‖ ≤ Σⱼ|wⱼ|‖gⱼ‖`` for any ``w`` with ``d = Jᵀw``, so the bound is no looser)."""
    bad = []
    for i, e in enumerate(entries):
        jacs = references.rounded(e.case.jacobians, dtype)
        if out.weights is None:
            grams = references.gramians(jacs)
        else:
            grams = references.rounded(references.gramians(e.case.jacobians), dtype)
        unit = "‖gᵢ‖‖d‖" if out.weights is None else "‖gᵢ‖Σ|wⱼ|‖gⱼ‖"
        for s, g in enumerate(grams):
            if kind == "independent" and not independent(g, dtype):
                continue
            n = np.sqrt(np.clip(np.diagonal(g), 0.0, None))
            if out.weights is None:
                d = out.directions[i, s]
                margin = jacs[s] @ d
                size = np.linalg.norm(jacs[s], axis=1) * np.linalg.norm(d)
            else:
                w = out.weights[i, s]
                size = n * (np.abs(w) @ n)
                margin = g @ w
            if np.any(margin < -tol * size):
                worst = np.min(margin / np.where(size > 0, size, 1.0))
                bad.append(f"{e.case.name} step {s}: gᵢ·d = {worst:.2e} × {unit}")
    return bad


def check_solver_report(entries, out: Outputs, claims: Claims, dtype: str) -> list[str]:
    """Solver methods keep a ``SolverInfo`` (iterations ≥ 1, a converged flag, a residual at
    rounding level when converged, converged on the well-conditioned property cases); other
    methods keep none."""
    if not claims.solver:
        return [] if out.solver is None else ["keeps a SolverInfo but is not declared a solver"]
    if out.solver is None:
        return ["runs an iterative solver but its state keeps no SolverInfo"]
    iters, conv, resid = out.solver
    bad = []
    for i, e in enumerate(entries):
        for s in range(iters.shape[1]):
            where = f"{e.case.name} step {s}"
            if e.role != "degenerate" and iters[i, s] < 1:
                bad.append(f"{where}: {iters[i, s]} iterations")
            if not np.isfinite(resid[i, s]) or resid[i, s] < 0:
                bad.append(f"{where}: residual {resid[i, s]}")
            elif conv[i, s] and resid[i, s] > RESIDUAL_BOUND[dtype]:
                bad.append(f"{where}: converged with residual {resid[i, s]:.2e}")
            if e.role == "property" and not conv[i, s]:
                bad.append(f"{where}: not converged on a well-conditioned problem")
    return bad
