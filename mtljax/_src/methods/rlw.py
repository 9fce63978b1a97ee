"""Random loss weighting (Lin et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax._src.base import Method, make_method
from mtljax._src.methods import _common

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


def rlw(distribution: str = "normal", *, alpha: float = 1.0, p: float = 0.5) -> Method:
    """Random loss weighting: fresh random task weights at every step.

    Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022. At each step ``λ̃ ~ p(λ̃)`` is drawn and normalised onto
    the simplex, ``λ = f(λ̃)``; the shared update is ``∇ Σᵢ λᵢ Lᵢ``. Distributions:

    * ``"normal"`` (default; the default of the authors' code and the only distribution of
      LibMTL's current ``RLW``): ``λ = softmax(λ̃)``, ``λ̃ ~ N(0, I)``;
    * ``"uniform"``: ``λ = softmax(λ̃)``, ``λ̃ ~ U(0, 1)ᵀ``;
    * ``"dirichlet"``: ``λ ~ Dir(α·1)``, already on the simplex (``alpha``, default 1);
    * ``"bernoulli"``: ``λ̃ᵢ ~ Bernoulli(p)`` independently, redrawn until at least one task is
      selected, then ``λ = λ̃ / Σⱼ λ̃ⱼ`` (the selected tasks share the step equally);
    * ``"constrained_bernoulli"``: exactly one task, chosen uniformly, gets ``λᵢ = 1``.

    ``α = 1`` and ``p = ½`` are the parameters of the authors' first code (LibMTL's ``RLW``
    with its ``dist`` argument, commit d884c93: ``Dirichlet(1)``, ``Bernoulli(0.5)``), which
    also passes Dirichlet samples through the softmax and leaves Bernoulli's 0/1 weights
    unnormalised.

    The weights depend on the ``key`` only (not on the losses): the same key gives the same
    weights, and the train step passes a fresh key at every step. Needs the losses only.

    Args:
      distribution: one of the names above.
      alpha: the Dirichlet concentration (> 0), for ``"dirichlet"`` (default 1, see above).
      p: the selection probability in ``(0, 1]``, for ``"bernoulli"`` (default ½, see above).

    Scale: ``λ`` lies on the simplex, ``Σᵢ λᵢ = 1`` (``ew(reduction="mean")`` is its average).
    Task-specific parameters get ``λᵢ∇Lᵢ``.
    """
    name = "rlw"
    _common.check_choice(name, "distribution", distribution, _DISTRIBUTIONS)
    alpha = _common.check_positive(name, "alpha", alpha)
    p = _common.check_in_range(name, "p", p, 0.0, 1.0)
    if p == 0.0:
        raise ValueError(f"{name}: p must be in (0, 1], got {p!r}")

    def init(num_tasks: int):
        return ()

    def sample(key: jax.Array, t: int) -> jax.Array:
        if distribution == "normal":
            return jax.nn.softmax(jax.random.normal(key, (t,)))
        if distribution == "uniform":
            return jax.nn.softmax(jax.random.uniform(key, (t,)))
        if distribution == "dirichlet":
            return jax.random.dirichlet(key, jnp.full((t,), alpha))
        if distribution == "constrained_bernoulli":
            return jax.nn.one_hot(jax.random.randint(key, (), 0, t), t)

        # Bernoulli, conditioned on selecting at least one task (rejection sampling).
        def draw(carry):
            k, _ = carry
            k, sub = jax.random.split(k)
            return k, jax.random.bernoulli(sub, p, (t,)).astype(jnp.float32)

        _, mask = jax.lax.while_loop(
            lambda carry: jnp.sum(carry[1]) == 0, draw, draw((key, jnp.zeros((t,))))
        )
        return mask / jnp.sum(mask)

    def weights(losses, gramian, state, key):
        if key is None:
            raise ValueError(
                "rlw draws random weights and needs a PRNG key: pass key=... to "
                "mtljax.aggregate / weights_from_gramian (the train step passes one)"
            )
        return sample(key, losses.shape[0]).astype(losses.dtype), state

    return make_method(name, init, needs="losses", weights=weights)
