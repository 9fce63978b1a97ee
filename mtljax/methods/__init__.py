"""Multi-task methods: loss weighting and gradient aggregation, as optax-style factories.

Every factory returns a :class:`mtljax.Method`; use it with :func:`mtljax.aggregate` or
:func:`mtljax.make_train_step`. Each method lives in ``mtljax/_src/methods/<name>.py``.
"""

from __future__ import annotations

from mtljax._src.base import Method
from mtljax._src.methods.ew import ew
from mtljax._src.methods.fixed import fixed
from mtljax._src.methods.gradnorm import gradnorm
from mtljax._src.methods.uw import uw

# Method factories, by name (kept in the order of DESIGN's list; more may be added).
_FACTORIES = {
    "ew": ew,
    "fixed": fixed,
    "uw": uw,
    "gradnorm": gradnorm,
}


def names() -> tuple[str, ...]:
    """The names of all method factories."""
    return tuple(_FACTORIES)


def get(name: str, **kwargs) -> Method:
    """Builds a method by name: ``get("uw", learning_rate=1e-2)``."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(names())}")
    return _FACTORIES[name](**kwargs)


__all__ = ["Method", "get", "names", *_FACTORIES]
