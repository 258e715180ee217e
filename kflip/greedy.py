"""Greedy flip search: train a BNN by trying flips and keeping those that lower the loss.

:func:`greedy_flip` is the engine, :class:`GreedyFlip` the Keras callback.

On a fixed probe set, layer by layer (front to back by default), every candidate (one
binary weight, or a group of weights of one output unit) is flipped in a preset order;
the flip is kept if the probe loss (inference mode, BatchNorm moving statistics)
decreases by more than ``min_delta``, otherwise reverted. ``exhaustive=True`` instead
evaluates all ``2**n`` sign assignments of each group of ``n`` weights and keeps the
best one.

How it is fast (``method="incremental"``, the default)
-----------------------------------------------------
The model is split at the layer under search. The prefix (everything before the
layer's kernel product, including its input quantizer) runs once; its output ``X`` is
cached together with the layer's pre-activation ``Z``, the binarized *boundary* ``A``
(``Z`` pushed through the channel-local layers up to and including the next layer's
input quantizer: bias, activation, BatchNorm, pooling), the next layer's
pre-activation ``Znext`` and the per-example loss. Flipping ``W[f, c]`` changes only
output channel ``c``: ``Z[..., c] -= 2 W[f, c] P[..., f]`` where ``P`` are the input
patches (``X`` itself for Dense). For a block of candidates the engine computes, in one
XLA call, the new channel ``c`` at the boundary for every probe example; examples whose
binarized boundary does not change keep their loss (no further work). For the others
the next layer's pre-activation gets a rank-1 (Dense) or local (Conv) update, the rest
of the network runs on those rows only, and the loss deltas are summed per candidate.
For the last binary layer the boundary is the logits: the loss delta is computed in
closed form from one changed logit column.

Acceptance is sequential and exact: a block is evaluated against the current weights;
the first improving candidate is accepted, the caches are updated, and evaluation
restarts after it (candidates of untouched channels whose flip changes no boundary
value are rejected without re-evaluation: their loss change is exactly zero). The
accepted sequence is the one a one-at-a-time search produces; ``method="naive"`` is
that reference (one full forward pass of the probe set per candidate).

Model variables are only written when a flip is accepted, one ``assign`` per accepted
candidate; on any exception (including ``KeyboardInterrupt``) the model is left as
after the last accepted flip.

Distribution: the compiled kernels never capture model variables. Their values are
read eagerly (``_Network.values``) when a layer's search starts and passed in as
tensors (``params=``), and accepted kernels are written back with ``var.assign``
outside the compiled functions, so models whose variables were created under a
``tf.distribute`` strategy (``MirroredVariable``, ``SyncOnReadVariable``) are searched
on the current device with the same result as on a single device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import time
from typing import Callable

import numpy as np

from kflip import _keras
from kflip import data as data_lib

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip.binary import is_binary_variable  # noqa: E402

__all__ = ["GreedyFlip", "GreedyReport", "LayerReport", "greedy_flip"]

ORDERS = ("index", "random", "gradient")
METHODS = ("incremental", "naive")
MAX_EXHAUSTIVE = 24


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerReport:
    """What the search did in one layer during one pass."""

    name: str
    pass_index: int
    candidates: int  # candidates (groups) available in the layer
    tried: int  # candidate evaluations (assignments, for exhaustive search)
    accepted: int  # accepted candidates (groups / assignments)
    flipped: int  # individual weights flipped
    loss_before: float
    loss_after: float
    seconds: float
    stop_reason: str  # "done" | "max_candidates" | "max_seconds"
    flips: list = dataclasses.field(default_factory=list, repr=False)  # flat kernel indices


@dataclasses.dataclass
class GreedyReport:
    """Result of :func:`greedy_flip`. Losses are mean per-example probe losses."""

    method: str
    probe_size: int
    tried: int
    accepted: int
    flipped: int
    loss_before: float
    loss_after: float
    seconds: float
    layers: list

    def as_logs(self, prefix: str = "greedy/") -> dict:
        """Flat ``{name: float}`` for Keras logs / History / TensorBoard."""
        logs = {
            f"{prefix}loss_before": self.loss_before,
            f"{prefix}loss_after": self.loss_after,
            f"{prefix}tried": float(self.tried),
            f"{prefix}accepted": float(self.accepted),
            f"{prefix}flipped": float(self.flipped),
            f"{prefix}seconds": self.seconds,
        }
        for lr in self.layers:
            key = f"{prefix}{lr.name}"
            logs[f"{key}/accepted"] = logs.get(f"{key}/accepted", 0.0) + lr.accepted
            logs[f"{key}/tried"] = logs.get(f"{key}/tried", 0.0) + lr.tried
            logs[f"{key}/loss_after"] = lr.loss_after
        return logs


# --------------------------------------------------------------------------------------
# Primitive inference ops (pure TF). ``full`` acts on (N, ..., C) tensors; ``chan`` on
# one channel per candidate, tensors (B, N, *spatial) with channel indices (B,).
# --------------------------------------------------------------------------------------


_BINDINGS = threading.local()


def _read(var):
    """The value of a model variable inside an op.

    Inside :func:`_bind` (the compiled search kernels) it is the tensor passed in for
    ``var``; outside it the variable's current value.
    """
    stack = getattr(_BINDINGS, "stack", None)
    if stack:
        t = stack[-1].get(id(var))
        if t is None:  # would capture the variable in the compiled function
            raise RuntimeError(f"greedy: variable {var.name!r} has no bound value.")
        return t
    return tf.convert_to_tensor(var)


@contextlib.contextmanager
def _bind(variables, values):
    """Make :func:`_read` return ``values[i]`` for ``variables[i]`` (used while tracing)."""
    if len(variables) != len(values):
        raise RuntimeError(f"greedy: {len(values)} values for {len(variables)} variables.")
    stack = _BINDINGS.__dict__.setdefault("stack", [])
    stack.append({id(v): t for v, t in zip(variables, values)})
    try:
        yield
    finally:
        stack.pop()


def _bcast(v, rank):
    """(B,) or (B, k...) parameters -> broadcastable against (B, N, *spatial)."""
    return tf.reshape(v, tf.concat([tf.shape(v)[:1], tf.ones([rank - 1], tf.int32)], 0))


class _Identity:
    local = True

    def __init__(self, name):
        self.name = name

    def variables(self):
        """Model variables this op reads (through :func:`_read`)."""
        return []

    def full(self, t):
        return t

    def chan(self, t, idx):
        return t


class _Elementwise(_Identity):
    def __init__(self, name, fn):
        super().__init__(name)
        self.fn = fn

    def full(self, t):
        return self.fn(t)

    def chan(self, t, idx):
        return self.fn(t)


class _Bias(_Identity):
    def __init__(self, name, var):
        super().__init__(name)
        self.var = var

    def variables(self):
        return [self.var]

    def full(self, t):
        return t + _read(self.var)

    def chan(self, t, idx):
        return t + _bcast(tf.gather(_read(self.var), idx), t.shape.rank)


class _BatchNorm(_Identity):
    def __init__(self, layer):
        super().__init__(layer.name)
        self.layer = layer

    def variables(self):
        bn = self.layer
        return ([bn.moving_mean, bn.moving_variance] + ([bn.gamma] if bn.scale else [])
                + ([bn.beta] if bn.center else []))

    def _affine(self):
        bn = self.layer
        inv = tf.math.rsqrt(_read(bn.moving_variance) + bn.epsilon)
        if bn.scale:
            inv = inv * _read(bn.gamma)
        shift = -_read(bn.moving_mean) * inv
        if bn.center:
            shift = shift + _read(bn.beta)
        return inv, shift

    def full(self, t):
        inv, shift = self._affine()
        return t * inv + shift

    def chan(self, t, idx):
        inv, shift = self._affine()
        r = t.shape.rank
        return t * _bcast(tf.gather(inv, idx), r) + _bcast(tf.gather(shift, idx), r)


class _Pool(_Identity):
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


class _GlobalPool(_Identity):
    def __init__(self, layer, kind):
        super().__init__(layer.name)
        self.reduce = tf.reduce_max if kind == "max" else tf.reduce_mean

    def full(self, t):
        return self.reduce(t, axis=[1, 2])

    def chan(self, t, idx):
        return self.reduce(t, axis=[-2, -1])


class _Flatten(_Identity):
    local = False

    def full(self, t):
        return tf.reshape(t, [tf.shape(t)[0], -1])


class _Linear(_Identity):
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
        k = _read(self.var)
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


_IDENTITY_LAYERS = (
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
)
_NOT_ELEMENTWISE = ("softmax", "log_softmax")


def _activation_op(name, fn):
    fname = getattr(fn, "__name__", "")
    if fname == "linear":
        return None
    return _Elementwise(name, fn) if fname not in _NOT_ELEMENTWISE else ("softmax", fname)


def _layer_ops(layer) -> list:
    """Lower one Keras layer to primitive ops; raise for unsupported layers."""
    cls = type(layer).__name__
    ops = []
    if isinstance(layer, tf.keras.layers.InputLayer):
        return ops
    kind = None
    if isinstance(layer, (lq.layers.QuantDense, tf.keras.layers.Dense)):
        kind = "dense"
    elif isinstance(layer, (lq.layers.QuantConv2D, tf.keras.layers.Conv2D)) and cls in (
        "QuantConv2D",
        "Conv2D",
    ):
        kind = "conv"
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise ValueError(
                f"`model`: layer {layer.name!r}: only channels_last, groups=1 Conv2D is supported."
            )
    if kind == "dense":
        try:
            rank = len(layer.input_shape)
        except (AttributeError, RuntimeError):
            rank = 2
        if rank != 2:
            raise ValueError(f"`model`: Dense layer {layer.name!r} needs a 2D input (add a Flatten).")
    if kind is not None:
        iq = getattr(layer, "input_quantizer", None)
        if iq is not None:
            ops.append(_Elementwise(f"{layer.name}/input_quantizer", iq))
        ops.append(_Linear(layer, kind))
        if layer.use_bias:
            ops.append(_Bias(f"{layer.name}/bias", layer.bias))
        act = _activation_op(f"{layer.name}/activation", layer.activation)
        if act is not None:
            ops.append(act)
        return ops
    if isinstance(layer, tf.keras.layers.BatchNormalization):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        spec = getattr(layer, "input_spec", None)
        in_rank = getattr(spec, "ndim", None)
        if len(axis) != 1 or axis[0] not in (-1, (in_rank or 0) - 1):
            raise ValueError(
                f"`model`: BatchNormalization {layer.name!r} must normalize the last axis."
            )
        return [_BatchNorm(layer)]
    if isinstance(layer, tf.keras.layers.Activation):
        act = _activation_op(layer.name, layer.activation)
        return [act] if act is not None else []
    if isinstance(layer, tf.keras.layers.ReLU):
        return [_Elementwise(layer.name, layer)]
    if isinstance(layer, tf.keras.layers.MaxPooling2D):
        return [_Pool(layer, "max")]
    if isinstance(layer, tf.keras.layers.AveragePooling2D):
        return [_Pool(layer, "avg")]
    if isinstance(layer, tf.keras.layers.GlobalMaxPooling2D) and not layer.keepdims:
        return [_GlobalPool(layer, "max")]
    if isinstance(layer, tf.keras.layers.GlobalAveragePooling2D) and not layer.keepdims:
        return [_GlobalPool(layer, "avg")]
    if isinstance(layer, tf.keras.layers.Flatten):
        return [_Flatten(layer.name)]
    if cls in _IDENTITY_LAYERS:
        return [_Identity(layer.name)]
    raise ValueError(
        f"`model`: layer {layer.name!r} ({cls}) is not supported by greedy search. Supported: "
        "QuantDense/Dense, QuantConv2D/Conv2D, BatchNormalization, Activation, ReLU, "
        "Max/AveragePooling2D, GlobalMax/AveragePooling2D, Flatten, Dropout-like layers."
    )


def _chain_layers(model) -> list:
    """The layers of ``model`` in order; raise unless they form a simple chain."""
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"`model` must be a tf.keras Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError("`model` must be built (call it once or give it an Input).")
    if isinstance(model, tf.keras.Sequential):
        return list(model.layers)
    if not getattr(model, "_is_graph_network", False):
        raise ValueError("`model` must be Sequential or functional (subclassed models are not supported).")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("`model` must have exactly one input and one output.")
    layers = [l for l in model.layers]
    prev = None
    for layer in layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            prev = layer
            continue
        nodes = layer._inbound_nodes
        inbound = nodes[0].inbound_layers if len(nodes) == 1 else None
        if isinstance(inbound, (list, tuple)):
            inbound = inbound[0] if len(inbound) == 1 else None
        if prev is None or inbound is not prev:
            raise ValueError(
                f"`model`: layer {layer.name!r} does not continue a single chain; greedy "
                "search supports Sequential models and functional models whose layers "
                "form a chain."
            )
        prev = layer
    return layers


class _Network:
    """A chain model lowered to primitive ops, with its loss head."""

    def __init__(self, model, loss, from_logits):
        self.model = model
        ops = []
        for layer in _chain_layers(model):
            for op in _layer_ops(layer):
                ops.append(op)
        softmax = False
        if ops and isinstance(ops[-1], tuple):
            kind, fname = ops.pop()
            softmax = fname == "softmax"
            if not softmax:
                raise ValueError("`model`: a final log_softmax is not supported; use softmax.")
        for op in ops:
            if isinstance(op, tuple):
                raise ValueError("`model`: softmax is only supported as the final activation.")
        self.ops = ops
        self.softmax = softmax
        if loss in (None, "sparse_categorical_crossentropy"):
            if not softmax and from_logits is None:
                raise ValueError(
                    "`from_logits`: the model does not end in a softmax; pass "
                    "from_logits=True (outputs are logits) or False (probabilities)."
                )
            self.from_logits = True if softmax else bool(from_logits)
            self.loss_fn = None
        elif callable(loss):
            self.loss_fn = loss
            self.from_logits = None
        else:
            raise ValueError(
                "`loss` must be 'sparse_categorical_crossentropy' or a callable "
                f"(y_true, y_pred) -> per-example losses, got {loss!r}."
            )
        self.linear = [i for i, op in enumerate(ops) if isinstance(op, _Linear)]
        self.variables, seen = [], set()
        for op in ops:
            for v in op.variables():
                if id(v) not in seen:
                    seen.add(id(v))
                    self.variables.append(v)

    def values(self):
        """Current values of :attr:`variables`, read eagerly (``params`` of the kernels).

        Under a ``tf.distribute`` strategy this is the cross-replica value on the
        current device, so the compiled kernels never touch per-replica components.
        """
        return tuple(tf.convert_to_tensor(v) for v in self.variables)

    def jit(self, fn):
        """``fn(*tensors)`` XLA-compiled, reading the model variables from ``params``.

        The result is called as ``kernel(*tensors, params=self.values())``; without
        ``params`` the current values are read first. The variables are never
        captured by the compiled function.
        """
        return _Kernel(self, fn)

    def forward(self, t, start=0, stop=None, override=None):
        """Run ops[start:stop]; ``override`` = (op index, flat (F, C) kernel)."""
        stop = len(self.ops) if stop is None else stop
        for i in range(start, stop):
            op = self.ops[i]
            if isinstance(op, _Linear) and override is not None and override[0] == i:
                t = op.full(t, override[1])
            else:
                t = op.full(t)
        return t

    def outputs(self, logits):
        return tf.nn.softmax(logits) if self.softmax else logits

    def per_example_loss(self, logits, y):
        """Per-example loss from the pre-softmax output (float32)."""
        if self.loss_fn is not None:
            return tf.reshape(tf.cast(self.loss_fn(y, self.outputs(logits)), tf.float32), [-1])
        if self.from_logits:
            picked = tf.gather(logits, y, axis=-1, batch_dims=logits.shape.rank - 1)
            return tf.reduce_logsumexp(logits, axis=-1) - picked
        eps = tf.keras.backend.epsilon()
        p = tf.clip_by_value(tf.gather(logits, y, axis=-1, batch_dims=logits.shape.rank - 1), eps, 1 - eps)
        return -tf.math.log(p)


class _Kernel:
    """An XLA-compiled search kernel whose model variables are passed in as tensors."""

    def __init__(self, net, fn):
        variables = net.variables
        self.net = net

        def kernel(*args, params):
            with _bind(variables, params):
                return fn(*args)

        self.function = tf.function(kernel, jit_compile=True, autograph=False)

    def _params(self, params):
        return self.net.values() if params is None else params

    def __call__(self, *args, params=None):
        return self.function(*args, params=self._params(params))

    def get_concrete_function(self, *args, params=None):
        return self.function.get_concrete_function(*args, params=self._params(params))

    def experimental_get_compiler_ir(self, *args, params=None):
        return self.function.experimental_get_compiler_ir(*args, params=self._params(params))


def _sum64(x, axis=None):
    return tf.reduce_sum(tf.cast(x, tf.float64), axis=axis)


# --------------------------------------------------------------------------------------
# One layer's incremental search state and XLA kernels
# --------------------------------------------------------------------------------------


class _LayerSearch:
    """Cached state and compiled kernels for searching the kernel of ops[p]."""

    def __init__(self, net: _Network, p: int, x, y, pairs_per_block: int):
        self.net, self.p = net, p
        self.lin: _Linear = net.ops[p]
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        ops = net.ops
        q = next((i for i in net.linear if i > p), None)
        self.q = q
        end = len(ops) if q is None else q
        chain, post_flatten, flat = [], False, False
        for op in ops[p + 1 : end]:
            if isinstance(op, _Flatten):
                flat = True
                continue
            if flat and isinstance(op, (_BatchNorm, _Bias, _Pool, _GlobalPool)):
                post_flatten = True
            chain.append(op)
        self.chain, self.flat = chain, flat
        self.next: _Linear | None = ops[q] if q is not None else None
        self.rest_start = None if q is None else q + 1
        self._post_flatten = post_flatten
        self.pairs_per_block = int(pairs_per_block)
        self._eval_fns = {}
        self._cap = {}
        self._update = net.jit(self._update_impl)
        self._init = net.jit(self._init_impl)
        self._grad = net.jit(self._grad_impl)
        self.params = None

    # ---- helpers -----------------------------------------------------------------
    def _P(self, X):
        if self.lin.kind == "dense":
            return X
        return self.lin.patches(X)

    def _chain_chan(self, zc, idx):
        for op in self.chain:
            zc = op.chan(zc, idx)
        return zc

    def _to_front(self, t):
        """(N, *sp, C) -> (C, N, *sp)."""
        r = t.shape.rank
        return tf.transpose(t, [r - 1] + list(range(r - 1)))

    def _to_back(self, t):
        r = t.shape.rank
        return tf.transpose(t, list(range(1, r)) + [0])

    def _contrib(self, d, idx):
        """Next layer's pre-activation change for boundary deltas d (K, *spb) in channels idx."""
        nxt = self.next
        k = nxt.kernel()
        rb = d.shape.rank - 1  # boundary spatial rank
        if nxt.kind == "dense":
            if rb == 0:
                return d[:, None] * tf.gather(k, idx)
            sp = [int(s) for s in d.shape[1:]]
            k4 = tf.reshape(k, sp + [-1, nxt.units])
            g = tf.gather(k4, idx, axis=rb)  # (*sp, K, U)
            return tf.einsum("khw,hwku->ku", d, g) if rb == 2 else tf.einsum("kh,hku->ku", d, g)
        g = tf.gather(k, idx, axis=2)  # (kh, kw, K, U)
        kh, kw = nxt.ksize
        g = tf.reshape(tf.transpose(g, [2, 0, 1, 3]), [-1, kh * kw, nxt.units])
        pt = nxt.patches(d[..., None], pad_value=0.0)  # (K, H', W', kh*kw)
        return tf.einsum("khwp,kpu->khwu", pt, g)

    def _rest_loss(self, znext):
        logits = self.net.forward(znext, self.rest_start)
        return logits

    # ---- kernels -----------------------------------------------------------------
    def _init_impl(self, x, Wm):
        X = self.net.forward(x, 0, self.p)  # prefix, incl. the layer's input quantizer
        P = self._P(X)
        Z = tf.tensordot(P, Wm, [[P.shape.rank - 1], [0]])
        c = int(Wm.shape[1])
        A = self._to_back(self._chain_chan(self._to_front(Z), tf.range(c)))
        if self.next is None:
            logits, Zn = A, tf.zeros([0])
        else:
            Zn = self.next.full(tf.reshape(A, [self.n, -1]) if self.flat else A)
            logits = self._rest_loss(Zn)
        L = self.net.per_example_loss(logits, self.y)
        return X, P, Z, A, Zn, L

    def _grad_impl(self, X, Wm):
        with tf.GradientTape() as tape:
            tape.watch(Wm)
            logits = self.net.forward(X, self.p, override=(self.p, Wm))
            loss = tf.reduce_mean(self.net.per_example_loss(logits, self.y))
        return tape.gradient(loss, Wm)

    def _new_channels(self, P, Z, Wm, cc, ff, mm):
        """Candidate pre-activations of their channel: (B, N, *sp)."""
        b, g = int(ff.shape[0]), int(ff.shape[1])
        zc = self._to_front(tf.gather(Z, cc, axis=-1))
        w = tf.gather_nd(Wm, tf.stack([ff, tf.broadcast_to(cc[:, None], [b, g])], -1))
        pg = tf.gather(P, tf.reshape(ff, [-1]), axis=-1)  # (N, *sp, B*G)
        r = pg.shape.rank
        pg = tf.reshape(pg, tf.concat([tf.shape(pg)[:-1], [b, g]], 0))
        pg = tf.transpose(pg, [r - 1, r] + list(range(r - 1)))  # (B, G, N, *sp)
        coef = -2.0 * w * mm
        coef = tf.reshape(coef, [b, g] + [1] * (r - 1))
        return zc + tf.reduce_sum(coef * pg, axis=1)

    def _eval_impl(self, P, Z, A, Zn, L, Wm, cc, ff, mm, capacity):
        zc = self._new_channels(P, Z, Wm, cc, ff, mm)
        ac_new = self._chain_chan(zc, cc)  # (B, N, *spb)
        a_t = self._to_front(A)  # (C, N, *spb)
        ac_old = tf.gather(a_t, cc)
        sp_axes = list(range(2, ac_new.shape.rank))
        diff = tf.not_equal(ac_new, ac_old)
        changed = tf.reduce_any(diff, axis=sp_axes) if sp_axes else diff  # (B, N)
        naff = tf.reduce_sum(tf.cast(changed, tf.int32), axis=1)
        b = int(cc.shape[0])
        L64 = tf.cast(L, tf.float64)
        if self.next is None:
            C = int(A.shape[-1])
            if self.net.loss_fn is None and self.net.from_logits:
                # closed form: one logit column changes; lse' = logaddexp(lse without c, l')
                eye = tf.eye(C, dtype=tf.bool)
                masked = tf.where(eye[None], tf.constant(-np.inf, A.dtype), A[:, None, :])
                lse_wo = tf.gather(tf.reduce_logsumexp(masked, axis=-1), cc, axis=1)  # (N, B)
                lse_wo = tf.transpose(lse_wo)  # (B, N)
                hi = tf.maximum(lse_wo, ac_new)
                lse = hi + tf.math.log1p(tf.exp(-tf.abs(lse_wo - ac_new)))
                ly = tf.gather(A, self.y, axis=1, batch_dims=1)  # (N,)
                is_y = tf.equal(tf.cast(self.y, tf.int32)[None], cc[:, None])
                lnew = lse - tf.where(is_y, ac_new, ly[None])
            else:
                onehot = tf.one_hot(cc, C, on_value=True, off_value=False)[:, None, :]
                logits = tf.where(onehot, ac_new[..., None], A[None])  # (B, N, C)
                lnew = self.net.per_example_loss(logits, tf.broadcast_to(self.y[None], [b, self.n]))
            delta = tf.where(changed, tf.cast(lnew, tf.float64) - L64[None], tf.zeros_like(L64[None]))
            return tf.reduce_sum(delta, axis=1), naff, tf.constant(0, tf.int32)
        flat = tf.reshape(changed, [-1])
        pos = tf.cumsum(tf.cast(flat, tf.int32)) - 1
        count = tf.reduce_sum(tf.cast(flat, tf.int32))
        slot = tf.where(flat & (pos < capacity), pos, capacity)
        ids = tf.tensor_scatter_nd_update(
            tf.fill([capacity + 1], -1), slot[:, None], tf.range(b * self.n)
        )[:capacity]
        valid = ids >= 0
        ids = tf.maximum(ids, 0)
        bk, nk = ids // self.n, ids % self.n
        ck = tf.gather(cc, bk)
        spb = ac_new.shape[2:]
        new_rows = tf.gather(tf.reshape(ac_new, [-1] + list(spb)), ids)
        old_rows = tf.gather_nd(a_t, tf.stack([ck, nk], -1))
        zrows = tf.gather(Zn, nk) + self._contrib(new_rows - old_rows, ck)
        lnew = self.net.per_example_loss(self._rest_loss(zrows), tf.gather(self.y, nk))
        dk = tf.where(valid, tf.cast(lnew, tf.float64) - tf.gather(L64, nk), tf.zeros_like(bk, tf.float64))
        delta = tf.math.unsorted_segment_sum(dk, bk, b)
        return delta, naff, count

    def _update_impl(self, P, Z, A, Zn, Wm, c, ff, mm):
        g = int(ff.shape[0])
        idx = tf.stack([ff, tf.fill([g], c)], -1)
        old = tf.gather_nd(Wm, idx)
        Wm = tf.tensor_scatter_nd_update(Wm, idx, tf.where(mm > 0, -old, old))
        zc = tf.tensordot(P, tf.gather(Wm, c, axis=1), [[P.shape.rank - 1], [0]])  # (N, *sp)
        C = int(Wm.shape[1])
        sel = tf.equal(tf.range(C), c)
        Z = tf.where(sel, zc[..., None], Z)
        ac = self._chain_chan(zc[None], c[None])[0]
        a_old = tf.gather(A, c, axis=-1)
        A = tf.where(sel, ac[..., None], A)
        if self.next is None:
            logits = A
        else:
            Zn = Zn + self._contrib(ac - a_old, tf.fill([self.n], c))
            logits = self._rest_loss(Zn)
        L = self.net.per_example_loss(logits, self.y)
        return Wm, Z, A, Zn, L

    # ---- driver-facing API -------------------------------------------------------
    def start(self, Wm):
        """Compute the caches for the current kernel (flat (F, C) tensor)."""
        # the model's variables, read now (outside XLA); the searched kernel itself is
        # never read from them (it is ``Wm``), so they stay valid for the whole layer
        self.params = self.net.values()
        self.X, self.P, self.Z, self.A, self.Zn, self.L = self._init(self.x, Wm, params=self.params)
        if self.A.shape.rank > 2 and (self._post_flatten or (
                self.next is not None and self.next.kind == "dense" and not self.flat)):
            raise ValueError(
                f"`model`: between {self.lin.name!r} and the next Dense only a Flatten and "
                "elementwise layers are supported after the spatial layers."
            )
        self.Wm = Wm

    def gradient(self):
        return self._grad(self.X, self.Wm, params=self.params)

    def loss_sum(self):
        return float(_sum64(self.L))

    def _capacities(self, b):
        """Compiled pair capacities for block size b: n * 4**k, up to the cap."""
        top = min(b * self.n, max(self.n, self.pairs_per_block))
        if top <= 8192:  # small problems: one compiled size
            return [top]
        caps, c = [], self.n
        while c < top:
            caps.append(c)
            c *= 4
        return caps + [top]

    def eval_fn(self, b, g, capacity):
        key = (b, g, capacity)
        if key not in self._eval_fns:
            self._eval_fns[key] = self.net.jit(
                lambda P, Z, A, Zn, L, Wm, cc, ff, mm: self._eval_impl(
                    P, Z, A, Zn, L, Wm, cc, ff, mm, capacity
                )
            )
        return self._eval_fns[key]

    def evaluate(self, cc, ff, mm):
        """Loss-sum deltas (float64) and changed-example counts for a block.

        Returns None if more (candidate, example) pairs change than ``pairs_per_block``
        allows (the caller splits the block). The pair capacity adapts to the counts
        seen (compiled sizes n * 4**k).
        """
        b, g = int(cc.shape[0]), int(ff.shape[1])
        caps = self._capacities(b) if self.next is not None else [0]
        cap = self._cap.get(b, caps[-1]) if self.next is not None else 0
        while True:
            fn = self.eval_fn(b, g, cap)
            delta, naff, count = fn(self.P, self.Z, self.A, self.Zn, self.L, self.Wm, cc, ff, mm,
                                    params=self.params)
            if self.next is None:
                return delta.numpy(), naff.numpy()
            count = int(count)
            if count > cap:
                bigger = [c for c in caps if c >= count]
                if not bigger:
                    self._cap[b] = caps[-1]
                    return None
                cap = bigger[0]
                continue
            # next time: the smallest capacity with 2x headroom over this block's count
            self._cap[b] = next((c for c in caps if c >= 2 * count), caps[-1])
            return delta.numpy(), naff.numpy()

    def apply(self, c, ff, mm):
        """New state tensors after flipping (c, ff[mm>0]); does not commit them."""
        return self._update(self.P, self.Z, self.A, self.Zn, self.Wm, c, ff, mm, params=self.params)

    def commit(self, state):
        self.Wm, self.Z, self.A, self.Zn, self.L = state


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def _probe(x, y, probe_size, probe_seed):
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("`y` must be None when `x` is a tf.data.Dataset of (x, y).")
        xs, ys, n = [], [], 0
        for item in x:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("`x`: the tf.data.Dataset must yield (x, y) pairs.")
            bx, by = np.asarray(item[0]), np.asarray(item[1])
            if bx.ndim == 0 or by.ndim == 0:
                raise ValueError("`x`: the tf.data.Dataset must be batched.")
            xs.append(bx)
            ys.append(by)
            n += len(bx)
            if probe_size is not None and n >= probe_size:
                break
        if not xs:
            raise ValueError("`x`: the tf.data.Dataset is empty.")
        x = np.concatenate(xs)[: probe_size or None]
        y = np.concatenate(ys)[: probe_size or None]
    else:
        if y is None:
            raise ValueError("`y` is required when `x` is an array.")
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"`y` has {len(y)} examples but `x` has {len(x)}.")
        if probe_size is not None and len(x) > probe_size:
            idx = np.sort(np.random.RandomState(probe_seed).choice(len(x), probe_size, replace=False))
            x, y = x[idx], y[idx]
    if len(x) == 0:
        raise ValueError("`x` is empty.")
    x, y = _check_arrays(x, y)
    return tf.constant(x, tf.float32), tf.constant(y)


def _check_arrays(x, y):
    """Probe arrays as float inputs and int64 class ids (one-hot ``y`` allowed);
    ``ValueError`` for a length mismatch, NaN/Inf inputs or non-class labels."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"`y` has {len(y)} examples but `x` has {len(x)}.")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise ValueError("`x`: the probe inputs must be finite numbers (found NaN, Inf or non-numbers).")
    if y.ndim > 1:
        y = y.reshape(len(y), -1)
        y = y[:, 0] if y.shape[1] == 1 else np.argmax(y, axis=1)
    return x, data_lib.class_labels(y, "`y`")


def _check_classes(model, loss, y) -> None:
    """With the sparse cross-entropy, every label must be one of the model's outputs."""
    if loss not in (None, "sparse_categorical_crossentropy"):
        return
    n_out = int(model.output_shape[-1])
    top = int(tf.reduce_max(y))
    if top >= n_out:
        raise ValueError(
            f"`y` has label {top}, but the model has {n_out} outputs (classes 0..{n_out - 1})."
        )


def _select_layers(net: _Network, layers):
    binary = [i for i in net.linear if net.ops[i].binary]
    if layers is None:
        return binary
    if isinstance(layers, (str, int)) or isinstance(layers, tf.keras.layers.Layer):
        layers = [layers]
    chosen = []
    for spec in layers:
        if isinstance(spec, tf.keras.layers.Layer):
            match = [i for i in binary if net.ops[i].layer is spec]
        elif isinstance(spec, str):
            match = [i for i in binary if net.ops[i].name == spec]
        elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            match = [binary[spec]] if -len(binary) <= spec < len(binary) else []
        else:
            match = []
        if not match:
            names = [net.ops[i].name for i in binary]
            raise ValueError(
                f"`layers`: {spec!r} is not a binary layer of the model (binary layers: {names})."
            )
        if match[0] not in chosen:
            chosen.append(match[0])
    return sorted(chosen)


def _groups(order, fan_in, units, group_size, rng, gain=None):
    """Candidate groups in search order: columns (M,), fan-in rows (M, G) (-1 padded)."""
    g = group_size
    if order == "random":
        rows = np.stack([rng.permutation(fan_in) for _ in range(units)], 1)  # (F, C)
    elif order == "gradient":
        rows = np.argsort(gain, axis=0, kind="stable")  # most promising first per column
    else:
        rows = np.broadcast_to(np.arange(fan_in)[:, None], (fan_in, units))
    nchunk = -(-fan_in // g)
    pad = nchunk * g - fan_in
    rows = np.concatenate([rows, np.full((pad, units), -1, rows.dtype)], 0)
    ff = rows.reshape(nchunk, g, units).transpose(0, 2, 1).reshape(-1, g)  # (chunk, col)
    cc = np.tile(np.arange(units), nchunk)
    if order == "random":
        perm = rng.permutation(len(cc))
        cc, ff = cc[perm], ff[perm]
    elif order == "gradient":
        gg = np.where(ff >= 0, gain[np.maximum(ff, 0), cc[:, None]], 0.0).sum(1)
        perm = np.argsort(gg, kind="stable")
        cc, ff = cc[perm], ff[perm]
    return cc.astype(np.int32), ff.astype(np.int32)


def _check_int(name, v, lo=1, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}{' or None' if allow_none else ''}, got {v!r}.")


def validate_options(options: dict) -> None:
    """Raise ``ValueError`` for unknown or invalid :func:`greedy_flip` keywords.

    Checks what can be checked without a model, so that a run can refuse bad options
    before it trains (``kflip train --greedy``, :class:`GreedyFlip`).

    >>> validate_options({"order": "gradient", "max_seconds": 5.0})
    >>> validate_options({"order": "bogus"})
    Traceback (most recent call last):
    ...
    ValueError: `order` must be one of ('index', 'random', 'gradient'), got 'bogus'.
    """
    bad = set(options) - set(greedy_flip.__kwdefaults__)
    if bad:
        raise ValueError(f"unknown greedy_flip arguments: {sorted(bad)}")
    merged = {**greedy_flip.__kwdefaults__, **options}
    _check_values(**{k: merged[k] for k in _CHECKED})


def _check_values(
    *,
    layer_order,
    order,
    method,
    group_size,
    passes,
    block_size,
    pairs_per_block,
    max_candidates,
    probe_size,
    exhaustive,
    max_seconds,
    min_delta,
    on_step,
):
    """The model-free checks of :func:`greedy_flip`'s keywords (one place for both)."""
    if layer_order not in ("forward", "backward"):
        raise ValueError(f"`layer_order` must be 'forward' or 'backward', got {layer_order!r}.")
    if order not in ORDERS:
        raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    _check_int("group_size", group_size)
    _check_int("passes", passes)
    _check_int("block_size", block_size)
    _check_int("pairs_per_block", pairs_per_block)
    _check_int("max_candidates", max_candidates, allow_none=True)
    _check_int("probe_size", probe_size, allow_none=True)
    if not isinstance(exhaustive, bool):
        raise ValueError(f"`exhaustive` must be a bool, got {exhaustive!r}.")
    if exhaustive and group_size > MAX_EXHAUSTIVE:
        raise ValueError(
            f"`group_size` must be <= {MAX_EXHAUSTIVE} with exhaustive=True, got {group_size}."
        )
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"`max_seconds` must be a positive number or None, got {max_seconds!r}.")
    if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
        raise ValueError(f"`min_delta` must be a number >= 0, got {min_delta!r}.")
    if on_step is not None and not callable(on_step):
        raise ValueError(f"`on_step` must be callable or None, got {on_step!r}.")


_CHECKED = tuple(inspect.signature(_check_values).parameters)


def greedy_flip(
    model,
    x,
    y=None,
    *,
    probe_size: int | None = 2048,
    probe_seed: int = 0,
    layers=None,
    layer_order: str = "forward",
    order: str = "index",
    group_size: int = 1,
    exhaustive: bool = False,
    max_candidates: int | None = None,
    max_seconds: float | None = None,
    passes: int = 1,
    min_delta: float = 1e-6,
    loss="sparse_categorical_crossentropy",
    from_logits: bool | None = None,
    method: str = "incremental",
    block_size: int = 512,
    pairs_per_block: int = 65536,
    seed: int = 0,
    on_step: Callable | None = None,
    verbose: int = 0,
) -> GreedyReport:
    """Greedy flip search on the binary kernels of ``model`` (modified in place).

    Args:
      model: a built Sequential (or chain-shaped functional) tf.keras model of larq
        ``QuantDense``/``QuantConv2D`` and BatchNorm/pooling/Flatten/Activation layers.
        Binary kernels (larq ``precision == 1``) must hold exactly +-1 (see
        :func:`kflip.snap_binary_weights`).
      x, y: the probe data: arrays (a fixed random subset of ``probe_size`` examples
        is used, chosen by ``probe_seed``), or ``x`` a batched ``tf.data.Dataset`` of
        ``(x, y)`` (its first ``probe_size`` examples) and ``y=None``.
      layers: binary layers to search (names, Layer objects or indices among the
        binary layers); default all.
      layer_order: ``"forward"`` (front to back, default) or ``"backward"``.
      order: candidate order within a layer: ``"index"`` (kernel order), ``"random"``
        or ``"gradient"`` (by the first-order loss change ``-2*theta*g``, most negative
        first; ``g`` is computed on the probe set when the layer's search starts).
      group_size: flip this many weights of one output unit together (default 1).
      exhaustive: evaluate all ``2**group_size`` assignments of each group (at most
        ``2**24``) and keep the best one if it lowers the loss.
      max_candidates, max_seconds: per-layer, per-pass budget.
      passes: number of sweeps over the layers; stops early after a pass without any
        accepted flip.
      min_delta: a flip is accepted iff the mean probe loss decreases by more than this.
      loss: ``"sparse_categorical_crossentropy"`` or ``callable(y_true, y_pred)``
        returning per-example losses (``y_pred`` are the model outputs).
      from_logits: only for models that do not end in softmax.
      method: ``"incremental"`` (default) or ``"naive"`` (reference: one full forward
        pass of the probe set per candidate; same accepted sequence, much slower).
      block_size: maximum candidates per XLA call (incremental).
      pairs_per_block: capacity for (candidate, example) pairs whose binarized
        activations change, per XLA call; blocks that overflow are split.
      seed: RNG seed for ``order="random"``.
      on_step: optional ``callable(event: dict)`` called after every evaluated block
        and every accepted flip (``event["event"]`` is ``"block"`` or ``"accept"``);
        an exception from it stops the search and propagates, leaving the model as
        after the last accepted flip.
      verbose: print a line per layer if > 0.

    Returns:
      A :class:`GreedyReport`.

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
      >>> _ = kflip.snap_binary_weights(model)
      >>> report = kflip.greedy_flip(model, ds.x_train, ds.y_train, probe_size=64,
      ...                            max_seconds=1.0)
      >>> type(report).__name__, report.probe_size, len(report.layers)
      ('GreedyReport', 64, 2)
      >>> report.loss_after <= report.loss_before  # only improving flips are kept
      True
      >>> kflip.assert_binary(model)
    """
    arguments = locals()
    _check_values(**{k: arguments[k] for k in _CHECKED})

    net = _Network(model, loss, from_logits)
    chosen = _select_layers(net, layers)
    if not chosen:
        raise ValueError("`model` has no binary (precision 1) QuantDense/QuantConv2D kernels.")
    for i in chosen:
        lin = net.ops[i]
        k = tf.convert_to_tensor(lin.var)
        if not bool(tf.reduce_all(tf.abs(k) == 1.0)):
            raise ValueError(
                f"`model`: binary kernel of layer {lin.name!r} is not exactly +-1; call "
                "kflip.snap_binary_weights(model) first."
            )
        if lin.quantizer is not None and not bool(tf.reduce_all(lin.quantizer(k) == k)):
            raise ValueError(
                f"`model`: the kernel quantizer of layer {lin.name!r} does not map +-1 to "
                "itself; greedy search needs a sign-like quantizer (e.g. 'ste_sign')."
            )
    xp, yp = _probe(x, y, probe_size, probe_seed)
    expected = tuple(model.input_shape[1:])
    if tuple(xp.shape[1:]) != expected:
        raise ValueError(f"`x` examples have shape {tuple(xp.shape[1:])}, the model expects {expected}.")
    _check_classes(model, loss, yp)
    if layer_order == "backward":
        chosen = chosen[::-1]
    n = int(xp.shape[0])
    rng = np.random.RandomState(seed)

    t0 = time.perf_counter()
    reports = []
    searches: dict = {}  # compiled per-layer kernels, reused across passes
    for pass_index in range(passes):
        pass_accepted = 0
        for p in chosen:
            if method == "naive":
                rep = _search_layer_naive(net, p, xp, yp, pass_index, order, group_size, exhaustive,
                                          max_candidates, max_seconds, min_delta, rng, on_step)
            else:
                if p not in searches:
                    searches[p] = _LayerSearch(net, p, xp, yp, pairs_per_block)
                rep = _search_layer(searches[p], pass_index, order, group_size, exhaustive,
                                    max_candidates, max_seconds, min_delta, rng, on_step, block_size)
            reports.append(rep)
            pass_accepted += rep.accepted
            if verbose:
                print(
                    f"greedy pass {pass_index} {rep.name}: tried {rep.tried} accepted "
                    f"{rep.accepted} loss {rep.loss_before:.5f} -> {rep.loss_after:.5f} "
                    f"({rep.seconds:.1f}s, {rep.stop_reason})"
                )
        if pass_accepted == 0:
            break
    # probe losses from the engine's caches (tests check them against a full forward pass)
    loss_before, loss_after = reports[0].loss_before, reports[-1].loss_after
    return GreedyReport(
        method=method,
        probe_size=n,
        tried=sum(r.tried for r in reports),
        accepted=sum(r.accepted for r in reports),
        flipped=sum(r.flipped for r in reports),
        loss_before=loss_before,
        loss_after=loss_after,
        seconds=time.perf_counter() - t0,
        layers=reports,
    )


class _Writer:
    """Writes accepted kernels to the model variable; restores the last one on error."""

    def __init__(self, lin: _Linear, Wm):
        self.lin = lin
        self.committed = Wm

    def write(self, Wm):
        self.committed = Wm
        self.lin.var.assign(tf.reshape(Wm, self.lin.kernel_shape))

    def restore(self):
        self.lin.var.assign(tf.reshape(self.committed, self.lin.kernel_shape))


def _layer_candidates(lin, Wm_np, order, group_size, rng, grad_fn):
    gain = None
    if order == "gradient":
        g = grad_fn().numpy()
        gain = -2.0 * Wm_np * g  # first-order loss change of flipping each weight
    return _groups(order, lin.fan_in, lin.units, group_size, rng, gain)


def _masks(n_bits, start, count):
    m = np.arange(start, start + count, dtype=np.int64)[:, None]
    return ((m >> np.arange(n_bits)) & 1).astype(np.float32)


def _search_layer(s, pass_index, order, group_size, exhaustive, max_candidates,
                  max_seconds, min_delta, rng, on_step, block_size):
    lin: _Linear = s.lin
    t0 = time.perf_counter()
    Wm = tf.reshape(tf.convert_to_tensor(lin.var), [lin.fan_in, lin.units])
    s.start(Wm)
    n = s.n
    thr = -min_delta * n  # accept iff loss-sum delta < thr
    cc, ff = _layer_candidates(lin, Wm.numpy(), order, group_size, rng, s.gradient)
    m_all = len(cc)
    # padding rows (-1) are never flipped: fan-in index 0 with mask 0
    mask_all = (ff >= 0).astype(np.float32)
    ff = np.maximum(ff, 0)
    loss_before = s.loss_sum() / n
    writer = _Writer(lin, s.Wm)
    tried = accepted = flipped = 0
    flips: list = []
    stop = "done"
    limit = m_all if max_candidates is None else min(m_all, max_candidates)
    bmax = max(1, block_size)

    def out_of_time():
        return max_seconds is not None and time.perf_counter() - t0 > max_seconds

    def accept(c, f, m):
        nonlocal accepted, flipped
        state = s.apply(tf.constant(c, tf.int32), tf.constant(f), tf.constant(m))
        writer.write(state[0])
        s.commit(state)
        accepted += 1
        sel = [int(fi) * lin.units + int(c) for fi, mi in zip(f, m) if mi > 0]
        flipped += len(sel)
        flips.extend(sel)
        if on_step is not None:
            on_step({"event": "accept", "layer": lin.name, "tried": tried, "accepted": accepted,
                     "loss": s.loss_sum() / n})

    try:
        if exhaustive:
            g = group_size
            total = 1 << g
            for j in range(limit):
                if out_of_time():
                    stop = "max_seconds"
                    break
                f = ff[j]
                valid = mask_all[j]
                best, best_mask, start, b = 0.0, 0, 0, min(bmax, total)
                while start < total:
                    cnt = min(b, total - start)
                    masks = _masks(g, start, cnt) * valid[None]
                    if cnt < b:
                        masks = np.concatenate([masks, np.zeros((b - cnt, g), np.float32)])
                    res = s.evaluate(np.full(b, cc[j], np.int32), np.repeat(f[None], b, 0), masks)
                    if res is None:
                        b = max(1, b // 2)
                        continue
                    d = res[0][:cnt]
                    k = int(np.argmin(d))
                    if d[k] < best:
                        best, best_mask = float(d[k]), start + k
                    start += cnt
                tried += total - 1
                if on_step is not None:
                    on_step({"event": "block", "layer": lin.name, "tried": tried, "accepted": accepted,
                             "loss": s.loss_sum() / n})
                if best < thr:
                    accept(int(cc[j]), f, _masks(g, best_mask, 1)[0] * valid)
        else:
            ladder = sorted({min(8, bmax), bmax} | ({64} if bmax >= 256 else set()))  # compiled sizes
            pos, b = 0, ladder[min(1, len(ladder) - 1)]
            while pos < limit:
                if out_of_time():
                    stop = "max_seconds"
                    break
                cnt = min(b, limit - pos)
                bc, bf, bm = cc[pos : pos + cnt], ff[pos : pos + cnt], mask_all[pos : pos + cnt]
                if cnt < b:  # pad to the compiled block size with no-op candidates
                    padn = b - cnt
                    bc = np.concatenate([bc, np.zeros(padn, np.int32)])
                    bf = np.concatenate([bf, np.zeros((padn, group_size), np.int32)])
                    bm = np.concatenate([bm, np.zeros((padn, group_size), np.float32)])
                res = s.evaluate(bc, bf, bm)
                if res is None:
                    smaller = [v for v in ladder if v < b]
                    b = smaller[-1] if smaller else max(1, b // 2)
                    if b not in ladder:
                        ladder = sorted(set(ladder) | {b})
                    continue
                delta, naff = res
                t = 0
                touched = None
                while t < cnt:
                    if touched is None:
                        tried += 1
                        if delta[t] < thr:
                            accept(int(bc[t]), bf[t], bm[t])
                            touched = {int(bc[t])}
                        t += 1
                    elif int(bc[t]) not in touched and naff[t] == 0:
                        tried += 1  # exactly zero change in the current state too
                        t += 1
                    else:
                        break
                pos += t
                if on_step is not None:
                    on_step({"event": "block", "layer": lin.name, "tried": tried, "accepted": accepted,
                             "loss": s.loss_sum() / n})
                if touched is None:  # no acceptance: grow the block
                    b = next((v for v in ladder if v > b), b)
                else:  # acceptance after t candidates: the next block need not be much larger
                    b = next((v for v in ladder if v >= 2 * t), ladder[-1])
        if stop == "done" and limit < m_all:
            stop = "max_candidates"
    except BaseException:
        writer.restore()
        raise
    return LayerReport(
        name=lin.name,
        pass_index=pass_index,
        candidates=m_all,
        tried=tried,
        accepted=accepted,
        flipped=flipped,
        loss_before=loss_before,
        loss_after=s.loss_sum() / n,
        seconds=time.perf_counter() - t0,
        stop_reason=stop,
        flips=flips,
    )


class _Naive:
    """Reference evaluator: full forward pass of the probe set per candidate."""

    def __init__(self, net, p, xp, yp):
        self.net, self.p, self.xp, self.yp = net, p, xp, yp
        self.params = net.values()  # kernel p itself is always overridden by ``Wm``
        self.fn = net.jit(
            lambda t, yy, Wm: _sum64(net.per_example_loss(net.forward(t, override=(p, Wm)), yy))
        )

    def loss_sum(self, Wm):
        return float(self.fn(self.xp, self.yp, Wm, params=self.params))

    def gradient(self, Wm):
        net, p = self.net, self.p
        with tf.GradientTape() as tape, _bind(net.variables, self.params):
            tape.watch(Wm)
            logits = net.forward(self.xp, override=(p, Wm))
            loss = tf.reduce_mean(net.per_example_loss(logits, self.yp))
        return tape.gradient(loss, Wm)


def _search_layer_naive(net, p, xp, yp, pass_index, order, group_size, exhaustive, max_candidates,
                        max_seconds, min_delta, rng, on_step):
    lin: _Linear = net.ops[p]
    t0 = time.perf_counter()
    nv = _Naive(net, p, xp, yp)
    n = int(xp.shape[0])
    W = tf.reshape(tf.convert_to_tensor(lin.var), [lin.fan_in, lin.units]).numpy()
    cc, ff = _layer_candidates(lin, W, order, group_size, rng, lambda: nv.gradient(tf.constant(W)))
    mask_all = ff >= 0
    ff = np.maximum(ff, 0)
    m_all = len(cc)
    limit = m_all if max_candidates is None else min(m_all, max_candidates)
    cur = nv.loss_sum(tf.constant(W))
    loss_before = cur / n
    thr = -min_delta * n
    writer = _Writer(lin, tf.constant(W))
    tried = accepted = flipped = 0
    flips, stop = [], "done"

    def flipped_w(c, f, m):
        w2 = W.copy()
        for fi, mi in zip(f, m):
            if mi:
                w2[fi, c] = -w2[fi, c]
        return w2

    try:
        for j in range(limit):
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stop = "max_seconds"
                break
            c, f, valid = int(cc[j]), ff[j], mask_all[j]
            if exhaustive:
                g = group_size
                best, best_m = 0.0, None
                for code in range(1, 1 << g):
                    m = _masks(g, code, 1)[0].astype(bool) & valid
                    d = nv.loss_sum(tf.constant(flipped_w(c, f, m))) - cur
                    if d < best:
                        best, best_m = d, m
                tried += (1 << g) - 1
                cand = best_m if best < thr else None
            else:
                tried += 1
                w2 = flipped_w(c, f, valid)
                d = nv.loss_sum(tf.constant(w2)) - cur
                cand = valid if d < thr else None
            if cand is not None:
                W = flipped_w(c, f, cand)
                writer.write(tf.constant(W))
                cur = nv.loss_sum(tf.constant(W))
                accepted += 1
                sel = [int(fi) * lin.units + c for fi, mi in zip(f, cand) if mi]
                flipped += len(sel)
                flips.extend(sel)
                if on_step is not None:
                    on_step({"event": "accept", "layer": lin.name, "tried": tried, "accepted": accepted,
                             "loss": cur / n})
        if stop == "done" and limit < m_all:
            stop = "max_candidates"
    except BaseException:
        writer.restore()
        raise
    return LayerReport(lin.name, pass_index, m_all, tried, accepted, flipped, loss_before, cur / n,
                       time.perf_counter() - t0, stop, flips)


# --------------------------------------------------------------------------------------
# Keras callback
# --------------------------------------------------------------------------------------


class GreedyFlip(tf.keras.callbacks.Callback):
    """Run :func:`greedy_flip` during ``model.fit``.

    Args:
      x, y: probe data (arrays, or a batched ``tf.data.Dataset`` of ``(x, y)`` with
        ``y=None``); ``probe_size``/``probe_seed`` select the fixed subset.
      every_n_epochs: run after every so many epochs (None: never during training).
      at_train_end: run once when training ends.
      snap: snap binary weights to +-1 before searching (needed for latent-weight
        training such as Adam+STE; FlipLSTM and Bop keep them +-1 already).
      log_dir: if given, also write the figures as TensorBoard scalars there.
      prefix: key prefix in the logs (default ``"greedy/"``).
      **kwargs: passed to :func:`greedy_flip` (order, group_size, max_seconds, ...).

    After an epoch-end run the figures (``greedy/loss_before``, ``greedy/loss_after``,
    ``greedy/accepted``, ``greedy/tried``, ``greedy/seconds``, per layer
    ``greedy/<layer>/accepted`` ...) are added to that epoch's logs, so they land in
    ``History`` and in TensorBoard when a ``TensorBoard`` callback comes after this one
    in the list. The run at train end adds them to the ``logs`` of ``on_train_end``
    and to ``model.history.history`` (one entry per key). Every report is kept in
    ``reports`` as ``(epoch, GreedyReport)``.

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
      >>> model.compile(kflip.FlipLSTM(), "sparse_categorical_crossentropy")
      >>> greedy = kflip.GreedyFlip(ds.x_train, ds.y_train, probe_size=64, max_seconds=0.5)
      >>> hist = model.fit(ds.x_train[:128], ds.y_train[:128], batch_size=64,
      ...                  callbacks=[greedy], verbose=0)
      >>> [(epoch, type(r).__name__) for epoch, r in greedy.reports]  # at train end
      [(1, 'GreedyReport')]
      >>> "greedy/loss_after@train_end" in hist.history
      True
    """

    def __init__(self, x, y=None, every_n_epochs=None, at_train_end=True, snap=False,
                 log_dir=None, prefix="greedy/", **kwargs):
        super().__init__()
        _check_int("every_n_epochs", every_n_epochs, allow_none=True)
        if not isinstance(at_train_end, bool):
            raise ValueError(f"`at_train_end` must be a bool, got {at_train_end!r}.")
        if every_n_epochs is None and not at_train_end:
            raise ValueError("`every_n_epochs` is None and `at_train_end` is False: nothing to do.")
        validate_options(kwargs)
        if not isinstance(x, tf.data.Dataset):
            if y is None:
                raise ValueError("`y` is required when `x` is an array.")
            _check_arrays(x, y)
        if log_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "`log_dir` needs the tensorboard package (pip install tensorboard); without "
                    "it, put a TensorBoard callback after GreedyFlip or read model.history."
                ) from e
        self.x, self.y = x, y
        self.every_n_epochs = every_n_epochs
        self.at_train_end = at_train_end
        self.snap = snap
        self.log_dir = log_dir
        self.prefix = prefix
        self.kwargs = kwargs
        self.reports: list = []
        self._epoch = 0
        self._writer = None

    def _run(self, epoch):
        if self.snap:
            from kflip.binary import snap_binary_weights

            snap_binary_weights(self.model)
        report = greedy_flip(self.model, self.x, self.y, **self.kwargs)
        self.reports.append((epoch, report))
        logs = report.as_logs(self.prefix)
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                for k, v in logs.items():
                    tf.summary.scalar(k, v, step=epoch)
            self._writer.flush()
        return logs

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            figures = self._run(epoch + 1)
            if logs is not None:
                logs.update(figures)

    def on_train_end(self, logs=None):
        if not self.at_train_end:
            return
        figures = self._run(self._epoch)
        if logs is not None:
            logs.update(figures)
        history = getattr(self.model, "history", None)
        if history is not None and hasattr(history, "history"):
            for k, v in figures.items():
                history.history.setdefault(f"{k}@train_end", []).append(v)
