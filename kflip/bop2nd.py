"""Bop2ndOrder: Bop with the flip signal normalised by a second raw moment."""

from __future__ import annotations

import numpy as np

from kflip import _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import _checks as checks  # noqa: E402

_Schedule = tf.keras.optimizers.schedules.LearningRateSchedule
_HYPERS = ("threshold", "gamma", "sigma")


def _hyper(name, value, **bounds):
    """A ``LearningRateSchedule`` as it is, else a number checked against ``bounds``."""
    if isinstance(value, _Schedule):
        return value
    return checks.number(name, value, **bounds)


@tf.keras.utils.register_keras_serializable(package="kflip")
class Bop2ndOrder(tf.keras.optimizers.legacy.Optimizer):
    """Second-order binary optimizer (Bop2ndOrder).

    Like Bop, Bop2ndOrder is a latent-free optimizer for Binarized Neural Networks: it
    keeps an exponential moving average ``m`` of each binary weight's gradient and
    flips the weight when that average is strong enough and points the same way as
    the weight. It also keeps an exponential moving average ``v`` of the squared
    gradient (the second raw moment, as in Adam) and compares ``m / sqrt(v)``, not
    ``m``, with the threshold, so one threshold suits layers whose gradients differ
    in scale. Per binary weight ``w`` (exactly +1 or -1) with gradient ``g``:

        m <- m + gamma * (g - m)
        v <- v + sigma * (g**2 - v)
        w <- -w  where  |m| / (sqrt(v) + epsilon) > threshold  and  sign(m) == sign(w)

    With ``bias_correction=True`` the test uses ``m_hat = m / (1 - (1 - gamma)**t)``
    and ``v_hat = v / (1 - (1 - sigma)**t)`` instead, ``t`` being the 1-based step
    (the paper's bias-corrected variant). The slots ``m`` and ``v`` hold the biased
    averages in both variants. The first step snaps the weights to their sign
    (0 -> +1); afterwards they stay exactly +1/-1.

    Only binary variables may be given to it: use it inside
    ``larq.optimizers.CaseOptimizer`` with ``lq.optimizers.Bop.is_binary_variable``
    (variables with larq ``precision == 1``, e.g. kernels quantized by ``"ste_sign"``
    or ``lq.quantizers.NoOp(precision=1)``) and a float optimizer for the rest. The
    float optimizer must be a *legacy* Keras optimizer, e.g.
    ``tf.keras.optimizers.legacy.Adam(0.01)``; larq's ``CaseOptimizer`` rejects the
    new ``tf.keras.optimizers.Adam``. Works under ``model.compile(jit_compile=True)``.

    Example:
      >>> import kflip
      >>> import larq as lq
      >>> import numpy as np
      >>> import tensorflow as tf
      >>> tf.keras.utils.set_random_seed(0)
      >>> x = np.random.randn(64, 8, 8, 1).astype("float32")
      >>> y = np.random.randint(0, 10, size=64)
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> bop2 = kflip.Bop2ndOrder(threshold=1e-6, gamma=1e-6, sigma=1e-2)
      >>> opt = lq.optimizers.CaseOptimizer(
      ...     (lq.optimizers.Bop.is_binary_variable, bop2),
      ...     default_optimizer=tf.keras.optimizers.legacy.Adam(0.01))
      >>> model.compile(opt, "sparse_categorical_crossentropy", jit_compile=True)
      >>> _ = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
      >>> int(bop2.iterations)  # 2 epochs of 4 steps
      8
      >>> kernel = model.layers[1].kernel
      >>> sorted(set(kernel.numpy().ravel()))  # exactly +-1
      [-1.0, 1.0]
      >>> bop2.get_slot(kernel, "m").shape, bop2.get_slot(kernel, "v").shape
      (TensorShape([64, 16]), TensorShape([64, 16]))

    Args:
      threshold: ``tau``, the magnitude of ``m / (sqrt(v) + epsilon)`` a weight needs
        to flip; a number >= 0 or a ``LearningRateSchedule``.
      gamma: adaptivity rate of the first moment ``m``, in (0, 1], or a schedule.
      sigma: adaptivity rate of the second moment ``v``, in (0, 1], or a schedule.
      bias_correction: False (default) for the biased variant, True for the
        bias-corrected one.
      epsilon: added to ``sqrt(v)`` (outside the square root), > 0.
      name: name of the optimizer. Keep the default inside ``CaseOptimizer`` if the
        model is to be saved: ``CaseOptimizer`` stores its optimizers under their
        ``name`` and finds the class by it when loading.

    Schedules are evaluated at the optimizer's ``iterations`` (0 on the first step),
    as larq's Bop does; with ``bias_correction`` the correction uses the current
    ``gamma`` and ``sigma``. Defaults are those of the authors' implementation
    (``threshold=1e-6, gamma=1e-6, sigma=1e-2, epsilon=1e-10``).

    References:
      - [Suarez-Ramirez et al., 2021. A Bop and Beyond: A Second Order Optimizer for
        Binarized Neural Networks. CVPR Workshops](https://arxiv.org/abs/2104.05124)
      - [Helwegen et al., 2019. Latent Weights Do Not Exist: Rethinking Binarized
        Neural Network Optimization](https://arxiv.org/abs/1906.02107)
    """

    _HAS_AGGREGATE_GRAD = True
    is_binary_variable = staticmethod(lq.optimizers.Bop.is_binary_variable)

    def __init__(
        self,
        threshold=1e-6,
        gamma=1e-6,
        sigma=1e-2,
        bias_correction: bool = False,
        epsilon: float = 1e-10,
        name: str = "Bop2ndOrder",
        **kwargs,
    ):
        threshold = _hyper("threshold", threshold, low=0.0)
        gamma = _hyper("gamma", gamma, low=0.0, high=1.0, low_open=True)
        sigma = _hyper("sigma", sigma, low=0.0, high=1.0, low_open=True)
        if not isinstance(bias_correction, (bool, np.bool_)):
            raise ValueError(
                f"`bias_correction` must be True or False, got {bias_correction!r}."
            )
        epsilon = checks.number("epsilon", epsilon, low=0.0, low_open=True)
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
        super().__init__(name=name, **kwargs)
        self._set_hyper("threshold", threshold)
        self._set_hyper("gamma", gamma)
        self._set_hyper("sigma", sigma)
        self.bias_correction = bool(bias_correction)
        self.epsilon = epsilon

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")
            self.add_slot(var, "v")

    def _decayed(self, name, dtype):
        hyper = self._get_hyper(name, dtype)
        if isinstance(hyper, _Schedule):
            hyper = tf.cast(hyper(tf.cast(self.iterations, dtype)), dtype)
        return hyper

    def _resource_apply_dense(self, grad, var, apply_state=None):
        dtype = var.dtype.base_dtype
        grad = tf.cast(grad, dtype)
        gamma, sigma, threshold = (self._decayed(h, dtype) for h in ("gamma", "sigma", "threshold"))
        m = self.get_slot(var, "m")
        v = self.get_slot(var, "v")
        m_t = m.assign_add(gamma * (grad - m))
        v_t = v.assign_add(sigma * (tf.square(grad) - v))
        if self.bias_correction:
            # 1 - (1 - rate)**t as -expm1(t * log1p(-rate)): exact for tiny rates,
            # where 1 - rate rounds badly in float32.
            t = tf.cast(self.iterations + 1, dtype)
            m_t = m_t / -tf.math.expm1(t * tf.math.log1p(-gamma))
            v_t = v_t / -tf.math.expm1(t * tf.math.log1p(-sigma))
        ratio = m_t / (tf.sqrt(v_t) + tf.cast(self.epsilon, dtype))
        w = lq.math.sign(var)
        # sign(m) == sign(w) and |ratio| > threshold  <=>  w * ratio > threshold >= 0
        return var.assign(tf.where(w * ratio > threshold, -w, w)).op

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise NotImplementedError(
            f"Bop2ndOrder got a sparse gradient for {var.name}; binary weights need "
            "dense gradients."
        )

    def get_config(self):
        config = super().get_config()
        for h in _HYPERS:
            value = self._serialize_hyperparameter(h)
            # float32 variable -> the shortest decimal that rounds to it (1e-06, not
            # 9.99999997e-07)
            config[h] = value if isinstance(value, dict) else float(str(np.float32(value)))
        config["bias_correction"] = self.bias_correction
        config["epsilon"] = self.epsilon
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for h in _HYPERS:
            if isinstance(config.get(h), dict):
                config[h] = tf.keras.optimizers.schedules.deserialize(
                    config[h], custom_objects=custom_objects
                )
        return cls(**config)


# CaseOptimizer.from_config finds its optimizers by their bare name (what larq's own
# Bop registers under), not by the "kflip>Bop2ndOrder" key registered above.
tf.keras.utils.get_custom_objects().setdefault("Bop2ndOrder", Bop2ndOrder)
