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

    Example:
      >>> import kflip
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> [kflip.is_binary_variable(v) for v in model.trainable_variables]
      [True, False, True, False]
    """
    return getattr(var, "precision", None) == 1


def binary_variables(model) -> list:
    """The binary trainable variables of ``model``, in layer order (front to back).

    Example:
      >>> import kflip
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> [tuple(v.shape) for v in kflip.binary_variables(model)]
      [(64, 16), (16, 10)]
    """
    return [v for v in model.trainable_variables if is_binary_variable(v)]


def named_binary_variables(model) -> list:
    """``(name, variable)`` for every binary variable of ``model``, front to back.

    ``name`` is ``"<layer name>/<weight name>"`` (e.g. ``"quant_dense/kernel"``), taken
    from the layer that owns the variable, so it stays right after
    ``tf.keras.models.load_model`` (which names every kernel just ``kernel:0``).

    >>> import kflip, tensorflow as tf
    >>> tf.keras.backend.clear_session()  # fresh layer names
    >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
    >>> [name for name, _ in kflip.binary.named_binary_variables(model)]
    ['quant_dense/kernel', 'quant_dense_1/kernel']
    """
    owner = {}
    for layer in [model, *model.submodules]:  # pre-order: inner layers come later
        if isinstance(layer, tf.keras.layers.Layer):
            for w in layer.trainable_weights:
                owner[w.ref()] = layer.name
    variables = binary_variables(model)
    names = (
        f"{owner.get(v.ref(), model.name)}/{v.name.split('/')[-1].split(':')[0]}"
        for v in variables
    )
    return list(zip(unique_names(names), variables))


def unique_names(names) -> list:
    """``names`` with repeats made distinct by a suffix (``a``, ``a_2``, ``a_3``).

    >>> unique_names(["kernel", "kernel", "bias"])
    ['kernel', 'kernel_2', 'bias']
    """
    out, seen = [], set()
    for name in names:
        base, k = name, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


def snap_binary_weights(model) -> int:
    """Set every binary weight of ``model`` to exactly +1/-1 (sign, 0 -> +1).

    Returns the number of binary variables. FlipLSTM does this itself on its first
    step; call it to start from exact binary weights (e.g. before greedy search).

    Example:
      >>> import kflip
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> kflip.snap_binary_weights(model)  # the initial kernels are floats
      2
      >>> sorted(set(kflip.binary_variables(model)[0].numpy().ravel()))
      [-1.0, 1.0]
    """
    variables = binary_variables(model)
    for v in variables:
        v.assign(sign_pm1(v))
    return len(variables)


def assert_binary(model) -> None:
    """Raise AssertionError unless every binary weight of ``model`` is exactly +-1.

    Example:
      >>> import kflip
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> kflip.assert_binary(model)  # freshly initialised: latent floats
      Traceback (most recent call last):
      ...
      AssertionError: binary variable quant_dense.../kernel:0 has values other than +-1
      >>> _ = kflip.snap_binary_weights(model)
      >>> kflip.assert_binary(model)  # passes silently
    """
    for v in binary_variables(model):
        x = tf.convert_to_tensor(v)
        ok = bool(tf.reduce_all(tf.logical_or(tf.equal(x, 1.0), tf.equal(x, -1.0))))
        if not ok:
            raise AssertionError(f"binary variable {v.name} has values other than +-1")
