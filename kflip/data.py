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
import difflib
import os
import zipfile

import numpy as np

ENV_DATA_DIR = "KFLIP_DATA_DIR"
# Names kflip's docs and benchmarks use (for "did you mean" on a typo).
KNOWN = ("digits", "mnist", "fashion_mnist", "cifar10", "emnist", "kmnist", "svhn_cropped")


@dataclasses.dataclass
class Dataset:
    """Train and test arrays: float32 images ``(N, H, W, C)``, int64 labels.

    Construction checks the arrays (equal lengths, non-empty splits, finite images,
    integer labels in ``0..num_classes-1``) and raises ``ValueError`` otherwise.

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> ds.input_shape, ds.num_classes, len(ds.x_train), len(ds.x_test)
      ((8, 8, 1), 10, 1438, 359)
      >>> small = ds.subset(n_train=256, n_test=64)  # the first examples of each split
      >>> small.x_train.shape, small.y_test.shape
      ((256, 8, 8, 1), (64,))
      >>> val = ds.validation_split(200)  # the last 200 training examples as test set
      >>> val.name, len(val.x_train), len(val.x_test)
      ('digits-val', 1238, 200)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str = ""

    def __post_init__(self):
        where = f"dataset {self.name!r}" + (f" ({self.source})" if self.source else "")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"{where}: x_{split} has {len(x)} examples but y_{split} has {len(y)}."
                )
            if len(x) == 0:
                raise ValueError(f"{where}: the {split} split is empty.")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{where}: x_{split} contains NaN or Inf.")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{where}: y_{split} must hold integer labels, got {y.dtype}.")
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                raise ValueError(
                    f"{where}: y_{split} has label {int(y[bad][0])}, outside the "
                    f"{self.num_classes} classes 0..{self.num_classes - 1}"
                    + (" of the training set." if split == "test" else ".")
                )

    @property
    def input_shape(self):
        """Shape of one example, ``(H, W, C)``."""
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` training and ``n_test`` test examples (None: all)."""
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


def class_labels(y, what: str) -> np.ndarray:
    """Integer class labels >= 0; fractional, negative or non-finite labels are refused.

    ``what`` names the labels in the error message.

    Example:
      >>> import kflip
      >>> kflip.data.class_labels([[0], [1.0], [2]], "y_train")
      array([0, 1, 2])
      >>> kflip.data.class_labels([0, 1.5], "y_train")
      Traceback (most recent call last):
      ...
      ValueError: y_train: labels must be whole numbers, got 1.5.
    """
    y = np.asarray(y).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{what}: labels must be integers, got dtype {y.dtype}.")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise ValueError(f"{what}: labels must be whole numbers, got {y[bad][0]!r}.")
    if y.size and y.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0, got {y.min()!r}.")
    return y.astype(np.int64)


def _dataset(name, xtr, ytr, xte, yte, source) -> Dataset:
    """A validated Dataset; the classes are those of the training labels."""
    ytr = class_labels(ytr, f"{source}: y_train")
    yte = class_labels(yte, f"{source}: y_test")
    n_cls = int(ytr.max() + 1) if ytr.size else 0
    return Dataset(name, _images(xtr), ytr, _images(xte), yte, n_cls, source)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), fixed split.

    Offline (no download). ``test_fraction`` of the images, chosen by ``seed``, form
    the test set; pixel values 0..16 are mapped to [-1, 1].

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> ds.x_train.shape, ds.x_train.dtype, ds.y_train.dtype
      ((1438, 8, 8, 1), dtype('float32'), dtype('int64'))
      >>> float(ds.x_train.min()), float(ds.x_train.max())
      (-1.0, 1.0)
    """
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
    """Where :func:`load` looks for ``<name>.npz``: ``data_dir``, then ``$KFLIP_DATA_DIR``.

    Example:
      >>> import kflip
      >>> kflip.data.npz_candidates("mnist", "/data")
      ['/data/mnist.npz', '/data/mnist/mnist.npz'...]
    """
    roots = [r for r in (data_dir, os.environ.get(ENV_DATA_DIR)) if r]
    return [p for r in roots for p in (os.path.join(r, f"{name}.npz"), os.path.join(r, name, f"{name}.npz"))]


def from_npz(path: str, name: str | None = None) -> Dataset:
    """Read an ``.npz`` with arrays ``x_train, y_train, x_test, y_test`` (no pickles).

    Images of shape ``(N, H, W)`` get a channel axis; ``uint8`` images (or values
    above 1.5) are scaled from 0..255 to [-1, 1]. The classes are those of
    ``y_train``; ``name`` defaults to the file name.

    Example:
      >>> import os, tempfile
      >>> import kflip
      >>> import numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "toy.npz")
      >>> x = np.zeros((6, 4, 4), np.uint8)
      >>> np.savez(path, x_train=x, y_train=[0, 1, 2, 0, 1, 2], x_test=x[:2], y_test=[0, 2])
      >>> ds = kflip.data.from_npz(path)
      >>> ds.name, ds.input_shape, ds.num_classes, float(ds.x_train.max())
      ('toy', (4, 4, 1), 3, -1.0)
    """
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive (arrays x_train, y_train, x_test, y_test).")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)}")
            xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot be read ({e}).") from e
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot be read ({e}).") from e
    name = name or os.path.splitext(os.path.basename(path))[0]
    return _dataset(name, xtr, ytr, xte, yte, path)


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
    return _dataset(name, xtr, ytr, xte, yte, f"tfds:{name}")


def load(name: str = "digits", data_dir: str | None = None, download: bool = False) -> Dataset:
    """Load dataset ``name`` (see the module docstring for the lookup order).

    Raises ``FileNotFoundError`` saying which file to put where when ``name`` is not
    available offline (and ``download`` is False).

    Example:
      >>> import os, tempfile
      >>> import kflip
      >>> import numpy as np
      >>> kflip.data.load("digits").source
      'sklearn.datasets.load_digits'
      >>> data_dir = tempfile.mkdtemp()  # or set $KFLIP_DATA_DIR
      >>> x, y = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 0, 1])
      >>> path = os.path.join(data_dir, "tiny.npz")
      >>> np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
      >>> kflip.data.load("tiny", data_dir=data_dir).x_train.shape
      (4, 28, 28, 1)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a dataset name, got {name!r}.")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"`data_dir` {data_dir!r} is not a directory.")
    if name == "digits":
        return digits()
    for path in npz_candidates(name, data_dir):
        if os.path.exists(path):
            return from_npz(path, name)
    try:
        return _from_tfds(name, data_dir, download)
    except Exception as e:  # tfds raises many types when data is absent
        tried = f"tensorflow-datasets: {type(e).__name__}: {_first_line(e)}"
    raise FileNotFoundError(_not_found(name, data_dir, tried))


def _first_line(error: Exception, limit: int = 300) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def _not_found(name: str, data_dir: str | None, tried: str) -> str:
    guess = difflib.get_close_matches(name, KNOWN + _tfds_names(), n=1, cutoff=0.75)
    if guess and guess[0] != name:
        return f"unknown dataset {name!r}; did you mean {guess[0]!r}? ({tried})"
    where = npz_candidates(name, data_dir)
    put = (
        f"Put an .npz with arrays x_train, y_train, x_test, y_test at one of: {', '.join(where)}"
        if where
        else f"No data directory is set: pass `data_dir` (--data-dir) or set ${ENV_DATA_DIR} "
        f"to a folder holding {name}.npz or {name}/{name}.npz (arrays x_train, y_train, "
        "x_test, y_test)"
    )
    return (
        f"Dataset {name!r} is not available offline. {put}, or let tensorflow-datasets "
        f"download it (download=True / --download) where there is network. Tried: {tried}"
    )


def _tfds_names() -> tuple:
    try:
        import tensorflow_datasets as tfds

        return tuple(tfds.list_builders())
    except Exception:  # an old or broken tfds must not hide the real error
        return ()
