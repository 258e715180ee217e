"""The suffix evaluator: exact loss changes for layers inside any graph (residual nets).

When a shortcut crosses the searched layer, a flip changes real-valued activations
downstream and no binarized boundary limits its reach, so every example's loss can
change. The prefix up to the layer still runs once: its outputs (the layer's input
patches ``P``, pre-activation ``Z``, and every earlier tensor a later op reads, e.g. the
shortcut) are cached. A block of B candidates becomes B copies of ``Z`` with one
channel each replaced (:func:`~kflip.greedy.ops.new_channels`), and the rest of the
network runs once on the B x N rows.
"""

from __future__ import annotations

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy.evaluators import flip  # noqa: E402
from kflip.greedy.network import GRADIENT_EXAMPLES, Network  # noqa: E402
from kflip.greedy.ops import Linear, new_channels, sum64  # noqa: E402


# elements per tensor per compiled call (B candidates x N examples x widest activation)
SUFFIX_BUDGET = 1 << 24


def _tile(t, b):
    return tf.tile(t, [b] + [1] * (t.shape.rank - 1))


class SuffixEvaluator:
    """Cached prefix, batched suffix (an :class:`~kflip.greedy.evaluators.Evaluator`)."""

    exact_zero = False  # a flip elsewhere changes what this candidate does

    def __init__(self, net: Network, p: int, x, y, budget: int = SUFFIX_BUDGET):
        self.net, self.p, self.x, self.y = net, p, x, y
        self.lin: Linear = net.ops[p]
        self.n = int(x.shape[0])
        self.front = net.frontier(p)  # op p's input and the tensors later ops read
        self.keep = [j for j in net.frontier(p + 1) if j != p]
        width = max(int(np.prod(layer.output_shape[1:])) for layer in net.model.layers)
        self.chunk = max(1, budget // max(1, self.n * width))
        self.max_block = self.chunk  # a block is one call: no candidate evaluated in vain
        self._init = net.jit(self._init_impl)
        self._update = net.jit(self._update_impl)
        self._grad = net.jit(self._grad_impl)
        self._eval = net.jit(self._eval_impl)

    def _patches(self, X):
        return X if self.lin.kind == "dense" else self.lin.patches(X)

    def _loss(self, front, Z, y):
        values = {j: front[self.front.index(j)] for j in self.keep}
        return self.net.per_example_loss(self.net.run({**values, self.p: Z}, self.p + 1), y)

    def _init_impl(self, x, Wm):
        values = self.net.prefix(x, self.p)
        front = tuple(values[j] for j in self.front)
        P = self._patches(values[self.net.src[self.p][0]])
        Z = tf.tensordot(P, Wm, [[P.shape.rank - 1], [0]])
        return front, P, Z, self._loss(front, Z, self.y)

    def _eval_impl(self, front, P, Z, L, Wm, cc, ff, mm):
        b = int(cc.shape[0])
        zc = new_channels(P, Z, Wm, cc, ff, mm)  # (B, N, *sp)
        c = int(Z.shape[-1])
        sel = tf.reshape(tf.one_hot(cc, c, on_value=True, off_value=False),
                         [b] + [1] * (Z.shape.rank - 1) + [c])
        Zb = tf.where(sel, zc[..., None], Z[None])
        Zb = tf.reshape(Zb, [b * self.n] + Z.shape[1:].as_list())
        tiled = tuple(_tile(t, b) for t in front)
        lnew = tf.reshape(self._loss(tiled, Zb, _tile(self.y, b)), [b, self.n])
        d = tf.cast(lnew, tf.float64) - tf.cast(L, tf.float64)[None]
        return tf.reduce_sum(d, axis=1), tf.reduce_sum(tf.cast(d != 0, tf.int32), axis=1)

    def _update_impl(self, front, P, Z, Wm, c, ff, mm):
        Wm = flip(Wm, c, ff, mm)
        zc = tf.tensordot(P, tf.gather(Wm, c, axis=1), [[P.shape.rank - 1], [0]])
        Z = tf.where(tf.equal(tf.range(int(Z.shape[-1])), c), zc[..., None], Z)
        return Wm, Z, self._loss(front, Z, self.y)

    def _grad_impl(self, front, Wm):
        k = GRADIENT_EXAMPLES
        with tf.GradientTape() as tape:
            tape.watch(Wm)
            values = {j: t[:k] for j, t in zip(self.front, front)}
            logits = self.net.run(values, self.p, override=(self.p, Wm))
            loss = tf.reduce_mean(self.net.per_example_loss(logits, self.y[:k]))
        return tape.gradient(loss, Wm)

    # ---- the Evaluator protocol ---------------------------------------------------
    def start(self, Wm):
        self.params = self.net.values()
        self.F, self.P, self.Z, self.L = self._init(self.x, Wm, params=self.params)
        self.Wm = Wm

    def loss_sum(self):
        return float(sum64(self.L))

    def gradient(self):
        return self._grad(self.F, self.Wm, params=self.params)

    def evaluate(self, cc, ff, mm):
        b, g = min(self.chunk, len(cc)), int(ff.shape[1])
        out = []
        for i in range(0, len(cc), b):
            bc, bf, bm = cc[i:i + b], ff[i:i + b], mm[i:i + b]
            pad = b - len(bc)  # pad with no-op candidates (mask 0)
            if pad:
                bc, bf = np.concatenate([bc, bc[:1].repeat(pad)]), np.concatenate([bf, bf[:1].repeat(pad, 0)])
                bm = np.concatenate([bm, np.zeros((pad, g), np.float32)])
            d, naff = self._eval(self.F, self.P, self.Z, self.L, self.Wm, bc, bf, bm, params=self.params)
            out.append((d.numpy()[:b - pad], naff.numpy()[:b - pad]))
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def accept(self, c, ff, mm):
        self.Wm, self.Z, self.L = self._update(self.F, self.P, self.Z, self.Wm, tf.constant(c, tf.int32),
                                               tf.constant(ff), tf.constant(mm), params=self.params)
        return self.Wm
