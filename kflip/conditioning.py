"""Per-tensor conditioning of the flip rule: where a tensor is, at O(1) cost per tensor.

The per-weight cell is the same for every binary weight; what differs between a
conv kernel early in a short run and a dense kernel late in a long one is told by
a few numbers per *tensor*, computed once per step:

* ``log_step``: ``log(t) / log(10**4)`` (0 at the first step, 1 at step 10,000), the
  step embedding of learned optimizers (Metz et al., learned_optimization);
* ``grad_rms_trend``: ``0.5 * log(v / v_slow)``, the tensor's gradient RMS against
  its long-run average (``v_slow``: decay 0.999), clipped to [-3, 3];
* ``log_fan_in``: ``log(fan_in) / log(10**4)`` (inputs per output unit: rows of a
  Dense kernel, ``kh * kw * c_in`` of a convolution);
* ``flip_rate``: ``log10(r + 1e-6) / 6 + 1`` of the tensor's recent fraction of
  weights flipped per step (``r``: decay 0.9), 0 for no flips, 1 for all.

A linear map (``tensor_kernel``, ``[len(TENSOR_FEATURES), 4H + 1]``, meta-learned)
turns them into offsets of the cell's ``4H`` gate biases and a log-scale of its
read-out bias (the flip threshold). As in VeLO (Metz et al., 2022), a per-tensor
model sets the parameters of the per-weight rule; the per-weight work keeps its
shape. A zero ``tensor_kernel`` is the unconditioned rule, exactly.

>>> import tensorflow as tf
>>> from kflip import conditioning
>>> state = conditioning.init(tf.float32)
>>> phi, state2 = conditioning.features(tf.ones([3, 3, 8, 16]), state, v_hat=tf.constant(1e-4),
...                                     step=tf.constant(1.0), eps=1e-20)
>>> [round(float(x), 3) + 0.0 for x in phi]  # log step, trend, log fan-in (72), flip rate
[0.0, 0.0, 0.464, 0.0]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

TENSOR_FEATURES = ("log_step", "grad_rms_trend", "log_fan_in", "flip_rate")
SLOW_BETA = 0.999
RATE_DECAY = 0.9
_LOG_1E4 = math.log(1e4)
_MAX_OFFSET = 20.0  # gate-logit offsets and the log threshold scale are clipped to this


class TensorState(NamedTuple):
    """The conditioning state of one tensor (two scalars)."""

    v_slow: Any  # slow average of the bias-corrected mean(g**2)
    rate: Any  # average fraction of the tensor's weights flipped per step


def num_outputs(hidden_size: int) -> int:
    """Columns of ``tensor_kernel``: ``4H`` gate-bias offsets and one log threshold scale."""
    return 4 * int(hidden_size) + 1


def zeros(hidden_size: int) -> np.ndarray:
    """The ``tensor_kernel`` of the unconditioned rule."""
    return np.zeros((len(TENSOR_FEATURES), num_outputs(hidden_size)), np.float32)


def init(dtype) -> TensorState:
    return TensorState(tf.zeros([], dtype), tf.zeros([], dtype))


def features(theta, state: TensorState, v_hat, step, eps: float):
    """``(phi, v_slow)``: the features of a tensor shaped like ``theta`` at (1-based,
    float) ``step`` whose bias-corrected gradient moment is ``v_hat``, and the new slow
    moment. A non-finite ``v_hat`` leaves ``v_slow`` as it was."""
    dtype = theta.dtype
    step = tf.cast(step, dtype)
    v_hat = tf.cast(v_hat, dtype)
    v_slow = SLOW_BETA * state.v_slow + (1.0 - SLOW_BETA) * v_hat
    v_slow = tf.where(tf.math.is_finite(v_slow), v_slow, state.v_slow)
    v_slow_hat = v_slow / (1.0 - tf.pow(tf.constant(SLOW_BETA, dtype), step))
    trend = 0.5 * tf.math.log((v_hat + eps) / (v_slow_hat + eps))
    trend = tf.clip_by_value(tf.where(tf.math.is_finite(trend), trend, 0.0), -3.0, 3.0)
    shape = theta.shape.as_list()
    fan_in = max(1, int(np.prod(shape[:-1]))) if len(shape) > 1 else 1
    rate = tf.math.log(state.rate + 1e-6) / math.log(10.0) / 6.0 + 1.0
    phi = tf.stack([
        tf.math.log(tf.maximum(step, 1.0)) / _LOG_1E4,
        trend,
        tf.constant(math.log(fan_in) / _LOG_1E4, dtype),
        tf.clip_by_value(rate, 0.0, 1.0),
    ])
    return phi, v_slow


def offsets(tensor_kernel, phi):
    """``(gate_offsets [4H], out_scale)`` of features ``phi`` (a scalar scale > 0)."""
    z = tf.linalg.matvec(tf.cast(tensor_kernel, phi.dtype), phi, transpose_a=True)
    z = tf.clip_by_value(z, -_MAX_OFFSET, _MAX_OFFSET)
    return z[:-1], tf.exp(z[-1])


def next_rate(state: TensorState, flipped, size: int):
    """The flip-rate average after ``flipped`` of ``size`` weights flipped."""
    frac = tf.cast(flipped, state.rate.dtype) / float(max(size, 1))
    return RATE_DECAY * state.rate + (1.0 - RATE_DECAY) * frac
