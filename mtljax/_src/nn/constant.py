"""Constants held by a module: values a model reads but never trains (a regularizer's anchor)."""

from __future__ import annotations

from flax import nnx


class Constant(nnx.Variable):
    """A non-trainable value inside an NNX module, frozen into the model by :func:`mtljax.from_nnx`.

    ``from_nnx`` carries other non-parameter variables (batch statistics) as model state,
    updated by every train step; ``Constant`` variables are the exception: they are neither
    shared nor task-specific parameters, receive no gradient, are never updated and are
    closed over by the model's functions (``Model.nnx_rest``). Use them for what a loss or a
    regularizer reads but does not learn: the anchor of :class:`mtljax.nn.Cascade`'s successive
    regularization, a prior mean, a fixed task covariance.

    Changing one means rebuilding the model: update it on the module (``mtljax.to_nnx(model,
    params)``, then e.g. ``Cascade.set_anchor()``), call ``from_nnx``/``from_block`` again and
    make a new train step (which compiles again; the parameters, optimizer and method states
    carry over unchanged).

    A train state does not hold the constants: checkpoint them beside it,
    ``ckpt.save((state, model.nnx_rest), step=int(state.step))``. To resume, build the model
    as before, ``state, consts = ckpt.restore((state, model.nnx_rest)).state``, write them
    into the module (``module = mtljax.to_nnx(model, state.params)``, then
    ``nnx.update(module, consts)``) and build the model from it again.
    """
