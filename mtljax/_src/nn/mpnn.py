"""Message passing on padded static-shape graph batches (Gilmer et al. 2017's MPNN).

A :class:`GraphBatch` holds several graphs in flat node and edge arrays of fixed sizes, with
masks for the padding, so that one compiled step serves every batch; every reduction over a
graph's nodes or a node's incoming edges is a ``jax.ops.segment_*`` (no Python loop over
graphs). Padding nodes and edges are masked out of every sum, mean, max and softmax, so the
outputs of the real graphs do not depend on how much padding a batch carries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtljax._src.nn.checks import check_positive


class GraphBatch(NamedTuple):
    """``G`` graph slots with ``N`` node and ``E`` edge slots in all (static sizes).

    Attributes:
      nodes: f32[N, F] node features.
      node_graph: i32[N], the graph slot of each node (any valid slot for padding nodes).
      node_mask: bool[N], true for real nodes.
      edge_src, edge_dst: i32[E], the edge's source and target node (messages flow
        ``src → dst``; padding edges may point anywhere).
      edge_attr: f32[E, Fe] edge features.
      edge_mask: bool[E], true for real edges.
      graph_mask: bool[G], true for real graphs.
    """

    nodes: jax.Array
    node_graph: jax.Array
    node_mask: jax.Array
    edge_src: jax.Array
    edge_dst: jax.Array
    edge_attr: jax.Array
    edge_mask: jax.Array
    graph_mask: jax.Array

    @property
    def num_graphs(self) -> int:
        return self.graph_mask.shape[0]


def segment_mean(data: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int):
    """Mean of the masked rows of ``data`` per segment (0 for a segment with no row)."""
    w = mask.astype(data.dtype)
    total = jax.ops.segment_sum(data * w[:, None], segment_ids, num_segments)
    count = jax.ops.segment_sum(w, segment_ids, num_segments)
    return total / jnp.maximum(count, 1.0)[:, None]


def segment_softmax(logits: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int):
    """``softmax`` of ``logits[i]`` over the masked entries of each segment; 0 where masked."""
    neg = jnp.finfo(logits.dtype).min
    masked = jnp.where(mask, logits, neg)
    top = jax.ops.segment_max(masked, segment_ids, num_segments)
    e = jnp.where(mask, jnp.exp(masked - top[segment_ids]), 0.0)
    z = jax.ops.segment_sum(e, segment_ids, num_segments)
    return e / jnp.maximum(z[segment_ids], jnp.finfo(logits.dtype).tiny)


@jax.custom_vjp
def edge_messages(
    x_src: jax.Array, weights: jax.Array, hidden: jax.Array, kernel: jax.Array, bias: jax.Array
) -> jax.Array:
    """f32[E, d_out]: ``m_e = W_eᵀ x_e`` for the edge network's matrices
    ``W_e = reshape(h_e K + b)`` (``h``: f32[E, k], the edge MLP's hidden layer; ``kernel`` K
    as f32[k, d_in, d_out], ``bias`` b as f32[d_in, d_out]), given ``weights`` = the ``W_e``
    (f32[E, d_in, d_out], computed once by the caller and treated as a constant).

    The value is ``einsum(x, W)``. The gradient is taken with respect to ``x``, ``h``, ``K``
    and ``b`` directly (``weights`` gets none; pass it through ``stop_gradient``):

    ``∂x_e = W_e g_e``, ``∂h_ek = Σ_o g_eo (x_eᵀ K_k)_o``, ``∂K_kio = Σ_e h_ek x_ei g_eo``,
    ``∂b_io = Σ_e x_ei g_eo``,

    the same derivative as differentiating through ``W``, but without forming the cotangent of
    ``W`` (f32[E, d_in, d_out] per cotangent): ``x_eᵀ K`` and ``h ⊗ x`` depend on the primal only,
    so under ``vmap`` over the cotangents (one VJP per task) they are computed once, and the
    kernel's gradient is one matrix product contracting the edges.
    """
    return jnp.einsum("ei,eio->eo", x_src, weights)


def _edge_messages_fwd(x_src, weights, hidden, kernel, bias):
    return edge_messages(x_src, weights, hidden, kernel, bias), (x_src, weights, hidden, kernel)


def _edge_messages_bwd(res, g):
    x, w, h, kernel = res
    d_x = jnp.einsum("eo,eio->ei", g, w)
    xk = jnp.einsum("ei,kio->eko", x, kernel)  # primal only
    d_h = jnp.einsum("eo,eko->ek", g, xk)
    hx = (h[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)  # primal only: f32[E, k·d_in]
    d_kernel = (hx.T @ g).reshape(kernel.shape)
    d_bias = x.T @ g
    return d_x, jnp.zeros_like(w), d_h, d_kernel, d_bias


edge_messages.defvjp(_edge_messages_fwd, _edge_messages_bwd)


class EdgeWeights(NamedTuple):
    """The edge network's per-edge matrices ``W`` (f32[E, d_in, d_out]) and its hidden layer
    ``h`` (f32[E, k]), shared by the message-passing steps."""

    matrices: jax.Array
    hidden: jax.Array


class EdgeNetworkConv(nnx.Module):
    """Edge-conditioned convolution ("edge network", Gilmer et al. 2017, §5.1; PyG's
    ``NNConv`` with ``aggr="mean"``):

    ``x'ᵢ = W_root xᵢ + b + mean_{j → i} W(e_ji)ᵀ xⱼ``, ``W(e) = reshape(MLP(e), d_in × d_out)``

    with ``MLP = Linear(Fe, k) → ReLU → Linear(k, d_in·d_out)``. :meth:`edge_weights` computes
    the per-edge matrices once; :meth:`__call__` applies them (the MPNN reuses them across its
    message-passing steps, whose convolution shares its weights). With ``shared_vjp`` (default)
    they go through :func:`edge_messages`, whose gradient skips the per-edge matrices'
    cotangent (f32[E, d_in, d_out] per cotangent) for two primal-only products
    (f32[E, k, d_in] and f32[E, k, d_out]): much faster for several VJPs under ``vmap`` (the
    per-task Jacobian) when ``k ≤ d_in, d_out``; with ``k`` larger (the MTL papers' MPNN:
    k = 128, d = 64) one plain gradient is slower with it (2.2× on a CPU). The outputs are the
    same either way.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        edge_features: int,
        edge_hidden: int,
        *,
        shared_vjp: bool = True,
        rngs,
    ):
        check_positive(
            "EdgeNetworkConv",
            in_features=in_features,
            out_features=out_features,
            edge_features=edge_features,
            edge_hidden=edge_hidden,
        )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.shared_vjp = bool(shared_vjp)
        self.edge_in = nnx.Linear(edge_features, edge_hidden, rngs=rngs)
        self.edge_out = nnx.Linear(edge_hidden, in_features * out_features, rngs=rngs)
        self.root = nnx.Linear(in_features, out_features, rngs=rngs)

    def edge_weights(self, edge_attr: jax.Array) -> EdgeWeights:
        """The per-edge matrices f32[E, d_in, d_out] and the edge MLP's hidden layer."""
        h = nnx.relu(self.edge_in(edge_attr))
        w = self.edge_out(h)
        return EdgeWeights(w.reshape(edge_attr.shape[0], self.in_features, self.out_features), h)

    def __call__(self, x: jax.Array, weights: EdgeWeights, graph: GraphBatch) -> jax.Array:
        d_in, d_out = self.in_features, self.out_features
        x_src = x[graph.edge_src]
        if self.shared_vjp:
            kernel = self.edge_out.kernel[...].reshape(-1, d_in, d_out)
            bias = self.edge_out.bias[...].reshape(d_in, d_out)
            w = jax.lax.stop_gradient(weights.matrices)
            msg = edge_messages(x_src, w, weights.hidden, kernel, bias)
        else:
            msg = jnp.einsum("ei,eio->eo", x_src, weights.matrices)
        agg = segment_mean(msg, graph.edge_dst, graph.edge_mask, x.shape[0])
        return self.root(x) + agg


class Set2Set(nnx.Module):
    """Set2Set readout (Vinyals, Bengio & Kudlur 2016, "Order Matters"; Gilmer et al. 2017):
    ``steps`` rounds of

    ``q_t = LSTM(q*_{t−1})``, ``a_n = softmax_{n ∈ graph}(x_n · q_t)``, ``r_t = Σ_n a_n x_n``,
    ``q*_t = [q_t, r_t]``,

    from ``q*_0 = 0``; returns ``q*_T``: f32[G, 2d]."""

    def __init__(self, features: int, steps: int, *, rngs):
        check_positive("Set2Set", features=features, steps=steps)
        self.features, self.steps = int(features), int(steps)
        self.lstm = nnx.LSTMCell(2 * self.features, self.features, rngs=rngs)

    def __call__(self, x: jax.Array, graph: GraphBatch) -> jax.Array:
        g, d = graph.num_graphs, self.features
        carry = (jnp.zeros((g, d), x.dtype), jnp.zeros((g, d), x.dtype))
        q_star = jnp.zeros((g, 2 * d), x.dtype)
        mask = graph.node_mask

        def step(_, state):
            carry, q_star = state
            carry, q = self.lstm(carry, q_star)
            logits = jnp.sum(x * q[graph.node_graph], axis=-1)
            a = segment_softmax(logits, graph.node_graph, mask, g)
            r = jax.ops.segment_sum(a[:, None] * x, graph.node_graph, g)
            return carry, jnp.concatenate([q, r], axis=-1)

        # A rolled loop (the steps share their weights): one copy of the step to compile.
        return jax.lax.fori_loop(0, self.steps, step, (carry, q_star))[1]


class MPNN(nnx.Module):
    """Gilmer et al. 2017, "Neural Message Passing for Quantum Chemistry" (ICML), as the QM9
    experiments of the multi-task papers use it (Nash-MTL, Navon et al. 2022, and FAMO, Liu et
    al. 2023: ``experiments/quantum_chemistry/models.py`` of their code, after PyG's
    ``examples/qm9_nn_conv.py``):

    ``h⁰ = ReLU(W₀ x)``; ``steps`` times ``mᵗ = ReLU(EdgeNetworkConv(hᵗ))``,
    ``hᵗ⁺¹ = GRU(hᵗ, mᵗ)`` (one convolution and one GRU shared by the steps); then
    ``z = ReLU(W₁ Set2Set(h))`` per graph: f32[G, hidden].

    Defaults are theirs: ``hidden = 64``, edge network width 128, 3 message-passing steps,
    3 Set2Set steps. ``z`` is the shared representation of their model (its
    ``return_representation``); their per-task heads are ``Linear(hidden, 1)`` on it. The
    initialisations are Flax's defaults (PyTorch's differ), and Flax's GRU cell has no bias
    inside its reset product (PyTorch's ``b_hn``). ``shared_edge_vjp``: the gradient of the
    edge network's messages (:class:`EdgeNetworkConv`'s ``shared_vjp``).
    """

    def __init__(
        self,
        node_features: int,
        edge_features: int,
        *,
        hidden: int = 64,
        edge_hidden: int = 128,
        steps: int = 3,
        set2set_steps: int = 3,
        shared_edge_vjp: bool = True,
        rngs: nnx.Rngs,
    ):
        check_positive(
            "MPNN",
            node_features=node_features,
            edge_features=edge_features,
            hidden=hidden,
            edge_hidden=edge_hidden,
            steps=steps,
            set2set_steps=set2set_steps,
        )
        self.node_features, self.hidden, self.steps = int(node_features), int(hidden), int(steps)
        self.lin0 = nnx.Linear(node_features, hidden, rngs=rngs)
        self.conv = EdgeNetworkConv(
            hidden, hidden, edge_features, edge_hidden, shared_vjp=shared_edge_vjp, rngs=rngs
        )
        self.gru = nnx.GRUCell(hidden, hidden, rngs=rngs)
        self.set2set = Set2Set(hidden, set2set_steps, rngs=rngs)
        self.lin1 = nnx.Linear(2 * hidden, hidden, rngs=rngs)

    @property
    def last_layer_path(self) -> str:
        return "lin1"

    def node_states(self, graph: GraphBatch) -> jax.Array:
        """f32[N, hidden]: the node states after message passing (0 on padding nodes)."""
        keep = graph.node_mask[:, None].astype(graph.nodes.dtype)
        h = nnx.relu(self.lin0(graph.nodes)) * keep
        weights = self.conv.edge_weights(graph.edge_attr)

        def step(_, h):
            m = nnx.relu(self.conv(h, weights, graph))
            return self.gru(h, m)[0] * keep

        return jax.lax.fori_loop(0, self.steps, step, h)

    def __call__(self, graph: GraphBatch) -> jax.Array:
        """f32[G, hidden]: one representation per graph slot (padding slots are meaningless)."""
        return nnx.relu(self.lin1(self.set2set(self.node_states(graph), graph)))
