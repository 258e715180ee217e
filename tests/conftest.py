import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402,F401  (selects Keras 2 before TensorFlow)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits: real data, offline, 8x8x1 in [-1, 1]."""
    return data.digits()


def random_lstm_weights(hidden=2, seed=0):
    """LSTM weights with every gate and the recurrence in play (not a Bop rule)."""
    rng = np.random.RandomState(seed)
    return kflip.LSTMWeights(
        kernel=rng.randn(2, 4 * hidden) * 0.5,
        recurrent=rng.randn(hidden, 4 * hidden) * 0.5,
        bias=rng.randn(4 * hidden),
        out_kernel=rng.randn(hidden),
        out_bias=0.1,
    )


def small_mlp(hidden=(32,), seed=0, num_classes=10, input_shape=(8, 8, 1)):
    """A tiny BinaryNet-style MLP on digits with exact +-1 kernels."""
    tf.keras.utils.set_random_seed(seed)
    m = models.mlp(input_shape=input_shape, num_classes=num_classes, hidden=hidden)
    kflip.snap_binary_weights(m)
    return m


def small_cnn(seed=0, num_classes=10, input_shape=(8, 8, 1)):
    tf.keras.utils.set_random_seed(seed)
    import larq as lq

    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    m = tf.keras.Sequential(
        [
            tf.keras.Input(input_shape),
            lq.layers.QuantConv2D(8, 3, padding="same", **kw),
            tf.keras.layers.BatchNormalization(scale=False),
            lq.layers.QuantConv2D(8, 3, input_quantizer="ste_sign", **kw),
            tf.keras.layers.BatchNormalization(scale=False),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(num_classes, input_quantizer="ste_sign", **kw),
            tf.keras.layers.BatchNormalization(scale=False),
            tf.keras.layers.Activation("softmax"),
        ]
    )
    kflip.snap_binary_weights(m)
    return m


def binary_values(model):
    return [v.numpy().copy() for v in kflip.binary_variables(model)]


def is_pm1(arrays):
    return all(np.all(np.abs(a) == 1.0) for a in arrays)
