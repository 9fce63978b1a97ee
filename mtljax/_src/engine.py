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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtljax._src import tree as tree_lib
from mtljax._src.model import Batch, Model, Params

PyTree = Any


def map_cotangents(vjp_fn: Callable, num_tasks: int, chunk_size: int | None, dtype: Any) -> Any:
    """Applies ``vjp_fn`` to the ``T`` unit cotangents: ``vmap``, or ``lax.map`` in chunks."""
    eye = jnp.eye(num_tasks, dtype=dtype)
    if chunk_size is None or chunk_size >= num_tasks:
        return jax.vmap(vjp_fn)(eye)
    return jax.lax.map(vjp_fn, eye, batch_size=int(chunk_size))


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def subset_predicate(model: Model, subset: str) -> Callable[[str], bool]:
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
    raise ValueError(f"unknown parameter subset {subset!r}; expected 'all' or 'last'")


def losses_and_vjp(model: Model, params: Params, batch: Batch):
    """``(losses, vjp)`` with ``vjp(cotangent) -> Params`` of gradients."""
    losses, vjp = jax.vjp(lambda s, p: model.losses_fn(s, p, batch), params.shared, params.specific)
    return losses, lambda c: Params(*vjp(c))


def jacobian(
    model: Model,
    params: Params,
    batch: Batch,
    *,
    subset: str = "all",
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree, Callable[[jax.Array], Params]]:
    """Task losses, their Jacobian w.r.t. (a subset of) the shared parameters, and the VJP.

    Returns ``(losses, J, vjp)``: ``J`` has the structure of the shared parameters (or, for
    ``subset="last"``, a list of the selected leaves) with a leading task axis; ``vjp(c)``
    gives the full :class:`Params` gradient of ``c · losses`` from the same forward pass.
    """
    check_chunk_size(chunk_size)
    t = model.num_tasks
    if subset == "all":
        losses, vjp = losses_and_vjp(model, params, batch)
        jac = map_cotangents(lambda c: vjp(c).shared, t, chunk_size, losses.dtype)
        return losses, jac, vjp
    pred = subset_predicate(model, subset)
    sel, rest, treedef, mask = tree_lib.partition(params.shared, pred)

    def f(sel_, rest_, spec_):
        return model.losses_fn(tree_lib.combine(sel_, rest_, treedef, mask), spec_, batch)

    losses, vjp3 = jax.vjp(f, sel, rest, params.specific)
    jac = map_cotangents(lambda c: vjp3(c)[0], t, chunk_size, losses.dtype)

    def vjp(c):
        g_sel, g_rest, g_spec = vjp3(c)
        return Params(tree_lib.combine(g_sel, g_rest, treedef, mask), g_spec)

    return losses, jac, vjp


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
    if not model.has_features:
        raise ValueError(
            "feature-level mode needs a model given as encoder and heads "
            "(Model.from_encoder_heads, or from_nnx(encode=..., heads=...))"
        )
    check_chunk_size(chunk_size)
    z, enc_vjp = jax.vjp(lambda s: model.encode_fn(s, batch), params.shared)
    losses, head_vjp = jax.vjp(lambda p, z_: model.heads_fn(p, z_, batch), params.specific, z)
    jac = map_cotangents(lambda c: head_vjp(c)[1], model.num_tasks, chunk_size, losses.dtype)

    def vjp(c):
        g_spec, g_z = head_vjp(c)
        return Params(enc_vjp(g_z)[0], g_spec)

    def backprop(d_z):
        return enc_vjp(d_z)[0]

    return losses, jac, vjp, backprop


def task_jacobian(
    model: Model, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> tuple[jax.Array, PyTree]:
    """``(losses, J)``: the Jacobian of the task losses w.r.t. all shared parameters."""
    losses, jac, _ = jacobian(model, params, batch, chunk_size=chunk_size)
    return losses, jac
