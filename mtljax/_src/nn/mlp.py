"""A multi-layer perceptron encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx

from mtljax._src.nn.checks import check_features, check_width


class MLP(nnx.Module):
    """``x -> act(W₁x + b₁) -> … -> W_L(…) + b_L`` (no activation after the last layer unless
    ``final_activation``). Layer ``i`` lives at path ``layers/i``; :attr:`last_layer_path`
    names the last one (GradNorm's default subset when the MLP is the shared encoder).
    """

    def __init__(
        self,
        features: Sequence[int],
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        final_activation: bool = False,
    ):
        features = check_features("MLP", features)
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(features[:-1], features[1:], strict=True)]
        )
        self.activation = activation
        self.final_activation = final_activation
        self.in_features = features[0]

    @property
    def last_layer_path(self) -> str:
        return f"layers/{len(self.layers) - 1}"

    def __call__(self, x: jax.Array) -> jax.Array:
        check_width("MLP", x, self.in_features)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1 or self.final_activation:
                x = self.activation(x)
        return x
