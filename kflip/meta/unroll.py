"""The compiled inner loop of meta-training: one task, ``horizon`` steps, one XLA program.

The binary kernels are updated by :meth:`kflip.rule.FlipRule.update`, the same call
:class:`kflip.FlipLSTM` makes; the BatchNorm offsets by :class:`kflip.adam.Adam`
(``Adam(0.01)``, FlipLSTM's default float optimizer). The LSTM weights are a tensor
argument (a flat vector), so one compilation serves every population member, and
the loop state is a typed :class:`UnrollState`.

>>> import numpy as np, kflip
>>> from kflip.meta import tasks, unroll
>>> task = tasks.make_task("mlp-32", "digits", seed=0, horizon=20)
>>> w = kflip.bop_weights()
>>> run = unroll.get_unroll("mlp-32", w.hidden_size, w.beta, w.eps)
>>> result = run(unroll.flatten(w).astype(np.float32), *task.unroll_args())
>>> 0.0 < float(result.held_out_accuracy) <= 1.0
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import cell as cell_lib  # noqa: E402
from kflip._tracing import Traced  # noqa: E402
from kflip import conditioning  # noqa: E402
from kflip.adam import Adam, AdamState  # noqa: E402
from kflip.meta import tasks  # noqa: E402
from kflip.meta.nets import FAMILIES, forward, offset_shapes, xent  # noqa: E402
from kflip.meta.tasks import Task, check_choice  # noqa: E402
from kflip.rule import FlipRule, FlipState  # noqa: E402

OFFSET_ADAM = Adam(learning_rate=tasks.OFFSET_LR)


# ---- LSTM weights <-> flat vector --------------------------------------------------
def num_params(hidden_size: int, conditioned: bool = False) -> int:
    """Length of the flat vector (``conditioned``: with the per-tensor ``tensor_kernel``)."""
    return sum(int(np.prod(s)) for s in _split_sizes(hidden_size, conditioned))


def flatten(w: cell_lib.LSTMWeights, conditioned: bool | None = None) -> np.ndarray:
    """``kernel, recurrent, bias, out_kernel, out_bias`` (and ``tensor_kernel`` when
    ``conditioned``; default: when ``w`` is) as one float64 vector."""
    conditioned = w.conditioned if conditioned is None else conditioned
    parts = [w.kernel.ravel(), w.recurrent.ravel(), w.bias.ravel(), w.out_kernel.ravel(),
             [w.out_bias]]
    if conditioned:
        parts.append(w.tensor_kernel.ravel())
    return np.concatenate(parts).astype(np.float64)


def unflatten(vec, hidden_size: int, like: cell_lib.LSTMWeights | None = None, metadata=None):
    """Inverse of :func:`flatten` (``beta``/``eps`` taken from ``like``)."""
    vec = np.asarray(vec, np.float64)
    out = _split(vec, hidden_size, np)
    kw = {}
    if like is not None:
        kw = dict(beta=like.beta, eps=like.eps)
    return cell_lib.LSTMWeights(
        kernel=out[0],
        recurrent=out[1],
        bias=out[2],
        out_kernel=out[3],
        out_bias=float(out[4][0]),
        metadata=dict(metadata or {}),
        tensor_kernel=out[5] if len(out) > 5 else None,
        **kw,
    )


def _split_sizes(h, conditioned: bool = False):
    sizes = [(len(cell_lib.FEATURES), 4 * h), (h, 4 * h), (4 * h,), (h,), (1,)]
    if conditioned:
        sizes.append(conditioning.zeros(h).shape)
    return sizes


def _split(vec, hidden_size: int, lib):
    """The parts of a flat vector (NumPy or TF); its length tells whether it is conditioned."""
    n = int(vec.shape[0])
    conditioned = n == num_params(hidden_size, True)
    if not conditioned and n != num_params(hidden_size):
        raise ValueError(
            f"`vec` has shape {tuple(vec.shape)}, expected ({num_params(hidden_size)},) or "
            f"({num_params(hidden_size, True)},) for hidden size {hidden_size}."
        )
    parts, i = [], 0
    for shape in _split_sizes(hidden_size, conditioned):
        k = int(np.prod(shape))
        parts.append(lib.reshape(vec[i : i + k], shape))
        i += k
    return parts


def cell_from_vector(vec: tf.Tensor, hidden_size: int) -> cell_lib.CellTensors:
    """:class:`kflip.cell.CellTensors` from a flat float32 tensor (traceable)."""
    parts = _split(vec, hidden_size, tf)
    tk = parts[5] if len(parts) > 5 else None
    return cell_lib.CellTensors(parts[0], parts[1], parts[2], parts[3], parts[4][0], tk)


# ---- the compiled inner loop -------------------------------------------------------
class InnerResult(NamedTuple):
    meta_loss: tf.Tensor  # mean log train loss over the trajectory + log held-out loss
    mean_log_train_loss: tf.Tensor
    held_out_loss: tf.Tensor
    held_out_accuracy: tf.Tensor
    flip_fraction: tf.Tensor  # mean fraction of binary weights flipped per step
    kernels: tuple  # final binary kernels


class UnrollState(NamedTuple):
    """The inner loop's state after ``t`` steps."""

    t: tf.Tensor
    kernels: tuple  # binary kernels, exactly +-1
    flip: FlipState  # the rule's state over the kernels
    offsets: tuple  # BatchNorm offsets
    adam: AdamState  # Adam's state over the offsets
    log_loss: tf.Tensor  # sum of log training-minibatch losses so far


def _initial_state(rule: FlipRule, family, kernels) -> UnrollState:
    offsets = tuple(tf.zeros(s) for s in offset_shapes(family))
    adam = OFFSET_ADAM.init(offsets)
    return UnrollState(
        tf.constant(0), kernels, rule.init(kernels), offsets, adam, tf.zeros([])
    )


def _train_step(rule: FlipRule, family, s: UnrollState, xb, yb) -> UnrollState:
    """One step: flips on the kernels by ``rule``, Adam on the offsets."""
    with tf.GradientTape() as tape:
        tape.watch(s.kernels + s.offsets)
        loss = xent(forward(family, s.kernels, s.offsets, xb), yb)
    grads = tape.gradient(loss, s.kernels + s.offsets)
    nk = len(s.kernels)
    signs, flip = rule.update(grads[:nk], s.flip, s.kernels)
    kernels = tuple(k * sign for k, sign in zip(s.kernels, signs))
    offsets, adam = OFFSET_ADAM.update(grads[nk:], s.adam, s.offsets)
    return UnrollState(s.t + 1, kernels, flip, offsets, adam, s.log_loss + tf.math.log(loss))


def _result(family, s: UnrollState, horizon, n_weights, x_held_out, y_held_out):
    logits = forward(family, s.kernels, s.offsets, x_held_out)
    held = xent(logits, y_held_out)
    correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y_held_out)
    h = tf.cast(horizon, tf.float32)
    mean_log = s.log_loss / h
    flips = tf.cast(tf.add_n(list(s.flip.flips)), tf.float32)
    return InnerResult(
        mean_log + tf.math.log(held),
        mean_log,
        held,
        tf.reduce_mean(tf.cast(correct, tf.float32)),
        flips / (h * n_weights),
        s.kernels,
    )


def make_unroll(family_name: str, hidden_size: int, beta: float, eps: float, bucketed: bool = False):
    """A ``tf.function(jit_compile=True)`` training ``family`` on a task.

    Signature: ``unroll(cell_vec, x_train, y_train, x_held_out, y_held_out, batches,
    kernels) -> InnerResult``, ``len(batches)`` steps (a static shape: what the shipped
    weights were meta-trained with, bit for bit). ``bucketed``: one more argument,
    ``horizon``, the steps to run on the first rows of a padded ``batches``
    (:meth:`kflip.meta.tasks.Task.unroll_args` with ``bucketed=True``).
    """
    check_choice("family", family_name, FAMILIES)
    family = FAMILIES[family_name]
    n_weights = float(sum(int(np.prod(s)) for s in family.kernel_shapes()))

    def run(cell_vec, x_train, y_train, x_held_out, y_held_out, batches, kernels, horizon):
        rule = FlipRule(cell_from_vector(tf.cast(cell_vec, tf.float32), hidden_size), beta, eps)

        def body(s):
            idx = batches[s.t]
            return [_train_step(rule, family, s, tf.gather(x_train, idx), tf.gather(y_train, idx))]

        (s,) = tf.while_loop(
            lambda s: s.t < horizon,
            body,
            [_initial_state(rule, family, tuple(kernels))],
            maximum_iterations=horizon,
        )
        return _result(family, s, horizon, n_weights, x_held_out, y_held_out)

    if bucketed:
        return tf.function(Traced(run), jit_compile=True, reduce_retracing=True)

    def unroll(cell_vec, x_train, y_train, x_held_out, y_held_out, batches, kernels):
        return run(cell_vec, x_train, y_train, x_held_out, y_held_out, batches, kernels,
                   tf.shape(batches)[0])

    return tf.function(Traced(unroll), jit_compile=True, reduce_retracing=True)


_UNROLLS: dict = {}


def get_unroll(family_name: str, hidden_size: int, beta: float, eps: float, bucketed: bool = False,
               conditioned: bool = False):
    """:func:`make_unroll`, cached per process (XLA compiles once per family/shape);
    ``conditioned`` rules (longer vectors) get their own function."""
    key = (family_name, int(hidden_size), float(beta), float(eps), bool(bucketed))
    if key + (bool(conditioned),) not in _UNROLLS:
        _UNROLLS[key + (bool(conditioned),)] = make_unroll(*key)
    return _UNROLLS[key + (bool(conditioned),)]


class Evaluator:
    """Evaluates (LSTM weight vector, task) pairs with the cached compiled unrolls."""

    def __init__(self, hidden_size: int, beta: float, eps: float):
        self.hidden_size = hidden_size
        self.beta = beta
        self.eps = eps

    def __call__(self, vec, task: Task, bucketed: bool = False) -> dict:
        conditioned = len(vec) == num_params(self.hidden_size, True)
        fn = get_unroll(task.family, self.hidden_size, self.beta, self.eps, bucketed, conditioned)
        r = fn(tf.constant(np.asarray(vec, np.float32)), *task.unroll_args(bucketed))
        meta = float(r.meta_loss)
        if not math.isfinite(meta):
            meta = 1e3  # a rule that produces NaN is as bad as it gets
        return {
            "meta_loss": meta,
            "train_log_loss": float(r.mean_log_train_loss),
            "held_out_loss": float(r.held_out_loss),
            "held_out_accuracy": float(r.held_out_accuracy),
            "flip_fraction": float(r.flip_fraction),
        }
