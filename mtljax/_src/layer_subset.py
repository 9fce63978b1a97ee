"""Weights from the Gramian of a subset of the shared parameters (a few layers).

A weighting method computes ``w = φ(G)`` from the Gramian ``G = J Jᵀ`` of the task Jacobian and
updates the shared parameters along ``Jᵀw``. :func:`on_layers` takes ``G`` over a subset ``S``
of the shared parameters instead: ``w = φ(J_S J_Sᵀ)``, while the update stays the gradient of
``w · L`` over **all** parameters (one backward pass, ``vjp(w)``). The ``T`` mapped backward
passes then stop at the first layer of ``S`` (the cost of GradNorm's last-layer Gramian: about
one backward plus ``T`` products of that layer), instead of running through the whole model.

This is GradNorm's choice (its paper differentiates the last shared layer only), offered for
every method whose update is ``Jᵀw``. A method that builds its direction from the Jacobian
itself (element-wise operations on the task gradients) needs every row of ``J`` and cannot use
a subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtljax._src import base, describe


def on_layers(method: base.Method, layers: str | Sequence[str] | Any) -> base.Method:
    """``method`` with its weights computed from the Gramian of the layers ``layers`` only.

    With ``S`` the selected shared parameters and ``J_S`` the task Jacobian restricted to them,
    the method computes its weights ``w`` from ``G_S = J_S J_Sᵀ`` and the train step's shared
    update is ``∇_θ (w · L)`` over all parameters, one VJP of the same forward pass. With
    ``layers="all"`` this is the method itself (``G_S = G`` and ``∇_θ(w·L) = Jᵀw``).

    Args:
      method: a weighting method that needs the Gramian (MGDA, UPGrad, Nash-MTL, CAGrad,
        IMTL-G, Aligned-MTL, FairGrad, DualProj, GradVac, PCGrad's Gramian form, GradNorm...).
      layers: ``"last"`` (the model's declared last shared layer, ``Model.last_shared``),
        ``"all"``, or a tuple of parameter path prefixes among the shared parameters
        (``("encoder/layers/2",)``; an :class:`mtljax.nn.PathPrefixes` also works).

    Returns:
      The method with ``params`` set to the subset (recorded in its ``hparams``).

    Raises:
      ValueError: for a method that yields a direction from the full Jacobian, one that reads
        the losses only, or an invalid ``layers``.
    """
    base.check_method("on_layers", method)
    if method.weights is None:
        raise ValueError(
            f"{method.name} builds its update from every row of the task Jacobian (a direction, "
            "not weights from the Gramian), so it cannot use the Gramian of a layer subset; use "
            f"it on all shared parameters, or choose a weighting method such as upgrad or mgda "
            "for on_layers"
        )
    if method.needs == "losses":
        raise ValueError(
            f"{method.name} weights the losses only and reads no Gramian, so a layer subset "
            "changes nothing; use the method as it is"
        )
    subset = base.check_param_subset(method.name, layers)
    hparams = tuple((k, v) for k, v in method.hparams if k != "params")
    hparams += (("params", describe.freeze(describe.describe(subset))),)
    return method._replace(params=subset, hparams=hparams)
