"""The FlipLSTM rule as one pure transformation: ``init`` and ``update`` over a typed state.

This module is the only place the rule lives. :class:`kflip.FlipLSTM` (the Keras
optimizer) stores a :class:`FlipState` in its slots and calls :meth:`FlipRule.update`;
meta-training's compiled inner loop (:mod:`kflip.meta.unroll`) calls the same
``update`` on its list of kernels. Nothing here knows about Keras.

Per binary weight ``theta`` in {-1, +1} with float gradient ``g`` (details in
:mod:`kflip.cell`): features in the weight's frame, one step of a coordinatewise LSTM
with state ``(h, c)``, output ``y``; ``theta <- theta * sign(y)`` (flip iff
``y < -flip_threshold``), then the state is re-expressed in the new frame.
The idea is learning to learn (Andrychowicz et al., 2016) applied to Bop's flip
decision (Helwegen et al., 2019).

Example (one tensor; a list of tensors works the same way):

>>> import tensorflow as tf
>>> from kflip.rule import FlipRule
>>> rule = FlipRule.from_weights("default")
>>> theta = tf.constant([1.0, -1.0, 1.0])
>>> state = rule.init(theta)
>>> grads = tf.constant([5.0, -5.0, 0.0])  # theta * g > 0: a flip lowers the loss
>>> signs, state = rule.update(grads, state, theta)
>>> (theta * signs).numpy().tolist(), int(state.step), int(state.flips)
([-1.0, 1.0, 1.0], 1, 2)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import cell as cell_lib  # noqa: E402
from kflip import conditioning  # noqa: E402


class FlipState(NamedTuple):
    """The rule's state for one tensor, or for a list of tensors (then ``h, c, v,
    flips`` are tuples, one entry per tensor, and ``step`` is shared).

    Attributes:
      h, c: per-weight LSTM state, shape ``param.shape + [hidden_size]``.
      v: per-tensor average of ``mean(g**2)`` (a scalar per tensor).
      step: updates done so far (int64 scalar).
      flips: cumulative flips per tensor (int64 scalar per tensor).
      tensor: per-tensor conditioning state (:class:`kflip.conditioning.TensorState`)
        when the rule is conditioned, else ``()``.
    """

    h: Any
    c: Any
    v: Any
    step: Any
    flips: Any
    tensor: Any = ()  # conditioning.TensorState per tensor (empty: unconditioned rule)


class _One(NamedTuple):
    """One tensor's share of the state (and, as an output, its signs)."""

    sign: tf.Tensor  # the parameter on input, its signs on output
    h: tf.Tensor
    c: tf.Tensor
    v: tf.Tensor
    flips: tf.Tensor
    tensor: Any = None


@dataclasses.dataclass(frozen=True)
class FlipRule:
    """The flip rule with fixed LSTM weights.

    Attributes:
      cell: the LSTM weights as :class:`kflip.cell.CellTensors` (NumPy arrays are
        trace-time constants, tensors are arguments: meta-training passes tensors).
      beta, eps: the per-tensor second-moment decay and its epsilon.
      flip_threshold: flip only where ``y < -flip_threshold`` (a float or a tensor).
      max_flip_rate: at most this fraction of each tensor flips per step (at least
        one weight); the most negative ``y`` win. None for no limit.
    """

    cell: cell_lib.CellTensors
    beta: float
    eps: float
    flip_threshold: Any = 0.0
    max_flip_rate: float | None = None

    @classmethod
    def from_weights(cls, weights=None, **options) -> "FlipRule":
        """The rule of ``weights`` (anything :func:`kflip.cell.load_weights` takes)."""
        w = cell_lib.load_weights(weights)
        cell = cell_lib.CellTensors.from_weights(w, constant=True)
        return cls(cell, w.beta, w.eps, **options)

    @property
    def hidden_size(self) -> int:
        return int(np.shape(self.cell.out_kernel)[0])

    def init(self, params) -> FlipState:
        """Zero state for ``params`` (one tensor or a list/tuple of tensors)."""
        flat = [tf.convert_to_tensor(p) for p in tf.nest.flatten(params)]
        zeros = [tf.zeros(p.shape.concatenate([self.hidden_size]), p.dtype) for p in flat]
        tensor = ()
        if self.conditioned:
            tensor = _pack(params, [conditioning.init(p.dtype) for p in flat])
        return FlipState(
            h=_pack(params, zeros),
            c=_pack(params, zeros),
            v=_pack(params, [tf.zeros([], p.dtype) for p in flat]),
            step=tf.constant(0, tf.int64),
            flips=_pack(params, [tf.constant(0, tf.int64) for _ in flat]),
            tensor=tensor,
        )

    @property
    def conditioned(self) -> bool:
        """Whether per-tensor features set the cell (:mod:`kflip.conditioning`)."""
        return self.cell.tensor_kernel is not None

    @property
    def shape_free(self) -> bool:
        """Whether :meth:`update` and :meth:`latent_update` read no static size, so one
        trace with unknown dimensions (``tf.TensorSpec([None] * rank)``) serves tensors
        of every shape of a rank. Not so with ``max_flip_rate`` (the number of flips
        allowed) or per-tensor conditioning (the fan-in and the flip rate's divisor).

        Example:
          >>> import kflip
          >>> kflip.rule.FlipRule.from_weights().shape_free
          True
          >>> kflip.rule.FlipRule.from_weights(max_flip_rate=0.1).shape_free
          False
        """
        return self.max_flip_rate is None and not self.conditioned

    def update(self, grads, state: FlipState, params):
        """``(signs, new_state)``: ``params * signs`` are the new binary weights.

        ``params`` must be exactly +-1. A tensor whose gradient has a NaN or Inf entry
        (or whose ``mean(g**2)`` overflows) skips the step: nothing in it flips and
        its state is left as it was.
        """
        outs = [self._update_one(one, g, state.step) for one, g in _zip(params, grads, state)]
        return self._collect(params, outs, state.step)

    def latent_update(self, grads, state: FlipState, latent, learning_rate, clip=None):
        """Ablation: ``y`` as a step on latent float weights instead of a flip.

        ``w <- clip(w + learning_rate * sign(w) * y / rms(y))``, so ``y < 0`` pushes
        ``w`` towards ``-sign(w)``; a weight flips when it crosses zero. Dividing by the
        tensor's RMS output makes ``learning_rate`` the RMS step size. Returns
        ``(new_latent, new_state)``.
        """
        new_latent, outs = [], []
        for one, g in _zip(latent, grads, state):
            w_new, one = self._latent_one(one, g, state.step, learning_rate, clip)
            new_latent.append(w_new)
            outs.append(one)
        _, new_state = self._collect(latent, outs, state.step)
        return _pack(latent, new_latent), new_state

    # ---- one tensor ------------------------------------------------------------------
    def _update_one(self, old: _One, grad, step) -> _One:
        theta = old.sign
        y, new, ok = self._cell(theta, grad, old, step)
        flip = tf.logical_and(y < -self.flip_threshold, ok)
        if self.max_flip_rate is not None:
            n = int(theta.shape.num_elements())
            flip = _limit_flips(flip, y, max(1, int(math.floor(self.max_flip_rate * n))))
        s = tf.where(flip, tf.constant(-1, theta.dtype), tf.constant(1, theta.dtype))
        return self._finish(s, ok, new, old, flipped=flip)

    def _latent_one(self, old: _One, grad, step, learning_rate, clip):
        w = old.sign
        theta = cell_lib.sign_pm1(w)
        y, new, ok = self._cell(theta, grad, old, step)
        y = tf.where(ok, y, tf.zeros_like(y))
        rms = tf.sqrt(cell_lib.fast_sum(tf.square(y)) / cell_lib.num_entries(y))
        w_new = w + learning_rate * theta * y / (rms + 1e-30)
        if clip is not None:
            w_new = tf.clip_by_value(w_new, -clip, clip)
        w_new = tf.where(ok, w_new, w)
        s = cell_lib.sign_pm1(w_new) * theta
        return w_new, self._finish(s, ok, new, old)

    def _cell(self, theta, grad, old: _One, step):
        """``(y, new, ok)``: the output, the new state (frame of ``theta``) and whether
        the gradient is usable (a scalar; see :func:`kflip.cell.features_and_moment`)."""
        step = tf.cast(step + 1, theta.dtype)
        feats, v_new, ok = cell_lib.features_and_moment(
            theta, grad, old.v, step, self.beta, self.eps
        )
        if not self.conditioned:
            y, h_new, c_new = cell_lib.lstm_cell(self.cell, feats, old.h, old.c)
            return y, _One(None, h_new, c_new, v_new, old.flips), ok
        v_hat = cell_lib.bias_corrected(v_new, self.beta, step)
        phi, v_slow = conditioning.features(theta, old.tensor, v_hat, step, self.eps)
        gate_offsets, out_scale = conditioning.offsets(self.cell.tensor_kernel, phi)
        y, h_new, c_new = cell_lib.lstm_cell(self.cell, feats, old.h, old.c, gate_offsets, out_scale)
        tensor = old.tensor._replace(v_slow=v_slow)
        return y, _One(None, h_new, c_new, v_new, old.flips, tensor), ok

    @staticmethod
    def _finish(s, ok, new: _One, old: _One, flipped=None) -> _One:
        """The new state in the frame of ``theta * s`` (the old one unless ``ok``) and
        the flip count (``flipped``: the mask ``s < 0`` if known)."""
        s_col = tf.expand_dims(s, -1)
        h, c = (tf.where(ok, a * s_col, b) for a, b in ((new.h, old.h), (new.c, old.c)))
        if flipped is None:
            flipped = s < 0
        count = cell_lib.count_true(flipped)
        tensor = new.tensor
        if tensor is not None:
            tensor = tensor._replace(
                rate=conditioning.next_rate(tensor, count, int(s.shape.num_elements())))
            tensor = type(tensor)(*(tf.where(ok, a, b) for a, b in zip(tensor, old.tensor)))
        return _One(s, h, c, new.v, old.flips + tf.cast(count, tf.int64), tensor)

    @staticmethod
    def _collect(params, outs, step):
        field = lambda k: _pack(params, [o[k] for o in outs])  # noqa: E731
        tensor = () if outs[0].tensor is None else field(5)
        return field(0), FlipState(field(1), field(2), field(3), step + 1, field(4), tensor)


def _single(params) -> bool:
    """True for one tensor (as opposed to a list or tuple of tensors)."""
    return tf.is_tensor(params) or isinstance(params, (tf.Variable, np.ndarray))


def _pack(structure, flat):
    """``flat`` in the structure of ``structure`` (one tensor, or a tuple of them)."""
    return flat[0] if _single(structure) else tuple(flat)


def _zip(params, grads, state: FlipState):
    """Per-tensor ``(_One(param, h, c, v, flips, tensor), grad)`` for one tensor or a list."""
    if _single(params):
        return [(_One(params, state.h, state.c, state.v, state.flips, state.tensor or None), grads)]
    tensors = state.tensor if state.tensor else [None] * len(params)
    ones = zip(params, state.h, state.c, state.v, state.flips, tensors)
    return [(_One(*one), g) for one, g in zip(ones, grads)]


def _limit_flips(flip, y, max_flips: int):
    """Keep only the ``max_flips`` most negative ``y`` among ``flip``."""
    flat_flip = tf.reshape(flip, [-1])
    k = int(min(max_flips, flat_flip.shape[0]))

    def cut():
        neg_inf = tf.fill(tf.shape(flat_flip), tf.constant(-np.inf, y.dtype))
        score = tf.where(flat_flip, -tf.reshape(y, [-1]), neg_inf)
        # Exactly k winners, ties broken by index (top_k is stable), never more.
        winners = tf.math.top_k(score, k=k, sorted=True).indices
        ones = tf.ones([k], y.dtype)
        keep = tf.scatter_nd(winners[:, None], ones, tf.shape(flat_flip)) > 0
        return tf.reshape(keep, tf.shape(flip))

    too_many = tf.reduce_sum(tf.cast(flat_flip, tf.int32)) > k
    return tf.cond(too_many, cut, lambda: flip)
