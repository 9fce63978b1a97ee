"""Problem registry: name -> factory ``(seed, **options) -> Problem``."""

from __future__ import annotations

from collections.abc import Callable

from mtljax._src.problems.base import Problem

_PROBLEMS: dict[str, Callable[..., Problem]] = {}


def register(name: str) -> Callable:
    def deco(factory: Callable[..., Problem]) -> Callable[..., Problem]:
        if name in _PROBLEMS:
            raise ValueError(f"problem {name!r} is registered twice")
        _PROBLEMS[name] = factory
        return factory

    return deco


def names() -> tuple[str, ...]:
    """The built-in problems' names (``toy2d``, ``gradnorm_toy``, ``uw_noise``,
    ``mmoe_synthetic``, ``multidigits``, ``qm9``)."""
    _load_all()
    return tuple(_PROBLEMS)


def get(name: str, *, seed: int = 0, **options) -> Problem:
    """Builds a built-in problem by name: ``get("mmoe_synthetic", correlation=0.5,
    arch="mmoe")``. ``options`` are the problem's keyword arguments, documented by its builder
    in ``mtljax/_src/problems/<name>.py``; an unknown option raises ``TypeError``."""
    _load_all()
    if name not in _PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; valid problems: {', '.join(_PROBLEMS)}")
    return _PROBLEMS[name](seed=seed, **options)


def _load_all() -> None:
    # Importing the modules registers their problems.
    from mtljax._src.problems import (  # noqa: F401
        gradnorm_toy,
        mmoe_synthetic,
        multidigits,
        qm9,
        toy2d,
        uw_noise,
    )
