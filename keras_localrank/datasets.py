"""Data sets: seeded synthetic Gaussian data, sklearn digits, MNIST, Fashion-MNIST.

Real users' machines download MNIST and Fashion-MNIST through
`keras.datasets`; offline, pass `data_path` (an `.npz` with arrays `x` and
`y`, e.g. `/path/to/mnist10k.npz`). Images come back as float32 in
[0, 1], flattened when `flatten=True`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from keras_localrank.io import read_npz

__all__ = ["Dataset", "gaussian", "gaussian_task", "digits", "load_npz", "load", "NAMES"]

NAMES = ("gaussian", "digits", "mnist", "fashion_mnist")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split. Arrays are float32 inputs and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def gaussian(n: int = 1024, dim: int = 32, *, seed: int = 0) -> np.ndarray:
    """`n` standard Gaussian samples of dimension `dim` (float32, seeded)."""
    if n < 1 or dim < 1:
        raise ValueError(f"Expected `n` >= 1 and `dim` >= 1. Received: n={n}, dim={dim}")
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def gaussian_task(
    n_train: int = 2000,
    n_test: int = 1000,
    *,
    dim: int = 20,
    k: int = 2,
    seed: int = 0,
) -> Dataset:
    """Gaussian inputs whose label depends on exactly `k` directions.

    `x ~ N(0, I_dim)`; the label is the sign pattern of `k` fixed random
    orthonormal projections `x @ P` (`2**k` classes), so the task needs a
    `k`-dimensional feature space and nothing more.

    Args:
        n_train: training samples. Default 2000.
        n_test: test samples. Default 1000.
        dim: input dimension `d`. Default 20.
        k: number of relevant directions, `1 <= k <= min(dim, 8)`. Default 2.
        seed: seed of the data and of the projections. Default 0.

    Returns:
        A `Dataset` with `2**k` classes.
    """
    if not 1 <= k <= min(dim, 8):
        raise ValueError(f"Expected 1 <= k <= min(dim, 8). Received: k={k}, dim={dim}")
    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"Expected positive sample counts. Received: n_train={n_train}, n_test={n_test}"
        )
    rng = np.random.default_rng(seed)
    proj = np.linalg.qr(rng.standard_normal((dim, k)))[0]
    x = rng.standard_normal((n_train + n_test, dim)).astype(np.float32)
    bits = (x @ proj > 0).astype(np.int64)
    y = (bits * (2 ** np.arange(k))).sum(axis=1)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 2**k, "gaussian")


def _split(x, y, test_fraction, seed, name, num_classes) -> Dataset:
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = idx[:n_test], idx[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], num_classes, name)


def digits(*, flatten: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), -1) if flatten else x
    return _split(x, bunch.target.astype(np.int64), test_fraction, seed, "digits", 10)


def load_npz(
    path: str | os.PathLike,
    *,
    flatten: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """An `.npz` with arrays `x` (images or vectors) and `y` (integer labels).

    uint8 images are divided by 255. The split is seeded and fixed.

    Raises:
        ValueError: a missing, truncated or corrupt file, or missing arrays
            (`io.UnreadableFileError`, naming the file).
    """
    path = os.fspath(path)
    arrays = read_npz(path, ("x", "y"), argument="data_path")
    x, y = arrays["x"], arrays["y"]
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    x = x.reshape(len(x), -1) if flatten else x
    y = y.astype(np.int64)
    return _split(x, y, test_fraction, seed, name or os.path.basename(path), int(y.max()) + 1)


def _keras_images(name: str, flatten: bool) -> Dataset:
    import keras

    module = {"mnist": keras.datasets.mnist, "fashion_mnist": keras.datasets.fashion_mnist}[name]
    try:
        (x_tr, y_tr), (x_te, y_te) = module.load_data()
    except Exception as e:  # Keras raises a bare Exception when the download fails
        raise OSError(
            f"Could not load {name!r} through keras.datasets ({' '.join(str(e).split())}). "
            "Offline, pass `data_path` (an .npz with arrays x and y; --data_path in the "
            f"scripts) or set KERAS_HOME to a directory holding datasets/{name}.npz."
        ) from e

    def prep(x):
        x = x.astype(np.float32) / 255.0
        return x.reshape(len(x), -1) if flatten else x

    return Dataset(
        prep(x_tr), y_tr.astype(np.int64), prep(x_te), y_te.astype(np.int64), 10, name
    )


def load(
    name: str,
    *,
    data_path: str | os.PathLike | None = None,
    flatten: bool = True,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Dataset:
    """Load a data set by name.

    Args:
        name: one of `NAMES`: `"gaussian"` (see `gaussian_task`), `"digits"`,
            `"mnist"`, `"fashion_mnist"`.
        data_path: an `.npz` with `x` and `y` read instead of downloading
            (for mnist / fashion_mnist on offline machines). Default None.
        flatten: flatten images to vectors. Default True.
        seed: seed for synthetic data and splits. Default 0.
        n_train: keep at most this many training samples. Default None: all.
        n_test: keep at most this many test samples. Default None: all.

    Raises:
        ValueError: an unknown name or an unreadable `data_path`.
    """
    if name not in NAMES:
        raise ValueError(f"Expected a data set name in {NAMES}. Received: {name!r}")
    if data_path is not None:
        ds = load_npz(data_path, flatten=flatten, seed=seed, name=name)
    elif name == "gaussian":
        ds = gaussian_task(seed=seed)
    elif name == "digits":
        ds = digits(flatten=flatten, seed=seed)
    else:
        ds = _keras_images(name, flatten)
    if n_train is not None or n_test is not None:
        ds = dataclasses.replace(
            ds,
            x_train=ds.x_train[:n_train],
            y_train=ds.y_train[:n_train],
            x_test=ds.x_test[:n_test],
            y_test=ds.y_test[:n_test],
        )
    return ds
