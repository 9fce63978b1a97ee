"""The Gramian of the task Jacobian, layer by layer, without per-task weight gradients.

For a dense layer ``y = x W`` applied to ``N`` rows (the batch, and any other axes the weight
is broadcast over), with inputs ``X`` (``N × C``) and task ``t``'s cotangent at the output
``Δₜ = ∂Lₜ/∂y`` (``N × F``), task ``t``'s gradient of the weight is ``Xᵀ Δₜ`` (``C × F``), and

    ⟨Xᵀ Δₜ, Xᵀ Δᵤ⟩ = Σₙₘ (X Xᵀ)ₙₘ (Δₜ Δᵤᵀ)ₙₘ = ⟨Δₜ, (X Xᵀ) Δᵤ⟩.

The Gramian's block of that weight therefore needs only the layer's inputs and the ``T``
output cotangents, never the ``T`` weight gradients: ``N²C`` for ``K = X Xᵀ``, ``T N² F`` for
``K Δᵤ`` and ``T² N F`` for the inner products, against ``T N C F + T² C F`` for forming the
``T`` gradients and their Gramian. For ``N`` below the layer's width this is the cheaper path
(torchjd calls its version of the idea "autogram").

How: the loss function is traced to a jaxpr; every ``dot_general`` whose one operand is a
differentiated parameter (a weight) and whose other operand is not is a *dense use* of that
weight (batch axes of the weight, e.g. stacked experts, are kept apart). The function is then
re-evaluated with a zero perturbation ``δ`` added to the output of each dense use handled this
way (a weight cast to another dtype first, as under mixed precision, counts as the weight),
and one forward pass linearized with ``jax.vjp``: mapped over the ``T`` unit cotangents,
its VJP yields the cotangents ``Δₜ`` at the dense outputs (the cotangents w.r.t. ``δ``) and
the per-task gradients of the other parameters (biases, normalization scales, convolutions,
weights used in any other way), whose Gramian is added as is. A weight is handled layer-wise
only when every one of its uses is a dense use with the same roles of its axes (its blocks
over several uses add up: their inputs and cotangents are stacked along ``N``); with
``policy="auto"``, only when the FLOP count above is lower than the per-task gradients'.

The result equals ``J Jᵀ`` up to rounding (the same sums in another order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from mtljax._src import base
from mtljax._src import tree as tree_lib

PyTree = Any
Policy = Literal["auto", "layerwise", "exact"]
_HIGHEST = jax.lax.Precision.HIGHEST
_INLINED = (prims.jit_p, prims.closed_call_p)


class DenseUse(NamedTuple):
    """One ``dot_general`` that applies a weight (static description).

    Attributes:
      leaf: the weight's index among the differentiated leaves.
      w_side: 0 if the weight is the left operand, 1 if the right.
      w_batch, w_contract: the weight's batch and contracting axes, sorted; ``x_batch`` and
        ``x_contract`` the input's matching axes in the same order; ``x_free`` the input's
        other axes; ``y_batch``, ``y_x_free``, ``y_w_free``: where each group lies in the output.
      n, c, f, b: the sizes ``N`` (rows), ``C`` (contracted), ``F`` (the weight's free size)
        and ``B`` (the weight's batch size).
      y_shape, y_dtype: the output's shape and dtype.
    """

    leaf: int
    w_side: int
    w_batch: tuple[int, ...]
    w_contract: tuple[int, ...]
    x_batch: tuple[int, ...]
    x_contract: tuple[int, ...]
    x_free: tuple[int, ...]
    y_batch: tuple[int, ...]
    y_x_free: tuple[int, ...]
    y_w_free: tuple[int, ...]
    n: int
    c: int
    f: int
    b: int
    y_shape: tuple[int, ...]
    y_dtype: Any


class LeafPlan(NamedTuple):
    """How a differentiated leaf's block of the Gramian is computed.

    Attributes:
      path: the leaf's path in the parameters.
      layerwise: whether from the layer's inputs and output cotangents (else from the per-task
        gradients).
      uses: the indices of its dense uses (empty when it has other uses).
      flops_layerwise, flops_exact: the multiply-adds of either path for this leaf's block
        (``None`` for the layer-wise path of a leaf that cannot take it).
    """

    path: str
    layerwise: bool
    uses: tuple[int, ...]
    flops_layerwise: int | None
    flops_exact: int


class Plan(NamedTuple):
    """The per-leaf choices of :func:`gramian_layerwise` and its dense uses."""

    leaves: tuple[LeafPlan, ...]
    uses: tuple[DenseUse, ...]

    def flops(self) -> int:
        """Multiply-adds of the Gramian's blocks along the chosen paths."""
        return sum(p.flops_layerwise if p.layerwise else p.flops_exact for p in self.leaves)


def _dense_use(eqn: Any, leaf: int, w_side: int) -> DenseUse:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    shapes = [v.aval.shape for v in eqn.invars[:2]]
    wc, xc = (lc, rc) if w_side == 0 else (rc, lc)
    wb, xb = (lb, rb) if w_side == 0 else (rb, lb)
    w_shape, x_shape = shapes[w_side], shapes[1 - w_side]
    order_c = sorted(range(len(wc)), key=lambda i: wc[i])
    order_b = sorted(range(len(wb)), key=lambda i: wb[i])
    x_free = tuple(a for a in range(len(x_shape)) if a not in xc and a not in xb)
    w_free = tuple(a for a in range(len(w_shape)) if a not in wc and a not in wb)
    nb = len(wb)
    lhs_free = len(x_free) if w_side == 1 else len(w_free)
    first = tuple(range(nb, nb + lhs_free))
    second = tuple(range(nb + lhs_free, nb + lhs_free + (len(w_free) + len(x_free) - lhs_free)))
    y_x_free, y_w_free = (first, second) if w_side == 1 else (second, first)
    return DenseUse(
        leaf=leaf,
        w_side=w_side,
        w_batch=tuple(sorted(wb)),
        w_contract=tuple(sorted(wc)),
        x_batch=tuple(xb[i] for i in order_b),
        x_contract=tuple(xc[i] for i in order_c),
        x_free=x_free,
        y_batch=tuple(order_b),
        y_x_free=y_x_free,
        y_w_free=y_w_free,
        n=math.prod(x_shape[a] for a in x_free),
        c=math.prod(x_shape[a] for a in xc),
        f=math.prod(w_shape[a] for a in w_free),
        b=math.prod(w_shape[a] for a in wb),
        y_shape=tuple(eqn.outvars[0].aval.shape),
        y_dtype=eqn.outvars[0].aval.dtype,
    )


def _interpret(
    jaxpr: Any,
    consts: list,
    args: list,
    leaf_of: list[int | None],
    on_dot: Callable[[Any, int, int, list], Any],
    on_other: Callable[[int], None],
) -> list:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, inlining nested ``jit`` calls, with
    ``on_dot(eqn, leaf, w_side, invals)`` in place of each dense use of a differentiated leaf
    (``leaf_of[i]``: the leaf index of argument ``i``, or ``None``) and ``on_other(leaf)`` for
    every other use of one. A leaf cast to another dtype stays that leaf."""
    env: dict[Any, Any] = {}
    leaves: dict[Any, int] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a, leaf in zip(jaxpr.invars, args, leaf_of, strict=True):
        env[v] = a
        if leaf is not None:
            leaves[v] = leaf
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        ids = [None if isinstance(v, jcore.Literal) else leaves.get(v) for v in eqn.invars]
        if eqn.primitive in _INLINED:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if isinstance(inner, jcore.ClosedJaxpr):
                outs = _interpret(inner.jaxpr, inner.consts, invals, ids, on_dot, on_other)
                for v, o in zip(eqn.outvars, outs, strict=True):
                    env[v] = o
                continue
        if eqn.primitive is prims.dot_general_p and (ids[0] is None) != (ids[1] is None):
            w_side = 0 if ids[0] is not None else 1
            env[eqn.outvars[0]] = on_dot(eqn, ids[w_side], w_side, invals)
            continue
        if eqn.primitive is prims.convert_element_type_p and ids[0] is not None:
            leaves[eqn.outvars[0]] = ids[0]  # a cast weight (mixed precision) is the weight
        else:
            for leaf in ids:
                if leaf is not None:
                    on_other(leaf)
        ans = _bind(eqn, invals)
        if eqn.primitive.multiple_results:
            for v, o in zip(eqn.outvars, ans, strict=True):
                env[v] = o
        else:
            env[eqn.outvars[0]] = ans
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: Any, invals: list) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _costs(uses: list[DenseUse], t: int) -> tuple[int, int]:
    """Multiply-adds of a weight's block: (layer-wise, from per-task gradients)."""
    b, c, f = uses[0].b, uses[0].c, uses[0].f
    n = sum(u.n for u in uses)
    layerwise = b * (n * n * c + t * n * n * f + t * t * n * f)
    exact = b * (t * n * c * f + t * t * c * f)
    return layerwise, exact


class _Traced(NamedTuple):
    closed: Any
    treedef: Any
    arg_def: Any
    out_tree: Any
    leaves: list
    arg_leaves: list
    paths: list[str]
    shapes: list
    num_tasks: int


def _trace(f: Callable[..., Any], primal: PyTree, args: tuple) -> _Traced:
    """``f(primal, *args)`` as a jaxpr over the flat leaves of ``primal`` then ``args``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(primal)
    leaves = [leaf for _, leaf in flat]
    arg_leaves, arg_def = jax.tree_util.tree_flatten(args)
    n = len(leaves)
    out_def: list[Any] = []

    def flat_f(*xs):
        p = jax.tree_util.tree_unflatten(treedef, xs[:n])
        outs, d = jax.tree_util.tree_flatten(f(p, *jax.tree_util.tree_unflatten(arg_def, xs[n:])))
        out_def.append(d)
        return outs

    closed = jax.make_jaxpr(flat_f)(*leaves, *arg_leaves)
    shape = closed.out_avals[0].shape
    if len(shape) != 1:
        raise ValueError(f"f must return the task losses f32[T] (first), got shape {shape}")
    paths = [tree_lib.path_str(p) for p, _ in flat]
    shapes = [(jnp.shape(x), jnp.result_type(x)) for x in leaves + arg_leaves]
    return _Traced(
        closed, treedef, arg_def, out_def[-1], leaves, arg_leaves, paths, shapes, shape[0]
    )


def _plan(tr: _Traced, policy: Policy) -> Plan:
    jaxpr, n_leaves, n_args = tr.closed, len(tr.leaves), len(tr.arg_leaves)
    paths, shapes, t = tr.paths, tr.shapes, tr.num_tasks
    uses: list[DenseUse] = []
    other: set[int] = set()

    def on_dot(eqn, leaf, w_side, invals):
        uses.append(_dense_use(eqn, leaf, w_side))
        return _bind(eqn, invals)

    def trace(*xs):
        leaf_of = list(range(n_leaves)) + [None] * n_args
        return _interpret(jaxpr.jaxpr, jaxpr.consts, list(xs), leaf_of, on_dot, other.add)

    jax.make_jaxpr(trace)(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    leaves = []
    for i in range(n_leaves):
        mine = [k for k, u in enumerate(uses) if u.leaf == i]
        size = math.prod(shapes[i][0])
        exact = t * t * size
        roles = {(uses[k].w_batch, uses[k].w_contract) for k in mine}
        if i in other or not mine or len(roles) != 1:
            leaves.append(LeafPlan(paths[i], False, (), None, exact))
            continue
        lw, ex = _costs([uses[k] for k in mine], t)
        chosen = policy == "layerwise" or (policy == "auto" and lw < ex)
        leaves.append(LeafPlan(paths[i], chosen, tuple(mine), lw, ex))
    return Plan(tuple(leaves), tuple(uses))


def _normal_input(x: jax.Array, u: DenseUse) -> jax.Array:
    """The input as ``(B, N, C)``, its contracted axes in the weight's axis order."""
    return jnp.transpose(x, u.x_batch + u.x_free + u.x_contract).reshape(u.b, u.n, u.c)


def _normal_cotangent(d: jax.Array, u: DenseUse) -> jax.Array:
    """Task cotangents at the output ``(T, *y)`` as ``(T, B, N, F)``."""
    perm = (0,) + tuple(1 + a for a in u.y_batch + u.y_x_free + u.y_w_free)
    return jnp.transpose(d, perm).reshape(d.shape[0], u.b, u.n, u.f)


def _block(xs: list[jax.Array], ds: list[jax.Array], dtype: Any) -> jax.Array:
    """``Gₜᵤ = Σ_b ⟨Δₜ, (X Xᵀ) Δᵤ⟩`` over the stacked uses of one weight."""
    x = jnp.concatenate(xs, axis=1).astype(dtype)
    d = jnp.concatenate(ds, axis=2).astype(dtype)
    k = jnp.einsum("bnc,bmc->bnm", x, x, precision=_HIGHEST)
    kd = jnp.einsum("bnm,tbmf->tbnf", k, d, precision=_HIGHEST)
    return jnp.einsum("tbnf,ubnf->tu", d, kd, precision=_HIGHEST)


class Linearized(NamedTuple):
    """What :func:`linearize` returns: one forward pass, its Gramian and its VJP."""

    losses: jax.Array
    gramian: jax.Array
    vjp: Callable[[jax.Array], tuple[PyTree, tuple]] | None
    aux: PyTree
    plan: Plan


def linearize(
    f: Callable[..., Any],
    primal: PyTree,
    *args: PyTree,
    policy: Policy = "auto",
    has_aux: bool = False,
    full_vjp: bool = True,
) -> Linearized:
    """One forward pass of ``f(primal, *args)`` and the Gramian of its Jacobian w.r.t.
    ``primal``, layer by layer (see the module docstring).

    ``f`` returns the task losses ``f32[T]`` (and an auxiliary output with ``has_aux``).
    With ``full_vjp``, ``vjp(c)`` is the gradient of ``c · losses`` w.r.t. ``(primal, args)``
    from the same forward pass (a weighting method's update); without it the per-task
    backward passes are linearized w.r.t. the perturbations and the leaves on the per-task
    gradient path only, so the per-task gradients of layer-wise weights exist in no program.
    """
    if policy not in ("auto", "layerwise", "exact"):
        raise ValueError(f"policy must be 'auto', 'layerwise' or 'exact', got {policy!r}")
    tr = _trace(f, primal, args)
    closed, treedef, arg_def, out_tree = tr.closed, tr.treedef, tr.arg_def, tr.out_tree
    leaves, arg_leaves = tr.leaves, tr.arg_leaves
    n, m, t = len(leaves), len(arg_leaves), tr.num_tasks
    plan = _plan(tr, policy)
    lw_uses = [k for p in plan.leaves if p.layerwise for k in p.uses]
    lw_leaves = [i for i, p in enumerate(plan.leaves) if p.layerwise]
    exact_leaves = [i for i, p in enumerate(plan.leaves) if not p.layerwise]

    def run(all_leaves, deltas, arg_vals):
        inputs: dict[int, Any] = {}
        count = [0]

        def on_dot(eqn, leaf, w_side, invals):
            k = count[0]
            count[0] += 1
            y = _bind(eqn, invals)
            if k in deltas:
                inputs[k] = invals[1 - w_side]
                return y + deltas[k].astype(y.dtype)
            return y

        leaf_of = list(range(n)) + [None] * m
        outs = _interpret(
            closed.jaxpr,
            closed.consts,
            list(all_leaves) + list(arg_vals),
            leaf_of,
            on_dot,
            lambda leaf: None,
        )
        out = jax.tree_util.tree_unflatten(out_tree, outs)
        losses, aux = out if has_aux else (out, None)
        return losses, (aux, [jax.lax.stop_gradient(inputs[k]) for k in lw_uses])

    deltas0 = {k: jnp.zeros(plan.uses[k].y_shape, plan.uses[k].y_dtype) for k in lw_uses}

    if full_vjp:

        def g(ls, ds, avs):
            return run(ls, ds, avs)

        losses, vjp_all, (aux, xs) = jax.vjp(g, leaves, deltas0, arg_leaves, has_aux=True)

        def task_cot(c):
            g_leaves, g_d, _ = vjp_all(c)
            return [g_leaves[i] for i in exact_leaves], g_d

        def vjp(c):
            g_leaves, _, g_args = vjp_all(c)
            g_primal = jax.tree_util.tree_unflatten(treedef, g_leaves)
            return g_primal, jax.tree_util.tree_unflatten(arg_def, g_args)

    else:

        def g(ex, ds):
            ls = list(leaves)
            for i, x in zip(exact_leaves, ex, strict=True):
                ls[i] = x
            for i in lw_leaves:
                ls[i] = jax.lax.stop_gradient(ls[i])
            return run(ls, ds, [jax.lax.stop_gradient(a) for a in arg_leaves])

        ex0 = [leaves[i] for i in exact_leaves]
        losses, vjp_part, (aux, xs) = jax.vjp(g, ex0, deltas0, has_aux=True)
        task_cot = vjp_part
        vjp = None

    eye = jnp.eye(t, dtype=losses.dtype)
    g_exact, g_deltas = jax.vmap(task_cot)(eye)
    gram = base.gramian(g_exact, t) if g_exact else jnp.zeros((t, t), jnp.float32)
    gram = gram.astype(jnp.promote_types(losses.dtype, jnp.float32))
    x_of = dict(zip(lw_uses, xs, strict=True))
    for i in lw_leaves:
        mine = plan.leaves[i].uses
        xn = [_normal_input(x_of[k], plan.uses[k]) for k in mine]
        dn = [_normal_cotangent(g_deltas[k], plan.uses[k]) for k in mine]
        gram = gram + _block(xn, dn, gram.dtype)
    return Linearized(losses, 0.5 * (gram + gram.T), vjp, aux, plan)


def gramian_layerwise(
    f: Callable[..., Any],
    params: PyTree,
    *args: PyTree,
    policy: Policy = "auto",
    has_aux: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, PyTree]:
    """``(losses, G)``: the task losses ``f(params, *args)`` and the Gramian ``G = J Jᵀ`` of
    their Jacobian w.r.t. ``params``, accumulated layer by layer.

    A dense layer's block ``⟨Xᵀ Δₜ, Xᵀ Δᵤ⟩ = ⟨Δₜ, (X Xᵀ) Δᵤ⟩`` comes from its inputs ``X``
    and the ``T`` cotangents ``Δₜ`` at its outputs, without forming the ``T`` gradients of its
    weight; every other parameter's block from its per-task gradients (see the module
    docstring for the rule and the costs). Jittable.

    Args:
      f: ``(params, *args) -> f32[T]`` (``(losses, aux)`` with ``has_aux``).
      params: the parameters the Jacobian is taken w.r.t. (any pytree of arrays).
      args: further inputs of ``f``, not differentiated.
      policy: ``"auto"`` (per weight, the path with fewer multiply-adds), ``"layerwise"``
        (every weight that allows it) or ``"exact"`` (every block from per-task gradients,
        the Jacobian's Gramian).
      has_aux: ``f`` returns ``(losses, aux)``; ``aux`` is returned as a third output.
    """
    args = tuple(jax.tree_util.tree_map(jax.lax.stop_gradient, a) for a in args)
    out = linearize(f, params, *args, policy=policy, has_aux=has_aux, full_vjp=False)
    return (out.losses, out.gramian, out.aux) if has_aux else (out.losses, out.gramian)


def plan(
    f: Callable[..., Any],
    params: PyTree,
    *args: PyTree,
    policy: Policy = "auto",
) -> Plan:
    """The per-leaf choices :func:`gramian_layerwise` makes for ``f`` (shapes only), with the
    multiply-adds of both paths for each leaf."""
    tr = _trace(f, params, args)
    return _plan(tr, policy)
