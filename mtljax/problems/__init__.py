"""Built-in multi-task problems (each in ``mtljax/_src/problems/<name>.py``).

``get(name, seed=..., **options)`` builds one; the modules ``toy2d`` and ``mmoe_synthetic``
also expose their problem-specific helpers (trajectories, landscapes, the Pareto front, fits).
"""

from mtljax._src.problems import mmoe_synthetic, toy2d
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import get, names

__all__ = ["Problem", "get", "mmoe_synthetic", "names", "toy2d"]
