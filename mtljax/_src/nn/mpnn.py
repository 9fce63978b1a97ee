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


class EdgeNetworkConv(nnx.Module):
    """Edge-conditioned convolution ("edge network", Gilmer et al. 2017, §5.1; PyG's
    ``NNConv`` with ``aggr="mean"``):

    ``x'ᵢ = W_root xᵢ + b + mean_{j → i} W(e_ji)ᵀ xⱼ``, ``W(e) = reshape(MLP(e), d_in × d_out)``

    with ``MLP = Linear(Fe, k) → ReLU → Linear(k, d_in·d_out)``. :meth:`edge_weights` computes
    the per-edge matrices once; :meth:`__call__` applies them (the MPNN reuses them across its
    message-passing steps, whose convolution shares its weights).
    """

    def __init__(
        self, in_features: int, out_features: int, edge_features: int, edge_hidden: int, *, rngs
    ):
        check_positive(
            "EdgeNetworkConv",
            in_features=in_features,
            out_features=out_features,
            edge_features=edge_features,
            edge_hidden=edge_hidden,
        )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.edge_in = nnx.Linear(edge_features, edge_hidden, rngs=rngs)
        self.edge_out = nnx.Linear(edge_hidden, in_features * out_features, rngs=rngs)
        self.root = nnx.Linear(in_features, out_features, rngs=rngs)

    def edge_weights(self, edge_attr: jax.Array) -> jax.Array:
        """f32[E, d_in, d_out]."""
        w = self.edge_out(nnx.relu(self.edge_in(edge_attr)))
        return w.reshape(edge_attr.shape[0], self.in_features, self.out_features)

    def __call__(self, x: jax.Array, weights: jax.Array, graph: GraphBatch) -> jax.Array:
        msg = jnp.einsum("ei,eio->eo", x[graph.edge_src], weights)
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
    inside its reset product (PyTorch's ``b_hn``).
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
        self.conv = EdgeNetworkConv(hidden, hidden, edge_features, edge_hidden, rngs=rngs)
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
