"""QM9 data: reading the bundled ``qm9pack`` CSV files, preprocessing, cache, splits, scaling.

QM9 (Ramakrishnan, Dral, Rupp & von Lilienfeld, "Quantum chemistry structures and properties
of 134 kilo molecules", Scientific Data 1, 140022, 2014) holds 133 885 small organic molecules
(up to 9 heavy atoms C, N, O, F; up to 29 atoms with H) with DFT (B3LYP/6-31G(2df,p))
geometries and properties. The ``qm9pack`` wheel (optional extra ``mtljax[qm9]``) bundles
130 831 of them as CSV files: the 3 054 molecules whose geometry optimisation failed the
authors' consistency check are left out, as PyTorch Geometric's ``QM9`` dataset does, so the
molecule count is the one the multi-task papers use.

Targets. The 11 regression targets of the multi-task literature are PyTorch Geometric's QM9
targets ``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]`` (``target_idx`` in the Nash-MTL code,
``experiments/quantum_chemistry/utils.py`` of github.com/AvivNavon/nash-mtl; the gap, target 4,
is left out; the four energies are the atomization versions, targets 12–15), in PyG's units
(``torch_geometric/datasets/qm9.py``: Hartree × ``HAR2EV``):

======  ==========================  ==============  ====================================
name    property                    unit            from the CSV column
======  ==========================  ==============  ====================================
mu      dipole moment μ             D               ``Dipole_debye``
alpha   isotropic polarizability α  a₀³             ``Polarizability_bohr3``
homo    ε_HOMO                      eV              ``HOMO_au`` × HAR2EV
lumo    ε_LUMO                      eV              ``LUMO_au`` × HAR2EV
r2      electronic extent ⟨R²⟩      a₀²             ``R2_bohr2``
zpve    zero-point vib. energy      eV              ``ZPVE_au`` × HAR2EV
U0      atomization energy at 0 K   eV              (``InternalEnergy_0K_au`` − Σ ref) × HAR2EV
U       atomization energy, 298 K   eV              (``InternalEnergy_298K_au`` − Σ ref) × …
H       atomization enthalpy, 298K  eV              (``Enthalphy_298K_au`` − Σ ref) × …
G       atomization free energy     eV              (``GibbsFreeEnergy_298K_au`` − Σ ref) × …
cv      heat capacity c_v, 298 K    cal/(mol K)     ``Heatcapacity_Cv_cal_mol_K``
======  ==========================  ==============  ====================================

``Σ ref`` sums, over the molecule's atoms, the isolated atoms' energies of the dataset's
``atomref`` table (Ramakrishnan et al. 2014, figshare file ``atomref.txt``; :data:`ATOMREF`),
and ``HAR2EV = 27.211386246`` eV per Hartree (CODATA 2018, PyG's constant). PyG takes the
atomization energies from the MoleculeNet CSV, in kcal/mol, times ``KCALMOL2EV =
0.04336414``; the two routes agree to a relative 1e-6.

Graph. PyG's node features (Gilmer et al. 2017, "Neural Message Passing for Quantum
Chemistry") are 11 per atom: one-hot type (H, C, N, O, F), atomic number, aromatic, sp, sp2,
sp3, number of bonded hydrogens; its bonds are the SDF file's, one-hot (single, double, triple,
aromatic). PyG reads the SDF with ``sanitize=False``, so its aromatic, sp, sp2 and sp3 features
and its aromatic bond type are zero for every atom and bond (PyG issues #2163 and #8370); the
networks of the multi-task papers were therefore trained with the other 7 node features
carrying all the information. The bundled data has geometries but no bond table, so here:

* bonds are inferred from the geometry: atoms ``i, j`` are bonded when their distance is below
  ``1.2 (rᵢ + rⱼ)`` with the covalent radii of Cordero et al. 2008 (:data:`COVALENT_RADIUS`);
* the bond order is read from the length with per-pair thresholds between the typical single,
  double and triple bond lengths (:data:`DOUBLE_BELOW`, :data:`TRIPLE_BELOW`); aromatic and
  conjugated bonds, which the SDF file writes in one Kekulé form, get the class their length
  says (benzene's 1.39 Å bonds are single here), and no bond is aromatic (as in PyG);
* the aromatic, sp, sp2 and sp3 features are zero (as in PyG), the number of hydrogens counts
  the inferred bonds to H atoms.

Cache. :func:`load` reads the CSV files once (15–35 s on two CPU cores) into a ``.npz`` of
about 60 MB (atoms unpadded, bonds as a list) in the cache folder (``$MTLJAX_CACHE``, else
``$XDG_CACHE_HOME/mtljax``, else ``~/.cache/mtljax``), named by a SHA-256 of the source files
and of this module's code, and logs how long that took; a file that does not load, does not
carry its key or fails the consistency checks is rebuilt (written to a temporary file and
renamed atomically), never used. Later loads take about a second.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from typing import NamedTuple

import numpy as np

log = logging.getLogger("mtljax.qm9")

TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
TARGET_UNITS = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "eV",
    "lumo": "eV",
    "r2": "a0^2",
    "zpve": "eV",
    "U0": "eV",
    "U": "eV",
    "H": "eV",
    "G": "eV",
    "cv": "cal/(mol K)",
}
HAR2EV = 27.211386246
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER = np.array([1, 6, 7, 8, 9], np.int8)
MAX_ATOMS = 29
NUM_NODE_FEATURES = 11
NUM_BOND_TYPES = 4  # single, double, triple, aromatic (the last never set, as in PyG)

# Isolated-atom energies in Hartree (QM9 atomref table; rows H, C, N, O, F) for U₀, U(298.15 K),
# H(298.15 K), G(298.15 K).
ATOMREF = {
    "U0": np.array([-0.500273, -37.846772, -54.583861, -75.064579, -99.718730]),
    "U": np.array([-0.498857, -37.845355, -54.582445, -75.063162, -99.717314]),
    "H": np.array([-0.497912, -37.844411, -54.581501, -75.062219, -99.716370]),
    "G": np.array([-0.510927, -37.861317, -54.598897, -75.079532, -99.733544]),
}
ENERGY_COLUMN = {
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
}
PLAIN_COLUMN = {
    "mu": ("Dipole_debye", 1.0),
    "alpha": ("Polarizability_bohr3", 1.0),
    "homo": ("HOMO_au", HAR2EV),
    "lumo": ("LUMO_au", HAR2EV),
    "r2": ("R2_bohr2", 1.0),
    "zpve": ("ZPVE_au", HAR2EV),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),
}

# Covalent radii in Å (Cordero et al., "Covalent radii revisited", Dalton Trans. 2008; C sp³).
COVALENT_RADIUS = np.array([0.31, 0.76, 0.71, 0.66, 0.57])
BOND_TOLERANCE = 1.2
# Bond-order thresholds in Å between typical single/double and double/triple lengths
# (C–C 1.54/1.34/1.20, C–N 1.47/1.28/1.16, C–O 1.43/1.21/1.13, N–N 1.45/1.25/1.10,
# N–O 1.40/1.21, O–O 1.48/1.21; Allen et al., J. Chem. Soc. Perkin Trans. 2, 1987). A bond
# shorter than DOUBLE_BELOW is double, shorter than TRIPLE_BELOW triple; pairs not listed
# (any bond to H or F) are single.
DOUBLE_BELOW = np.zeros((5, 5))
TRIPLE_BELOW = np.zeros((5, 5))
for (_a, _b), _d, _t in (
    ((1, 1), 1.38, 1.26),
    ((1, 2), 1.315, 1.20),
    ((1, 3), 1.30, 1.16),
    ((2, 2), 1.32, 1.17),
    ((2, 3), 1.30, 0.0),
    ((3, 3), 1.35, 0.0),
):
    DOUBLE_BELOW[_a, _b] = DOUBLE_BELOW[_b, _a] = _d
    TRIPLE_BELOW[_a, _b] = TRIPLE_BELOW[_b, _a] = _t

SOURCE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
INSTALL_HINT = 'pip install -e ".[qm9]"'


class QM9Data(NamedTuple):
    """Preprocessed QM9, molecules sorted by their QM9 index.

    ``M`` molecules; atom arrays are padded to :data:`MAX_ATOMS`.

    Attributes:
      index: i32[M], the QM9 (GDB-9) index, 1 … 133 885.
      num_atoms: i32[M].
      atom_type: i8[M, 29], 0…4 for H, C, N, O, F; −1 past ``num_atoms``.
      positions: f32[M, 29, 3] in Å (0 past ``num_atoms``).
      bonds: i8[M, 29, 29], 0 for no bond, 1/2/3 for single/double/triple (symmetric).
      targets: f64[M, 11] in :data:`TARGET_UNITS`, columns :data:`TARGETS`.
    """

    index: np.ndarray
    num_atoms: np.ndarray
    atom_type: np.ndarray
    positions: np.ndarray
    bonds: np.ndarray
    targets: np.ndarray

    def take(self, idx: np.ndarray) -> QM9Data:
        return QM9Data(*(a[idx] for a in self))

    def node_features(self) -> np.ndarray:
        """f32[M, 29, 11]: PyG's QM9 node features (see the module docstring); 0 for padding."""
        m = len(self.index)
        t = self.atom_type.astype(np.int64)
        real = t >= 0
        x = np.zeros((m, MAX_ATOMS, NUM_NODE_FEATURES), np.float32)
        x[..., :5] = (t[..., None] == np.arange(5)) & real[..., None]
        x[..., 5] = np.where(real, ATOMIC_NUMBER[np.maximum(t, 0)], 0)
        # columns 6..9: aromatic, sp, sp2, sp3 (zero, as in PyG)
        is_h = (t == 0).astype(np.float32)
        x[..., 10] = np.einsum("mij,mj->mi", (self.bonds > 0).astype(np.float32), is_h)
        return x


# ----------------------------------------------------------------------------------------------
# Reading the source


def source_folder() -> str:
    """The folder of the CSV files bundled by ``qm9pack`` (the package is not imported)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the 'qm9' problem needs the QM9 data of the `qm9pack` package; install it with "
            f"`{INSTALL_HINT}` (or `pip install qm9pack`)"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [f for f in SOURCE_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ImportError(
            f"qm9pack is installed but lacks {missing} in {folder}; reinstall it with "
            f"`{INSTALL_HINT}`"
        )
    return folder


def _parse_list(text: str) -> list[str]:
    return [s for s in text.replace("[", "").replace("]", "").replace("'", "").split(",") if s]


def infer_bonds(atom_type: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Bond classes i8[..., n, n] (0 none, 1 single, 2 double, 3 triple) from the geometry.

    ``atom_type``: i[..., n] (−1 for padding); ``positions``: f[..., n, 3] in Å. Bonded when
    ``d < 1.2 (rᵢ + rⱼ)`` (:data:`COVALENT_RADIUS`); the order from :data:`DOUBLE_BELOW` and
    :data:`TRIPLE_BELOW`.
    """
    t = np.asarray(atom_type).astype(np.int64)
    real = t >= 0
    tc = np.maximum(t, 0)
    p = np.asarray(positions, np.float64)
    d = np.sqrt(np.sum((p[..., :, None, :] - p[..., None, :, :]) ** 2, axis=-1))
    r = COVALENT_RADIUS[tc]
    n = t.shape[-1]
    pair = real[..., :, None] & real[..., None, :] & ~np.eye(n, dtype=bool)
    bonded = pair & (d < BOND_TOLERANCE * (r[..., :, None] + r[..., None, :]))
    ti, tj = tc[..., :, None], tc[..., None, :]
    order = np.where(d < DOUBLE_BELOW[ti, tj], 2, 1)
    order = np.where(d < TRIPLE_BELOW[ti, tj], 3, order)
    return np.where(bonded, order, 0).astype(np.int8)


def read_source(folder: str | None = None, *, max_molecules: int | None = None) -> QM9Data:
    """Parses the ``qm9pack`` CSV files into :class:`QM9Data` (sorted by QM9 index).

    ``max_molecules`` keeps the first molecules of the files (the lowest QM9 indices), for
    tests and quick looks.
    """
    folder = folder or source_folder()
    index, num_atoms, types, pos, cols = [], [], [], [], []
    names = [c for c, _ in PLAIN_COLUMN.values()] + list(ENERGY_COLUMN.values())
    code = {e: i for i, e in enumerate(ELEMENTS)}
    csv.field_size_limit(1 << 24)
    done = False
    for fname in SOURCE_FILES:
        with open(os.path.join(folder, fname), newline="") as f:
            rows = csv.reader(f)
            header = next(rows)
            where = {c: i for i, c in enumerate(header)}
            need = ["Index", "N_atoms", "Elements", "XYZ_Ang", *names]
            lacking = [c for c in need if c not in where]
            if lacking:
                raise ValueError(f"qm9: {fname} lacks the columns {lacking}")
            ci = [where[c] for c in names]
            for row in rows:
                n = int(row[where["N_atoms"]])
                el = _parse_list(row[where["Elements"]])
                xyz = np.array(_parse_list(row[where["XYZ_Ang"]]), np.float64)
                if len(el) != n or xyz.size != 3 * n or n > MAX_ATOMS:
                    raise ValueError(f"qm9: malformed molecule {row[where['Index']]} in {fname}")
                index.append(int(row[where["Index"]]))
                num_atoms.append(n)
                t = np.full(MAX_ATOMS, -1, np.int8)
                t[:n] = [code[e] for e in el]
                p = np.zeros((MAX_ATOMS, 3), np.float32)
                p[:n] = xyz.reshape(n, 3)
                types.append(t)
                pos.append(p)
                cols.append([float(row[i]) for i in ci])
                if max_molecules is not None and len(index) >= max_molecules:
                    done = True
                    break
        if done:
            break
    order = np.argsort(np.asarray(index), kind="stable")
    atom_type = np.stack(types)[order]
    positions = np.stack(pos)[order]
    raw = np.asarray(cols, np.float64)[order]
    counts = np.stack([(atom_type == e).sum(1) for e in range(5)], axis=1).astype(np.float64)
    targets = np.empty((len(order), len(TARGETS)), np.float64)
    for k, name in enumerate(TARGETS):
        if name in PLAIN_COLUMN:
            targets[:, k] = raw[:, names.index(PLAIN_COLUMN[name][0])] * PLAIN_COLUMN[name][1]
        else:
            total = raw[:, names.index(ENERGY_COLUMN[name])]
            targets[:, k] = (total - counts @ ATOMREF[name]) * HAR2EV
    bonds = np.concatenate(
        [
            infer_bonds(atom_type[s : s + 4096], positions[s : s + 4096])
            for s in range(0, len(order), 4096)
        ]
    )
    return QM9Data(
        index=np.asarray(index, np.int32)[order],
        num_atoms=np.asarray(num_atoms, np.int32)[order],
        atom_type=atom_type,
        positions=positions,
        bonds=bonds,
        targets=targets,
    )


# ----------------------------------------------------------------------------------------------
# Cache


def cache_folder() -> str:
    """``$MTLJAX_CACHE``, else ``$XDG_CACHE_HOME/mtljax``, else ``~/.cache/mtljax``."""
    if os.environ.get("MTLJAX_CACHE"):
        return os.environ["MTLJAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtljax")


def cache_key(folder: str, max_molecules: int | None = None) -> str:
    """SHA-256 of the source files, of this module's code and of ``max_molecules``."""
    h = hashlib.sha256()
    for fname in SOURCE_FILES:
        h.update(fname.encode())
        with open(os.path.join(folder, fname), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    with open(__file__, "rb") as f:
        h.update(f.read())
    h.update(repr(max_molecules).encode())
    return h.hexdigest()


def _check(data: QM9Data) -> None:
    """Consistency checks of loaded arrays (raises ``ValueError``)."""
    m = len(data.index)
    shapes = {
        "num_atoms": (m,),
        "atom_type": (m, MAX_ATOMS),
        "positions": (m, MAX_ATOMS, 3),
        "bonds": (m, MAX_ATOMS, MAX_ATOMS),
        "targets": (m, len(TARGETS)),
    }
    for name, shape in shapes.items():
        if getattr(data, name).shape != shape:
            raise ValueError(f"{name} has shape {getattr(data, name).shape}, expected {shape}")
    if m == 0 or np.any(np.diff(data.index) <= 0):
        raise ValueError("molecule indices are not strictly increasing")
    real = np.arange(MAX_ATOMS) < data.num_atoms[:, None]
    if np.any((data.atom_type >= 0) != real) or np.any(data.atom_type > 4):
        raise ValueError("atom types disagree with the atom counts")
    if not np.all(np.isfinite(data.targets)) or not np.all(np.isfinite(data.positions)):
        raise ValueError("non-finite values")
    if np.any(data.bonds != np.swapaxes(data.bonds, 1, 2)):
        raise ValueError("bond table is not symmetric")
    if np.any((data.bonds < 0) | (data.bonds > 3)):
        raise ValueError("bond orders outside 0…3")
    if np.any(data.bonds[~real]):
        raise ValueError("bonds on padding atoms")


def _compact(data: QM9Data) -> dict[str, np.ndarray]:
    """The arrays as stored: atoms unpadded (one row per atom), bonds as a list ``i < j``."""
    real = data.atom_type >= 0
    mol, i, j = np.nonzero(np.triu(data.bonds, 1))
    return {
        "index": data.index,
        "num_atoms": data.num_atoms,
        "atom_type": data.atom_type[real],
        "positions": data.positions[real],
        "bond_mol": mol.astype(np.int32),
        "bond_ij": np.stack([i, j], 1).astype(np.int8),
        "bond_order": data.bonds[mol, i, j],
        "targets": data.targets,
    }


def _expand(z) -> QM9Data:
    """Inverse of :func:`_compact`."""
    num_atoms = np.asarray(z["num_atoms"])
    m = len(num_atoms)
    if int(num_atoms.sum()) != len(z["atom_type"]) or np.any(num_atoms > MAX_ATOMS):
        raise ValueError("atom counts disagree with the atom rows")
    real = np.arange(MAX_ATOMS) < num_atoms[:, None]
    atom_type = np.full((m, MAX_ATOMS), -1, np.int8)
    atom_type[real] = z["atom_type"]
    positions = np.zeros((m, MAX_ATOMS, 3), np.float32)
    positions[real] = z["positions"]
    bonds = np.zeros((m, MAX_ATOMS, MAX_ATOMS), np.int8)
    mol, ij, order = z["bond_mol"], z["bond_ij"].astype(np.int64), z["bond_order"]
    bonds[mol, ij[:, 0], ij[:, 1]] = order
    bonds[mol, ij[:, 1], ij[:, 0]] = order
    return QM9Data(
        index=np.asarray(z["index"]),
        num_atoms=num_atoms,
        atom_type=atom_type,
        positions=positions,
        bonds=bonds,
        targets=np.asarray(z["targets"]),
    )


def _save(path: str, key: str, data: QM9Data) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qm9-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.asarray(key), **_compact(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)  # our own temporary file
        raise


def _load_cached(path: str, key: str) -> QM9Data:
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            raise ValueError("key mismatch")
        data = _expand(z)
    _check(data)
    return data


def load(*, max_molecules: int | None = None, folder: str | None = None) -> QM9Data:
    """QM9 as :class:`QM9Data`, from the cache when it holds a valid copy, else preprocessed
    from the ``qm9pack`` CSV files (and cached). Raises ``ImportError`` naming
    ``pip install -e ".[qm9]"`` when ``qm9pack`` is not installed."""
    if max_molecules is not None and int(max_molecules) < 1:
        raise ValueError(f"qm9: max_molecules must be ≥ 1, got {max_molecules}")
    src = source_folder()
    key = cache_key(src, max_molecules)
    suffix = "" if max_molecules is None else f"-first{int(max_molecules)}"
    path = os.path.join(folder or cache_folder(), f"qm9{suffix}-{key[:16]}.npz")
    if os.path.exists(path):
        try:
            return _load_cached(path, key)
        except Exception as e:  # a corrupt or foreign file: rebuild it
            log.warning("qm9: the cached %s is unusable (%s); rebuilding it", path, e)
    start = time.perf_counter()
    data = read_source(src, max_molecules=max_molecules)
    _check(data)
    _save(path, key, data)
    log.warning(
        "qm9: preprocessed %d molecules into %s in %.1f s (done once)",
        len(data.index),
        path,
        time.perf_counter() - start,
    )
    return data


# ----------------------------------------------------------------------------------------------
# Splits and scaling


def split_indices(
    num_molecules: int,
    data_seed: int = 0,
    *,
    num_test: int = 10_000,
    num_validation: int = 10_000,
    num_train: int | None = None,
) -> dict[str, np.ndarray]:
    """``{"train", "validation", "test"}`` → molecule positions, from one seeded permutation:
    the first ``num_test`` are the test set, the next ``num_validation`` the validation set,
    then ``num_train`` (default: all the rest) the training set, as the Nash-MTL code slices
    its shuffled dataset (``test = dataset[:10000]``, ``val = dataset[10000:20000]``,
    ``train = dataset[20000:]``). The permutation is NumPy's (``default_rng(data_seed)``), not
    PyTorch's, so the molecules in each split differ from theirs; a smaller ``num_train`` or
    ``num_test`` takes a prefix of the same sets."""
    sizes = (num_test, num_validation)
    if any(int(s) < 1 for s in sizes) or (num_train is not None and int(num_train) < 1):
        raise ValueError(f"qm9: split sizes must be ≥ 1, got {num_train, num_validation, sizes}")
    rest = num_molecules - num_test - num_validation
    n_train = rest if num_train is None else int(num_train)
    if n_train < 1 or n_train > rest:
        raise ValueError(
            f"qm9: {num_molecules} molecules cannot hold {num_test} test, {num_validation} "
            f"validation and {n_train} training molecules"
        )
    perm = np.random.default_rng(data_seed).permutation(num_molecules)
    return {
        "test": perm[:num_test],
        "validation": perm[num_test : num_test + num_validation],
        "train": perm[num_test + num_validation : num_test + num_validation + n_train],
    }


class Scaler(NamedTuple):
    """Per-target standardisation ``z = (y − mean) / std`` (training-set statistics)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, targets: np.ndarray) -> Scaler:
        """Mean and (unbiased, as ``torch.std``) standard deviation of each column."""
        y = np.asarray(targets, np.float64)
        return cls(mean=y.mean(0), std=y.std(0, ddof=1))

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, np.float64) - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, np.float64) * self.std + self.mean
