"""Double-float arithmetic (``mtljax._src.solvers.double_float``) against exact rationals."""

import subprocess
import sys
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from mtljax._src.solvers import double_float as df
from tests.helpers import subprocess_env


def _exact(x) -> list[Fraction]:
    return [Fraction(float(v)) for v in np.asarray(x, np.float64).ravel()]


def _draws(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)).astype(np.float32)


def test_error_free_transformations_are_exact():
    a, b = _draws(0, 2000), _draws(1, 2000)
    hi, lo = jax.jit(df.two_sum)(a, b)
    for x, y, h, e in zip(_exact(a), _exact(b), _exact(hi), _exact(lo), strict=True):
        assert h + e == x + y
    hi, lo = jax.jit(df.split)(a)
    for x, h, e in zip(_exact(a), _exact(hi), _exact(lo), strict=True):
        assert h + e == x
    # 12 bits each: the low 12 bits of hi's significand are zero.
    bits = np.asarray(hi).view(np.uint32)
    assert np.all(bits & 0xFFF == 0)


def check_two_prod_in_every_shape(quick: bool = False) -> None:
    """``p + e`` is ``a·b`` to ``ε₃₂²|a·b|`` and ``p = fl(a·b)``, also in the shapes where XLA:CPU
    at its default optimisation contracts a product and a difference into one FMA (8-wide outer
    products, rows of 7 or 8 against a broadcast row): the textbook
    ``e = (ah·bh − fl(a·b)) + …`` lost ``p``'s rounding there (``e ≈ 0``, an error of about
    ``ε|a·b|``)."""
    eps = float(np.finfo(np.float32).eps)
    shapes = [((8, 1), (1, 8)), ((8, 7), (1, 7))]  # ``quick``: two shapes that contracted
    if not quick:
        shapes += [
            ((2000,), (2000,)),
            ((33, 1), (1, 33)),
            ((10, 300), (1, 300)),
            ((5, 64), (1, 64)),
        ]
    for seed, (sa, sb) in enumerate(shapes):
        a = _draws(2 * seed, int(np.prod(sa))).reshape(sa)
        b = _draws(2 * seed + 1, int(np.prod(sb))).reshape(sb)
        hi, lo = jax.jit(df.two_prod)(jnp.asarray(a), jnp.asarray(b))
        x, y = np.broadcast_arrays(a, b)
        np.testing.assert_array_equal(hi, x * y, err_msg=str(sa))
        for u, v, h, e in zip(_exact(x), _exact(y), _exact(hi), _exact(lo), strict=True):
            assert abs(h + e - u * v) <= eps**2 * abs(u * v), (sa, sb)


def _check_solution(a: np.ndarray, b: np.ndarray, hi: jax.Array, lo: jax.Array) -> None:
    """The double-float solution ``hi + lo`` of ``Ax = b`` (float32 ``a``, ``b`` taken as
    exact): the exact residual (rationals) is within ``4nε₃₂²(|A||x| + |b|)`` componentwise,
    and ``x`` agrees with float64's solve to ``1e-8`` relative."""
    eps = float(np.finfo(np.float32).eps)
    n = b.shape[0]
    x = [h + e for h, e in zip(_exact(hi), _exact(lo), strict=True)]
    rows = np.asarray(a, np.float64)
    for i in range(n):
        terms = [Fraction(float(rows[i, j])) * x[j] for j in range(n)]
        resid = Fraction(float(b[i])) - sum(terms, Fraction(0))
        size = sum(abs(t) for t in terms) + abs(Fraction(float(b[i])))
        assert abs(resid) <= 4 * n * eps**2 * size, (n, i, float(resid / size))
    want = np.linalg.solve(rows, b.astype(np.float64))
    got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    assert np.linalg.norm(got - want) <= 1e-8 * np.linalg.norm(want), n


def check_cholesky_solve(quick: bool = False) -> None:
    """``cholesky_solve(cholesky(A), b)`` on graded SPD matrices (``n`` = 3, 8, 40, condition
    up to 1e5, float32 entries taken as exact): the exact residual ``b − Ax`` (rationals) is
    within ``4nε₃₂²(|A||x| + |b|)`` componentwise, and ``x`` agrees with float64's solve to
    ``1e-8`` relative."""
    rng = np.random.default_rng(4)
    solve = jax.jit(lambda a, b: df.cholesky_solve(df.cholesky(a), b))
    for n in (3, 8, 40):
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        if quick and n != 40:
            continue
        a = ((q * np.logspace(0, -5, n)) @ q.T).astype(np.float32)
        a = ((a + a.T) / 2).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        zero = jnp.zeros((n,), jnp.float32)
        hi, lo = solve((jnp.asarray(a), jnp.zeros((n, n), jnp.float32)), (jnp.asarray(b), zero))
        _check_solution(a, b, hi, lo)


def test_signed_cholesky_solves_a_slightly_indefinite_matrix_to_eps_squared():
    """``signed_cholesky`` (``L diag(s) Lᵀ = A``) on graded symmetric matrices whose smallest
    eigenvalue is negative (−1e-5 of the largest; ``n`` = 3, 8, 40), as rounding leaves a nearly
    singular cosine matrix: it finds the one negative pivot where :func:`cholesky` gives NaN,
    the exact residual of the solve is within ``4nε₃₂²(|A||x| + |b|)`` and ``x`` agrees with
    float64's solve to ``1e-8`` relative."""
    rng = np.random.default_rng(5)

    def solve(a, b):
        low, signs = df.signed_cholesky(a)
        return df.cholesky_solve(low, b, signs), signs, df.cholesky(a)[0]

    solve = jax.jit(solve)
    for n in (3, 8, 40):
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        eig = np.logspace(0, -5, n) * np.where(np.arange(n) == n - 1, -1.0, 1.0)
        a = ((q * eig) @ q.T).astype(np.float32)
        a = ((a + a.T) / 2).astype(np.float32)
        assert np.sum(np.linalg.eigvalsh(a.astype(np.float64)) < 0) == 1
        b = rng.standard_normal(n).astype(np.float32)
        zero = jnp.zeros((n,), jnp.float32)
        (hi, lo), signs, plain = solve(
            (jnp.asarray(a), jnp.zeros((n, n), jnp.float32)), (jnp.asarray(b), zero)
        )
        assert np.sum(np.asarray(signs) < 0) == 1 and not np.all(np.isfinite(plain)), n
        _check_solution(a, b, hi, lo)


def test_cholesky_solve_is_backward_stable_to_eps_squared():
    check_cholesky_solve()


def test_two_prod_is_within_eps_squared_in_every_shape():
    """:func:`check_two_prod_in_every_shape` as the suite compiles (LLVM at level 0) and, in a
    subprocess, as users compile (XLA's default flags, where the contraction happens), with
    :func:`check_cholesky_solve` there too (in the subprocess: the two shapes that contracted
    and the 40 × 40 solve, which compile slowly at the default optimisation)."""
    check_two_prod_in_every_shape()
    code = "import tests.methods.test_double_float as t; t.check_two_prod_in_every_shape(True)"
    code += "; t.check_cholesky_solve(True)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(XLA_FLAGS=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_dot_and_norm_resolve_cancellation_to_about_eps_squared():
    """``‖a‖ − a·b`` with ``b`` the unit vector of ``a`` plus a 1e-5 tilt: float32 loses every
    digit of the difference; double-float keeps it to ≲ 10 ε₃₂² relative to ‖a‖."""
    rng = np.random.default_rng(2)
    eps = float(np.finfo(np.float32).eps)
    for m in (7, 1000, 65537):
        a = rng.standard_normal(m).astype(np.float32)
        b = (a / np.linalg.norm(a) + 1e-5 * rng.standard_normal(m) / np.sqrt(m)).astype(np.float32)

        def gap(a, b):
            norm = df.sqrt(df.dot_last(a, a))
            prod = df.dot_last(a, b)
            return df.add(norm, (-prod[0], -prod[1]))

        hi, lo = jax.jit(gap)(jnp.asarray(a), jnp.asarray(b))
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        exact = sum(_exact(a64 * a64), Fraction(0))  # float32 squares are exact in float64
        norm = np.sqrt(float(exact))
        prod = sum((x * y for x, y in zip(_exact(a64), _exact(b64), strict=True)), Fraction(0))
        want = norm - float(prod)
        got = float(hi) + float(lo)
        assert abs(got - want) <= 10 * eps**2 * norm, (m, got, want)
        assert abs(float(jnp.sum(a * b)) - float(prod)) > 1e3 * eps**2 * norm  # float32 cannot


def test_dot2_is_accurate_to_eps_on_ill_conditioned_sums():
    """``dot2`` (the CAGrad solver's products) against exact rationals on sums that cancel to
    about 1e-8 of their terms: error within ``4ε|Σ| + 8·ε·2⁻¹²·Σ|aⱼbⱼ|``, where the plain float32
    sum errs by ``ε·Σ|aⱼbⱼ|``."""
    rng = np.random.default_rng(3)
    eps = float(np.finfo(np.float32).eps)
    for m in (5, 300, 4097):
        a = rng.standard_normal(m).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32)
        b[-1] = np.float32(-(a[:-1].astype(np.float64) @ b[:-1]) / a[-1])  # Σ ≈ 0
        exact = sum((x * y for x, y in zip(_exact(a), _exact(b), strict=True)), Fraction(0))
        size = float(np.abs(a.astype(np.float64) * b).sum())
        got = float(jax.jit(df.dot2)(jnp.asarray(a), jnp.asarray(b)))
        assert abs(got - float(exact)) <= 4 * eps * abs(float(exact)) + 8 * eps * 2**-12 * size, m
        split = df.split(jnp.asarray(a))
        assert float(jax.jit(df.dot2)(split, jnp.asarray(b))) == got
