"""Two overlaid handwritten digits (a small MultiMNIST) from scikit-learn's bundled 8×8 digits.

MultiMNIST (Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NeurIPS 2017; used as
a multi-task benchmark by Sener & Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018) puts one digit at the top-left and another at the bottom-right
of a slightly larger canvas so that they overlap, combining them by the pixel-wise maximum;
the tasks are to classify the left and the right digit. Here the digits are the 1 797 8×8
images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download), so the
problem is small enough to benchmark every method on a CPU.

The images are split once, by ``data_seed``, into disjoint train / validation / test pools;
each split's pairs are drawn from its own pool only, so no handwritten digit is seen in two
splits. Auxiliary tasks ("hints") are computed from the two labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtljax._src.model import Params, from_nnx, to_nnx
from mtljax._src.nn.hard_sharing import HardSharing
from mtljax._src.nn.mlp import MLP
from mtljax._src.nn.resnet import ResNet
from mtljax._src.problems.base import Problem
from mtljax._src.problems.registry import register

MAIN_TASKS = ("left", "right")
AUX_TASKS = ("sum", "larger", "equal")
SPLITS = ("train", "validation", "test")
# How each task is scored: (metric, higher is better).
TASK_METRICS = {
    "left": ("accuracy", True),
    "right": ("accuracy", True),
    "sum": ("mae", False),
    "larger": ("accuracy", True),
    "equal": ("accuracy", True),
}
# Output width of each task's head: 10 classes, or one logit / one regression value.
HEAD_WIDTH = {"left": 10, "right": 10, "sum": 1, "larger": 1, "equal": 1}
ARCHS = ("mlp", "resnet")


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits as ``(images f32[N, 8, 8] in [0, 1], labels i32[N])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'multidigits' problem needs scikit-learn (its bundled 8×8 digits); install "
            "it with `pip install 'mtljax[bench]'` (or `pip install scikit-learn`)"
        ) from e
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def overlay(left: np.ndarray, right: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """Places ``left`` at the top-left and ``right`` shifted by ``offset = (dy, dx)`` on a
    canvas of ``(h + dy, w + dx)``, combined by the pixel-wise maximum (as MultiMNIST).

    Works on batches: ``left, right: (..., h, w) -> (..., h + dy, w + dx)``.
    """
    dy, dx = (int(o) for o in offset)
    h, w = left.shape[-2:]
    if right.shape[-2:] != (h, w):
        raise ValueError(f"overlay: digit shapes differ: {left.shape} vs {right.shape}")
    if not (0 <= dy < h and 0 <= dx < w):
        raise ValueError(f"overlay: offset must satisfy 0 ≤ dy < {h}, 0 ≤ dx < {w}: {offset}")
    batch = np.broadcast_shapes(left.shape[:-2], right.shape[:-2])
    a = np.zeros((*batch, h + dy, w + dx), np.result_type(left, right))
    b = np.zeros_like(a)
    a[..., :h, :w] = left
    b[..., dy:, dx:] = right
    return np.maximum(a, b)


def split_pools(num_images: int, fractions: tuple[float, float, float], data_seed: int):
    """Disjoint image index pools ``{split: i64[n]}`` from a seeded permutation."""
    frac = np.asarray(fractions, np.float64)
    if frac.shape != (3,) or np.any(frac <= 0):
        raise ValueError(f"multidigits: need 3 positive split fractions, got {fractions}")
    frac = frac / frac.sum()
    perm = np.random.default_rng(data_seed).permutation(num_images)
    n_train = int(round(frac[0] * num_images))
    n_val = int(round(frac[1] * num_images))
    return {
        "train": np.sort(perm[:n_train]),
        "validation": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def make_pairs(
    images: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    num_pairs: int,
    rng: np.random.Generator,
    offset: tuple[int, int],
) -> dict[str, np.ndarray]:
    """``num_pairs`` overlaid pairs of two different images drawn from ``pool``.

    Returns ``{"x": f32[n, H·W], "left": i32[n], "right": i32[n], "idx": i64[n, 2]}``.
    """
    i = rng.choice(pool, num_pairs)
    j = rng.choice(pool, num_pairs)
    same = i == j
    while np.any(same):  # two distinct images (the same image twice is not a pair)
        j[same] = rng.choice(pool, int(same.sum()))
        same = i == j
    canvas = overlay(images[i], images[j], offset)
    return {
        "x": canvas.reshape(num_pairs, -1).astype(np.float32),
        "left": labels[i],
        "right": labels[j],
        "idx": np.stack([i, j], axis=1),
    }


def targets(left: jax.Array, right: jax.Array, tasks: Sequence[str]) -> dict[str, jax.Array]:
    """The per-task targets from the two labels (``sum`` scaled to ``[-1, 1]``)."""
    all_targets = {
        "left": left,
        "right": right,
        "sum": (left + right).astype(jnp.float32) / 9.0 - 1.0,
        "larger": (left > right).astype(jnp.float32),
        "equal": (left == right).astype(jnp.float32),
    }
    return {t: all_targets[t] for t in tasks}


def datasets(
    data_seed: int = 0,
    *,
    offset: tuple[int, int] = (1, 2),
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    sizes: dict[str, int] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The pairs of every split (see :func:`make_pairs`), deterministic in ``data_seed``.

    ``sizes`` gives the number of pairs per split (default 10 000 / 2 000 / 2 000). Each
    entry also holds ``"pool"``, the image indices the split draws from.
    """
    sizes = sizes or {"train": 10_000, "validation": 2_000, "test": 2_000}
    images, labels = load_digit_images()
    pools = split_pools(len(labels), fractions, data_seed)
    rng = np.random.default_rng([data_seed, 1])
    out = {}
    for s in SPLITS:
        out[s] = make_pairs(images, labels, pools[s], int(sizes[s]), rng, offset)
        out[s]["pool"] = pools[s]
    return out


def _task_losses(outputs, tgt, tasks):
    """Cross-entropy for the digits, binary cross-entropy for comparisons, MSE for the sum."""
    out = []
    for t, o in zip(tasks, outputs, strict=True):
        y = tgt[t]
        if t in ("left", "right"):
            out.append(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o, y)))
        elif t == "sum":
            out.append(jnp.mean((o[:, 0] - y) ** 2))
        else:
            out.append(jnp.mean(optax.sigmoid_binary_cross_entropy(o[:, 0], y)))
    return jnp.stack(out)


def _task_scores(outputs, tgt, tasks):
    """``{"accuracy": f32[T], "mae": f32[T]}`` (NaN where a metric does not apply).

    The sum's MAE is in digit units (``|predicted sum − true sum|``).
    """
    acc, mae = [], []
    for t, o in zip(tasks, outputs, strict=True):
        y = tgt[t]
        if t in ("left", "right"):
            acc.append(jnp.mean(jnp.argmax(o, axis=-1) == y))
            mae.append(jnp.nan)
        elif t == "sum":
            acc.append(jnp.nan)
            mae.append(jnp.mean(jnp.abs(o[:, 0] - y)) * 9.0)
        else:
            acc.append(jnp.mean((o[:, 0] > 0) == (y > 0.5)))
            mae.append(jnp.nan)
    return {
        "accuracy": jnp.asarray(acc, jnp.float32),
        "mae": jnp.asarray(mae, jnp.float32),
    }


@register("multidigits")
def multidigits(
    *,
    seed: int = 0,
    data_seed: int = 0,
    auxiliary: Sequence[str] = ("sum", "larger"),
    offset: tuple[int, int] = (1, 2),
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    num_train: int = 10_000,
    num_validation: int = 2_000,
    num_test: int = 2_000,
    hidden: Sequence[int] = (128, 128),
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    arch: str = "mlp",
    widths: Sequence[int] = (16, 32, 64),
    blocks: Sequence[int] | None = None,
    dropout_rate: float = 0.0,
) -> Problem:
    """Two overlaid 8×8 digits; tasks: the ``left`` and ``right`` digit (main), plus hints.

       A canvas of ``(8 + dy) × (8 + dx)`` pixels holds the left digit at the top-left and the
       right digit shifted by ``offset = (dy, dx)``, combined by the pixel-wise maximum; the
       digits are two different images (possibly the same class). Tasks:

       * ``left``, ``right``: 10-way classification, cross-entropy; metric accuracy (↑);
       * auxiliary (any of ``auxiliary``): ``sum`` of the two digits, regression of
         ``sum/9 − 1`` with squared error, metric the mean absolute error in digit units (↓);
         ``larger`` (left > right) and ``equal`` (left = right), binary cross-entropy on one
         logit, metric accuracy (↑).

       The model (``arch``) is a shared encoder with one linear head per task:

       * ``"mlp"`` (default): an MLP trunk ``H·W → hidden…`` (ReLU); its last layer is the
         ``last_shared`` layer;
       * ``"resnet"``: :class:`mtljax.nn.ResNet` on the canvas as a one-channel image, of
         ``widths`` and ``blocks`` per stage (its defaults: the CIFAR ResNet-20), with BatchNorm
         and ``dropout_rate`` between each block's convolutions; its last residual block is the
         ``last_shared`` layer. Every encoder parameter, BatchNorm's scale and shift included, is
         shared; BatchNorm's running statistics are model state (``TrainState.model_state``),
         and ``evaluate`` / ``evaluate_split`` then take the train state and evaluate with
         them, dropout off (given :class:`Params` alone, they use the statistics as built).
         ``hidden`` applies to ``"mlp"`` only; ``widths``, ``blocks``, ``dropout_rate`` to
         ``"resnet"`` only.
    ``data_seed`` fixes the split of the images into
       disjoint train/validation/test pools (``fractions``) and the pairs drawn from them;
       ``seed`` fixes the initial parameters only, so runs with different seeds see the same data.
       Training batches are drawn uniformly, with replacement, from the ``num_train`` pairs.
    """
    aux = tuple(auxiliary)
    bad = [t for t in aux if t not in AUX_TASKS]
    if bad or len(set(aux)) != len(aux):
        raise ValueError(
            f"multidigits: auxiliary tasks must be distinct names among {AUX_TASKS}, got {aux}"
        )
    if arch not in ARCHS:
        raise ValueError(f"multidigits: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    hidden = tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"multidigits: hidden must list positive layer sizes, got {hidden}")
    for name, n in (
        ("num_train", num_train),
        ("num_validation", num_validation),
        ("num_test", num_test),
        ("batch_size", batch_size),
    ):
        if int(n) < 1:
            raise ValueError(f"multidigits: {name} must be ≥ 1, got {n}")
    tasks = MAIN_TASKS + aux
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    data = datasets(data_seed, offset=offset, fractions=fractions, sizes=sizes)
    in_features = data["train"]["x"].shape[1]
    canvas = (8 + int(offset[0]), 8 + int(offset[1]))

    def inputs(x: jax.Array) -> jax.Array:
        # The flat canvases, or, for the ResNet, images (batch, H, W, 1).
        return x if arch == "mlp" else x.reshape(*x.shape[:-1], *canvas, 1)

    def encoder_of(rngs: nnx.Rngs) -> nnx.Module:
        if arch == "mlp":
            return MLP((in_features, *hidden), rngs=rngs, final_activation=True)
        return ResNet(1, rngs=rngs, widths=widths, blocks=blocks, dropout_rate=dropout_rate)

    def build(key_or_seed) -> tuple:
        # Parameters from the seed; dropout's stream, if any, is reseeded by every train step.
        rngs = nnx.Rngs(params=key_or_seed, dropout=0)
        encoder = encoder_of(rngs)
        width = hidden[-1] if arch == "mlp" else encoder.out_features
        heads = [nnx.Linear(width, HEAD_WIDTH[t], rngs=rngs) for t in tasks]
        return from_nnx(
            HardSharing(encoder, heads),
            task_names=tasks,
            shared="encoder",
            encode=lambda m, b: m.encode(inputs(b["x"])),
            heads=lambda m, z, b: _task_losses(m.predict(z), b["targets"], tasks),
            last_shared="encoder/" + encoder.last_layer_path,
        )

    model, params = build(seed)

    def init_params(key: jax.Array) -> Params:
        return build(key)[1]

    arrays = {
        s: {
            "x": jnp.asarray(d["x"]),
            "targets": targets(jnp.asarray(d["left"]), jnp.asarray(d["right"]), tasks),
        }
        for s, d in data.items()
    }
    train = arrays["train"]

    def sample(key):
        idx = jax.random.randint(key, (batch_size,), 0, num_train)
        return jax.tree_util.tree_map(lambda a: a[idx], train)

    def _outputs(p, x):
        # Evaluation mode: BatchNorm's running statistics (from a TrainState), no dropout.
        module = to_nnx(model, p)
        module.eval()
        return module(inputs(x))

    @jax.jit
    def _evaluate(p, split_data):
        outputs = _outputs(p, split_data["x"])
        return {
            "loss": _task_losses(outputs, split_data["targets"], tasks),
            **_task_scores(outputs, split_data["targets"], tasks),
        }

    def evaluate_split(p, split: str) -> dict[str, jax.Array]:
        if split not in arrays:
            raise ValueError(f"multidigits: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return _evaluate(p, arrays[split])

    def evaluate(p) -> dict[str, jax.Array]:
        return evaluate_split(p, "test")

    return Problem(
        name="multidigits",
        model=model,
        params=params,
        sample=sample,
        optimizer=optax.adam(learning_rate),
        steps=3000,
        evaluate=evaluate,
        info={
            "canvas": [8 + offset[0], 8 + offset[1]],
            "offset": list(offset),
            "auxiliary": list(aux),
            "pairs": {s: int(n) for s, n in sizes.items()},
            "images": {s: int(len(d["pool"])) for s, d in data.items()},
            "data_seed": int(data_seed),
            "arch": arch,
        },
        evaluate_split=evaluate_split,
        metrics={t: TASK_METRICS[t] for t in tasks},
        auxiliary=aux,
        splits=("train", "validation", "test"),
        init_params=init_params,
        steps_per_epoch=-(-int(num_train) // int(batch_size)),
    )
