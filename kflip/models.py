"""Reference binarized networks (larq layers), as used by the benchmarks.

All binary kernels use the ``ste_sign`` quantizer (precision 1, so FlipLSTM, Bop and
greedy search treat them as binary) with larq's ``weight_clip`` constraint for the
Adam+STE baseline. Hidden activations are binarized with ``ste_sign`` too; the first
layer sees real-valued inputs and the last BatchNorm feeds a softmax.
"""

from __future__ import annotations

import weakref

import numpy as np

from kflip import _checks as checks
from kflip import _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

_BIN = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
_BIN_IN = dict(input_quantizer="ste_sign", **_BIN)


def _bn():
    return tf.keras.layers.BatchNormalization(momentum=0.9, scale=False)


def _bn_last_batch():
    """A BatchNorm that keeps the last training batch's statistics (see ``resnet``)."""
    return tf.keras.layers.BatchNormalization(momentum=0.0, scale=False)


def _check_positive(name, values):
    for v in values:
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must contain positive ints, got {values!r}.")


def mlp(input_shape=(28, 28, 1), num_classes: int = 10, hidden=(512, 512)) -> tf.keras.Model:
    """BinaryNet-style MLP: [binary Dense -> BN] x len(hidden) -> binary Dense -> BN.

    Example:
      >>> import kflip
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> model.output_shape, [tuple(v.shape) for v in kflip.binary_variables(model)]
      ((None, 10), [(64, 16), (16, 10)])
    """
    hidden = tuple(hidden)
    _check_positive("hidden", hidden)
    layers = [tf.keras.Input(input_shape), tf.keras.layers.Flatten()]
    for i, units in enumerate(hidden):
        layers += [lq.layers.QuantDense(units, **(_BIN if i == 0 else _BIN_IN)), _bn()]
    layers += [
        lq.layers.QuantDense(num_classes, **(_BIN_IN if hidden else _BIN)),
        _bn(),
        tf.keras.layers.Activation("softmax"),
    ]
    return tf.keras.Sequential(layers, name="mlp")


def cnn(input_shape=(28, 28, 1), num_classes: int = 10, filters=(32, 64, 64), dense: int = 64) -> tf.keras.Model:
    """The larq MNIST tutorial CNN (conv 32-64-64, dense 64-10).

    Example:
      >>> import kflip
      >>> model = kflip.models.cnn(input_shape=(28, 28, 1))
      >>> model.output_shape, len(kflip.binary_variables(model))
      ((None, 10), 5)
    """
    _check_positive("filters", tuple(filters))
    _check_positive("dense", (dense,))
    f1, f2, f3 = filters
    pool = lambda: tf.keras.layers.MaxPooling2D((2, 2))  # noqa: E731
    return tf.keras.Sequential(
        [
            tf.keras.Input(input_shape),
            lq.layers.QuantConv2D(f1, (3, 3), **_BIN),
            pool(),
            _bn(),
            lq.layers.QuantConv2D(f2, (3, 3), **_BIN_IN),
            pool(),
            _bn(),
            lq.layers.QuantConv2D(f3, (3, 3), **_BIN_IN),
            _bn(),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(dense, **_BIN_IN),
            _bn(),
            lq.layers.QuantDense(num_classes, **_BIN_IN),
            _bn(),
            tf.keras.layers.Activation("softmax"),
        ],
        name="cnn",
    )


def binarynet(input_shape=(32, 32, 3), num_classes: int = 10, width: float = 1.0) -> tf.keras.Model:
    """BinaryNet VGG-style net for CIFAR-10 (Courbariaux et al. 2016).

    ``width`` scales every layer (1.0: 128-128-256-256-512-512 conv, 1024-1024 dense).

    Example:
      >>> import kflip
      >>> model = kflip.models.binarynet(input_shape=(32, 32, 3), width=0.125)
      >>> model.output_shape, len(kflip.binary_variables(model))
      ((None, 10), 9)
      >>> model.layers[0].filters  # 128 * 0.125
      16

    References:
      - [Courbariaux et al., 2016. Binarized Neural Networks: Training Deep Neural
        Networks with Weights and Activations Constrained to +1 or
        -1](https://arxiv.org/abs/1602.02830)
    """
    if not width > 0:
        raise ValueError(f"`width` must be > 0, got {width!r}.")
    w = lambda n: max(1, int(round(n * width)))  # noqa: E731
    conv = lambda n, **kw: lq.layers.QuantConv2D(w(n), (3, 3), padding="same", **kw)  # noqa: E731
    pool = lambda: tf.keras.layers.MaxPooling2D((2, 2))  # noqa: E731
    layers = [tf.keras.Input(input_shape), conv(128, **_BIN), _bn()]
    layers += [conv(128, **_BIN_IN), pool(), _bn()]
    layers += [conv(256, **_BIN_IN), _bn(), conv(256, **_BIN_IN), pool(), _bn()]
    layers += [conv(512, **_BIN_IN), _bn(), conv(512, **_BIN_IN), pool(), _bn()]
    layers += [tf.keras.layers.Flatten()]
    layers += [lq.layers.QuantDense(w(1024), **_BIN_IN), _bn()]
    layers += [lq.layers.QuantDense(w(1024), **_BIN_IN), _bn()]
    layers += [lq.layers.QuantDense(num_classes, **_BIN_IN), _bn(), tf.keras.layers.Activation("softmax")]
    return tf.keras.Sequential(layers, name="binarynet")


def resnet(input_shape=(28, 28, 1), num_classes: int = 10, filters=(32, 64), blocks: int = 1) -> tf.keras.Model:
    """A small binary residual net in the Bi-Real Net / QuickNet style.

    Stem: a float 3x3 conv on the real-valued input -> 2x2 max-pool -> BN. Then two
    stages of ``blocks`` residual blocks ``x = x + BN(binary conv 3x3(sign(x)))``
    (real-valued shortcuts), the second after a transition (binary 3x3 conv to the new
    width, 2x2 max-pool, BN); then global average pooling and a float Dense head with
    softmax. As in Bi-Real Net and QuickNet, the first and the last layer are real-valued
    and every convolution in between is binary (``ste_sign`` weights and inputs).

    Re-estimate its BatchNorm statistics with :func:`recalibrate_batchnorm` after training
    and before inference (``kflip train``/``bench`` do so before every test evaluation);
    its BatchNorms themselves keep the last training batch's statistics
    (``momentum=0``), which describe the weights before the last step's update. The
    training step, which normalizes with batch statistics, is unaffected by either.
    Measured: the inference-mode gap was stale statistics, not the architecture (a BN
    before each sign, learnable BN scales or a BN after the pooling needed the
    re-estimation as much); with it, MNIST 6 epochs of FlipLSTM 96.64/97.03/96.50%
    (seeds 0/1/2; before: 94.92/63.03% for seeds 0/1), digits 10 epochs 98.33/98.05%
    (docs/benchmarks.md has the experiments).

    Example:
      >>> import kflip
      >>> model = kflip.models.resnet(input_shape=(8, 8, 1))
      >>> model.output_shape, len(kflip.binary_variables(model))  # 2 blocks, 1 transition
      ((None, 10), 3)
      >>> sum(type(layer).__name__ == "Add" for layer in model.layers)  # one per block
      2

    References:
      - [Liu et al., 2018. Bi-Real Net: Enhancing the Performance of 1-bit CNNs with
        Improved Representational Capability and Advanced Training
        Algorithm](https://arxiv.org/abs/1808.00278)
      - [Bannink et al., 2021. Larq Compute Engine: Design, Benchmark, and Deploy
        State-of-the-Art Binarized Neural Networks](https://arxiv.org/abs/2011.09398)
    """
    filters = tuple(filters)
    _check_positive("filters", filters)
    _check_positive("blocks", (blocks,))
    if len(filters) != 2:
        raise ValueError(f"`filters` must give the widths of the two stages, got {filters!r}.")
    conv = lambda n, **kw: lq.layers.QuantConv2D(n, (3, 3), padding="same", **kw)  # noqa: E731
    pool = lambda: tf.keras.layers.MaxPooling2D((2, 2))  # noqa: E731
    inp = tf.keras.Input(input_shape)
    stem = tf.keras.layers.Conv2D(filters[0], (3, 3), padding="same", use_bias=False)
    x = _bn_last_batch()(pool()(stem(inp)))
    for stage, width in enumerate(filters):
        if stage:
            x = _bn_last_batch()(pool()(conv(width, **_BIN_IN)(x)))
        for _ in range(blocks):
            x = tf.keras.layers.Add()([x, _bn_last_batch()(conv(width, **_BIN_IN)(x))])
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(num_classes)(x)
    return tf.keras.Model(inp, tf.keras.layers.Activation("softmax")(x), name="resnet")


_PROBES = weakref.WeakKeyDictionary()  # model -> (its BatchNorms, compiled moments of their inputs)


def _bn_probe(model):
    if model in _PROBES:
        return _PROBES[model]
    for layer in model.submodules:
        if isinstance(layer, tf.keras.Model) and any(
            isinstance(sub, tf.keras.layers.BatchNormalization) for sub in layer.submodules
        ):
            raise ValueError(
                f"`model`: nested model {layer.name!r} holds BatchNormalization layers; "
                "only top-level ones are supported."
            )
    bns = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    if not bns:
        _PROBES[model] = (bns, None)
        return _PROBES[model]
    probe = tf.keras.Model(model.inputs, [layer.input for layer in bns])

    @tf.function(jit_compile=True)
    def moments(x):
        out = probe(x, training=True)  # every BatchNorm normalizes with its batch statistics
        out = out if isinstance(out, (list, tuple)) else [out]
        res = []
        for layer, h in zip(bns, out):
            axis = [a % len(h.shape) for a in layer.axis]
            mean, var = tf.nn.moments(h, [a for a in range(len(h.shape)) if a not in axis])
            res.append((mean, var))
        return res

    _PROBES[model] = (bns, moments)
    return _PROBES[model]


def recalibrate_batchnorm(model: tf.keras.Model, x, batch_size: int = 64, batches: int | None = 100) -> int:
    """Set every BatchNorm's moving mean and variance to its population statistics under
    the current weights ("precise BN", Wu & Johnson 2021); returns the examples used.

    Runs the first ``batches`` full batches of ``batch_size`` examples of ``x`` (all of
    ``x`` if ``batches`` is None; pass shuffled training data) through ``model`` with every
    BatchNorm in training mode, as in a training step, and averages each BatchNorm
    input's per-channel statistics over them with equal weights: mean = the mean of the
    batch means, variance = the mean of the batch variances plus the variance of the batch
    means. Only the moving statistics change; kernels, biases, beta and gamma do not.
    Flip optimizers move the weights every step, so a moving average (or the last
    batch's statistics) describes older weights; call this after training, before
    inference (``kflip train``/``bench`` do so for :func:`resnet` before every test
    evaluation). Training-mode layers other than BatchNorm (e.g. Dropout) would be active
    too; kflip's models have none.

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.resnet(input_shape=(8, 8, 1), filters=(4, 8))
      >>> kflip.models.recalibrate_batchnorm(model, ds.x_train, batch_size=64, batches=4)
      256

    References:
      - [Wu & Johnson, 2021. Rethinking "Batch" in BatchNorm](https://arxiv.org/abs/2105.07576)
    """
    batch_size = checks.positive_int("batch_size", batch_size)
    batches = None if batches is None else checks.positive_int("batches", batches)
    x = np.asarray(x)
    if not len(x):
        raise ValueError("`x` must hold at least one example.")
    batch_size = min(int(batch_size), len(x))  # then one batch of all of x
    n = len(x) // batch_size if batches is None else min(int(batches), len(x) // batch_size)
    bns, moments = _bn_probe(model)
    if not bns:
        return 0
    means = [[] for _ in bns]
    variances = [[] for _ in bns]
    for i in range(n):
        for j, (m, v) in enumerate(moments(x[i * batch_size : (i + 1) * batch_size])):
            means[j].append(m.numpy().astype(np.float64))
            variances[j].append(v.numpy().astype(np.float64))
    for layer, m, v in zip(bns, means, variances):
        m, v = np.stack(m), np.stack(v)
        layer.moving_mean.assign(m.mean(0).astype(np.float32))
        layer.moving_variance.assign((v.mean(0) + m.var(0)).astype(np.float32))
    return n * batch_size


MODELS = {"mlp": mlp, "cnn": cnn, "binarynet": binarynet, "resnet": resnet}


def build(name: str, input_shape, num_classes: int, **kwargs) -> tf.keras.Model:
    """The model called ``name`` (``"mlp"``, ``"cnn"``, ``"binarynet"`` or ``"resnet"``); ``kwargs``
    go to its builder.

    Example:
      >>> import kflip
      >>> model = kflip.models.build("mlp", (8, 8, 1), num_classes=10, hidden=(16,))
      >>> model.name, model.output_shape
      ('mlp', (None, 10))
    """
    if name not in MODELS:
        raise ValueError(f"`model` must be one of {sorted(MODELS)}, got {name!r}.")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes, **kwargs)
