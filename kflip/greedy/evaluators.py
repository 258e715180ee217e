"""Evaluators: the loss change of candidate flips in one layer, behind one protocol.

The search driver (:mod:`kflip.greedy.search`) sees only :class:`Evaluator`. Three
implementations, all exact:

* :class:`~kflip.greedy.incremental.IncrementalEvaluator`: cached activations, only the
  examples whose binarized boundary changes are recomputed (layers whose successors
  form a chain);
* :class:`~kflip.greedy.suffix.SuffixEvaluator`: the prefix up to the layer runs once, each block of
  candidates runs the rest of the network (any graph, e.g. residual shortcuts);
* :class:`NaiveEvaluator`: the reference, one full forward pass per candidate.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy.network import GRADIENT_EXAMPLES, Network  # noqa: E402
from kflip.greedy.ops import Linear, sum64  # noqa: E402


class Evaluator(Protocol):
    """What the search driver needs from a layer's evaluator.

    ``cc`` (B,) output channels, ``ff`` (B, G) fan-in rows, ``mm`` (B, G) float masks
    (1: flip that weight) describe a block of candidates; ``Wm`` is the layer kernel as
    a flat (fan_in, units) tensor.
    """

    lin: Linear
    n: int  # probe examples
    exact_zero: bool  # naff == 0 stays exact after accepting a flip in another channel
    max_block: int | None  # largest block evaluate() takes (None: any)

    def start(self, Wm) -> None:
        """Compute the caches for the current kernel."""

    def loss_sum(self) -> float:
        """Probe loss sum (float64) at the current kernel."""

    def gradient(self) -> tf.Tensor:
        """d(mean probe loss) / d(Wm) at the current kernel."""

    def evaluate(self, cc, ff, mm) -> tuple[np.ndarray, np.ndarray] | None:
        """(loss-sum changes (B,), changed-example counts (B,)), or None: split the block."""

    def accept(self, c, ff, mm) -> tf.Tensor:
        """Flip one candidate in the current state; returns the new flat kernel."""


def flip(Wm, c, ff, mm):
    """``Wm`` with ``W[ff[mm > 0], c]`` negated (one candidate)."""
    g = int(ff.shape[0])
    idx = tf.stack([ff, tf.fill([g], c)], -1)
    old = tf.gather_nd(Wm, idx)
    return tf.tensor_scatter_nd_update(Wm, idx, tf.where(mm > 0, -old, old))


class NaiveEvaluator:
    """The reference: one full forward pass of the probe set per candidate."""

    exact_zero = False
    max_block = 1

    def __init__(self, net: Network, p: int, x, y):
        self.net, self.p, self.x, self.y = net, p, x, y
        self.lin: Linear = net.ops[p]
        self.n = int(x.shape[0])
        self.params = None
        self._loss = net.jit(lambda t, yy, Wm: sum64(net.per_example_loss(net.forward(t, (p, Wm)), yy)))
        self._grad = net.jit(self._grad_impl)
        self._flip = tf.function(flip, jit_compile=True, autograph=False)

    def _grad_impl(self, t, yy, Wm):
        with tf.GradientTape() as tape:
            tape.watch(Wm)
            loss = tf.reduce_mean(self.net.per_example_loss(self.net.forward(t, (self.p, Wm)), yy))
        return tape.gradient(loss, Wm)

    def loss_of(self, Wm) -> float:
        """Probe loss sum with ``Wm`` as the layer's kernel."""
        if self.params is None:  # kernel p itself is always overridden by ``Wm``
            self.params = self.net.values()
        return float(self._loss(self.x, self.y, Wm, params=self.params))

    def start(self, Wm):
        self.params = self.net.values()
        self.Wm, self.cur = Wm, self.loss_of(Wm)

    def loss_sum(self):
        return self.cur

    def gradient(self):
        k = GRADIENT_EXAMPLES
        return self._grad(self.x[:k], self.y[:k], self.Wm, params=self.params)

    def evaluate(self, cc, ff, mm):
        delta = [self.loss_of(self._flip(self.Wm, c, f, m)) - self.cur for c, f, m in zip(cc, ff, mm)]
        return np.array(delta), np.full(len(delta), self.n)

    def accept(self, c, ff, mm):
        self.Wm = self._flip(self.Wm, tf.constant(c, tf.int32), tf.constant(ff), tf.constant(mm))
        self.cur = self.loss_of(self.Wm)
        return self.Wm
