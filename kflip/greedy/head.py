"""The head evaluator: the last convolution of a residual net, in closed form per channel.

In a residual net the last binary convolution is crossed by a shortcut, so a flip
changes real-valued activations of every example, but what follows it acts on each
channel separately up to the head: BatchNorm, the ``Add`` with the shortcut (a tensor
computed before the layer), pooling, global pooling, then a Dense layer. Flipping
``W[f, c]`` therefore changes one pooled feature per example, and the head's output by
that change times row ``c`` of its kernel (rank 1). A candidate costs the layer's
spatial positions plus the head's outputs per example instead of the rest of the
network (:class:`~kflip.greedy.suffix.SuffixEvaluator`, which this evaluator extends:
same caches, same exact update after an acceptance).
"""

from __future__ import annotations

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy.network import Network  # noqa: E402
from kflip.greedy.ops import Add, GlobalPool, Linear, new_channels, to_front  # noqa: E402
from kflip.greedy.suffix import SUFFIX_BUDGET, SuffixEvaluator, _tile  # noqa: E402


def head_path(net: Network, p: int):
    """``(walk, q)``: the per-channel ops after op ``p`` and the Dense head ``q`` they
    feed, or None when the layer does not end that way.

    Every op of ``walk`` reads the op before it (an ``Add`` may also read tensors
    computed before ``p``) and acts on each channel separately; one of them is a global
    pooling; ``q`` is a Dense kernel product and the ops after it form a chain.
    """
    walk, pooled = [], False
    for i in range(p + 1, len(net.ops)):
        op, src = net.ops[i], net.src[i]
        if isinstance(op, Linear):
            ok = pooled and op.kind == "dense" and src == (i - 1,) and net.chain_after(i)
            return (walk, i) if ok else None
        if isinstance(op, Add):
            if src.count(i - 1) != 1 or any(j >= p and j != i - 1 for j in src):
                return None
        elif not (op.local and src == (i - 1,)):
            return None
        pooled = pooled or isinstance(op, GlobalPool)
        walk.append(i)
    return None


class HeadEvaluator(SuffixEvaluator):
    """Cached prefix, per-channel path to a Dense head (an
    :class:`~kflip.greedy.evaluators.Evaluator`).

    Example:
      >>> import kflip
      >>> from kflip.greedy.network import Network
      >>> net = Network(kflip.models.resnet(input_shape=(8, 8, 1)))
      >>> [HeadEvaluator.applies(net, p) for p in net.linear if net.ops[p].binary]
      [False, False, True]
    """

    def __init__(self, net: Network, p: int, x, y, budget: int = SUFFIX_BUDGET):
        path = head_path(net, p)
        if path is None:
            raise ValueError(f"`model`: {net.ops[p].name!r} does not feed a Dense head channel by channel.")
        super().__init__(net, p, x, y, budget)
        self.walk, self.q = path
        out = net.ops[p].layer.output_shape
        per_candidate = max(int(np.prod(out[1:-1])) * 2, net.ops[self.q].units)
        self.chunk = self.max_block = max(1, budget // max(1, self.n * per_candidate))

    @staticmethod
    def applies(net: Network, p: int) -> bool:
        return head_path(net, p) is not None

    def _head(self, front, Z):
        """The head's input (N, C) and output (N, U) at the cached state."""
        values = {j: front[self.front.index(j)] for j in self.keep}
        values[self.p] = Z
        for i in range(self.p + 1, self.q + 1):
            values[i] = self.net.ops[i].full(*[values[j] for j in self.net.src[i]])
        return values[self.q - 1], values[self.q]

    def _eval_impl(self, front, P, Z, L, Wm, cc, ff, mm):
        b = int(cc.shape[0])
        g, u = self._head(front, Z)
        t = new_channels(P, Z, Wm, cc, ff, mm)  # (B, N, *sp)
        for i in self.walk:
            op = self.net.ops[i]
            if isinstance(op, Add):  # + the shortcut's channel
                for j in self.net.src[i]:
                    if j != i - 1:
                        t = t + to_front(tf.gather(front[self.front.index(j)], cc, axis=-1))
            else:
                t = op.chan(t, cc)
        delta = t - tf.transpose(tf.gather(g, cc, axis=-1))  # (B, N) change of the head input
        k = tf.gather(self.net.ops[self.q].kernel(), cc)  # (B, U) kernel rows
        un = u[None] + delta[..., None] * k[:, None, :]
        logits = self.net.chain(tf.reshape(un, [b * self.n, -1]), self.q + 1)
        lnew = tf.reshape(self.net.per_example_loss(logits, _tile(self.y, b)), [b, self.n])
        lold = self.net.per_example_loss(self.net.chain(u, self.q + 1), self.y)  # same arithmetic
        d = tf.cast(lnew, tf.float64) - tf.cast(lold, tf.float64)[None]
        return tf.reduce_sum(d, axis=1), tf.reduce_sum(tf.cast(d != 0, tf.int32), axis=1)
