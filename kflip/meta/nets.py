"""The binarized networks of meta-training, written functionally.

Weights are tensors, not Keras layers, mirroring :mod:`kflip.models`: binary kernels
(exactly +-1), BatchNorm with batch statistics and a trainable offset, ``ste_sign``
activations with larq's straight-through estimator (gradient ``* (|x| <= 1)``),
real-valued inputs into the first layer, BatchNorm logits into softmax
cross-entropy. Every kernel is binary; the rule flips them all.

Kinds of :class:`Family`:

* ``mlp``: dense layers (``hidden`` widths), as :func:`kflip.models.mlp`;
* ``cnn``: two 3x3 convolutions on 8x8 images (``filters``), then a dense head;
* ``cnn28``: the larq tutorial CNN's shape on 28x28 images (:func:`kflip.models.cnn`:
  conv, pool, conv, pool, conv, dense ``hidden``, dense), at the widths ``filters``;
* ``res``: a residual net as :func:`kflip.models.resnet` (real-valued shortcuts
  ``x + BN(conv(sign(x)))``), with a binary stem and head: a 3x3 stem, one block per
  stage, a pooled transition between stages (28x28 inputs only), global average
  pooling, a dense head.

>>> import numpy as np, tensorflow as tf
>>> from kflip.meta import nets
>>> fam = nets.FAMILIES["res-8"]
>>> kernels = [tf.ones(s) for s in fam.kernel_shapes()]
>>> offsets = [tf.zeros(s) for s in nets.offset_shapes(fam)]
>>> nets.forward(fam, kernels, offsets, tf.zeros([4, fam.inputs])).shape
TensorShape([4, 10])
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import cell as cell_lib  # noqa: E402

N_FEATURES = 64  # 8x8 images
IMAGE28 = 28
N_CLASSES = 10
BN_EPS = 1e-3  # tf.keras BatchNormalization default


@dataclasses.dataclass(frozen=True)
class Family:
    """A binarized architecture: ``kind`` "mlp", "cnn", "cnn28" or "res"."""

    name: str
    kind: str
    hidden: tuple = ()
    filters: tuple = ()
    inputs: int = N_FEATURES  # 64 (8x8 images) or 784 (28x28)

    @property
    def side(self) -> int:
        return int(round(self.inputs**0.5))

    def kernel_shapes(self) -> list:
        if self.kind == "mlp":
            dims = (self.inputs,) + tuple(self.hidden) + (N_CLASSES,)
            return [(a, b) for a, b in zip(dims[:-1], dims[1:])]
        if self.kind == "cnn":
            f1, f2 = self.filters
            # conv 3x3 "same" on 8x8 -> conv 3x3 "valid" -> 6x6 -> dense
            return [(3, 3, 1, f1), (3, 3, f1, f2), (6 * 6 * f2, N_CLASSES)]
        if self.kind == "cnn28":
            f1, f2, f3 = self.filters
            # 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5 -conv-> 3
            (dense,) = self.hidden
            return [(3, 3, 1, f1), (3, 3, f1, f2), (3, 3, f2, f3), (9 * f3, dense),
                    (dense, N_CLASSES)]
        shapes, prev = [(3, 3, 1, self.filters[0])], self.filters[0]
        for stage, width in enumerate(self.filters):
            if stage:
                shapes.append((3, 3, prev, width))  # transition
            shapes.append((3, 3, width, width))  # residual block
            prev = width
        return shapes + [(prev, N_CLASSES)]


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
        Family("mlp784-128", "mlp", hidden=(128,), inputs=IMAGE28**2),
        Family("mlp784-256-256-256", "mlp", hidden=(256, 256, 256), inputs=IMAGE28**2),
        # the larq tutorial CNN's shape at half its widths, on 28x28
        Family("cnn28-16-32-32", "cnn28", hidden=(32,), filters=(16, 32, 32), inputs=IMAGE28**2),
        Family("res-8", "res", filters=(16,)),
        Family("res28-16-32", "res", filters=(16, 32), inputs=IMAGE28**2),
    )
}


def ste_sign(x):
    """larq's ``ste_sign``: forward sign (0 -> +1), gradient ``* (|x| <= 1)``."""
    clipped = tf.clip_by_value(x, -1.0, 1.0)
    return clipped + tf.stop_gradient(cell_lib.sign_pm1(x) - clipped)


def _batch_norm(z, offset, axes):
    mean, var = tf.nn.moments(z, axes=axes)
    return (z - mean) * tf.math.rsqrt(var + BN_EPS) + offset


def _conv3x3(a, kernel, padding):
    """3x3 stride-1 convolution as patches @ kernel (XLA on CPU runs this much faster
    than ``tf.nn.conv2d`` and its gradients at these tiny sizes; same result)."""
    patches = tf.image.extract_patches(
        a, sizes=[1, 3, 3, 1], strides=[1, 1, 1, 1], rates=[1, 1, 1, 1], padding=padding
    )
    k = tf.reshape(kernel, [-1, kernel.shape[-1]])
    return tf.einsum("bhwp,pf->bhwf", patches, k)


def _pool(a):
    return tf.nn.max_pool2d(a, 2, 2, "VALID")


_SPATIAL = [0, 1, 2]


def _mlp(kernels, offsets, a):
    for i, (w, b) in enumerate(zip(kernels, offsets)):
        z = _batch_norm(tf.matmul(a, w), b, axes=[0])
        a = ste_sign(z) if i < len(kernels) - 1 else z
    return a


def _cnn(kernels, offsets, a):
    a = ste_sign(_batch_norm(_conv3x3(a, kernels[0], "SAME"), offsets[0], _SPATIAL))
    a = ste_sign(_batch_norm(_conv3x3(a, kernels[1], "VALID"), offsets[1], _SPATIAL))
    return _mlp(kernels[2:], offsets[2:], tf.reshape(a, [tf.shape(a)[0], -1]))


def _cnn28(kernels, offsets, a):
    a = ste_sign(_batch_norm(_pool(_conv3x3(a, kernels[0], "VALID")), offsets[0], _SPATIAL))
    a = ste_sign(_batch_norm(_pool(_conv3x3(a, kernels[1], "VALID")), offsets[1], _SPATIAL))
    a = ste_sign(_batch_norm(_conv3x3(a, kernels[2], "VALID"), offsets[2], _SPATIAL))
    return _mlp(kernels[3:], offsets[3:], tf.reshape(a, [tf.shape(a)[0], -1]))


def _res(family: Family, kernels, offsets, a):
    x = _conv3x3(a, kernels[0], "SAME")
    if family.side > 8:
        x = _pool(x)
    x = _batch_norm(x, offsets[0], _SPATIAL)  # the real-valued residual stream
    i = 1
    for stage in range(len(family.filters)):
        if stage:
            x = _batch_norm(_pool(_conv3x3(ste_sign(x), kernels[i], "SAME")), offsets[i], _SPATIAL)
            i += 1
        x = x + _batch_norm(_conv3x3(ste_sign(x), kernels[i], "SAME"), offsets[i], _SPATIAL)
        i += 1
    return _mlp(kernels[i:], offsets[i:], ste_sign(tf.reduce_mean(x, axis=[1, 2])))


def forward(family: Family, kernels: Sequence[tf.Tensor], offsets, x):
    """Logits (BatchNorm output, batch statistics) of ``family`` on ``x`` [B, family.inputs]."""
    if family.kind == "mlp":
        return _mlp(kernels, offsets, x)
    a = tf.reshape(x, [-1, family.side, family.side, 1])
    if family.kind == "cnn":
        return _cnn(kernels, offsets, a)
    if family.kind == "cnn28":
        return _cnn28(kernels, offsets, a)
    return _res(family, kernels, offsets, a)


def offset_shapes(family: Family) -> list:
    return [(s[-1],) for s in family.kernel_shapes()]


def xent(logits, labels):
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
