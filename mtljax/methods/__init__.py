"""Multi-task methods: loss weighting and gradient aggregation, as optax-style factories.

Every factory returns a :class:`mtljax.Method`; use it with :func:`mtljax.aggregate` or
:func:`mtljax.make_train_step`. Each method lives in ``mtljax/_src/methods/<name>.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax

from mtljax._src import describe
from mtljax._src.base import Method
from mtljax._src.layer_subset import on_layers
from mtljax._src.methods.aligned_mtl import aligned_mtl
from mtljax._src.methods.cagrad import cagrad
from mtljax._src.methods.config import config
from mtljax._src.methods.db_mtl import db_mtl
from mtljax._src.methods.dualproj import dualproj
from mtljax._src.methods.dwa import dwa
from mtljax._src.methods.ew import ew
from mtljax._src.methods.fairgrad import fairgrad
from mtljax._src.methods.famo import famo
from mtljax._src.methods.fixed import fixed
from mtljax._src.methods.gls import gls
from mtljax._src.methods.graddrop import graddrop
from mtljax._src.methods.gradnorm import gradnorm
from mtljax._src.methods.gradvac import gradvac
from mtljax._src.methods.imtl import imtl
from mtljax._src.methods.imtl_g import imtl_g
from mtljax._src.methods.imtl_l import imtl_l
from mtljax._src.methods.mgda import mgda
from mtljax._src.methods.nash_mtl import nash_mtl
from mtljax._src.methods.pcgrad import pcgrad
from mtljax._src.methods.rlw import rlw
from mtljax._src.methods.stch import stch
from mtljax._src.methods.upgrad import upgrad
from mtljax._src.methods.uw import uw

# Method factories, by name.
_FACTORIES = {
    "ew": ew,
    "fixed": fixed,
    "uw": uw,
    "dwa": dwa,
    "rlw": rlw,
    "gls": gls,
    "famo": famo,
    "stch": stch,
    "imtl_l": imtl_l,
    "gradnorm": gradnorm,
    "mgda": mgda,
    "pcgrad": pcgrad,
    "graddrop": graddrop,
    "gradvac": gradvac,
    "cagrad": cagrad,
    "nash_mtl": nash_mtl,
    "imtl_g": imtl_g,
    "imtl": imtl,
    "aligned_mtl": aligned_mtl,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "config": config,
    "fairgrad": fairgrad,
    "db_mtl": db_mtl,
}


def _recording(factory: Callable[..., Method]) -> Callable[..., Method]:
    """``factory`` that records its arguments, defaults included, in ``Method.hparams``
    (``like``, a shape template for the state, is not a hyper-parameter: the state's
    structure is checked on its own)."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args, **kwargs) -> Method:
        method = factory(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hparams = tuple(
            (k, describe.freeze(describe.describe(v)))
            for k, v in bound.arguments.items()
            if k != "like"
        )
        return method._replace(hparams=hparams)

    return build


# The public factories record their hyper-parameters.
_FACTORIES = {name: _recording(factory) for name, factory in _FACTORIES.items()}
globals().update(_FACTORIES)


def names() -> tuple[str, ...]:
    """The names of all method factories."""
    return tuple(_FACTORIES)


def get(name: str, *, like=None, **kwargs) -> Method:
    """Builds a method by name: ``get("uw", learning_rate=1e-2)``.

    ``like`` (e.g. the shared parameters, or their ``jax.ShapeDtypeStruct``) is passed on to
    the factories whose state holds gradient-shaped arrays (``db_mtl``) and ignored by others.
    ``params`` (``"last"``, ``"all"`` or a tuple of parameter path prefixes) takes a weighting
    method's Gramian over those shared parameters only (:func:`on_layers`):
    ``get("upgrad", params="last")``.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(names())}")
    factory = _FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    if like is not None and "like" not in kwargs and "like" in accepted:
        kwargs["like"] = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like
        )
    if "params" in kwargs and "params" not in accepted:
        layers = kwargs.pop("params")
        return on_layers(factory(**kwargs), layers)
    return factory(**kwargs)


__all__ = ["Method", "get", "names", "on_layers", *_FACTORIES]
