"""DSelect-k gates (Hazimeh et al. 2021) in a multi-gate mixture of experts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtljax._src.nn.checks import check_positive, check_real
from mtljax._src.nn.mmoe import check_input, expert_bank
from mtljax._src.nn.split import PathPrefixes
from mtljax._src.nn.stacked import StackedLinear
from mtljax._src.nn.towers import StackedMLP


def smooth_step(t: jax.Array, gamma: float) -> jax.Array:
    """Hazimeh et al.'s smooth-step: 0 for ``t ≤ −γ/2``, 1 for ``t ≥ γ/2``, and
    ``−2t³/γ³ + 3t/(2γ) + 1/2`` between (continuously differentiable, exactly 0/1 outside)."""
    if not isinstance(gamma, jax.Array):  # a traced γ is the caller's to check
        gamma = check_real("smooth_step", "gamma", gamma, low=0.0, strict=True)
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def _codes(num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Bits ``(2^m, m)`` of every code and the code→expert map ``(2^m, n)`` (code mod n)."""
    m = max(1, math.ceil(math.log2(num_experts)))
    codes = np.arange(2**m)
    bits = ((codes[:, None] >> np.arange(m)[None, :]) & 1).astype(np.float32)
    to_expert = np.zeros((2**m, num_experts), np.float32)
    to_expert[codes, codes % num_experts] = 1.0
    return bits, to_expert


def selector_weights(z: jax.Array, gamma: float, num_experts: int) -> jax.Array:
    """Single-expert selectors: ``z (..., m)`` -> ``r(z) (..., n)``, a point of the simplex.

    ``r(z)_l = Πⱼ [S(zⱼ) if bit j of l is 1 else 1 − S(zⱼ)]`` (Hazimeh et al. eq. 4); it is
    one-hot once every ``|zⱼ| ≥ γ/2``. When ``n`` is not a power of two, code ``l`` selects
    expert ``l mod n``: every code is a valid selection (no penalty is needed to keep the
    selectors off unused codes), at the price of an uneven prior — at ``z = 0`` experts
    ``0 … 2^m − n − 1`` get two codes' weight (``n = 3``: ``[½, ¼, ¼]``).
    """
    check_positive("selector_weights", num_experts=num_experts)
    bits, to_expert = _codes(num_experts)
    if z.ndim < 1 or z.shape[-1] != bits.shape[1]:
        raise ValueError(
            f"selector_weights: {num_experts} experts take codes of {bits.shape[1]} bits, so z "
            f"needs {bits.shape[1]} entries in its last axis; got shape {z.shape}"
        )
    s = smooth_step(z, gamma)[..., None, :]  # (..., 1, m)
    per_code = jnp.prod(bits * s + (1.0 - bits) * (1.0 - s), axis=-1)  # (..., 2^m)
    return per_code @ to_expert


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """``−Σ p log p`` along ``axis`` (``0 log 0 = 0``)."""
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=axis)


class DSelectK(nnx.Module):
    """Multi-gate mixture of experts with DSelect-k gates.

    Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k:
    Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
    Learning", NeurIPS 2021. Each task's gate combines ``k`` single-expert selectors
    (binary codes of ``m = ⌈log₂ n⌉`` smooth-step bits, :func:`selector_weights`):

        q(x) = Σᵢ softmax(α)ᵢ r(z⁽ⁱ⁾),    yₜ = hₜ(Σₑ qₑ(x) fₑ(x)),

    so at most ``k`` experts have a non-zero weight once the selectors have converged. With
    ``per_example=True`` (the per-example gate of §3.2) ``z⁽ⁱ⁾ = Z⁽ⁱ⁾x`` and ``α = Ax``
    (stacked over tasks); otherwise ``z`` and ``α`` are parameters (the static gate). With
    ``k = 1`` the softmax of a single ``α`` is constant: ``α`` (or ``A``) gets no gradient.

    The entropy regularizer ``λ Σₜ Σᵢ h(r(zₜ⁽ⁱ⁾))`` (averaged over the batch for per-example
    gates) pushes the selectors to binary. It is a penalty of the objective, beside the
    weighted task losses (Hazimeh et al. §4), so :meth:`entropy_penalty` returns it whole, to be
    the model's regularizer (added outside the multi-task method, which then cannot rescale
    it): ``from_block(net, ..., regularizer=lambda m, b: m.entropy_penalty(b["x"]))``.

    **Shared / task-specific split.** Experts: shared. Gates and towers: task-specific.
    Input ``(batch, in)``; output ``(T, batch, tower_features[-1])``. The last tower size may
    give one width per task (``(8, (10, 1))``): the output is then ``(T, batch, max)`` with
    each task's extra columns 0; :func:`mtljax.nn.split_outputs` slices them off.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_features: Sequence[int],
        tower_features: Sequence[int | Sequence[int]],
        num_tasks: int,
        *,
        k: int,
        rngs: nnx.Rngs,
        gamma: float = 1.0,
        per_example: bool = True,
        entropy_weight: float = 0.0,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        check_positive(
            "DSelectK", in_features=in_features, num_experts=num_experts, num_tasks=num_tasks, k=k
        )
        if num_experts < 2:
            raise ValueError("DSelectK: needs at least 2 experts to select from")
        if k > num_experts:
            raise ValueError(f"DSelectK: k={k} exceeds the number of experts {num_experts}")
        gamma = check_real("DSelectK", "gamma", gamma, low=0.0, strict=True)
        entropy_weight = check_real(
            "DSelectK", "entropy_weight", entropy_weight, low=0.0, strict=False
        )
        m = max(1, math.ceil(math.log2(num_experts)))
        self.experts, tf = expert_bank(
            "DSelectK",
            in_features,
            num_experts,
            expert_features,
            tower_features,
            num_tasks,
            rngs=rngs,
            activation=activation,
        )
        if per_example:
            self.z_gate = StackedLinear(in_features, k * m, num_tasks, rngs=rngs)
            # z starts inside (−γ/2, γ/2), where the smooth-step has a gradient.
            self.z_gate.kernel[...] = self.z_gate.kernel[...] * (gamma / 8.0)
            self.alpha_gate = StackedLinear(in_features, k, num_tasks, rngs=rngs)
            self.alpha_gate.kernel[...] = jnp.zeros_like(self.alpha_gate.kernel[...])
        else:
            self.z = nnx.Param(
                jax.random.uniform(
                    rngs.params(),
                    (num_tasks, k, m),
                    jnp.float32,
                    minval=-gamma / 4,
                    maxval=gamma / 4,
                )
            )
            self.alpha = nnx.Param(jnp.zeros((num_tasks, k), jnp.float32))
        self.towers = StackedMLP(tf, num_tasks, rngs=rngs, activation=activation)
        self.in_features = in_features
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.k, self.m, self.gamma = k, m, float(gamma)
        self.per_example = per_example
        self.entropy_weight = float(entropy_weight)

    @property
    def shared_paths(self) -> tuple[str, ...]:
        return ("experts",)

    @property
    def shared_filter(self) -> PathPrefixes:
        return PathPrefixes(*self.shared_paths)

    @property
    def last_shared(self) -> str:
        return f"experts/layers/{len(self.experts.layers) - 1}"

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(q, selectors)``: expert weights ``(T, batch, n)`` and selectors
        ``(T, batch, k, n)`` (batch axis of size 1 for the static gate)."""
        t = self.num_tasks
        if self.per_example:
            z = self.z_gate(x).reshape((t,) + x.shape[:-1] + (self.k, self.m))
            alpha = self.alpha_gate(x)
        else:
            z = self.z[...][:, None]
            alpha = self.alpha[...][:, None]
        r = selector_weights(z, self.gamma, self.num_experts)
        q = jnp.einsum("tbk,tbkn->tbn", jax.nn.softmax(alpha, axis=-1), r)
        return q, r

    def encode(self, x: jax.Array) -> jax.Array:
        """The experts' outputs ``(n, batch, h)``."""
        check_input("DSelectK", x, self.in_features)
        return self.experts(x)

    def entropy_penalty(self, x: jax.Array) -> jax.Array:
        """``f32[]``: ``λ Σₜ Σᵢ h(r(zₜ⁽ⁱ⁾))`` on the input ``x`` (the batch mean for
        per-example gates; static gates do not read ``x``), ``λ = entropy_weight``."""
        check_input("DSelectK", x, self.in_features)
        _, r = self.gates(x)
        per_task = jnp.mean(jnp.sum(entropy(r), axis=-1), axis=-1)  # (T,)
        return self.entropy_weight * jnp.sum(per_task)

    def predict(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """Predictions ``(T, batch, out)`` from the experts' outputs ``z`` and the input ``x``
        (which the per-example gates read)."""
        q, _ = self.gates(x)
        mixed = jnp.einsum(
            "tbn,nbh->tbh", jnp.broadcast_to(q, q.shape[:1] + z.shape[1:2] + q.shape[2:]), z
        )
        return self.towers(mixed, per_task=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.predict(self.encode(x), x)
