"""Datasets: scikit-learn's bundled digits (offline), tensorflow-datasets, local .npz.

Every loader returns a :class:`Dataset` of float32 images in [-1, 1] with shape
``(N, H, W, C)`` and int64 labels. Lookup order for a named dataset:

1. ``"digits"``: scikit-learn's bundled 8x8 digits (no network, no files);
2. tensorflow-datasets, from its local data dir (``download=False`` unless asked);
3. a local ``.npz`` with ``x_train, y_train, x_test, y_test`` at
   ``<data_dir>/<name>.npz`` or ``<data_dir>/<name>/<name>.npz``, where ``data_dir``
   is the argument or ``$KFLIP_DATA_DIR``.

If none works, the error says exactly which file to put where.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

ENV_DATA_DIR = "KFLIP_DATA_DIR"


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str = ""

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )

    def validation_split(self, n_val: int) -> "Dataset":
        """Hold out the last ``n_val`` training examples as the test set."""
        if not 0 < n_val < len(self.x_train):
            raise ValueError(f"`n_val` must be in (0, {len(self.x_train)}), got {n_val}.")
        return dataclasses.replace(
            self,
            name=f"{self.name}-val",
            x_train=self.x_train[:-n_val],
            y_train=self.y_train[:-n_val],
            x_test=self.x_train[-n_val:],
            y_test=self.y_train[-n_val:],
        )


def _images(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W[, C]), got {x.shape}")
    if x.dtype == np.uint8 or x.max() > 1.5:
        x = x.astype(np.float32) / 127.5 - 1.0
    return x.astype(np.float32)


def _labels(y) -> np.ndarray:
    return np.asarray(y).reshape(-1).astype(np.int64)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The 'digits' dataset needs scikit-learn: pip install 'kflip[digits]'."
        ) from e
    d = load_digits()
    x = (d.images / 8.0 - 1.0).astype(np.float32)[..., None]  # 0..16 -> [-1, 1]
    y = d.target.astype(np.int64)
    idx = np.random.RandomState(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = idx[:n_test], idx[n_test:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, "sklearn.datasets.load_digits")


def npz_candidates(name: str, data_dir: str | None = None) -> list[str]:
    roots = [r for r in (data_dir, os.environ.get(ENV_DATA_DIR)) if r]
    return [p for r in roots for p in (os.path.join(r, f"{name}.npz"), os.path.join(r, name, f"{name}.npz"))]


def from_npz(path: str, name: str | None = None) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    ytr, yte = _labels(ytr), _labels(yte)
    n_cls = int(max(ytr.max(), yte.max()) + 1)
    name = name or os.path.splitext(os.path.basename(path))[0]
    return Dataset(name, _images(xtr), ytr, _images(xte), yte, n_cls, path)


def _from_tfds(name: str, data_dir: str | None, download: bool) -> Dataset:
    import tensorflow_datasets as tfds

    (xtr, ytr), (xte, yte) = tfds.as_numpy(
        tfds.load(
            name,
            split=["train", "test"],
            batch_size=-1,
            as_supervised=True,
            data_dir=data_dir,
            download=download,
        )
    )
    ytr, yte = _labels(ytr), _labels(yte)
    n_cls = int(max(ytr.max(), yte.max()) + 1)
    return Dataset(name, _images(xtr), ytr, _images(xte), yte, n_cls, f"tfds:{name}")


def load(name: str = "digits", data_dir: str | None = None, download: bool = False) -> Dataset:
    """Load dataset ``name`` (see the module docstring for the lookup order)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a dataset name, got {name!r}.")
    if name == "digits":
        return digits()
    for path in npz_candidates(name, data_dir):
        if os.path.exists(path):
            return from_npz(path, name)
    errors = []
    try:
        return _from_tfds(name, data_dir, download)
    except Exception as e:  # tfds raises many types when data is absent
        errors.append(f"tensorflow-datasets: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    where = npz_candidates(name, data_dir) or [
        f"$KFLIP_DATA_DIR/{name}.npz (or $KFLIP_DATA_DIR/{name}/{name}.npz)"
    ]
    raise FileNotFoundError(
        f"Dataset {name!r} is not available offline. Put an .npz with arrays x_train, "
        f"y_train, x_test, y_test at one of: {', '.join(where)} (set `data_dir`/"
        f"--data-dir or ${ENV_DATA_DIR}), or let tensorflow-datasets download it "
        f"(download=True / --download) where there is network. Tried: {'; '.join(errors)}"
    )
