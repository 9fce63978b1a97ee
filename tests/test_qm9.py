"""QM9: preprocessing (units, atomization energies, bonds), cache, splits, standardisation,
padded graph batches, the MPNN, and a short training; on a slice of the bundled data."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtljax as mtl
from mtljax._src.model import to_nnx
from mtljax._src.nn import mpnn
from mtljax._src.problems import qm9 as Q
from mtljax._src.problems import qm9_data as qd

# `--dist loadgroup` keeps this module on one worker: the cached data slice and model.
pytestmark = pytest.mark.xdist_group("qm9")

HAS_QM9 = importlib.util.find_spec("qm9pack") is not None
needs_qm9 = pytest.mark.skipif(not HAS_QM9, reason='needs qm9pack (pip install -e ".[qm9]")')
HAR2EV = 27.211386246
# Raw CSV values (Hartree, except μ in D, α in a₀³, c_v in cal/(mol K)) of QM9 molecules 1
# (CH4) and 3 (H2O), typed from the source: μ, α, HOMO, LUMO, ⟨R²⟩, ZPVE, U0, U, H, G, c_v.
RAW = {
    1: (0.0, 13.21, -0.3877, 0.1171, 35.3641, 0.044749, -40.47893, -40.476062, -40.475117,
        -40.498597, 6.469),
    3: (1.8511, 6.31, -0.2928, 0.0687, 19.0002, 0.021375, -76.404702, -76.401867, -76.400922,
        -76.422349, 6.002),
}  # fmt: skip
# Isolated atoms (QM9 atomref table, Hartree): H, C, O for U0, U, H, G.
REF = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "O": (-75.064579, -75.063162, -75.062219, -75.079532),
}
SLICE = {"max_molecules": 600, "num_test": 100, "num_validation": 100, "model": "mpnn-light"}


@pytest.fixture(scope="module")
def data(cache_dir):
    if not HAS_QM9:
        pytest.skip('needs qm9pack (pip install -e ".[qm9]")')
    return qd.load(max_molecules=600)


@pytest.fixture(scope="module")
def problem(data):
    return mtl.problems.get("qm9", batch_size=24, **SLICE)


def test_without_qm9pack_the_error_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r'pip install -e "\.\[qm9\]"'):
        mtl.problems.get("qm9", **SLICE)


@needs_qm9
def test_targets_units_and_atomization_energies(data):
    assert data.index[0] == 1 and np.all(np.diff(data.index) > 0)
    for qm9_index, atoms in ((1, {"C": 1, "H": 4}), (3, {"O": 1, "H": 2})):
        row = int(np.flatnonzero(data.index == qm9_index)[0])
        raw = RAW[qm9_index]
        expect = [raw[0], raw[1], raw[2] * HAR2EV, raw[3] * HAR2EV, raw[4], raw[5] * HAR2EV]
        for k in range(4):  # atomization energies: total minus the isolated atoms, in eV
            ref = sum(n * REF[e][k] for e, n in atoms.items())
            expect.append((raw[6 + k] - ref) * HAR2EV)
        expect.append(raw[10])
        np.testing.assert_allclose(data.targets[row], expect, rtol=1e-12, atol=1e-12)
    # CH4's atomization energy at 0 K, by hand: (−40.47893 + 37.846772 + 4 · 0.500273) Ha.
    np.testing.assert_allclose(data.targets[0, qd.TARGETS.index("U0")], -0.631066 * HAR2EV)
    # PyG's atomref in eV for U0 (targets 7/12) is this table times HAR2EV.
    np.testing.assert_allclose(qd.ATOMREF["U0"] * HAR2EV, [-13.61312172, -1029.86312267,
        -1485.30251237, -2042.61123593, -2713.48485589], rtol=1e-8)  # fmt: skip
    assert set(Q.REPORT_UNITS.values()) == {"D", "a0^3", "meV", "a0^2", "cal/(mol K)"}


@needs_qm9
def test_bonds_and_node_features_from_the_geometry(data):
    t = data.atom_type

    def bonds_of(qm9_index):
        r = int(np.flatnonzero(data.index == qm9_index)[0])
        n = data.num_atoms[r]
        pairs = {}
        for i in range(n):
            for j in range(i + 1, n):
                if data.bonds[r, i, j]:
                    key = tuple(sorted((qd.ELEMENTS[t[r, i]], qd.ELEMENTS[t[r, j]])))
                    pairs.setdefault(key, []).append(int(data.bonds[r, i, j]))
        return {k: sorted(v) for k, v in pairs.items()}

    assert bonds_of(1) == {("C", "H"): [1, 1, 1, 1]}  # CH4
    assert bonds_of(4) == {("C", "C"): [3], ("C", "H"): [1, 1]}  # C#C
    assert bonds_of(5) == {("C", "N"): [3], ("C", "H"): [1]}  # C#N
    assert bonds_of(6) == {("C", "O"): [2], ("C", "H"): [1, 1]}  # C=O
    assert bonds_of(7) == {("C", "C"): [1], ("C", "H"): [1] * 6}  # CC
    # Every hydrogen of the slice has exactly one bond.
    h = t == 0
    assert np.all((data.bonds > 0).sum(2)[h] == 1)
    x = data.node_features()
    assert x.shape == (600, 29, 11)
    real = t >= 0
    np.testing.assert_array_equal(x[..., :5].sum(-1), real)
    np.testing.assert_array_equal(x[..., 5], np.where(real, qd.ATOMIC_NUMBER[t], 0))
    assert not np.any(x[..., 6:10])  # aromatic, sp, sp2, sp3: zero as in PyG
    np.testing.assert_array_equal(x[0, :5, 10], [4, 0, 0, 0, 0])  # CH4: C carries 4 H
    assert not np.any(x[~real])


@needs_qm9
def test_cache_is_keyed_checked_and_rebuilt_atomically(tmp_path, monkeypatch, data):
    folder = str(tmp_path)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not ours")
    first = qd.load(max_molecules=40, folder=folder)
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".npz"]
    key = qd.cache_key(qd.source_folder(), 40)
    assert path.name == f"qm9-first40-{key[:16]}.npz"
    np.testing.assert_array_equal(first.targets, data.targets[:40])
    calls = []
    real_read = qd.read_source
    monkeypatch.setattr(qd, "read_source", lambda *a, **k: calls.append(1) or real_read(*a, **k))
    again = qd.load(max_molecules=40, folder=folder)
    assert calls == []  # served from the cache
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # A truncated file is rebuilt, not used.
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    rebuilt = qd.load(max_molecules=40, folder=folder)
    assert calls == [1]
    np.testing.assert_array_equal(rebuilt.bonds, first.bonds)
    assert path.read_bytes() == blob
    # A readable file under the right name but with another key (stale) is rebuilt too.
    np.savez(path, key=np.asarray("0" * 64), **qd._compact(first))
    qd.load(max_molecules=40, folder=folder)
    assert calls == [1, 1] and path.read_bytes() == blob
    # Only the cache file and the foreign file remain (no temporary files); ours untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "notes.txt"])
    assert foreign.read_text() == "not ours"
    # The key depends on the slice and on the source.
    assert qd.cache_key(qd.source_folder(), 41) != key


def test_splits_follow_the_shuffle_then_slice_protocol():
    s = qd.split_indices(1000, 3, num_test=100, num_validation=150)
    perm = np.random.default_rng(3).permutation(1000)
    np.testing.assert_array_equal(s["test"], perm[:100])
    np.testing.assert_array_equal(s["validation"], perm[100:250])
    np.testing.assert_array_equal(s["train"], perm[250:])
    allidx = np.concatenate([s["test"], s["validation"], s["train"]])
    assert len(np.unique(allidx)) == 1000
    small = qd.split_indices(1000, 3, num_test=100, num_validation=150, num_train=300)
    np.testing.assert_array_equal(small["train"], s["train"][:300])
    other = qd.split_indices(1000, 4, num_test=100, num_validation=150)
    assert not np.array_equal(other["test"], s["test"])
    with pytest.raises(ValueError, match="cannot hold"):
        qd.split_indices(1000, 0, num_test=500, num_validation=500)
    # The literature's sizes on the bundled molecule count.
    full = qd.split_indices(130_831, 0)
    assert [len(full[k]) for k in ("train", "validation", "test")] == [110_831, 10_000, 10_000]


def test_standardisation_uses_training_statistics():
    rng = np.random.default_rng(0)
    y = rng.normal([3.0, -200.0], [0.1, 40.0], size=(50, 2))
    sc = qd.Scaler.fit(y[:30])
    np.testing.assert_allclose(sc.mean, y[:30].mean(0))
    np.testing.assert_allclose(sc.std, np.sqrt(((y[:30] - y[:30].mean(0)) ** 2).sum(0) / 29))
    z = sc.transform(y[:30])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0)
    np.testing.assert_allclose(sc.inverse(sc.transform(y)), y)


def test_segment_softmax_and_mean_ignore_the_padding():
    logits = jnp.array([1.0, 2.0, 3.0, 50.0, 0.5, -1.0])
    seg = jnp.array([0, 0, 0, 0, 1, 1])
    mask = jnp.array([True, True, True, False, True, True])
    a = mpnn.segment_softmax(logits, seg, mask, 3)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(a[:3], e / e.sum(), rtol=1e-6)
    assert a[3] == 0.0
    np.testing.assert_allclose(a[4:], np.exp([0.5, -1.0]) / np.exp([0.5, -1.0]).sum(), rtol=1e-6)
    m = mpnn.segment_mean(jnp.arange(12.0).reshape(6, 2), seg, mask, 3)
    np.testing.assert_allclose(m, [[2.0, 3.0], [9.0, 10.0], [0.0, 0.0]])


# One node/edge budget that holds any SLOTS molecules: the tests' forward passes share it
# (one compilation).
SLOTS = 7
BUDGET = {"max_nodes": SLOTS * qd.MAX_ATOMS, "max_edges": SLOTS * qd.MAX_ATOMS * (qd.MAX_ATOMS - 1)}


@pytest.fixture(scope="module")
def tools(problem, data):
    """Raw (unscaled) device arrays, a jitted batch builder and a jitted forward pass."""
    mols = Q.device_arrays(data, qd.Scaler(np.zeros(11), np.ones(11)))
    build = jax.jit(Q.build_batch, static_argnames=("max_nodes", "max_edges"))
    fwd = jax.jit(lambda params, graph: to_nnx(problem.model, params)(graph)[..., 0])
    return mols, build, fwd


def _slots(rows):
    """``rows`` in the first slots of SLOTS, the others empty."""
    idx = np.zeros(SLOTS, np.int32)
    idx[: len(rows)] = rows
    return jnp.asarray(idx), jnp.arange(SLOTS) < len(rows)


@needs_qm9
def test_batches_pack_complete_graphs_and_padding_changes_no_output(problem, data, tools):
    mols, build, fwd = tools
    rows = [0, 3, 17, 250, 599]  # CH4, C#C, …
    idx = jnp.asarray(rows)
    n = data.num_atoms[rows]
    nodes, edges = int(n.sum()), int((n * (n - 1)).sum())
    tight = build(mols, idx, max_nodes=nodes, max_edges=edges)
    g = tight["graph"]
    assert bool(g.node_mask.all()) and bool(g.edge_mask.all())
    src, dst = np.asarray(g.edge_src), np.asarray(g.edge_dst)
    gid = np.asarray(g.node_graph)
    assert np.all(src != dst) and np.all(gid[src] == gid[dst])
    assert len(set(zip(src.tolist(), dst.tolist(), strict=True))) == edges
    # Edge features: the bond table's one-hot and the distance, from the source arrays.
    offs = np.concatenate([[0], np.cumsum(n)])
    for e in (0, 7, edges - 1):
        k = gid[src[e]]
        i, j = src[e] - offs[k], dst[e] - offs[k]
        row = rows[k]
        d = np.linalg.norm(data.positions[row, i] - data.positions[row, j])
        np.testing.assert_allclose(g.edge_attr[e, 4], d, rtol=1e-6)
        b = data.bonds[row, i, j]
        np.testing.assert_array_equal(g.edge_attr[e, :4], [b == 1, b == 2, b == 3, 0])
    ref = np.asarray(fwd(problem.params, g))  # (T, 5)
    # Many more node and edge slots, and empty graph slots, around the same molecules.
    loose = build(mols, *_slots(rows), **BUDGET)
    assert int(loose["graph"].edge_mask.sum()) == edges
    np.testing.assert_allclose(
        fwd(problem.params, loose["graph"])[:, :5], ref, rtol=1e-5, atol=1e-6
    )
    # Each molecule alone gives its output in the batch.
    for k, r in enumerate(rows):
        one = build(mols, *_slots([r]), **BUDGET)
        np.testing.assert_allclose(
            fwd(problem.params, one["graph"])[:, 0], ref[:, k], rtol=1e-5, atol=1e-6
        )
    # The losses ignore empty slots whatever the predictions there.
    pred = jnp.asarray(np.random.default_rng(0).normal(size=(11, SLOTS, 1)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(SLOTS, 11)), jnp.float32)
    mask = jnp.arange(SLOTS) < 5
    expect = ((np.asarray(pred)[:, :5, 0] - np.asarray(y)[:5].T) ** 2).mean(1)
    np.testing.assert_allclose(Q._task_losses(pred, y, mask), expect, rtol=1e-6)
    garbage = pred.at[:, 5:].set(1e6)
    np.testing.assert_allclose(Q._task_losses(garbage, y, mask), expect, rtol=1e-6)


@needs_qm9
def test_sampler_redraws_batches_over_budget(data, tools):
    mols, _, _ = tools
    pool = np.arange(600)
    n = data.num_atoms.astype(np.int64)
    # A budget that 4 molecules of the pool fit only when they are small: most draws are redrawn.
    max_nodes, max_edges = 4 * 10, 4 * 10 * 9
    sample = jax.jit(Q.make_sampler(mols, pool, 4, max_nodes, max_edges))
    counts = []
    for i in range(30):
        g = sample(jax.random.key(i))["graph"]
        per_graph = np.bincount(np.asarray(g.node_graph)[np.asarray(g.node_mask)], minlength=4)
        assert per_graph.sum() <= max_nodes and (per_graph * (per_graph - 1)).sum() <= max_edges
        assert int(g.edge_mask.sum()) == int((per_graph * (per_graph - 1)).sum())
        counts.append(per_graph)
    # Without the budget a batch is this large on average: the redraws did happen.
    assert 4 * n.mean() > max_nodes and np.mean(np.sum(counts, 1)) <= max_nodes
    lo, hi = Q.sampling_budget(n, 120)
    assert lo >= 120 * n.mean() and lo <= 120 * n.max()
    assert hi >= 120 * (n * (n - 1)).mean() and hi <= 120 * (n * (n - 1)).max()


@needs_qm9
def test_epoch_sampler_sees_every_molecule_once_per_epoch(data, tools):
    mols, _, _ = tools
    pool = np.arange(100, 150)  # 50 molecules, batches of 8: 7 steps per epoch, the last 2 real
    n = data.num_atoms.astype(np.int64)
    budget = (8 * qd.MAX_ATOMS, 8 * qd.MAX_ATOMS * (qd.MAX_ATOMS - 1))
    sample_at = jax.jit(Q.make_epoch_sampler(mols, pool, 8, *budget))
    key = jax.random.key(3)

    def molecules(step):
        """The molecules of a step's batch (each identified by its atom count and targets)."""
        b = sample_at(key, jnp.int32(step))
        mask = np.asarray(b["graph"].graph_mask)
        return [tuple(r) for r in np.asarray(b["y"])[mask]], b["graph"]

    def identity(i):
        return tuple(np.asarray(mols["y"][i]))

    epochs = []
    for e in range(2):
        seen = []
        for s in range(7):
            rows, g = molecules(7 * e + s)
            assert len(rows) == (8 if s < 6 else 2)
            seen += rows
            per = np.bincount(np.asarray(g.node_graph)[np.asarray(g.node_mask)], minlength=8)
            assert int(g.edge_mask.sum()) == int((per * (per - 1)).sum())
        assert sorted(seen) == sorted(identity(i) for i in pool)  # each molecule once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh shuffle per epoch
    assert molecules(3)[0] == molecules(3)[0]  # a function of (key, step) only
    # A budget too small for a batch masks the molecules past it instead of dropping atoms of
    # a molecule still counted as present.
    tight = jax.jit(Q.make_epoch_sampler(mols, pool, 8, 40, 40 * 9))
    b = tight(key, jnp.int32(0))
    g, mask = b["graph"], np.asarray(b["graph"].graph_mask)
    per = np.bincount(np.asarray(g.node_graph)[np.asarray(g.node_mask)], minlength=8)
    atoms_of = {identity(i): n[i] for i in pool}
    kept = [atoms_of[tuple(r)] for r in np.asarray(b["y"])[mask]]
    assert 0 < mask.sum() < 8 and np.all(per[mask] == kept) and np.all(per[~mask] == 0)
    assert per.sum() <= 40 and (per * (per - 1)).sum() <= 40 * 9


@needs_qm9
def test_problem_shapes_split_metrics_and_jit(problem, data, tools):
    p = problem
    assert p.task_names == qd.TARGETS and p.metrics["U0"] == ("mae", False)
    assert p.info["molecules"] == {"test": 100, "validation": 100, "train": 400}
    splits = qd.split_indices(600, 0, num_test=100, num_validation=100)
    np.testing.assert_allclose(p.info["target_mean"], data.targets[splits["train"]].mean(0))
    assert p.steps_per_epoch == -(-400 // 24) and p.steps == 300 * p.steps_per_epoch
    batch = jax.jit(p.sample)(jax.random.key(0))
    assert batch["y"].shape == (24, 11) and batch["graph"].graph_mask.shape == (24,)
    # Training shuffles per epoch (``sample_at``), in the same batch shapes as ``sample``.
    epoch_batch = jax.jit(p.sample_step)(jax.random.key(0), jnp.int32(p.steps_per_epoch - 1))
    assert jax.tree_util.tree_map(jnp.shape, epoch_batch) == jax.tree_util.tree_map(
        jnp.shape, batch
    )
    assert int(epoch_batch["graph"].graph_mask.sum()) == 400 - 24 * (p.steps_per_epoch - 1)
    budget = p.info["batch_budget"]
    g = batch["graph"]
    assert g.nodes.shape == (budget["max_nodes"], 11)
    assert g.edge_attr.shape == (budget["max_edges"], Q.EDGE_FEATURES)
    per_graph = np.bincount(np.asarray(g.node_graph)[np.asarray(g.node_mask)], minlength=24)
    assert np.all(per_graph >= 3)  # every slot holds a molecule (QM9's smallest has 3 atoms)
    assert int(g.edge_mask.sum()) == int((per_graph * (per_graph - 1)).sum())
    # Shared = the MPNN encoder up to ReLU(W₁ Set2Set(h)); task-specific = 11 linear heads.
    (head,) = [x for x in jax.tree_util.tree_leaves(p.params.specific) if x.ndim == 3]
    assert head.shape == (11, Q.MODELS["mpnn-light"]["hidden"], 1)
    assert p.model.has_features and p.model.last_shared == "encoder/lin1"
    # MAE in the reported units, recomputed from the model's predictions in the original units.
    ev = p.evaluate_split(p.params, "validation")
    assert ev["mae"].shape == ev["loss"].shape == (11,)
    mols, build, fwd = tools
    std, mean = np.asarray(p.info["target_std"]), np.asarray(p.info["target_mean"])
    val = splits["validation"]
    pred = []
    for k in range(0, len(val), SLOTS):
        chunk = build(mols, *_slots(val[k : k + SLOTS]), **BUDGET)
        pred.append(np.asarray(fwd(p.params, chunk["graph"]))[:, : len(val[k : k + SLOTS])])
    pred = np.concatenate(pred, axis=1).T * std + mean
    scale = np.array([Q.REPORT_SCALE[t] for t in qd.TARGETS])
    mae = np.abs(pred - data.targets[val]).mean(0) * scale
    np.testing.assert_allclose(ev["mae"], mae, rtol=2e-4)
    with pytest.raises(ValueError, match="split"):
        p.evaluate_split(p.params, "holdout")
    # Unscaled targets (the FAMO code's default): batches carry the targets in their units.
    raw = mtl.problems.get("qm9", batch_size=24, standardize=False, **SLICE)
    y = np.asarray(jax.jit(raw.sample)(jax.random.key(0))["y"])
    assert raw.info["target_mean"] == p.info["target_mean"]
    u0, cv = y[:, qd.TARGETS.index("U0")], y[:, qd.TARGETS.index("cv")]
    assert np.all(u0 < -5.0) and np.all(cv > 5.0)  # eV and cal/(mol K), not standardised


@needs_qm9
def test_data_parallel_runs_are_refused_naming_the_packed_graphs(cache_dir):
    from mtljax._src.runner import run_training

    args = {"max_molecules": 600, "num_test": 100, "num_validation": 100}
    with pytest.raises(ValueError, match="trains on one device only: its batches pack"):
        run_training("qm9", "ew", steps=1, devices=2, progress=False, problem_args=args)


@needs_qm9
def test_short_training_lowers_every_target_loss(problem):
    p = problem
    method, opt = mtl.methods.ew(), optax.adam(3e-3)
    step = mtl.make_train_step(p.model, method, opt)
    state = mtl.init_train_state(p.model, p.params, method, opt, jax.random.key(0))
    before = np.asarray(p.evaluate_split(p.params, "train")["loss"])
    sample = jax.jit(p.sample_step)  # the training order: a fresh shuffle per epoch
    for i in range(150):
        state, _ = step(state, sample(jax.random.key(0), jnp.int32(i)))
    after = np.asarray(p.evaluate_split(state.params, "train")["loss"])
    assert np.all(after < 0.9 * before), (before, after)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _mpnn_reference(p, x, pos, bonds, steps, s2s_steps):
    """float64 MPNN forward of one molecule from the definitions (Gilmer et al. 2017: edge
    network with mean aggregation and root weight, GRU, Set2Set, ReLU(W₁ ·))."""
    lin = lambda v, layer: v @ layer["kernel"] + layer.get("bias", 0.0)
    relu = lambda v: np.maximum(v, 0.0)
    n, d = x.shape[0], p["lin0"]["kernel"].shape[1]
    h = relu(lin(x, p["lin0"]))
    w = {}
    for i in range(n):
        for j in range(n):
            if i != j:
                e = np.concatenate([[bonds[i, j] == k for k in (1, 2, 3, 4)], [0.0]])
                e[4] = np.linalg.norm(pos[i] - pos[j])
                w[j, i] = lin(relu(lin(e, p["conv"]["edge_in"])), p["conv"]["edge_out"])
                w[j, i] = w[j, i].reshape(d, d)
    for _ in range(steps):
        agg = np.stack([np.mean([h[j] @ w[j, i] for j in range(n) if j != i], 0) for i in range(n)])
        m = relu(lin(h, p["conv"]["root"]) + agg)
        xr, xz, xn = np.split(lin(m, p["gru"]["dense_i"]), 3, axis=-1)
        hr, hz, hn = np.split(lin(h, p["gru"]["dense_h"]), 3, axis=-1)
        r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
        h = (1 - z) * np.tanh(xn + r * hn) + z * h
    s = p["set2set"]["lstm"]
    c, q, q_star = np.zeros(d), np.zeros(d), np.zeros(2 * d)
    for _ in range(s2s_steps):
        i_ = _sigmoid(lin(q_star, s["ii"]) + lin(q, s["hi"]))
        f_ = _sigmoid(lin(q_star, s["if_"]) + lin(q, s["hf"]))
        g_ = np.tanh(lin(q_star, s["ig"]) + lin(q, s["hg"]))
        o_ = _sigmoid(lin(q_star, s["io"]) + lin(q, s["ho"]))
        c = f_ * c + i_ * g_
        q = o_ * np.tanh(c)
        a = np.exp(h @ q - (h @ q).max())
        a /= a.sum()
        q_star = np.concatenate([q, a @ h])
    return relu(lin(q_star, p["lin1"]))


@needs_qm9
def test_mpnn_matches_a_float64_reference(problem, data, tools):
    mols, build, fwd = tools
    leaves, treedef = jax.tree_util.tree_flatten(problem.params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    noisy = [0.4 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    params = jax.tree_util.tree_unflatten(treedef, noisy)  # biases off zero too
    state = nnx.state(to_nnx(problem.model, params), nnx.Param)
    pure = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(state))
    enc = pure["encoder"]
    rows = [0, 5, 321]
    out = np.asarray(fwd(params, build(mols, *_slots(rows), **BUDGET)["graph"]))  # (T, SLOTS)
    head_w, head_b = pure["heads"]["kernel"][..., 0], pure["heads"]["bias"][..., 0]
    cfg = Q.MODELS["mpnn-light"]
    x = data.node_features()
    for k, r in enumerate(rows):
        n = data.num_atoms[r]
        ref = _mpnn_reference(
            enc, x[r, :n], data.positions[r, :n], data.bonds[r], cfg["steps"], cfg["set2set_steps"]
        )
        np.testing.assert_allclose(out[:, k], head_w @ ref + head_b, rtol=1e-4, atol=1e-5)


def test_edge_messages_gradient_matches_differentiating_through_the_edge_matrices():
    """The custom VJP of ``edge_messages`` (no cotangent of the per-edge matrices) against
    autodiff of its definition ``m_e = x_eᵀ reshape(h_e K + b)``, in float64, for one
    cotangent and for a vmapped batch of cotangents (the per-task VJPs)."""
    with jax.enable_x64(True):
        e, k, d_in, d_out = 7, 3, 4, 5
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (e, d_in), jnp.float64)
        h = jax.random.normal(ks[1], (e, k), jnp.float64)
        kern = jax.random.normal(ks[2], (k, d_in, d_out), jnp.float64)
        bias = jax.random.normal(ks[3], (d_in, d_out), jnp.float64)
        cots = jax.random.normal(ks[4], (3, e, d_out), jnp.float64)

        def reference(x, h, kern, bias):
            w = (h @ kern.reshape(k, -1) + bias.reshape(-1)).reshape(e, d_in, d_out)
            return jnp.einsum("ei,eio->eo", x, w), w

        def custom(x, h, kern, bias):
            w = jax.lax.stop_gradient(reference(x, h, kern, bias)[1])
            return mpnn.edge_messages(x, w, h, kern, bias)

        out, vjp = jax.vjp(custom, x, h, kern, bias)
        ref_out, ref_vjp = jax.vjp(lambda *a: reference(*a)[0], x, h, kern, bias)
        np.testing.assert_array_equal(out, ref_out)
        for got, want in zip(jax.vmap(vjp)(cots), jax.vmap(ref_vjp)(cots), strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_edge_network_conv_same_outputs_and_gradients_with_and_without_shared_vjp():
    n, src, dst = 4, [], []
    for i in range(n):
        for j in range(n):
            if i != j:
                src.append(i)
                dst.append(j)
    e = len(src)
    ks = jax.random.split(jax.random.key(1), 2)
    graph = mpnn.GraphBatch(
        nodes=jax.random.normal(ks[0], (n, 6)),
        node_graph=jnp.zeros((n,), jnp.int32),
        node_mask=jnp.ones((n,), bool),
        edge_src=jnp.asarray(src, jnp.int32),
        edge_dst=jnp.asarray(dst, jnp.int32),
        edge_attr=jax.random.normal(ks[1], (e, 5)),
        edge_mask=jnp.ones((e,), bool),
        graph_mask=jnp.ones((1,), bool),
    )
    outs, grads = [], []
    for shared in (True, False):
        conv = mpnn.EdgeNetworkConv(6, 6, 5, 3, shared_vjp=shared, rngs=nnx.Rngs(0))
        gdef, state = nnx.split(conv)

        def f(state, x, gdef=gdef):
            c = nnx.merge(gdef, state)
            return c(x, c.edge_weights(graph.edge_attr), graph)

        out, vjp = jax.vjp(f, state, graph.nodes)
        cots = jax.random.normal(jax.random.key(2), (3, *out.shape))
        outs.append(out)
        grads.append(jax.tree_util.tree_leaves(jax.vmap(vjp)(cots)))
    np.testing.assert_array_equal(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
