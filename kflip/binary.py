"""Which variables are binary, and keeping them exactly +1/-1."""

from __future__ import annotations

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.cell import sign_pm1  # noqa: E402


def is_binary_variable(var) -> bool:
    """True for variables larq marks as 1-bit (``var.precision == 1``).

    That covers kernels of ``QuantDense``/``QuantConv2D``/... built with a 1-bit kernel
    quantizer such as ``"ste_sign"`` or ``larq.quantizers.NoOp(precision=1)``; the same
    predicate as ``larq.optimizers.Bop.is_binary_variable``, so it can be handed to
    ``larq.optimizers.CaseOptimizer``.
    """
    return getattr(var, "precision", None) == 1


def binary_variables(model) -> list:
    """The binary trainable variables of ``model``, in layer order (front to back)."""
    return [v for v in model.trainable_variables if is_binary_variable(v)]


def snap_binary_weights(model) -> int:
    """Set every binary weight of ``model`` to exactly +1/-1 (sign, 0 -> +1).

    Returns the number of binary variables. FlipLSTM does this itself on its first
    step; call it to start from exact binary weights (e.g. before greedy search).
    """
    variables = binary_variables(model)
    for v in variables:
        v.assign(sign_pm1(v))
    return len(variables)


def assert_binary(model) -> None:
    """Raise AssertionError unless every binary weight of ``model`` is exactly +-1."""
    for v in binary_variables(model):
        x = tf.convert_to_tensor(v)
        ok = bool(tf.reduce_all(tf.logical_or(tf.equal(x, 1.0), tf.equal(x, -1.0))))
        if not ok:
            raise AssertionError(f"binary variable {v.name} has values other than +-1")
