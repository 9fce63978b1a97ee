"""Hard parameter sharing: one shared encoder, one head per task."""

from __future__ import annotations

from typing import Any

from flax import nnx

from mtljax._src.nn.split import PathPrefixes


class HardSharing(nnx.Module):
    """Hard parameter sharing (Caruana 1997, "Multitask Learning"): a shared ``encoder`` and
    task ``heads``; ``heads`` is either one stacked module mapping ``z -> (T, …)`` (e.g.
    :class:`StackedLinear`, one batched matmul) or a list of per-task modules.

    Shared parameters are those under the top-level ``encoder``; task-specific ones those under
    ``heads`` (a head may have sub-modules of any name, ``encoder`` included).
    """

    def __init__(self, encoder: nnx.Module, heads: Any):
        self.encoder = encoder
        self.heads = nnx.List(list(heads)) if isinstance(heads, list | tuple) else heads

    @property
    def shared_paths(self) -> tuple[str, ...]:
        return ("encoder",)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str | None:
        """``encoder/<its last layer>`` when the encoder names it (``last_layer_path``, as
        :class:`mtljax.nn.MLP` does), else ``None``."""
        path = getattr(self.encoder, "last_layer_path", None)
        return f"encoder/{path}" if path is not None else None

    def encode(self, x: Any) -> Any:
        return self.encoder(x)

    def predict(self, z: Any) -> Any:
        """Per-task predictions from the representation: stacked ``(T, …)`` or a list."""
        if isinstance(self.heads, nnx.List):
            return [head(z) for head in self.heads]
        return self.heads(z)

    def __call__(self, x: Any) -> Any:
        return self.predict(self.encode(x))
