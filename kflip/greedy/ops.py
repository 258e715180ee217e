"""Primitive inference ops of a lowered model (pure TensorFlow).

``full`` acts on whole tensors ``(N, ..., C)``; ``chan`` on one channel per candidate,
tensors ``(B, N, *spatial)`` with channel indices ``(B,)`` (the ops after a searched
layer that act on each channel separately: bias, activation, BatchNorm, pooling).

Model variables are read through :func:`read`: inside :func:`bind` (while a compiled
search kernel is traced) it returns the tensor passed in for the variable, so kernels
never capture model variables (see :mod:`kflip.greedy`, distribution).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.binary import is_binary_variable  # noqa: E402

BINDINGS = threading.local()


def read(var):
    """The value of a model variable inside an op.

    Inside :func:`bind` (the compiled search kernels) it is the tensor passed in for
    ``var``; outside it the variable's current value.
    """
    stack = getattr(BINDINGS, "stack", None)
    if stack:
        t = stack[-1].get(id(var))
        if t is None:  # would capture the variable in the compiled function
            raise RuntimeError(f"greedy: variable {var.name!r} has no bound value.")
        return t
    if isinstance(var, Param):
        return tf.constant(var.value, tf.float32)
    return tf.convert_to_tensor(var)


@contextlib.contextmanager
def bind(variables, values):
    """Make :func:`read` return ``values[i]`` for ``variables[i]`` (used while tracing)."""
    if len(variables) != len(values):
        raise RuntimeError(f"greedy: {len(values)} values for {len(variables)} variables.")
    stack = BINDINGS.__dict__.setdefault("stack", [])
    stack.append({id(v): t for v, t in zip(variables, values)})
    try:
        yield
    finally:
        stack.pop()


def bcast(v, rank):
    """(B,) or (B, k...) parameters -> broadcastable against (B, N, *spatial)."""
    return tf.reshape(v, tf.concat([tf.shape(v)[:1], tf.ones([rank - 1], tf.int32)], 0))


class Identity:
    local = True

    def __init__(self, name):
        self.name = name

    def variables(self):
        """Model variables this op reads (through :func:`read`)."""
        return []

    def full(self, t):
        return t

    def chan(self, t, idx):
        return t


class Elementwise(Identity):
    def __init__(self, name, fn):
        super().__init__(name)
        self.fn = fn

    def full(self, t):
        return self.fn(t)

    def chan(self, t, idx):
        return self.fn(t)


class Bias(Identity):
    def __init__(self, name, var):
        super().__init__(name)
        self.var = var

    def variables(self):
        return [self.var]

    def full(self, t):
        return t + read(self.var)

    def chan(self, t, idx):
        return t + bcast(tf.gather(read(self.var), idx), t.shape.rank)


class BatchNorm(Identity):
    def __init__(self, layer):
        super().__init__(layer.name)
        self.layer = layer

    def variables(self):
        bn = self.layer
        return ([bn.moving_mean, bn.moving_variance] + ([bn.gamma] if bn.scale else [])
                + ([bn.beta] if bn.center else []))

    def _affine(self):
        bn = self.layer
        inv = tf.math.rsqrt(read(bn.moving_variance) + bn.epsilon)
        if bn.scale:
            inv = inv * read(bn.gamma)
        shift = -read(bn.moving_mean) * inv
        if bn.center:
            shift = shift + read(bn.beta)
        return inv, shift

    def full(self, t):
        inv, shift = self._affine()
        return t * inv + shift

    def chan(self, t, idx):
        inv, shift = self._affine()
        r = t.shape.rank
        return t * bcast(tf.gather(inv, idx), r) + bcast(tf.gather(shift, idx), r)


class Pool(Identity):
    def __init__(self, layer, kind):
        super().__init__(layer.name)
        self.kind = kind
        self.ksize = list(layer.pool_size)
        self.strides = list(layer.strides)
        self.padding = layer.padding.upper()

    def full(self, t):
        fn = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
        return fn(t, self.ksize, self.strides, self.padding)

    def chan(self, t, idx):
        s = tf.shape(t)
        y = self.full(tf.reshape(t, tf.concat([[-1], s[2:], [1]], 0)))
        return tf.reshape(y, tf.concat([s[:2], tf.shape(y)[1:3]], 0))


class GlobalPool(Identity):
    def __init__(self, layer, kind):
        super().__init__(layer.name)
        self.reduce = tf.reduce_max if kind == "max" else tf.reduce_mean

    def full(self, t):
        return self.reduce(t, axis=[1, 2])

    def chan(self, t, idx):
        return self.reduce(t, axis=[-2, -1])


class Flatten(Identity):
    local = False

    def full(self, t):
        return tf.reshape(t, [tf.shape(t)[0], -1])


class Linear(Identity):
    """Kernel product of a Dense/Conv2D-like layer (no bias, activation, quantizer)."""

    local = False

    def __init__(self, layer, kind):
        super().__init__(layer.name)
        self.layer = layer
        self.kind = kind
        self.var = layer.kernel
        self.kernel_shape = tuple(int(d) for d in self.var.shape)
        self.quantizer = getattr(layer, "kernel_quantizer", None)
        self.binary = is_binary_variable(self.var)
        if kind == "conv":
            self.ksize = tuple(layer.kernel_size)
            self.strides = tuple(layer.strides)
            self.dilation = tuple(layer.dilation_rate)
            self.padding = layer.padding.upper()
            self.pad_values = float(getattr(layer, "pad_values", 0.0))

    def variables(self):
        return [self.var]

    @property
    def fan_in(self):
        return int(np.prod(self.kernel_shape[:-1]))

    @property
    def units(self):
        return self.kernel_shape[-1]

    def kernel(self):
        """The effective kernel as a tensor (quantized), shaped like the variable."""
        k = read(self.var)
        return self.quantizer(k) if self.quantizer is not None else k

    def _pad(self, t, value):
        """Explicit 'same' padding (as larq does for pad_values != 0)."""
        pads = [[0, 0]]
        for i in range(2):
            n = int(t.shape[i + 1])
            k, s, d = self.ksize[i], self.strides[i], self.dilation[i]
            eff = (k - 1) * d + 1
            out = (n + s - 1) // s
            total = max((out - 1) * s + eff - n, 0)
            pads.append([total // 2, total - total // 2])
        pads.append([0, 0])
        return tf.pad(t, pads, constant_values=value)

    def patches(self, t, pad_value=None):
        """(N, H, W, Cin) -> (N, H', W', kh*kw*Cin), ordered like the kernel rows."""
        padding = self.padding
        value = self.pad_values if pad_value is None else pad_value
        if padding == "SAME" and value != 0.0:
            t, padding = self._pad(t, value), "VALID"
        return tf.image.extract_patches(
            t,
            sizes=[1, *self.ksize, 1],
            strides=[1, *self.strides, 1],
            rates=[1, *self.dilation, 1],
            padding=padding,
        )

    def full(self, t, kernel=None):
        k = self.kernel() if kernel is None else tf.reshape(kernel, self.kernel_shape)
        if self.kind == "dense":
            return tf.matmul(t, k)
        padding = self.padding
        if padding == "SAME" and self.pad_values != 0.0:
            t, padding = self._pad(t, self.pad_values), "VALID"
        return tf.nn.conv2d(t, k, self.strides, padding, dilations=self.dilation)


class Param:
    """A search parameter that is not a model variable (read like one, see :func:`read`)."""

    def __init__(self, name, value):
        self.name, self.value = name, float(value)


class Scale(Identity):
    """Multiplies by a scalar :class:`Param` (the loss head's temperature on the logits)."""

    def __init__(self, name, param):
        super().__init__(name)
        self.param = param

    def variables(self):
        return [self.param]

    def full(self, t):
        return t * read(self.param)

    def chan(self, t, idx):
        return t * read(self.param)


class Add(Identity):
    """Elementwise sum of several inputs (a residual shortcut)."""

    local = False

    def full(self, *ts):
        out = ts[0]
        for t in ts[1:]:
            out = out + t
        return out


def sum64(x, axis=None):
    """Sum in float64 (loss sums must not lose single flips' changes)."""
    return tf.reduce_sum(tf.cast(x, tf.float64), axis=axis)


def to_front(t):
    """(N, *sp, C) -> (C, N, *sp)."""
    r = t.shape.rank
    return tf.transpose(t, [r - 1] + list(range(r - 1)))


def to_back(t):
    """(C, N, *sp) -> (N, *sp, C)."""
    r = t.shape.rank
    return tf.transpose(t, list(range(1, r)) + [0])


def new_channels(P, Z, Wm, cc, ff, mm):
    """Pre-activations of each candidate's channel after its flips: (B, N, *sp).

    ``P`` (N, *sp, F) are the layer's input patches, ``Z`` (N, *sp, C) its
    pre-activation; flipping ``W[f, c]`` adds ``-2 W[f, c] P[..., f]`` to ``Z[..., c]``.
    """
    b, g = int(ff.shape[0]), int(ff.shape[1])
    zc = to_front(tf.gather(Z, cc, axis=-1))
    w = tf.gather_nd(Wm, tf.stack([ff, tf.broadcast_to(cc[:, None], [b, g])], -1))
    pg = tf.gather(P, tf.reshape(ff, [-1]), axis=-1)  # (N, *sp, B*G)
    r = pg.shape.rank
    pg = tf.reshape(pg, tf.concat([tf.shape(pg)[:-1], [b, g]], 0))
    pg = tf.transpose(pg, [r - 1, r] + list(range(r - 1)))  # (B, G, N, *sp)
    coef = -2.0 * w * mm
    coef = tf.reshape(coef, [b, g] + [1] * (r - 1))
    return zc + tf.reduce_sum(coef * pg, axis=1)
