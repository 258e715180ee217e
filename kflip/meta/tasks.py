"""The meta-training tasks: tiny binarized networks and the data they train on.

A *task* is a tiny binarized network (an architecture *family*) trained from scratch
on a tiny classification problem (a *dataset variant*) for ``horizon`` steps with the
real, hard FlipLSTM flips (:mod:`kflip.meta.unroll` runs it). MNIST is never used.

Dataset variants (all 64 input features, 10 classes, 1,024 training and 512
held-out examples, so every family compiles once whatever the variant):

* ``digits``: scikit-learn's bundled 8x8 digits, a random train/held-out split;
* ``digits-proj``: digits through a random orthogonal projection of the 64 pixels
  (a new "dataset" with the same difficulty but no spatial structure);
* ``digits-perm``: digits with the pixels randomly permuted and sign-flipped;
* ``teacher``: Gaussian inputs labelled by a random binary teacher network
  (64 -> 32 sign units -> 10, argmax).

Families are binarized networks written functionally (weights are tensors, not Keras
layers), mirroring :mod:`kflip.models`: binary kernels (exactly +-1), BatchNorm with
batch statistics and a trainable offset (Adam, lr 1e-2, as FlipLSTM's float
optimizer), ``ste_sign`` activations with larq's straight-through estimator
(gradient ``* (|x| <= 1)``), real-valued inputs into the first layer, BatchNorm
logits into softmax cross-entropy.

>>> from kflip.meta import tasks
>>> task = tasks.make_task("mlp-32", "digits", seed=0, horizon=10)
>>> task.x_train.shape, task.batches.shape, sorted(set(task.kernels[0].ravel()))
((1024, 64), (10, 64), [-1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import cell as cell_lib  # noqa: E402

N_TRAIN = 1024
N_HELD_OUT = 512
N_FEATURES = 64
IMAGE28 = 28
N_CLASSES = 10
BATCH_SIZE = 64
BN_EPS = 1e-3  # tf.keras BatchNormalization default
OFFSET_LR = 1e-2  # FlipLSTM's default float optimizer: Adam(0.01)

DATASETS = ("digits", "digits-proj", "digits-perm", "teacher")


@dataclasses.dataclass(frozen=True)
class Family:
    """A binarized architecture: ``kind`` "mlp" (``hidden`` widths) or "cnn"."""

    name: str
    kind: str
    hidden: tuple = ()
    filters: tuple = ()
    inputs: int = N_FEATURES  # 64 (8x8 images) or 784 (28x28, MNIST-sized MLPs)

    def kernel_shapes(self) -> list:
        if self.kind == "mlp":
            dims = (self.inputs,) + tuple(self.hidden) + (N_CLASSES,)
            return [(a, b) for a, b in zip(dims[:-1], dims[1:])]
        f1, f2 = self.filters
        # conv 3x3 "same" on 8x8 -> conv 3x3 "valid" -> 6x6 -> dense
        return [(3, 3, 1, f1), (3, 3, f1, f2), (6 * 6 * f2, N_CLASSES)]


FAMILIES = {
    f.name: f
    for f in (
        Family("mlp-32", "mlp", hidden=(32,)),
        Family("mlp-128", "mlp", hidden=(128,)),
        Family("mlp-64-64", "mlp", hidden=(64, 64)),
        Family("cnn-8-8", "cnn", filters=(8, 8)),
        # MNIST-sized: 28x28 inputs (digits upscaled, or 784-d teacher data), the
        # widths of kflip.models.mlp, so raw gradient scales match that model's
        Family("mlp784-256-256", "mlp", hidden=(256, 256), inputs=IMAGE28**2),
        Family("mlp784-512-512", "mlp", hidden=(512, 512), inputs=IMAGE28**2),
    )
}


class Task(NamedTuple):
    """One sampled inner problem (numpy arrays; the family is static)."""

    family: str
    dataset: str
    seed: int
    x_train: np.ndarray  # [n_train, family.inputs] float32
    y_train: np.ndarray  # [n_train] int32
    x_held_out: np.ndarray  # [N_HELD_OUT, family.inputs]
    y_held_out: np.ndarray
    kernels: tuple  # initial binary kernels, exactly +-1
    batches: np.ndarray  # [horizon, BATCH_SIZE] int32 indices into the training set

    def unroll_args(self) -> tuple:
        """The data arguments of the compiled unroll, after the LSTM weight vector."""
        return (
            self.x_train,
            self.y_train,
            self.x_held_out,
            self.y_held_out,
            self.batches,
            tuple(tf.constant(k) for k in self.kernels),
        )


_DIGITS = None


def _digits():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 8.0 - 1.0).astype(np.float32)  # 0..16 -> [-1, 1], as kflip.data
        _DIGITS = (x, d.target.astype(np.int32))
    return _DIGITS


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")


def _augment(x, rng):
    """Random +-1 pixel shifts (zero fill) and Gaussian noise (std 0.2) on 8x8 digits."""
    img = x.reshape(-1, 8, 8)
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    dy, dx = rng.randint(0, 3, size=(2, len(x)))
    out = np.stack([pad[i, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(len(x))])
    out = out.reshape(len(x), -1) + 0.2 * rng.randn(len(x), N_FEATURES)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _render28(x, rng, noise):
    """8x8 digits -> 28x28: 3x nearest upscaling, a 3x3 box blur (strokes look like
    MNIST's), pasted at a random offset (0-4 px per axis) on a -1 background, plus
    Gaussian noise of std ``noise``."""
    img = np.kron(x.reshape(-1, 8, 8), np.ones((3, 3), np.float32))
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    img = sum(pad[:, i : i + 24, j : j + 24] for i in range(3) for j in range(3)) / 9.0
    out = np.full((len(x), IMAGE28, IMAGE28), -1.0, np.float32)
    dy, dx = rng.randint(0, 5, size=(2, len(x)))
    for k in range(len(x)):
        out[k, dy[k] : dy[k] + 24, dx[k] : dx[k] + 24] = img[k]
    out = out.reshape(len(x), -1)
    if noise:
        out = out + noise * rng.randn(*out.shape).astype(np.float32)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _teacher(rng, n: int, d: int):
    """Gaussian inputs labelled by a random binary d-32-10 network."""
    x = rng.randn(n, d).astype(np.float32)
    w1 = np.sign(rng.randn(d, 32))
    w2 = np.sign(rng.randn(32, N_CLASSES))
    hid = np.sign(x @ w1 + 1e-6)
    y = np.argmax(hid @ w2 + 1e-3 * rng.randn(n, N_CLASSES), axis=1).astype(np.int32)
    return np.clip(x / 2.0, -1.0, 1.0), y  # same range as the image datasets


def _digit_images(rng, n_train: int, d: int):
    """``n_train + N_HELD_OUT`` digits at ``d`` = 64 or 784 inputs (held-out last)."""
    xd, yd = _digits()
    n = n_train + N_HELD_OUT
    if n <= len(xd):
        idx = rng.permutation(len(xd))[:n]
        x, y = xd[idx], yd[idx]
        return (x if d == N_FEATURES else _render28(x, rng, 0.0)), y
    # held-out: distinct real images; training: augmented resamples of the rest
    perm = rng.permutation(len(xd))
    held, rest = perm[:N_HELD_OUT], perm[N_HELD_OUT:]
    pick = rest[rng.randint(0, len(rest), size=n_train)]
    if d == N_FEATURES:
        x = np.concatenate([_augment(xd[pick], rng), xd[held]])
    else:
        x = np.concatenate([_render28(xd[pick], rng, 0.2), _render28(xd[held], rng, 0.0)])
    return x, np.concatenate([yd[pick], yd[held]])


def _variant(dataset: str, x, rng):
    """The digits variant ``dataset`` of images ``x`` (a projection or a permutation)."""
    d = x.shape[1]
    if dataset == "digits-proj":
        q, _ = np.linalg.qr(rng.randn(d, d))
        return np.clip(x @ q.astype(np.float32), -1.0, 1.0)
    if dataset == "digits-perm":
        perm = rng.permutation(d)
        flip = np.where(rng.rand(d) < 0.5, -1.0, 1.0).astype(np.float32)
        return x[:, perm] * flip
    return x


def make_task(family: str, dataset: str, seed: int, horizon: int, n_train: int = N_TRAIN) -> Task:
    """Build task ``(family, dataset, seed)`` deterministically (numpy only).

    ``n_train`` training examples (the held-out set is always 512). Digits has 1,797
    images: beyond 1,285 training images the training set is resampled with random
    shifts and noise (:func:`_augment`); teacher tasks just draw more inputs.
    """
    check_choice("family", family, FAMILIES)
    check_choice("dataset", dataset, DATASETS)
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"`horizon` must be a positive int, got {horizon!r}.")
    if not isinstance(n_train, int) or n_train < BATCH_SIZE:
        raise ValueError(f"`n_train` must be an int >= {BATCH_SIZE}, got {n_train!r}.")
    rng = np.random.RandomState(seed % (2**32))
    d = FAMILIES[family].inputs
    if dataset == "teacher":
        x, y = _teacher(rng, n_train + N_HELD_OUT, d)
    else:
        x, y = _digit_images(rng, n_train, d)
        x = _variant(dataset, x, rng)
    kernels = tuple(
        np.where(rng.rand(*s) < 0.5, -1.0, 1.0).astype(np.float32)
        for s in FAMILIES[family].kernel_shapes()
    )
    epochs = math.ceil(horizon * BATCH_SIZE / n_train)
    order = np.concatenate([rng.permutation(n_train) for _ in range(epochs)])
    batches = order[: horizon * BATCH_SIZE].reshape(horizon, BATCH_SIZE).astype(np.int32)
    f32, i32 = (lambda a: a.astype(np.float32)), (lambda a: a.astype(np.int32))  # noqa: E731
    return Task(family, dataset, int(seed), f32(x[:n_train]), i32(y[:n_train]),
                f32(x[n_train:]), i32(y[n_train:]), kernels, batches)


# ---- the functional binarized networks --------------------------------------------
def ste_sign(x):
    """larq's ``ste_sign``: forward sign (0 -> +1), gradient ``* (|x| <= 1)``."""
    clipped = tf.clip_by_value(x, -1.0, 1.0)
    return clipped + tf.stop_gradient(cell_lib.sign_pm1(x) - clipped)


def _batch_norm(z, offset, axes):
    mean, var = tf.nn.moments(z, axes=axes)
    return (z - mean) * tf.math.rsqrt(var + BN_EPS) + offset


def forward(family: Family, kernels: Sequence[tf.Tensor], offsets, x):
    """Logits (BatchNorm output, batch statistics) of ``family`` on ``x`` [B, family.inputs]."""
    if family.kind == "mlp":
        a = x
        for i, (w, b) in enumerate(zip(kernels, offsets)):
            z = _batch_norm(tf.matmul(a, w), b, axes=[0])
            a = ste_sign(z) if i < len(kernels) - 1 else z
        return a
    a = tf.reshape(x, [-1, 8, 8, 1])
    a = ste_sign(_batch_norm(_conv3x3(a, kernels[0], "SAME"), offsets[0], axes=[0, 1, 2]))
    a = ste_sign(_batch_norm(_conv3x3(a, kernels[1], "VALID"), offsets[1], axes=[0, 1, 2]))
    a = tf.reshape(a, [tf.shape(a)[0], -1])
    return _batch_norm(tf.matmul(a, kernels[2]), offsets[2], axes=[0])


def _conv3x3(a, kernel, padding):
    """3x3 stride-1 convolution as patches @ kernel (XLA on CPU runs this much faster
    than ``tf.nn.conv2d`` and its gradients at these tiny sizes; same result)."""
    patches = tf.image.extract_patches(
        a, sizes=[1, 3, 3, 1], strides=[1, 1, 1, 1], rates=[1, 1, 1, 1], padding=padding
    )
    k = tf.reshape(kernel, [-1, kernel.shape[-1]])
    return tf.einsum("bhwp,pf->bhwf", patches, k)


def offset_shapes(family: Family) -> list:
    return [(s[-1],) for s in family.kernel_shapes()]


def xent(logits, labels):
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
