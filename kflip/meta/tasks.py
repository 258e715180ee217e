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

Families are binarized networks written functionally (:mod:`kflip.meta.nets`: MLPs,
conv nets, residual nets), their BatchNorm offsets trained by Adam (lr 1e-2, as
FlipLSTM's float optimizer).

>>> from kflip.meta import tasks
>>> task = tasks.make_task("mlp-32", "digits", seed=0, horizon=10)
>>> task.x_train.shape, task.batches.shape, sorted(set(task.kernels[0].ravel()))
((1024, 64), (10, 64), [-1.0, 1.0])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.meta.nets import (  # noqa: E402,F401  (the networks, re-exported)
    FAMILIES, IMAGE28, N_CLASSES, N_FEATURES, Family, forward, offset_shapes, ste_sign, xent)

N_TRAIN = 1024
N_HELD_OUT = 512
BATCH_SIZE = 64
OFFSET_LR = 1e-2  # FlipLSTM's default float optimizer: Adam(0.01)
# ms per inner step on one CPU thread (AMD EPYC, 2026-12-06): only to start the
# costliest jobs first (kflip.meta.loop); results never depend on it
STEP_MS = {"mlp-32": 0.06, "mlp-128": 0.1, "mlp-64-64": 0.1, "cnn-8-8": 2.7, "res-8": 8.0,
           "mlp784-128": 1.5, "mlp784-256-256": 2.7, "mlp784-256-256-256": 3.5,
           "mlp784-512-512": 7.0, "cnn28-16-32-32": 29.0, "res28-16-32": 77.0}

DATASETS = ("digits", "digits-proj", "digits-perm", "teacher")


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

    @property
    def horizon(self) -> int:
        return int(self.batches.shape[0])

    def unroll_args(self, bucketed: bool = False) -> tuple:
        """The data arguments of the compiled unroll, after the LSTM weight vector.

        ``bucketed``: ``batches`` padded to :func:`horizon_bucket` rows and the step
        count as a tensor, so tasks of many lengths share a few compiled programs.
        """
        args = (
            self.x_train,
            self.y_train,
            self.x_held_out,
            self.y_held_out,
            self.batches,
            tuple(tf.constant(k) for k in self.kernels),
        )
        if not bucketed:
            return args
        pad = horizon_bucket(self.horizon) - self.horizon
        batches = np.pad(self.batches, ((0, pad), (0, 0)))
        return args[:4] + (batches, args[5], tf.constant(self.horizon, tf.int32))


def horizon_bucket(horizon: int) -> int:
    """The padded length of a task's batch table: the next power of two (at least 16).

    >>> horizon_bucket(100), horizon_bucket(4000), horizon_bucket(4096)
    (128, 4096, 4096)
    """
    return max(16, 1 << (int(horizon) - 1).bit_length())


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
