"""Double-float (compensated) arithmetic: a value as an unevaluated sum ``hi + lo`` of two floats.

For the few quantities that a float32 method must know to about ``ε²`` where float64 may not
exist (accelerators): residuals of nearly singular systems, where the answer's error is the
residual's times the condition number. The error-free transformations (Knuth's TwoSum;
Dekker's TwoProduct on a split into 12-bit halves, taken by masking the significand so that a
fused multiply-add cannot change it) are exact in round-to-nearest arithmetic without overflow
or underflow (XLA does not reassociate floating-point sums). Long sums run in 256 interleaved
double-float partial sums, then pairwise (Dekker, "A floating-point technique for extending
the available precision", Numer. Math. 1971; Ogita, Rump & Oishi, "Accurate sum and dot
product", SIAM J. Sci. Comput. 2005): the error is about ``(m/256)·ε²`` times the sum of the
terms' magnitudes (tested in ``tests/methods/test_double_float.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s + e = a + b`` exactly, ``s = fl(a + b)`` (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s + e = a + b`` exactly when ``|a| ≥ |b|`` (Dekker)."""
    s = a + b
    return s, b - (s - a)


def split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a = hi + lo`` exactly, by masking the low bits of the significand: 12 + 12 bits in
    float32 (every product of two parts is exact); 26 + 27 in float64 (all but ``lo·lo``)."""
    bits = {jnp.dtype(jnp.float32): (jnp.uint32, 12), jnp.dtype(jnp.float64): (jnp.uint64, 27)}
    utype, drop = bits[jnp.dtype(a.dtype)]
    mask = jnp.asarray(~((1 << drop) - 1) & jnp.iinfo(utype).max, utype)
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(a, utype) & mask, a.dtype)
    return hi, a - hi


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``p + e = a · b`` (Dekker's TwoProduct, summed from the split): in float32 the four
    products of the 12-bit halves are exact and ``p + e`` equals ``a · b`` up to a rounding of
    about ``ε²|a·b|`` in ``e`` (exactly, wherever ``a·b`` fits in two floats, as in the tests);
    in float64 ``lo·lo`` is rounded at ``2⁻¹⁰⁶|a·b|``.

    Every product taken is exact, so a compiler that contracts a product and a sum into a fused
    multiply-add cannot change the result. The textbook form ``e = ((ah·bh − p) + …)`` with
    ``p = fl(a·b)`` can be: XLA:CPU recomputes ``a·b`` inside a fusion and may contract
    ``ah·bh − a·b`` into one FMA, which subtracts the exact product instead of ``p``, and ``e``
    then misses ``p``'s rounding (seen on 8-wide outer products)."""
    ah, al = split(a)
    bh, bl = split(b)
    s, e1 = two_sum(ah * bh, ah * bl)
    s, e2 = two_sum(s, al * bh)
    return _fast_two_sum(s, (e1 + e2) + al * bl)


def add(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]):
    """``x + y`` in double-float."""
    s, e = two_sum(x[0], y[0])
    return _fast_two_sum(s, e + (x[1] + y[1]))


def sum_last(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``Σⱼ (hiⱼ + loⱼ)`` over the last axis, pairwise."""
    while hi.shape[-1] > 1:
        m = hi.shape[-1]
        if m % 2:
            pad = [(0, 0)] * (hi.ndim - 1) + [(0, 1)]
            hi, lo, m = jnp.pad(hi, pad), jnp.pad(lo, pad), m + 1
        h = m // 2
        hi, lo = add((hi[..., :h], lo[..., :h]), (hi[..., h:], lo[..., h:]))
    if hi.shape[-1] == 0:
        return jnp.zeros(hi.shape[:-1], hi.dtype), jnp.zeros(lo.shape[:-1], lo.dtype)
    return hi[..., 0], lo[..., 0]


def dot_last(a: jax.Array, b: jax.Array, block: int = 256) -> tuple[jax.Array, jax.Array]:
    """``Σⱼ aⱼ bⱼ`` over the last axis (broadcast), in double-float: the exact products summed
    in ``block`` interleaved running sums (one pass, a ``lax.reduce`` whose combiner is the
    double-float sum), then pairwise."""
    p, e = two_prod(*jnp.broadcast_arrays(a, b))
    m = p.shape[-1]
    if m <= block:
        return sum_last(p, e)
    pad = [(0, 0)] * (p.ndim - 1) + [(0, (-m) % block)]
    shape = (*p.shape[:-1], -1, block)
    p, e = jnp.pad(p, pad).reshape(shape), jnp.pad(e, pad).reshape(shape)
    zero = jnp.zeros((), p.dtype)
    hi, lo = lax.reduce((p, e), (zero, zero), lambda x, y: add(x, y), (p.ndim - 2,))
    return sum_last(hi, lo)


def sqrt(x: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``√x`` of a non-negative double-float, by one Newton step from ``√hi``."""
    hi, lo = x
    r = jnp.sqrt(jnp.maximum(hi, 0.0))
    safe = jnp.where(r > 0, r, 1.0)
    p, e = two_prod(r, r)
    corr = jnp.where(r > 0, ((hi - p) - e + lo) / (2.0 * safe), 0.0)
    return _fast_two_sum(r, corr)


def sum2(x: jax.Array) -> jax.Array:
    """``Σ x`` over the last axis, pairwise, with the rounding errors kept and added back (Ogita,
    Rump & Oishi's Sum2 in pairwise order): error about ``ε|Σ x| + ε²·Σ|x|``."""
    err = jnp.zeros(x.shape[:-1], x.dtype)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], 1), x.dtype)], axis=-1)
        x, e = two_sum(x[..., ::2], x[..., 1::2])
        err = err + jnp.sum(e, axis=-1)
    return x[..., 0] + err


def dot2(a, b: jax.Array) -> jax.Array:
    """``Σⱼ aⱼbⱼ`` over the last axis (broadcast): the products of the high halves summed by
    :func:`sum2`, the cross and low ones (each within about ``2⁻¹¹|aⱼbⱼ|`` in float32) plainly,
    so the error is about ``ε|Σ| + ε·2⁻¹²·Σ|aⱼbⱼ|``. ``a`` may be given split, as ``(hi, lo)``
    from :func:`split`."""
    a_hi, a_lo = a if isinstance(a, tuple) else split(a)
    b_hi, b_lo = split(b)
    # The products of the halves are exact; only the large ones need a compensated sum.
    small = a_hi * b_lo + a_lo * b_hi + a_lo * b_lo
    return sum2(a_hi * b_hi) + jnp.sum(small, axis=-1)


# ----------------------------------------------------------------------------------------------
# Double-float linear algebra on small matrices: values as pairs ``(hi, lo)`` of arrays.

DD = tuple[jax.Array, jax.Array]


def mul(x: DD, y: DD) -> DD:
    """``x · y`` in double-float (relative error about ``4ε²``)."""
    p, e = two_prod(x[0], y[0])
    return _fast_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def div(x: DD, y: DD) -> DD:
    """``x / y`` in double-float: the quotient of the high parts, corrected by the double-float
    remainder ``x − q·y`` (relative error about ``4ε²``)."""
    q = x[0] / y[0]
    r = add(x, mul((-q, jnp.zeros_like(q)), y))
    return _fast_two_sum(q, (r[0] + r[1]) / y[0])


def matvec(a: DD, x: DD) -> DD:
    """``A x`` for a square double-float ``A`` and vector ``x``: exact products of the pairs'
    parts, summed pairwise in double-float (:func:`sum_last`)."""
    return sum_last(*mul(a, (x[0][None, :], x[1][None, :])))


def cholesky(a: DD) -> DD:
    """The lower Cholesky factor ``L`` (``LLᵀ = A``) of a symmetric positive definite
    double-float ``A`` (``n × n``), right-looking: column ``j`` is ``A[:, j]/√A_jj`` of the
    remaining block, then that block loses ``l lᵀ``; ``n`` steps of ``O(n²)`` double-float
    operations. A non-positive pivot gives NaN in the factor (callers check finiteness)."""
    return _factor(a, signed=False)[0]


def signed_cholesky(a: DD) -> tuple[DD, jax.Array]:
    """``(L, s)`` with ``L diag(s) Lᵀ = A`` for a symmetric double-float ``A`` whose leading
    principal minors do not vanish (``LDLᵀ`` without pivoting, ``D = diag(s)·L_jj²``, written
    as :func:`cholesky` with ``√|d_j|`` and the signs ``s_j = ±1``): a negative pivot flips the
    sign of its column's update instead of failing. For a matrix that rounding left slightly
    indefinite, where a Cholesky factorisation stops; no pivoting, so a pivot near 0 amplifies
    errors (callers certify the solution). A zero pivot gives NaN."""
    return _factor(a, signed=True)


def signed_cholesky_on(k: jax.Array, free: jax.Array) -> tuple[DD, jax.Array]:
    """:func:`signed_cholesky` of ``K_FF``: the working-precision ``K`` (taken as exact)
    restricted to the rows and columns of the boolean mask ``free``, the identity elsewhere,
    so that the factor solves the system on ``F`` and leaves the other coordinates at 0."""
    ff = free[:, None] & free[None, :]
    m = jnp.where(ff, k, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0)).astype(k.dtype)
    return signed_cholesky((m, jnp.zeros_like(m)))


def _factor(a: DD, *, signed: bool) -> tuple[DD, jax.Array]:
    n = a[0].shape[0]
    rows = jnp.arange(n)

    def step(j, carry):
        (ah, al), (lh, ll), signs = carry
        piv = (ah[j, j], al[j, j])
        flip = (piv[0] < 0) if signed else jnp.zeros((), bool)
        sign = jnp.where(flip, -1.0, 1.0).astype(ah.dtype)
        mag = (sign * piv[0], sign * piv[1])
        root = sqrt(mag)
        root = (jnp.where(mag[0] > 0, root[0], jnp.nan), root[1])
        col = div((ah[:, j], al[:, j]), (root[0][None], root[1][None]))
        below = rows > j
        col = (jnp.where(below, sign * col[0], 0.0), jnp.where(below, sign * col[1], 0.0))
        col = (col[0].at[j].set(root[0]), col[1].at[j].set(root[1]))
        p, e = mul((col[0][:, None], col[1][:, None]), (col[0][None, :], col[1][None, :]))
        block = below[:, None] & below[None, :]
        upd = add((ah, al), (-sign * jnp.where(block, p, 0.0), -sign * jnp.where(block, e, 0.0)))
        lh, ll = lh.at[:, j].set(col[0]), ll.at[:, j].set(col[1])
        return upd, (lh, ll), signs.at[j].set(sign)

    zero = jnp.zeros_like(a[0])
    _, low, signs = lax.fori_loop(0, n, step, (a, (zero, zero), jnp.ones((n,), a[0].dtype)))
    return low, signs


def cholesky_solve(low: DD, b: DD, signs: jax.Array | None = None) -> DD:
    """``x`` with ``L Lᵀ x = b`` (double-float), by forward then backward substitution; with
    the ``signs`` of :func:`signed_cholesky`, ``L diag(signs) Lᵀ x = b``."""
    n = b[0].shape[0]
    rows = jnp.arange(n)

    def forward(i, y):
        # y_i = (b_i − Σ_{k<i} L_ik y_k) / L_ii, the other entries of y still zero.
        row = (jnp.where(rows < i, low[0][i], 0.0), jnp.where(rows < i, low[1][i], 0.0))
        s = sum_last(*mul(row, y))
        yi = div(add((b[0][i], b[1][i]), (-s[0], -s[1])), (low[0][i, i], low[1][i, i]))
        return (y[0].at[i].set(yi[0]), y[1].at[i].set(yi[1]))

    def backward(k, x):
        i = n - 1 - k
        col = (jnp.where(rows > i, low[0][:, i], 0.0), jnp.where(rows > i, low[1][:, i], 0.0))
        s = sum_last(*mul(col, x))
        xi = div(add((y[0][i], y[1][i]), (-s[0], -s[1])), (low[0][i, i], low[1][i, i]))
        return (x[0].at[i].set(xi[0]), x[1].at[i].set(xi[1]))

    zero = jnp.zeros_like(b[0])
    y = lax.fori_loop(0, n, forward, (zero, zero))
    if signs is not None:
        y = (signs * y[0], signs * y[1])
    return lax.fori_loop(0, n, backward, (zero, zero))
