"""Model lowering: a Keras model as a graph of primitive ops with its loss head.

Each Keras layer lowers to a short chain of ops (:mod:`kflip.greedy.ops`) through a
table (:data:`LOWERINGS`, one small function per layer kind); the layers' connections
become the graph: ``Network.src[i]`` are the indices of the ops whose outputs op ``i``
reads (``-1`` is the model input). Sequential models, functional chains and functional
models with residual shortcuts (``Add``) are supported.
"""

from __future__ import annotations

from kflip import _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip.greedy import ops  # noqa: E402

_NOT_ELEMENTWISE = ("softmax", "log_softmax")
SUPPORTED = (
    "QuantDense/Dense, QuantConv2D/Conv2D, BatchNormalization, Add, Activation, ReLU, "
    "Max/AveragePooling2D, GlobalMax/AveragePooling2D, Flatten, Dropout-like layers"
)


class _Softmax:
    """Marker for a final softmax / log_softmax (folded into the loss head)."""

    def __init__(self, fname):
        self.fname = fname


def _activation(name, fn) -> list:
    fname = getattr(fn, "__name__", "")
    if fname == "linear":
        return []
    return [_Softmax(fname) if fname in _NOT_ELEMENTWISE else ops.Elementwise(name, fn)]


def _linear(layer, kind) -> list:
    out = []
    iq = getattr(layer, "input_quantizer", None)
    if iq is not None:
        out.append(ops.Elementwise(f"{layer.name}/input_quantizer", iq))
    out.append(ops.Linear(layer, kind))
    if layer.use_bias:
        out.append(ops.Bias(f"{layer.name}/bias", layer.bias))
    return out + _activation(f"{layer.name}/activation", layer.activation)


def _dense(layer) -> list:
    try:
        rank = len(layer.input_shape)
    except (AttributeError, RuntimeError):
        rank = 2
    if rank != 2:
        raise ValueError(f"`model`: Dense layer {layer.name!r} needs a 2D input (add a Flatten).")
    return _linear(layer, "dense")


def _conv(layer) -> list:
    if type(layer).__name__ not in ("QuantConv2D", "Conv2D"):  # not DepthwiseConv2D etc.
        raise ValueError(f"`model`: layer {layer.name!r} ({type(layer).__name__}) is not supported.")
    if layer.data_format != "channels_last" or layer.groups != 1:
        raise ValueError(
            f"`model`: layer {layer.name!r}: only channels_last, groups=1 Conv2D is supported."
        )
    return _linear(layer, "conv")


def _batch_norm(layer) -> list:
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    in_rank = getattr(getattr(layer, "input_spec", None), "ndim", None)
    if len(axis) != 1 or axis[0] not in (-1, (in_rank or 0) - 1):
        raise ValueError(f"`model`: BatchNormalization {layer.name!r} must normalize the last axis.")
    return [ops.BatchNorm(layer)]


def _global_pool(kind):
    def lower(layer):
        if layer.keepdims:
            raise ValueError(f"`model`: {layer.name!r}: keepdims=True is not supported.")
        return [ops.GlobalPool(layer, kind)]

    return lower


K = tf.keras.layers
LOWERINGS = (  # (layer types, lowering); the first match wins
    ((K.InputLayer,), lambda layer: []),
    ((lq.layers.QuantDense, K.Dense), _dense),
    ((lq.layers.QuantConv2D, K.Conv2D), _conv),
    ((K.BatchNormalization,), _batch_norm),
    ((K.Activation,), lambda layer: _activation(layer.name, layer.activation)),
    ((K.ReLU,), lambda layer: [ops.Elementwise(layer.name, layer)]),
    ((K.MaxPooling2D,), lambda layer: [ops.Pool(layer, "max")]),
    ((K.AveragePooling2D,), lambda layer: [ops.Pool(layer, "avg")]),
    ((K.GlobalMaxPooling2D,), _global_pool("max")),
    ((K.GlobalAveragePooling2D,), _global_pool("avg")),
    ((K.Flatten,), lambda layer: [ops.Flatten(layer.name)]),
    ((K.Add,), lambda layer: [ops.Add(layer.name)]),
    ((K.Dropout, K.SpatialDropout1D, K.SpatialDropout2D, K.GaussianNoise, K.GaussianDropout,
      K.AlphaDropout, K.ActivityRegularization), lambda layer: [ops.Identity(layer.name)]),
)


def layer_ops(layer) -> list:
    """Lower one Keras layer to primitive ops; ``ValueError`` for unsupported layers."""
    for types, lower in LOWERINGS:
        if isinstance(layer, types):
            return lower(layer)
    raise ValueError(
        f"`model`: layer {layer.name!r} ({type(layer).__name__}) is not supported by greedy "
        f"search. Supported: {SUPPORTED}."
    )


def layer_graph(model) -> list:
    """``[(layer, [input layer positions])]`` in topological order (-1: the model input)."""
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"`model` must be a tf.keras Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError("`model` must be built (call it once or give it an Input).")
    if isinstance(model, tf.keras.Sequential):
        layers = list(model.layers)
        return [(layer, [i - 1]) for i, layer in enumerate(layers)]
    if not getattr(model, "_is_graph_network", False):
        raise ValueError("`model` must be Sequential or functional (subclassed models are not supported).")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("`model` must have exactly one input and one output.")
    layers = [layer for layer in model.layers if not isinstance(layer, tf.keras.layers.InputLayer)]
    pos = {id(layer): i for i, layer in enumerate(layers)}
    graph = []
    for layer in layers:
        nodes = layer._inbound_nodes
        if len(nodes) != 1:
            raise ValueError(f"`model`: layer {layer.name!r} is called more than once (shared layers "
                             "are not supported).")
        inbound = nodes[0].inbound_layers
        inbound = list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]
        srcs = [-1 if isinstance(src, tf.keras.layers.InputLayer) else pos.get(id(src)) for src in inbound]
        if None in srcs:
            raise ValueError(f"`model`: layer {layer.name!r} reads a layer outside the model.")
        graph.append((layer, srcs))
    if model.outputs[0]._keras_history.layer is not layers[-1]:
        raise ValueError("`model`: the output must come from the last layer.")
    return graph
