"""Built-in multi-task problems (each in ``mtljax/_src/problems/<name>.py``)."""

from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import get, names

__all__ = ["Problem", "get", "names"]
