"""Hard parameter sharing: one shared encoder, one head per task."""

from __future__ import annotations

from typing import Any

from flax import nnx


class HardSharing(nnx.Module):
    """Hard parameter sharing (Caruana 1997, "Multitask Learning"): a shared ``encoder`` and
    task ``heads``; ``heads`` is either one stacked module mapping ``z -> (T, …)`` (e.g.
    :class:`StackedLinear`, one batched matmul) or a list of per-task modules.

    Shared parameters live under ``encoder``; task-specific ones under ``heads``.
    """

    def __init__(self, encoder: nnx.Module, heads: Any):
        self.encoder = encoder
        self.heads = nnx.List(list(heads)) if isinstance(heads, list | tuple) else heads

    def encode(self, x: Any) -> Any:
        return self.encoder(x)

    def predict(self, z: Any) -> Any:
        """Per-task predictions from the representation: stacked ``(T, …)`` or a list."""
        if isinstance(self.heads, nnx.List):
            return [head(z) for head in self.heads]
        return self.heads(z)

    def __call__(self, x: Any) -> Any:
        return self.predict(self.encode(x))
