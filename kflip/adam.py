"""Adam as one pure function over a typed state, for NumPy arrays and TF tensors.

Meta-training uses it twice: on the BatchNorm offsets inside the compiled inner loop
(TensorFlow, float32, as FlipLSTM's default float optimizer ``Adam(0.01)``) and on
the meta-parameters of the outer loop (NumPy, float64). One formula serves both:

    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

This is Kingma & Ba (2015), Algorithm 1. tf_keras' ``Adam`` computes the same update
with ``eps`` scaled by ``sqrt(1 - b2^t)`` (it folds the bias corrections into the
step size); the two agree to float rounding wherever ``|g|`` is well above ``eps``
(``tests/test_rule.py`` pins it step for step).

Example:

>>> import numpy as np
>>> from kflip.adam import Adam
>>> opt = Adam(learning_rate=0.1)
>>> params = np.array([1.0, -2.0])
>>> state = opt.init(params)
>>> params, state = opt.update(2 * params, state, params)  # gradient of sum(p^2)
>>> params.round(3).tolist(), state.count
([0.9, -1.9], 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402


class AdamState(NamedTuple):
    """Adam's state: updates done so far and the two moment estimates (like params)."""

    count: Any
    mu: Any
    nu: Any


def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, float))


def _sqrt(x):
    return np.sqrt(x) if _is_numpy(x) else tf.sqrt(x)


def _power(base: float, t, like):
    """``base ** t`` in the precision of ``like`` (Python float for NumPy, else a tensor)."""
    if _is_numpy(like) and not tf.is_tensor(t):
        return base**t
    return tf.pow(tf.constant(base, like.dtype), tf.cast(t, like.dtype))


@dataclasses.dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba, 2015) as ``init(params)`` / ``update(grads, state, params)``.

    ``params`` may be one array or tensor or any nest of them (tuples, lists).
    """

    learning_rate: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7

    def init(self, params) -> AdamState:
        zeros = tf.nest.map_structure(
            lambda p: np.zeros_like(p) if _is_numpy(p) else tf.zeros_like(p), params
        )
        count = 0 if all(_is_numpy(p) for p in tf.nest.flatten(params)) else tf.constant(0)
        return AdamState(count, zeros, zeros)

    def update(self, grads, state: AdamState, params):
        """``(new_params, new_state)`` after one step with gradients ``grads``."""
        t = state.count + 1
        mu = tf.nest.map_structure(
            lambda m, g: self.b1 * m + (1 - self.b1) * g, state.mu, grads
        )
        nu = tf.nest.map_structure(
            lambda v, g: self.b2 * v + (1 - self.b2) * (g * g), state.nu, grads
        )

        def step(p, m, v):
            bc1 = 1.0 - _power(self.b1, t, p)
            bc2 = 1.0 - _power(self.b2, t, p)
            return p - self.learning_rate * (m / bc1) / (_sqrt(v / bc2) + self.eps)

        new_params = tf.nest.map_structure(step, params, mu, nu)
        return new_params, AdamState(t, mu, nu)
