"""The per-task gradient engine.

Every quantity comes from **one** forward pass linearized by ``jax.vjp``:

* the weighted gradient ``∇(w·L)`` is one call of the VJP (one backward, as for equal weights);
* the task Jacobian ``J`` w.r.t. the shared parameters is the VJP mapped over the ``T`` unit
  cotangents with ``jax.vmap`` (or ``jax.lax.map`` in task chunks to cap memory); the parts of
  the VJP that are not used (e.g. task-specific parameters) are removed by XLA;
* for a subset of the shared parameters (GradNorm's last shared layer) the VJP is taken w.r.t.
  that subset, so the mapped backward passes only stop at that layer;
* at feature level, the Jacobian w.r.t. the shared representation ``z`` comes from ``T`` VJPs of
  the heads alone, and ``∇_θ`` is one VJP of the encoder with cotangent ``Σᵢ wᵢ ∂Lᵢ/∂z``.

A model may have no shared parameters (``from_nnx(shared=None)``, pure soft sharing): the
Jacobian is then a pytree with no leaves (``T × 0``), its Gramian is zero
(``base.gramian(jac, num_tasks)``), and the task-specific parameters still get their task
gradients from the VJP.

A model with state (BatchNorm statistics, dropout's random streams; see
:class:`mtljax.Model`) runs in training mode on the context ``ctx = enter(model_state, key)``;
the model state that the forward pass leaves is an auxiliary output of that one linearized
pass (``has_aux``): the ``T`` mapped backward passes neither run the model again nor update
its statistics, and they differentiate the losses under the same dropout masks. At feature
level the encoder's pass hands its context to the heads' pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from mtljax._src import base, gramian_layerwise
from mtljax._src import tree as tree_lib
from mtljax._src.model import Batch, Model, Params, StateFns

PyTree = Any
Mode = Literal["parameter", "feature"]
GramianPath = Literal["jacobian", "layerwise", "auto"]


def map_cotangents(vjp_fn: Callable, num_tasks: int, chunk_size: int | None, dtype: Any) -> Any:
    """Applies ``vjp_fn`` to the ``T`` unit cotangents: ``vmap``, or ``lax.map`` in chunks."""
    eye = jnp.eye(num_tasks, dtype=dtype)
    if chunk_size is None or chunk_size >= num_tasks:
        return jax.vmap(vjp_fn)(eye)
    return jax.lax.map(vjp_fn, eye, batch_size=int(chunk_size))


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def subset_predicate(model: Model, subset: base.ParamSubset) -> Callable[[str], bool]:
    if subset == "all":
        return lambda p: True
    if subset == "last":
        if model.last_shared is None:
            raise ValueError(
                "this method differentiates the last shared layer only, but the model declares "
                "no `last_shared` (the path prefix of that layer among the shared parameters, "
                "e.g. 'encoder/layers/2'); give it, or build the method with params='all' "
                "(a model without shared parameters has no last shared layer)"
            )
        return tree_lib.prefix_predicate(model.last_shared)
    if isinstance(subset, tuple) and subset and all(isinstance(p, str) for p in subset):
        preds = [tree_lib.prefix_predicate(p) for p in subset]
        return lambda path: any(pred(path) for pred in preds)
    raise ValueError(
        f"unknown parameter subset {subset!r}; expected 'all', 'last' or a tuple of path prefixes"
    )


def check_subset_selects(subset: Any, mask: list, shared: PyTree) -> None:
    """A tuple of path prefixes must select at least one shared parameter."""
    if isinstance(subset, tuple) and not any(mask):
        raise ValueError(
            f"the parameter path prefixes {subset} match no shared parameter; shared parameter "
            f"paths are {tree_lib.leaf_paths(shared)}"
        )


def _enter(model: Model, model_state: PyTree, key: jax.Array | None):
    """The model's functions and the context of a forward pass at ``model_state`` (the model's
    initial state when ``None``) with random streams seeded from ``key``."""
    fns = model.step_fns()
    if model_state is None:
        model_state = model.initial_state
    return fns, fns.enter(model_state, key)


def _losses_and_vjp(fns: StateFns, params: Params, batch: Batch, ctx: PyTree):
    """``(losses, vjp, ctx)`` from one forward pass; ``vjp(c) -> Params``."""
    losses, vjp, ctx = jax.vjp(
        lambda s, p: fns.losses(s, p, batch, ctx), params.shared, params.specific, has_aux=True
    )
    return losses, lambda c: Params(*vjp(c)), ctx


def losses_and_vjp(model: Model, params: Params, batch: Batch):
    """``(losses, vjp)`` with ``vjp(cotangent) -> Params`` of gradients."""
    fns, ctx = _enter(model, None, None)
    losses, vjp, _ = _losses_and_vjp(fns, params, batch, ctx)
    return losses, vjp


def _jacobian(model, fns, params, batch, ctx, *, subset, chunk_size):
    """``(losses, J, vjp, ctx)``: see :func:`jacobian`."""
    check_chunk_size(chunk_size)
    t = model.num_tasks
    if subset == "all":
        losses, vjp, ctx = _losses_and_vjp(fns, params, batch, ctx)
        jac = map_cotangents(lambda c: vjp(c).shared, t, chunk_size, losses.dtype)
        return losses, jac, vjp, ctx
    pred = subset_predicate(model, subset)
    sel, rest, treedef, mask = tree_lib.partition(params.shared, pred)
    check_subset_selects(subset, mask, params.shared)

    def f(sel_, rest_, spec_):
        return fns.losses(tree_lib.combine(sel_, rest_, treedef, mask), spec_, batch, ctx)

    losses, vjp3, ctx_out = jax.vjp(f, sel, rest, params.specific, has_aux=True)
    jac = map_cotangents(lambda c: vjp3(c)[0], t, chunk_size, losses.dtype)

    def vjp(c):
        g_sel, g_rest, g_spec = vjp3(c)
        return Params(tree_lib.combine(g_sel, g_rest, treedef, mask), g_spec)

    return losses, jac, vjp, ctx_out


def jacobian(
    model: Model,
    params: Params,
    batch: Batch,
    *,
    subset: base.ParamSubset = "all",
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree, Callable[[jax.Array], Params]]:
    """Task losses, their Jacobian w.r.t. (a subset of) the shared parameters, and the VJP.

    Returns ``(losses, J, vjp)``: ``J`` has the structure of the shared parameters (or, for
    ``subset="last"``, a list of the selected leaves) with a leading task axis; ``vjp(c)``
    gives the full :class:`Params` gradient of ``c · losses`` from the same forward pass.
    A model with state is evaluated in training mode at its initial state (see
    :func:`compute` for a given state and key).
    """
    fns, ctx = _enter(model, None, None)
    losses, jac, vjp, _ = _jacobian(
        model, fns, params, batch, ctx, subset=subset, chunk_size=chunk_size
    )
    return losses, jac, vjp


def _check_features(model: Model) -> None:
    if not model.has_features:
        raise ValueError(
            "feature-level mode needs a model given as encoder and heads "
            "(Model.from_encoder_heads, or from_nnx(encode=..., heads=...))"
        )


def _encode_heads(fns, params, batch, ctx):
    """The encoder's pass, then the heads' pass on its context: ``(z, enc_vjp, losses,
    head_vjp, ctx)``."""
    z, enc_vjp, ctx_z = jax.vjp(lambda s: fns.encode(s, batch, ctx), params.shared, has_aux=True)
    losses, head_vjp, ctx_out = jax.vjp(
        lambda p, z_: fns.heads(p, z_, batch, ctx_z), params.specific, z, has_aux=True
    )
    return z, enc_vjp, losses, head_vjp, ctx_z, ctx_out


def _feature_jacobian(model, fns, params, batch, ctx, *, chunk_size):
    """``(losses, J_z, vjp, backprop, ctx)``: see :func:`feature_jacobian`."""
    _check_features(model)
    check_chunk_size(chunk_size)
    _, enc_vjp, losses, head_vjp, _, ctx = _encode_heads(fns, params, batch, ctx)
    jac = map_cotangents(lambda c: head_vjp(c)[1], model.num_tasks, chunk_size, losses.dtype)

    def vjp(c):
        g_spec, g_z = head_vjp(c)
        return Params(enc_vjp(g_z)[0], g_spec)

    def backprop(d_z):
        return enc_vjp(d_z)[0]

    return losses, jac, vjp, backprop, ctx


def feature_jacobian(
    model: Model,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree, Callable[[jax.Array], Params], Callable[[PyTree], PyTree]]:
    """Task losses and their Jacobian w.r.t. the shared representation ``z``.

    Returns ``(losses, J_z, vjp, backprop)``: ``vjp(c)`` is the :class:`Params` gradient of
    ``c · losses``; ``backprop(d_z)`` pulls a representation-space direction back through the
    encoder, giving a gradient for the shared parameters.
    """
    _check_features(model)
    fns, ctx = _enter(model, None, None)
    losses, jac, vjp, backprop, _ = _feature_jacobian(
        model, fns, params, batch, ctx, chunk_size=chunk_size
    )
    return losses, jac, vjp, backprop


def task_jacobian(
    model: Model, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> tuple[jax.Array, PyTree]:
    """``(losses, J)``: the Jacobian of the task losses w.r.t. all shared parameters."""
    losses, jac, _ = jacobian(model, params, batch, chunk_size=chunk_size)
    return losses, jac


def rows_finite(jac: PyTree, num_tasks: int) -> jax.Array:
    """``bool[T]``: whether every entry of each task's row of a Jacobian pytree is finite."""
    ok = jnp.ones((num_tasks,), bool)
    for leaf in jax.tree_util.tree_leaves(jac):
        ok = ok & jnp.all(jnp.isfinite(leaf.reshape(num_tasks, -1)), axis=1)
    return ok


def rows_finite_given_gramian(jac: PyTree, gram: jax.Array, num_tasks: int) -> jax.Array:
    """:func:`rows_finite` of ``J``, read from the diagonal of its Gramian ``G = J Jᵀ`` where it
    answers: a finite ``Gᵢᵢ = Σⱼ Jᵢⱼ²`` means that every entry of row ``i`` is finite. Only when
    some diagonal entry is not (a non-finite entry, or squares that overflow) are the rows of
    ``J`` scanned, under ``lax.cond``, so the usual step never reads ``J`` a second time."""
    diag_ok = jnp.isfinite(jnp.diagonal(gram))
    return jax.lax.cond(
        jnp.all(diag_ok), lambda j: diag_ok, lambda j: rows_finite(j, num_tasks), jac
    )


def gramian_by_chunks(
    f: Callable[[PyTree], jax.Array],
    primal: PyTree,
    num_tasks: int,
    chunk_size: int,
    *,
    constraint: Callable[[PyTree], PyTree] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(f(primal), G)`` with ``G = J Jᵀ`` for ``J = ∂f/∂primal``, never holding all of ``J``.

    ``f`` is linearized once (one forward pass); then, ``chunk_size`` tasks at a time, the rows
    ``J_c`` of a chunk come from mapped VJPs and the Gramian's columns ``J J_cᵀ`` from mapped
    JVPs along those rows (``J v`` is the directional derivative of the losses along ``v``).
    Memory holds ``chunk_size`` rows of ``J`` at a time instead of ``T``.

    The trade-off: on top of the ``T`` VJPs that forming ``J`` costs, this pays ``T`` JVPs
    (each about one forward pass, so roughly +50% over the VJPs) and the update ``Jᵀw`` must
    come from one more VJP instead of a product with a stored ``J``. It pays off when ``T × P``
    does not fit in memory; otherwise forming ``J`` (optionally with ``chunk_size``, which
    only bounds the intermediates of the backward passes) is faster. A ``primal`` with no
    leaves (no shared parameters) has ``G = 0``.
    """
    if not jax.tree_util.tree_leaves(primal):
        losses = f(primal)
        dtype = jnp.promote_types(losses.dtype, jnp.float32)
        return losses, jnp.zeros((int(num_tasks), int(num_tasks)), dtype)
    losses, jvp_fn = jax.linearize(f, primal)
    vjp_fn = jax.linear_transpose(jvp_fn, primal)
    t = int(num_tasks)
    c = max(1, min(int(chunk_size), t))
    n = math.ceil(t / c)
    eye = jnp.eye(n * c, t, dtype=losses.dtype).reshape(n, c, t)  # padded rows are zero

    def body(carry, e):
        rows = jax.vmap(lambda ei: vjp_fn(ei)[0])(e)
        if constraint is not None:
            rows = constraint(rows)
        return carry, jax.vmap(jvp_fn)(rows)

    _, cols = jax.lax.scan(body, None, eye)
    g = cols.reshape(n * c, t)[:t].astype(jnp.promote_types(losses.dtype, jnp.float32))
    return losses, 0.5 * (g + g.T)


def _chunked_gramian(
    model: Model,
    params: Params,
    batch: Batch,
    *,
    mode: Mode,
    subset: base.ParamSubset,
    chunk_size: int,
    constraint: Callable[[PyTree], PyTree] | None,
    model_state: PyTree = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, Callable[[jax.Array], Params]]:
    """``(losses, G, vjp)`` like :func:`jacobian` but with the Gramian in task chunks."""
    fns, ctx = _enter(model, model_state, key)
    return _chunked(model, fns, params, batch, ctx, mode, subset, chunk_size, constraint)[:3]


def _chunked(model, fns, params, batch, ctx, mode, subset, chunk_size, constraint):
    """``(losses, G, vjp, ctx)``: see :func:`_chunked_gramian`."""
    t = model.num_tasks
    if mode == "feature":
        z, enc_vjp, losses, head_vjp, ctx_z, ctx_out = _encode_heads(fns, params, batch, ctx)
        _, gram = gramian_by_chunks(
            lambda z_: fns.heads(params.specific, z_, batch, ctx_z)[0], z, t, chunk_size
        )

        def vjp(c):
            g_spec, g_z = head_vjp(c)
            return Params(enc_vjp(g_z)[0], g_spec)

        return losses, gram, vjp, ctx_out
    losses, vjp, ctx_out = _losses_and_vjp(fns, params, batch, ctx)
    pred = subset_predicate(model, subset)
    sel, rest, treedef, mask = tree_lib.partition(params.shared, pred)
    check_subset_selects(subset, mask, params.shared)

    def f(sel_):
        shared = tree_lib.combine(sel_, rest, treedef, mask)
        return fns.losses(shared, params.specific, batch, ctx)[0]

    _, gram = gramian_by_chunks(f, sel, t, chunk_size, constraint=constraint)
    return losses, gram, vjp, ctx_out


def _layerwise(model, fns, params, batch, ctx, subset):
    """``(losses, G, vjp, ctx)`` with ``G`` of (a subset of) the shared parameters accumulated
    layer by layer (:func:`mtljax.gramian_layerwise`), from one forward pass."""
    pred = subset_predicate(model, subset)
    sel, rest, treedef, mask = tree_lib.partition(params.shared, pred)
    check_subset_selects(subset, mask, params.shared)

    def f(sel_, rest_, spec_):
        return fns.losses(tree_lib.combine(sel_, rest_, treedef, mask), spec_, batch, ctx)

    out = gramian_layerwise.linearize(f, sel, rest, params.specific, has_aux=True)

    def vjp(c):
        g_sel, (g_rest, g_spec) = out.vjp(c)
        return Params(tree_lib.combine(g_sel, g_rest, treedef, mask), g_spec)

    return out.losses, out.gramian, vjp, out.aux


def auto_path(
    needs: base.Needs,
    mode: Mode,
    subset: base.ParamSubset,
    *,
    chunk_size: int | None,
    gramian_chunk_size: int | None,
    constraint: Callable[[PyTree], PyTree] | None,
) -> GramianPath:
    """What ``gramian="auto"`` takes before the shapes are known: ``"jacobian"`` unless the
    Gramian alone is needed, without chunks (``chunk_size``, ``gramian_chunk_size``) or a
    Jacobian ``constraint``; then ``"layerwise"`` at feature level and on a layer subset, whose
    update is one VJP of ``w · L`` either way (each weight takes the path with fewer
    multiply-adds, so it never costs more than forming the Jacobian), and over all shared
    parameters ``"auto"``, which :func:`compute` settles from the shapes with
    :func:`layerwise_pays`."""
    chunked = chunk_size is not None or gramian_chunk_size is not None
    if needs != "gramian" or chunked or constraint is not None:
        return "jacobian"
    return "layerwise" if (mode == "feature" or subset != "all") else "auto"


def layerwise_pays(f: Callable[..., Any], shared: PyTree, *args: PyTree) -> bool:
    """Whether, at parameter level over all shared parameters, the layer-wise Gramian plus
    the backward pass of the update ``∇(w·L)`` costs fewer multiply-adds than the Gramian of
    the formed Jacobian plus ``Jᵀw`` from it (``f(shared, *args)``: the task losses first).

    From :func:`mtljax._src.gramian_layerwise.plan` (shapes only): the layer-wise path costs
    its blocks (per leaf the cheaper of the two ways) and one more backward pass, ``2BNCF``
    for a dense use (the input's and the weight's gradients); the Jacobian path the blocks
    from per-task gradients (``T`` weight gradients and their ``T²`` inner products) and
    ``T·P`` for ``Jᵀw``. The ``T`` backward passes through the activations are common to both
    and not counted. With ``T`` tasks, batch ``B`` and a dense ``C × F`` weight the layer-wise
    block costs ``B²C + TB²F + T²BF`` against ``TBCF + T²CF``: it pays when ``B`` is below
    the layers' width and ``T`` is large enough to amortise the extra pass. ``False`` when no
    leaf takes the layer-wise block, or when a weight of two or more axes has other than dense
    uses (convolutions: the extra backward pass through them is not counted)."""
    p = gramian_layerwise.plan(f, shared, *args)
    shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(shared)]
    # The extra backward pass is counted for dense uses only: a weight of two or more axes
    # used otherwise (a convolution's kernel, an embedding table) has a backward pass of
    # uncounted cost, and then the Jacobian path is kept.
    other_uses = [
        len(sh) >= 2 and leaf.flops_layerwise is None
        for leaf, sh in zip(p.leaves, shapes, strict=True)
    ]
    if any(other_uses):
        return False
    if not any(leaf.layerwise for leaf in p.leaves):
        return False
    t = int(jax.tree_util.tree_leaves(jax.eval_shape(f, shared, *args))[0].shape[0])
    size = sum(math.prod(sh) for sh in shapes)
    backward = sum(2 * u.b * u.n * u.c * u.f for u in p.uses)
    exact = sum(leaf.flops_exact for leaf in p.leaves) + t * size
    return p.flops() + backward < exact


def _feature_layerwise(model, fns, params, batch, ctx):
    """``(losses, G, vjp, ctx)`` with ``G = J_z J_zᵀ`` of the representation Jacobian from the
    heads' dense uses of ``z`` (:func:`mtljax.gramian_layerwise` with ``z`` as the
    differentiated input), without forming ``J_z``.

    For heads ``y = z W`` (``z``: ``N × D``, ``W``: ``D × F``) with task ``t``'s cotangent
    ``Δₜ = ∂Lₜ/∂y``, task ``t``'s row is ``J_z⁽ᵗ⁾ = Δₜ Wᵀ`` and

        ⟨Δₜ Wᵀ, Δᵤ Wᵀ⟩ = ⟨Δₜ, Δᵤ (Wᵀ W)⟩,

    ``F² D + 2 T N F²`` multiply-adds against ``T² N D`` for the inner products of the rows
    alone (and ``T`` backward passes of the heads, ``T N F D`` each for dense cotangents, to
    form them). Several dense uses of ``z`` (one head each) stack along ``F``; ``z`` used any
    other way, or a cheaper ``T² N D``, takes the per-task rows (``policy="auto"``).
    """
    _check_features(model)
    z, enc_vjp, ctx_z = jax.vjp(lambda s: fns.encode(s, batch, ctx), params.shared, has_aux=True)

    def f(z_, spec):
        return fns.heads(spec, z_, batch, ctx_z)

    out = gramian_layerwise.linearize(f, z, params.specific, has_aux=True)

    def vjp(c):
        g_z, (g_spec,) = out.vjp(c)
        return Params(enc_vjp(g_z)[0], g_spec)

    return out.losses, out.gramian, vjp, out.aux


# ----------------------------------------------------------------------------------------------
# The one entry point of a train step


class Quantities(NamedTuple):
    """What a train step's method needs, all from one forward pass (see :func:`compute`).

    Attributes:
      losses: ``f32[T]``, the task losses.
      model_state: the model state after this forward pass (BatchNorm's statistics updated
        once, from this batch); ``()`` for a model without state.
      jacobian: the task Jacobian (a pytree whose leaves have a leading task axis): w.r.t. the
        shared parameters (or the declared subset), or, at feature level, w.r.t. the shared
        representation; ``None`` when not formed (losses-only methods, Gramian by chunks).
      gramian: ``f32[T, T]``, ``G = J Jᵀ``; ``None`` for losses-only methods.
      rows_finite: ``bool[T]``, whether each task's row of ``J`` (or its diagonal entry of
        ``G``) is finite; ``None`` for losses-only methods.
      vjp: ``c ↦`` the :class:`Params` gradient of ``c · losses`` (one backward pass).
      weighted: ``w ↦`` the :class:`Params` gradient of ``w · losses``, the update of a
        weighting method: at parameter level over all shared parameters the shared part is
        ``Jᵀw`` from the stored ``J`` (no further backward pass through the encoder),
        otherwise ``vjp(w)``.
      pullback: a direction with the structure of a Jacobian row ``↦`` the gradient of the
        shared parameters it stands for: the identity at parameter level, the encoder's VJP
        at feature level; ``None`` when no Jacobian was formed.
    """

    losses: jax.Array
    model_state: PyTree
    jacobian: PyTree | None
    gramian: jax.Array | None
    rows_finite: jax.Array | None
    vjp: Callable[[jax.Array], Params]
    weighted: Callable[[jax.Array], Params]
    pullback: Callable[[PyTree], PyTree] | None


def compute(
    model: Model,
    params: Params,
    batch: Batch,
    *,
    needs: base.Needs,
    mode: Mode = "parameter",
    subset: base.ParamSubset = "all",
    chunk_size: int | None = None,
    gramian_chunk_size: int | None = None,
    constraint: Callable[[PyTree], PyTree] | None = None,
    model_state: PyTree = None,
    key: jax.Array | None = None,
    gramian: GramianPath = "jacobian",
) -> Quantities:
    """Everything a method declares it needs (``needs``), from one forward pass of the model.

    Args:
      model, params, batch: the model, its parameters and the batch.
      needs: ``"losses"`` (the losses and their VJP only: one backward, as for equal weights),
        ``"gramian"`` or ``"jacobian"`` (the task Jacobian and its Gramian).
      mode: ``"parameter"`` (Jacobian w.r.t. the shared parameters) or ``"feature"`` (w.r.t. the
        shared representation).
      subset: ``"all"`` shared parameters, the ``"last"`` shared layer, or a tuple of parameter
        path prefixes (parameter level).
      chunk_size: map the Jacobian's backward passes this many tasks at a time.
      gramian_chunk_size: for ``needs="gramian"``: accumulate the Gramian this many tasks at
        a time without forming ``J`` (:func:`gramian_by_chunks`).
      constraint: applied to the parameter-level Jacobian (or its chunks), e.g. a sharding
        constraint.
      model_state: the model state the forward pass starts from (``None``: as built).
      key: seeds the model's random streams (dropout) for this forward pass; every quantity
        returned comes from the same pass, so under the same masks.
      gramian: for ``needs="gramian"``: ``"jacobian"`` (``G = J Jᵀ`` from the formed
        Jacobian), ``"layerwise"`` (accumulated layer by layer without the per-task
        gradients of the dense weights where that is cheaper,
        :func:`mtljax.gramian_layerwise`; at feature level without ``J_z`` where the heads
        apply ``z`` densely, :func:`_feature_layerwise`; no Jacobian is returned) or
        ``"auto"`` (:func:`auto_path`; over all shared parameters at parameter level, whichever
        of the two :func:`layerwise_pays` finds cheaper by its multiply-adds).
    """
    t = model.num_tasks
    fns, ctx = _enter(model, model_state, key)
    if needs == "losses":
        losses, vjp, ctx = _losses_and_vjp(fns, params, batch, ctx)
        return Quantities(losses, fns.leave(ctx), None, None, None, vjp, vjp, None)
    if gramian not in ("jacobian", "layerwise", "auto"):
        raise ValueError(f"gramian must be 'jacobian', 'layerwise' or 'auto', got {gramian!r}")
    if gramian == "auto":
        gramian = auto_path(
            needs,
            mode,
            subset,
            chunk_size=chunk_size,
            gramian_chunk_size=gramian_chunk_size,
            constraint=constraint,
        )
    if gramian == "auto":

        def f(shared, spec):
            return fns.losses(shared, spec, batch, ctx)

        gramian = "layerwise" if layerwise_pays(f, params.shared, params.specific) else "jacobian"
    if gramian == "layerwise" and needs == "gramian":
        if gramian_chunk_size is not None:
            raise ValueError("gramian='layerwise' and gramian_chunk_size exclude each other")
        if mode == "feature":
            losses, gram, vjp, ctx = _feature_layerwise(model, fns, params, batch, ctx)
        else:
            losses, gram, vjp, ctx = _layerwise(model, fns, params, batch, ctx, subset)
        rows_ok = jnp.isfinite(jnp.diagonal(gram))
        return Quantities(losses, fns.leave(ctx), None, gram, rows_ok, vjp, vjp, None)
    if gramian_chunk_size is not None and needs == "gramian":
        losses, gram, vjp, ctx = _chunked(
            model, fns, params, batch, ctx, mode, subset, gramian_chunk_size, constraint
        )
        rows_ok = jnp.isfinite(jnp.diagonal(gram))
        return Quantities(losses, fns.leave(ctx), None, gram, rows_ok, vjp, vjp, None)
    if mode == "parameter":
        losses, jac, vjp, ctx = _jacobian(
            model, fns, params, batch, ctx, subset=subset, chunk_size=chunk_size
        )
        if constraint is not None:
            jac = constraint(jac)
        if subset == "all":

            def weighted(w):
                return Params(base.combine(w, jac), vjp(w).specific)

        else:
            weighted = vjp
        gram = base.gramian(jac, t)
        rows_ok = rows_finite_given_gramian(jac, gram, t)
        return Quantities(losses, fns.leave(ctx), jac, gram, rows_ok, vjp, weighted, lambda d: d)
    if mode == "feature":
        losses, jac, vjp, backprop, ctx = _feature_jacobian(
            model, fns, params, batch, ctx, chunk_size=chunk_size
        )
        gram = base.gramian(jac, t)
        rows_ok = rows_finite_given_gramian(jac, gram, t)
        return Quantities(losses, fns.leave(ctx), jac, gram, rows_ok, vjp, vjp, backprop)
    raise ValueError(f"mode must be 'parameter' or 'feature', got {mode!r}")
