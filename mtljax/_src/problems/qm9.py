"""QM9: 11 molecular properties regressed from the molecule's 3-D graph (the multi-task
literature's QM9 benchmark).

Data, targets, units and the geometry-inferred graph: :mod:`mtljax._src.problems.qm9_data`
(needs the optional extra ``pip install -e ".[qm9]"``). The protocol follows the QM9
experiments of Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022;
``experiments/quantum_chemistry/trainer.py`` of github.com/AvivNavon/nash-mtl), whose trainer
FAMO reuses (Liu et al., NeurIPS 2023; github.com/Cranial-XIX/FAMO); FairGrad (Ban & Ji,
ICML 2024) reports on the same benchmark:

* splits: one seeded shuffle; the first 10 000 molecules are the test set, the next 10 000
  the validation set, the remaining 110 831 the training set (see
  :func:`~mtljax._src.problems.qm9_data.split_indices` for how ours relates to theirs);
* targets standardised per task, ``z = (y − mean) / std``, with training-set statistics (their
  code reads them from ``train_dataset.data.y``, which for a PyG in-memory slice is the whole
  dataset's storage, so theirs are, in effect, statistics of all 130 831 molecules); each
  task's loss is the mean squared error on ``z``; the FAMO code's copy of the trainer
  defaults to unscaled targets (option ``standardize=False``);
* metric: the mean absolute error in the original units, reported in the units of the papers'
  tables (:data:`REPORT_UNITS`: meV for the energies ε_HOMO, ε_LUMO, ZPVE, U₀, U, H, G, as the
  Nash-MTL code's ``multiply_indx``);
* model: the MPNN of Gilmer et al. 2017 (:class:`mtljax._src.nn.mpnn.MPNN`) on the complete
  graph of each molecule (every ordered pair of distinct atoms, as their ``Complete``
  transform) with edge features ``[bond one-hot (4), distance in Å]`` (their
  ``T.Distance(norm=False)``); the shared encoder is everything up to ``ReLU(W₁ Set2Set(h))``,
  the representation their model returns; the heads are one ``Linear(hidden, 1)`` per task,
  the task-specific parameters of their model (``head_i``).

Batches are padded to static sizes (:class:`~mtljax._src.nn.mpnn.GraphBatch`) and built on
device by a jittable gather (:func:`build_batch`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtljax._src.model import Params, from_nnx, to_nnx
from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.mpnn import MPNN, GraphBatch
from mtljax._src.nn.stacked import StackedLinear
from mtljax._src.problems import qm9_data as qd
from mtljax._src.problems._shuffle import permuted_positions
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import register

TARGETS = qd.TARGETS
SPLITS = ("train", "validation", "test")
EDGE_FEATURES = qd.NUM_BOND_TYPES + 1
# Reporting scale from the targets' units (eV → meV for the energies, as the papers' tables).
REPORT_SCALE = {t: 1000.0 if qd.TARGET_UNITS[t] == "eV" else 1.0 for t in TARGETS}
REPORT_UNITS = {t: "meV" if qd.TARGET_UNITS[t] == "eV" else qd.TARGET_UNITS[t] for t in TARGETS}
# Single-task MAEs of the Nash-MTL code (``BASE`` in experiments/quantum_chemistry/utils.py),
# in REPORT_UNITS: the reference of their Δm%.
PUBLISHED_STL_MAE = dict(
    zip(
        TARGETS,
        (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244, 63.852, 66.223, 0.07212),
        strict=True,
    )
)
# Model sizes: the literature's, and a light variant for CPUs.
MODELS = {
    "mpnn": {"hidden": 64, "edge_hidden": 128, "steps": 3, "set2set_steps": 3},
    "mpnn-light": {"hidden": 16, "edge_hidden": 16, "steps": 2, "set2set_steps": 2},
}


# ----------------------------------------------------------------------------------------------
# Device-resident molecules and jittable batches


def device_arrays(data: qd.QM9Data, scaler: qd.Scaler) -> dict[str, jax.Array]:
    """The per-molecule arrays a batch is gathered from (padded to 29 atoms)."""
    return {
        "x": jnp.asarray(data.node_features()),
        "pos": jnp.asarray(data.positions, jnp.float32),
        "bonds": jnp.asarray(data.bonds),
        "num_atoms": jnp.asarray(data.num_atoms, jnp.int32),
        "y": jnp.asarray(scaler.transform(data.targets), jnp.float32),
    }


def build_batch(
    mols: dict[str, jax.Array],
    idx: jax.Array,
    valid: jax.Array | None = None,
    *,
    max_nodes: int,
    max_edges: int,
) -> dict[str, Any]:
    """The molecules ``idx`` (i32[B]; slots with ``valid`` false are empty) as
    ``{"graph": GraphBatch, "y": f32[B, T]}`` with ``max_nodes`` node and ``max_edges`` edge
    slots, the graphs packed one after the other. Each molecule's ``n`` atoms are complete-graph
    connected (``n (n − 1)`` directed edges, no self-loops). Jittable: edge ``k`` finds its
    molecule by a sorted search over the edge offsets; nothing loops over graphs.

    The totals must fit: ``Σ n ≤ max_nodes`` and ``Σ n (n − 1) ≤ max_edges`` (see
    :func:`batch_fits`); what does not fit is dropped.
    """
    b = idx.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid
    n = jnp.where(valid, mols["num_atoms"][idx], 0)
    node_end = jnp.cumsum(n)
    node_off = node_end - n
    ne = n * (n - 1)
    edge_end = jnp.cumsum(ne)
    edge_off = edge_end - ne

    k = jnp.arange(max_nodes)
    g = jnp.minimum(jnp.searchsorted(node_end, k, side="right"), b - 1)
    atom = k - node_off[g]
    node_mask = k < node_end[-1]
    atom = jnp.where(node_mask, atom, 0)
    nodes = mols["x"][idx[g], atom] * node_mask[:, None]

    e = jnp.arange(max_edges)
    ge = jnp.minimum(jnp.searchsorted(edge_end, e, side="right"), b - 1)
    edge_mask = e < edge_end[-1]
    local = jnp.where(edge_mask, e - edge_off[ge], 0)
    m1 = jnp.maximum(n[ge] - 1, 1)
    i = local // m1
    jj = local % m1
    j = jj + (jj >= i)
    mol = idx[ge]
    bond = mols["bonds"][mol, i, j].astype(jnp.int32)
    onehot = (bond[:, None] == jnp.arange(1, qd.NUM_BOND_TYPES + 1)).astype(jnp.float32)
    dist = jnp.linalg.norm(mols["pos"][mol, i] - mols["pos"][mol, j], axis=-1)
    edge_attr = jnp.concatenate([onehot, dist[:, None]], axis=-1) * edge_mask[:, None]
    graph = GraphBatch(
        nodes=nodes,
        node_graph=g.astype(jnp.int32),
        node_mask=node_mask,
        edge_src=jnp.where(edge_mask, node_off[ge] + i, 0).astype(jnp.int32),
        edge_dst=jnp.where(edge_mask, node_off[ge] + j, 0).astype(jnp.int32),
        edge_attr=edge_attr,
        edge_mask=edge_mask,
        graph_mask=valid,
    )
    return {"graph": graph, "y": mols["y"][idx]}


def batch_fits(num_atoms: jax.Array, max_nodes: int, max_edges: int) -> jax.Array:
    """Whether molecules of these atom counts fit the node and edge budgets."""
    n = num_atoms.astype(jnp.int32)
    return (jnp.sum(n) <= max_nodes) & (jnp.sum(n * (n - 1)) <= max_edges)


def sampling_budget(num_atoms: np.ndarray, batch_size: int, margin: float = 7.0):
    """``(max_nodes, max_edges)`` for batches of ``batch_size`` molecules drawn uniformly with
    replacement: the mean total plus ``margin`` standard deviations (rounded up to a multiple
    of 64, capped at the largest possible total). A batch over budget is redrawn; at 7 s.d.
    that happens for about one batch in 10¹¹ (normal approximation), so the batches follow the
    uniform distribution up to that."""
    out = []
    for per in (num_atoms.astype(np.float64), num_atoms * (num_atoms - 1.0)):
        total = batch_size * per.mean() + margin * math.sqrt(batch_size) * per.std()
        cap = batch_size * per.max()
        out.append(int(min(cap, 64 * math.ceil(total / 64))))
    return tuple(out)


def make_sampler(
    mols: dict[str, jax.Array], pool: np.ndarray, batch_size: int, max_nodes: int, max_edges: int
):
    """``key -> batch`` (jittable): ``batch_size`` molecules of ``pool`` drawn uniformly with
    replacement, redrawn (``lax.while_loop``) until they fit the budgets."""
    pool = jnp.asarray(pool, jnp.int32)

    def draw(k):
        return pool[jax.random.randint(k, (batch_size,), 0, pool.shape[0])]

    def redraw(carry):
        k, _ = carry
        k, sub = jax.random.split(k)
        return k, draw(sub)

    def over(carry):
        return ~batch_fits(mols["num_atoms"][carry[1]], max_nodes, max_edges)

    def sample(key):
        k, sub = jax.random.split(key)
        _, idx = jax.lax.while_loop(over, redraw, (k, draw(sub)))
        return build_batch(mols, idx, max_nodes=max_nodes, max_edges=max_edges)

    return sample


def make_epoch_sampler(
    mols: dict[str, jax.Array], pool: np.ndarray, batch_size: int, max_nodes: int, max_edges: int
):
    """``(data_key, step) -> batch`` (jittable): epoch by epoch over ``pool`` without
    replacement, as a data loader with ``shuffle=True, drop_last=False`` (the papers' trainer).

    Epoch ``e = step // S`` (``S = ⌈len(pool) / batch_size⌉``) is the permutation ``π`` of
    :func:`~mtljax._src.problems._shuffle.permuted_positions` keyed by
    ``fold_in(data_key, e)``; step ``step`` takes its positions ``[(step mod S)·batch_size, …)``,
    computed for that batch alone (``jax.random.permutation`` of the whole pool at every step
    cost 52 ms on a 2-core CPU for the 110,831 training molecules; this, about 0.3 ms). Every
    molecule is seen once per epoch, and the last batch of an epoch holds the remainder, the
    empty slots masked. A molecule past the node or edge budget (about one batch in 10¹¹,
    :func:`sampling_budget`) is masked out of its batch rather than redrawn, which would break
    the one-pass order.
    """
    n = len(pool)
    per_epoch = -(-n // batch_size)
    pool = jnp.asarray(pool, jnp.int32)
    offsets = jnp.arange(batch_size)

    def sample_at(data_key, step):
        epoch, position = jnp.divmod(jnp.asarray(step, jnp.int32), per_epoch)
        at = position * batch_size + offsets
        valid = at < n
        order = permuted_positions(jax.random.fold_in(data_key, epoch), jnp.where(valid, at, 0), n)
        idx = pool[order]
        atoms = jnp.where(valid, mols["num_atoms"][idx], 0)
        fits = (jnp.cumsum(atoms) <= max_nodes) & (jnp.cumsum(atoms * (atoms - 1)) <= max_edges)
        return build_batch(mols, idx, valid & fits, max_nodes=max_nodes, max_edges=max_edges)

    return sample_at


def exact_budget(num_atoms: np.ndarray, chunks: np.ndarray, valid: np.ndarray):
    """``(max_nodes, max_edges)`` that fit every chunk of the fixed ``chunks`` (i[C, B])."""
    n = np.where(valid, num_atoms[chunks], 0).astype(np.int64)
    nodes = int(n.sum(1).max())
    edges = int((n * (n - 1)).sum(1).max())
    return 64 * math.ceil(nodes / 64), 64 * math.ceil(edges / 64)


# ----------------------------------------------------------------------------------------------
# Model


def _task_losses(pred: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """f32[T]: per task, the mean over real graphs of ``(pred − y)²`` (standardised units).

    ``pred``: (T, B, 1) stacked head outputs; ``y``: (B, T)."""
    w = mask.astype(pred.dtype)
    err = (pred[..., 0] - y.T) ** 2
    return jnp.sum(err * w, axis=1) / jnp.maximum(jnp.sum(w), 1.0)


def build_model(key_or_seed: Any, *, model: str = "mpnn", tasks=TARGETS):
    """``(Model, Params)``: the MPNN encoder and one ``Linear(hidden, 1)`` head per task
    (stacked)."""
    if model not in MODELS:
        raise ValueError(f"qm9: model must be one of {sorted(MODELS)}, got {model!r}")
    cfg = MODELS[model]
    rngs = nnx.Rngs(params=key_or_seed)
    encoder = MPNN(qd.NUM_NODE_FEATURES, EDGE_FEATURES, rngs=rngs, **cfg)
    heads = StackedLinear(cfg["hidden"], 1, len(tasks), rngs=rngs)
    return from_nnx(
        HardSharing(encoder, heads),
        task_names=tuple(tasks),
        shared="encoder",
        encode=lambda m, b: m.encode(b["graph"]),
        heads=lambda m, z, b: _task_losses(m.predict(z), b["y"], b["graph"].graph_mask),
        last_shared="encoder/" + encoder.last_layer_path,
    )


# ----------------------------------------------------------------------------------------------
# Problem


@register("qm9")
def qm9(
    *,
    seed: int = 0,
    data_seed: int = 0,
    model: str = "mpnn",
    num_train: int | None = None,
    num_validation: int = 10_000,
    num_test: int = 10_000,
    max_molecules: int | None = None,
    batch_size: int = 120,
    eval_batch_size: int = 500,
    learning_rate: float = 1e-3,
    epochs: int = 300,
    standardize: bool = True,
) -> Problem:
    """QM9's 11 targets (:data:`TARGETS`) from the molecular graph; see the module docstring.

    Options:
      model: ``"mpnn"`` (the literature's: hidden 64, edge network 128, 3 message-passing
        and 3 Set2Set steps) or ``"mpnn-light"`` (hidden 16, edge network 16, 2 and 2 steps;
        for CPUs, not the papers' model).
      num_train, num_validation, num_test: split sizes (default 10 000 test, 10 000
        validation, all the rest for training: 110 831); smaller sizes take prefixes of the
        same shuffled sets.
      max_molecules: read only the first molecules of the source (lowest QM9 indices) before
        splitting: for tests; not a random subset.
      batch_size: training batch (120, the papers'). Training passes over the training set
        once per epoch in a fresh shuffle, as the papers' data loader
        (:func:`make_epoch_sampler`, the problem's ``sample_at``); ``sample(key)`` draws a
        batch uniformly with replacement instead (a draw over the node/edge budget is
        redrawn, :func:`sampling_budget`: about one draw in 10¹¹).
      eval_batch_size: molecules per evaluation chunk.
      learning_rate: Adam's (1e-3, the papers'; their plateau schedule is applied by the
        ``qm9-paper`` benchmark suite, not by the problem).
      epochs: ``steps = epochs × steps_per_epoch`` (300 in the papers).
      standardize: train on standardised targets (Nash-MTL's ``--scale-y`` default, true);
        ``False`` trains on the targets in their units (eV, D, …), the default of the FAMO
        code's copy of the same trainer (``experiments/quantum_chemistry/trainer.py`` of
        github.com/Cranial-XIX/FAMO, whose ``run.sh`` does not set it). The MAE is in the
        original units either way.

    ``seed`` sets the initial parameters only; ``data_seed`` the split (the papers' single
    seed sets both, so their runs over seeds also vary the split).
    """
    for name, v in (
        ("batch_size", batch_size),
        ("eval_batch_size", eval_batch_size),
        ("epochs", epochs),
    ):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ValueError(f"qm9: {name} must be a positive integer, got {v!r}")
    if model not in MODELS:
        raise ValueError(f"qm9: model must be one of {sorted(MODELS)}, got {model!r}")
    data = qd.load(max_molecules=max_molecules)
    splits = qd.split_indices(
        len(data.index),
        data_seed,
        num_test=num_test,
        num_validation=num_validation,
        num_train=num_train,
    )
    stats = qd.Scaler.fit(data.targets[splits["train"]])
    scaler = stats if standardize else qd.Scaler(np.zeros(len(TARGETS)), np.ones(len(TARGETS)))
    mols = device_arrays(data, scaler)
    std = jnp.asarray(scaler.std * np.array([REPORT_SCALE[t] for t in TARGETS]), jnp.float32)

    net, params = build_model(seed, model=model)

    def init_params(key: jax.Array) -> Params:
        return build_model(key, model=model)[1]

    n_train = len(splits["train"])
    max_nodes, max_edges = sampling_budget(data.num_atoms[splits["train"]], batch_size)

    sample = make_sampler(mols, splits["train"], batch_size, max_nodes, max_edges)
    sample_at = make_epoch_sampler(mols, splits["train"], batch_size, max_nodes, max_edges)

    # Evaluation: fixed chunks of ``eval_batch_size`` molecules, one node/edge budget that
    # fits every chunk of every split (one compiled function for all of them).
    eval_sets = {}
    for s in SPLITS:
        pos = splits[s]
        chunks = -(-len(pos) // eval_batch_size)
        padded = np.zeros(chunks * eval_batch_size, np.int64)
        padded[: len(pos)] = pos
        valid = np.arange(len(padded)) < len(pos)
        eval_sets[s] = (
            padded.reshape(chunks, eval_batch_size),
            valid.reshape(chunks, eval_batch_size),
        )
    eval_budget = tuple(
        max(v)
        for v in zip(
            *(exact_budget(data.num_atoms, c, m) for c, m in eval_sets.values()), strict=True
        )
    )

    @jax.jit
    def _chunk_errors(p: Params, idx, valid):
        b = build_batch(mols, idx, valid, max_nodes=eval_budget[0], max_edges=eval_budget[1])
        pred = to_nnx(net, p)(b["graph"])[..., 0]  # (T, B)
        w = valid.astype(jnp.float32)
        diff = pred - b["y"].T
        return jnp.sum(jnp.abs(diff) * w, 1), jnp.sum(diff**2 * w, 1)

    def evaluate_split(p: Params, split: str) -> dict[str, jax.Array]:
        """``{"mae": f32[T] in REPORT_UNITS, "loss": f32[T] (MSE, standardised)}``."""
        if split not in eval_sets:
            raise ValueError(f"qm9: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        c_idx, c_valid = eval_sets[split]
        abs_sum = jnp.zeros(len(TARGETS))
        sq_sum = jnp.zeros(len(TARGETS))
        for idx, valid in zip(c_idx, c_valid, strict=True):  # chunks, not graphs
            a, q = _chunk_errors(p, jnp.asarray(idx, jnp.int32), jnp.asarray(valid))
            abs_sum, sq_sum = abs_sum + a, sq_sum + q
        count = float(c_valid.sum())
        return {"mae": abs_sum / count * std, "loss": sq_sum / count}

    def evaluate(p: Params) -> dict[str, jax.Array]:
        return evaluate_split(p, "test")

    steps_per_epoch = -(-n_train // batch_size)
    return Problem(
        name="qm9",
        model=net,
        params=params,
        sample=sample,
        optimizer=optax.adam(learning_rate),
        steps=int(epochs) * steps_per_epoch,
        evaluate=evaluate,
        info={
            "model": model,
            "model_config": dict(MODELS[model]),
            "standardize": bool(standardize),
            "molecules": {s: int(len(v)) for s, v in splits.items()},
            "data_seed": int(data_seed),
            "units": dict(REPORT_UNITS),
            "target_mean": [float(v) for v in stats.mean],
            "target_std": [float(v) for v in stats.std],
            "published_stl_mae": dict(PUBLISHED_STL_MAE),
            "batch_budget": {"max_nodes": max_nodes, "max_edges": max_edges},
        },
        evaluate_split=evaluate_split,
        metrics={t: ("mae", False) for t in TARGETS},
        splits=SPLITS,
        init_params=init_params,
        steps_per_epoch=steps_per_epoch,
        sample_at=sample_at,
        single_device=(
            "its batches pack the molecules' graphs into shared node and edge arrays, which "
            "cannot be split by molecule across devices"
        ),
    )
