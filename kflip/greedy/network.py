"""A lowered model: the op graph, its evaluation, the loss head and compiled kernels."""

from __future__ import annotations

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip._tracing import Traced  # noqa: E402
from kflip.greedy import lowering, ops  # noqa: E402

# order="gradient" ranks candidates by the gradient on the first this many probe examples
# (a ranking needs no more; backpropagating a large probe through convolutions would
# cost more memory and compile time than the search itself)
GRADIENT_EXAMPLES = 4096


def _lower(model):
    """Ops in topological order and their sources; a final softmax is returned apart."""
    graph_ops, src, last = [], [], []  # last[i]: index of layer i's last op (or its input)
    for layer, inputs in lowering.layer_graph(model):
        feeds = [-1 if j < 0 else last[j] for j in inputs]
        layer_ops = lowering.layer_ops(layer)
        if len(feeds) != 1 and not (len(layer_ops) == 1 and isinstance(layer_ops[0], ops.Add)):
            raise ValueError(f"`model`: layer {layer.name!r} has {len(feeds)} inputs.")
        for op in layer_ops:
            graph_ops.append(op)
            src.append(tuple(feeds))
            feeds = [len(graph_ops) - 1]
        last.append(feeds[0])
    if last and last[-1] != len(graph_ops) - 1:
        raise ValueError("`model`: the output must come from the last layer.")
    softmax = None
    if graph_ops and isinstance(graph_ops[-1], lowering._Softmax):
        softmax = graph_ops.pop().fname
        src.pop()
        if softmax != "softmax":
            raise ValueError("`model`: a final log_softmax is not supported; use softmax.")
    if any(isinstance(op, lowering._Softmax) for op in graph_ops):
        raise ValueError("`model`: softmax is only supported as the final activation.")
    return graph_ops, src, softmax is not None


class Network:
    """A model lowered to primitive ops (a graph), with its loss head.

    ``ops[i]`` reads the outputs of ``src[i]`` (``-1``: the model input); the last op
    produces the pre-softmax output. ``linear`` lists the kernel products.
    """

    def __init__(self, model, loss="sparse_categorical_crossentropy", from_logits=None):
        self.model = model
        self.ops, self.src, self.softmax = _lower(model)
        self._loss_head(loss, from_logits)
        self.temperature = None  # the cross-entropy's scale on the logits (see calibrate)
        if self.loss_fn is None and self.from_logits:
            self.temperature = ops.Param("temperature", 1.0)
            self.ops.append(ops.Scale("temperature", self.temperature))
            self.src.append((len(self.ops) - 2,))
        self.linear = [i for i, op in enumerate(self.ops) if isinstance(op, ops.Linear)]
        self.variables, seen = [], set()
        for op in self.ops:
            for v in op.variables():
                if id(v) not in seen:
                    seen.add(id(v))
                    self.variables.append(v)

    def _loss_head(self, loss, from_logits):
        if loss in (None, "sparse_categorical_crossentropy"):
            if not self.softmax and from_logits is None:
                raise ValueError(
                    "`from_logits`: the model does not end in a softmax; pass "
                    "from_logits=True (outputs are logits) or False (probabilities)."
                )
            self.from_logits = True if self.softmax else bool(from_logits)
            self.loss_fn = None
        elif callable(loss):
            self.loss_fn, self.from_logits = loss, None
        else:
            raise ValueError(
                "`loss` must be 'sparse_categorical_crossentropy' or a callable "
                f"(y_true, y_pred) -> per-example losses, got {loss!r}."
            )

    # ---- graph structure -----------------------------------------------------------
    def chain_after(self, p):
        """Whether every op after ``p`` reads only the op before it."""
        return all(self.src[i] == (i - 1,) for i in range(p + 1, len(self.ops)))

    def frontier(self, p):
        """Tensors computed before op ``p`` that ops ``p`` and later read (indices)."""
        return sorted({j for i in range(p, len(self.ops)) for j in self.src[i] if j < p})

    # ---- evaluation -------------------------------------------------------------------
    def run(self, values: dict, start=0, override=None):
        """Evaluate ops[start:] given ``values`` (op index or -1 -> tensor) for their inputs
        from before ``start``; ``override`` = (op index, flat (F, C) kernel). Returns the
        last op's output (or ``values`` of the frontier when ``start`` is past the end)."""
        values = dict(values)
        for i in range(start, len(self.ops)):
            op, ins = self.ops[i], [values[j] for j in self.src[i]]
            if isinstance(op, ops.Linear) and override is not None and override[0] == i:
                values[i] = op.full(ins[0], override[1])
            else:
                values[i] = op.full(*ins)
        return values[len(self.ops) - 1]

    def prefix(self, x, p):
        """The frontier of op ``p`` for input ``x``: ``{index: tensor}``."""
        values = {-1: x}
        keep = set(self.frontier(p))
        for i in range(p):
            values[i] = self.ops[i].full(*[values[j] for j in self.src[i]])
        return {j: values[j] for j in keep}

    def forward(self, x, override=None):
        """The pre-softmax output for input ``x``."""
        return self.run({-1: x}, 0, override)

    def chain(self, t, start, stop=None):
        """ops[start:stop] on ``t`` (only where they form a chain)."""
        stop = len(self.ops) if stop is None else stop
        for i in range(start, stop):
            t = self.ops[i].full(t)
        return t

    def values(self):
        """Current values of :attr:`variables`, read eagerly (``params`` of the kernels).

        Under a ``tf.distribute`` strategy this is the cross-replica value on the
        current device, so the compiled kernels never touch per-replica components.
        """
        return tuple(ops.read(v) for v in self.variables)

    def jit(self, fn):
        """``fn(*tensors)`` XLA-compiled, reading the model variables from ``params``."""
        return Kernel(self, fn)

    # ---- loss head --------------------------------------------------------------------
    def outputs(self, logits):
        return tf.nn.softmax(logits) if self.softmax else logits

    def per_example_loss(self, logits, y):
        """Per-example loss from the pre-softmax output (float32)."""
        if self.loss_fn is not None:
            return tf.reshape(tf.cast(self.loss_fn(y, self.outputs(logits)), tf.float32), [-1])
        picked = tf.gather(logits, y, axis=-1, batch_dims=logits.shape.rank - 1)
        if self.from_logits:
            return tf.reduce_logsumexp(logits, axis=-1) - picked
        eps = tf.keras.backend.epsilon()
        return -tf.math.log(tf.clip_by_value(picked, eps, 1 - eps))


class Kernel:
    """An XLA-compiled search kernel whose model variables are passed in as tensors.

    Called as ``kernel(*tensors, params=net.values())``; without ``params`` the current
    values are read first. The variables are never captured by the compiled function.
    """

    def __init__(self, net, fn):
        variables = net.variables
        self.net = net

        def kernel(*args, params):
            with ops.bind(variables, params):
                return fn(*args)

        self.function = tf.function(Traced(kernel), jit_compile=True, autograph=False)

    def _params(self, params):
        return self.net.values() if params is None else params

    def __call__(self, *args, params=None):
        return self.function(*args, params=self._params(params))

    def get_concrete_function(self, *args, params=None):
        return self.function.get_concrete_function(*args, params=self._params(params))

    def experimental_get_compiler_ir(self, *args, params=None):
        return self.function.experimental_get_compiler_ir(*args, params=self._params(params))
