"""The coordinatewise flip LSTM: weights, features and one pure-TensorFlow step.

This module holds the LSTM weights and the per-weight cell; :mod:`kflip.rule` turns
them into the flip rule (``init``/``update``) that the Keras optimizer
(:mod:`kflip.optimizer`) and meta-training (:mod:`kflip.meta`) both call. Nothing
here knows about Keras.

The rule, per binary weight ``theta`` in {-1, +1} with float gradient ``g``:

* Features (all in the *frame of the weight*, i.e. multiplied by ``theta``, so the
  rule is symmetric under ``(theta, g) -> (-theta, -g)``):

  0. ``theta_grad``: ``theta * g``. Its sign says whether flipping ``theta`` lowers the
     loss to first order (flipping changes the loss by ``-2 * theta * g``).
  1. ``theta_grad_normalized``: ``theta * g / sqrt(v)`` where ``v`` is a per-tensor
     exponential moving average of ``mean(g**2)``. Scale-free: the same rule works for
     layers and models whose gradients differ by orders of magnitude.

* A standard LSTM cell with hidden size ``H`` (gates ``i, f, c~, o``), weights shared
  by every coordinate, state ``(h, c)`` kept per coordinate.
* Output ``y = out_kernel . h + out_bias`` (the "second gradient" g_t). The update is
  ``theta <- theta * sign(y)`` with ties going to "keep": a weight flips iff
  ``y < -flip_threshold``.
* After a flip the state is re-expressed in the new frame: ``(h, c) <- s * (h, c)``
  with ``s = sign(y)``. For the Bop initialisation this is exactly Bop's momentum,
  which lives in gradient space and so changes sign relative to a flipped weight.

State per binary weight: ``h`` and ``c``, 2*H float32 = 8*H bytes (8 B for ``H = 1``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from kflip import _checks as checks
from kflip import _keras
from kflip import conditioning

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

FEATURES = ("theta_grad", "theta_grad_normalized")
GATES = ("input", "forget", "candidate", "output")
_DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "weights")
DEFAULT_WEIGHTS = os.path.join(_DEFAULT_DIR, "default.npz")


@dataclasses.dataclass(frozen=True, eq=False)
class LSTMWeights:
    """Weights of the coordinatewise LSTM (shared by every binary weight).

    Attributes:
      kernel: ``[F, 4H]`` input weights, gate blocks in order ``input, forget,
        candidate, output``.
      recurrent: ``[H, 4H]`` recurrent weights.
      bias: ``[4H]``.
      out_kernel: ``[H]`` read-out from ``h``.
      out_bias: scalar read-out bias.
      beta: decay of the per-tensor ``mean(g**2)`` average used by feature 1.
      eps: added to that average before the square root.
      metadata: free-form JSON-able description (how the weights were made).

    Example:
      >>> import os, tempfile
      >>> import kflip
      >>> w = kflip.bop_weights()  # or kflip.cell.load_weights() for the shipped ones
      >>> w.hidden_size, w.kernel.shape, w.recurrent.shape
      (1, (2, 4), (1, 4))
      >>> w.padded(4).kernel.shape  # 4 units, the 3 extra ones inert
      (2, 16)
      >>> path = os.path.join(tempfile.mkdtemp(), "bop.npz")
      >>> w.save(path)  # bop.npz (arrays) and bop.json (metadata)
      >>> kflip.LSTMWeights.load(path).metadata["init"]
      'analytic-bop'
    """

    kernel: np.ndarray
    recurrent: np.ndarray
    bias: np.ndarray
    out_kernel: np.ndarray
    out_bias: float
    beta: float = 0.99
    eps: float = 1e-20
    metadata: dict = dataclasses.field(default_factory=dict)
    tensor_kernel: Any = None

    def __post_init__(self):
        f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        object.__setattr__(self, "kernel", f(self.kernel))
        object.__setattr__(self, "recurrent", f(self.recurrent))
        object.__setattr__(self, "bias", f(self.bias))
        object.__setattr__(self, "out_kernel", f(self.out_kernel))
        if self.out_kernel.ndim != 1 or self.out_kernel.shape[0] < 1:
            raise ValueError(
                f"LSTM weights: `out_kernel` has shape {self.out_kernel.shape}, expected "
                "(H,) with hidden size H >= 1."
            )
        h = self.out_kernel.shape[0]
        expected = {
            "kernel": (len(FEATURES), 4 * h),
            "recurrent": (h, 4 * h),
            "bias": (4 * h,),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"LSTM weights: `{name}` has shape {getattr(self, name).shape}, "
                    f"expected {shape} for {len(FEATURES)} features and hidden size {h} "
                    "(from `out_kernel`)."
                )
        self._check_tensor_kernel(h)
        for name in ("kernel", "recurrent", "bias", "out_kernel", "tensor_kernel"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"LSTM weights: `{name}` contains NaN or Inf.")
        object.__setattr__(self, "out_bias", checks.number("out_bias", self.out_bias))
        beta = checks.number("beta", self.beta, low=0.0, high=1.0)
        if beta == 1.0:
            raise ValueError(f"LSTM weights: `beta` must be in [0, 1), got {beta}.")
        object.__setattr__(self, "beta", beta)
        eps = checks.number("eps", self.eps, low=0.0, low_open=True)
        object.__setattr__(self, "eps", eps)

    def _check_tensor_kernel(self, h: int) -> None:
        tk = conditioning.zeros(h) if self.tensor_kernel is None else self.tensor_kernel
        tk = np.asarray(tk, np.float32)
        if tk.shape != conditioning.zeros(h).shape:
            raise ValueError(
                f"LSTM weights: `tensor_kernel` has shape {tk.shape}, expected "
                f"{conditioning.zeros(h).shape} for {len(conditioning.TENSOR_FEATURES)} "
                f"per-tensor features and hidden size {h}."
            )
        object.__setattr__(self, "tensor_kernel", tk)

    @property
    def hidden_size(self) -> int:
        return int(self.out_kernel.shape[0])

    @property
    def conditioned(self) -> bool:
        """Whether per-tensor features change the rule (:mod:`kflip.conditioning`)."""
        return bool(np.any(self.tensor_kernel != 0))

    def padded(self, hidden_size: int) -> "LSTMWeights":
        """The same rule with ``hidden_size`` units; the extra units are inert.

        Padding with zeros leaves the extra cells at ``c = 0``, ``h = 0`` forever
        (their candidate is ``tanh(0) = 0``) and they are not read out, so the flips
        are unchanged. Useful as a starting point for meta-training a larger cell.
        """
        h = self.hidden_size
        if hidden_size == h:
            return self
        if hidden_size < h:
            raise ValueError(
                f"`hidden_size`={hidden_size} is smaller than the hidden size {h} of the "
                f"LSTM weights; pick hidden_size >= {h} or other weights."
            )

        def pad_gates(a, rows):
            out = np.zeros((rows, 4 * hidden_size), np.float32)
            for gate in range(4):
                out[: a.shape[0], gate * hidden_size : gate * hidden_size + h] = a[
                    :, gate * h : (gate + 1) * h
                ]
            return out

        bias = pad_gates(self.bias[None], 1)[0]
        tk = self.tensor_kernel
        return dataclasses.replace(
            self,
            tensor_kernel=np.concatenate([pad_gates(tk[:, :-1], len(tk)), tk[:, -1:]], axis=1),
            kernel=pad_gates(self.kernel, len(FEATURES)),
            recurrent=pad_gates(
                np.concatenate(
                    [self.recurrent, np.zeros((hidden_size - h, 4 * h), np.float32)]
                ),
                hidden_size,
            ),
            bias=bias,
            out_kernel=np.concatenate(
                [self.out_kernel, np.zeros(hidden_size - h, np.float32)]
            ),
        )

    # ---- (de)serialisation -------------------------------------------------------
    def get_config(self) -> dict:
        """JSON-able dict holding every number (the arrays are tiny)."""
        return {
            "kernel": self.kernel.tolist(),
            "recurrent": self.recurrent.tolist(),
            "bias": self.bias.tolist(),
            "out_kernel": self.out_kernel.tolist(),
            "out_bias": self.out_bias,
            "beta": self.beta,
            "eps": self.eps,
            "metadata": self.metadata,
        } | ({"tensor_kernel": self.tensor_kernel.tolist()} if self.conditioned else {})

    @classmethod
    def from_config(cls, config: dict) -> "LSTMWeights":
        return cls(**config)

    def save(self, path: str) -> None:
        """Write ``path`` (``.npz``, arrays) and ``path`` with ``.json`` (metadata)."""
        from kflip import weights_io

        weights_io.save(self, path)

    @classmethod
    def load(cls, path: str) -> "LSTMWeights":
        """Load weights saved by :meth:`save` (``allow_pickle=False``)."""
        from kflip import weights_io

        return weights_io.load(path)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


_BOP_DESCRIPTION = (
    "Analytic initialisation reproducing Bop's momentum-and-threshold rule inside one "
    "LSTM unit. Not meta-learned."
)


def bop_weights(
    threshold: float = 1e-6,
    gamma: float = 1e-3,
    *,
    normalized: bool = False,
    scale: float = 1e-2,
    hidden_size: int = 1,
) -> LSTMWeights:
    """Analytic LSTM weights that reproduce Bop (Helwegen et al., 2019).

    Bop keeps ``m <- (1 - gamma) m + gamma g`` and flips ``theta`` iff
    ``theta * m > threshold``. One LSTM unit does the same in the weight's frame:
    forget gate ``sigmoid(b_f) = 1 - gamma``, input gate ``sigmoid(b_i) = gamma``,
    candidate ``tanh(scale * theta g)`` (linear for small ``scale * g``), output gate
    saturated at 1, so ``c = scale * theta m``; read-out ``y = tanh(scale*threshold) -
    h`` is negative exactly when ``theta m > threshold``. The flip-frame state negation
    of :mod:`kflip.rule` plays the role of Bop's momentum staying put while theta
    changes sign.

    With ``normalized=True`` the rule reads feature 1 (gradient divided by the
    per-tensor RMS gradient) instead of the raw gradient, so ``threshold`` is in units
    of RMS gradients and the rule is independent of the loss scale.

    Example:
      >>> import kflip
      >>> w = kflip.bop_weights(threshold=1e-6, gamma=1e-3)
      >>> w.hidden_size, w.metadata["bop"]["gamma"]
      (1, 0.001)
      >>> opt = kflip.FlipLSTM(w)  # behaves like larq.optimizers.Bop(1e-6, 1e-3)
      >>> opt.state_bytes_per_weight
      8

    References:
      - [Helwegen et al., 2019. Latent Weights Do Not Exist: Rethinking Binarized
        Neural Network Optimization](https://arxiv.org/abs/1906.02107)
    """
    if not threshold >= 0:
        raise ValueError(f"`threshold` must be >= 0, got {threshold}.")
    if not 0 < gamma < 1:
        raise ValueError(f"`gamma` must be in (0, 1), got {gamma}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0, got {scale}.")
    kernel = np.zeros((len(FEATURES), 4), np.float32)
    kernel[1 if normalized else 0, 2] = scale
    bias = np.array([_logit(gamma), _logit(1 - gamma), 0.0, 30.0], np.float32)
    weights = LSTMWeights(
        kernel=kernel,
        recurrent=np.zeros((1, 4), np.float32),
        bias=bias,
        out_kernel=np.array([-1.0], np.float32),
        out_bias=float(np.tanh(np.float32(scale * threshold))),
        metadata={
            "init": "analytic-bop",
            "learned": False,
            "description": _BOP_DESCRIPTION,
            "bop": dict(threshold=threshold, gamma=gamma, normalized=normalized, scale=scale),
        },
    )
    return weights.padded(hidden_size)


def shipped_path(name: str) -> str | None:
    """The ``.npz`` of weights shipped in the package under ``name`` (``"default"``,
    ``"run3"``, ...), or None when ``name`` is not one of them (e.g. a path)."""
    if not isinstance(name, str) or os.sep in name or name.endswith(".npz"):
        return None
    path = os.path.join(_DEFAULT_DIR, name + ".npz")
    return path if os.path.exists(path) else None


def blend_inputs(weights: LSTMWeights, raw_scale: float, normalized: float) -> LSTMWeights:
    """``weights`` reading a blend of the raw and the per-tensor normalised gradient.

    The candidate gate's input weight on the raw feature (``theta * g``) is multiplied
    by ``raw_scale`` and the one on the normalised feature (``theta * g / rms(g)``,
    ``rms`` over the tensor) is set to ``normalized``; gates, recurrence and read-out
    stay. A rule reading only the raw gradient treats a layer whose gradients are ten
    times smaller as ten times less sure; the normalised term gives every tensor the
    same scale. For hidden size 1 and gates that read no input (as every shipped
    rule): a candidate weight ``k`` on the normalised feature alone makes the rule
    Bop on the normalised gradient with threshold ``c* (1 - f) / (i k)`` (``c*`` the
    cell value where the read-out crosses 0, ``i`` and ``f`` the gates).

    Example (run 8 of docs/meta.md: run 3 reading three quarters normalised gradient):
      >>> import kflip
      >>> run3 = kflip.cell.load_weights("run3")
      >>> w = kflip.cell.blend_inputs(run3, raw_scale=0.25, normalized=1.65e-7)
      >>> [f"{k:.3g}" for k in w.kernel[:, 2]]  # candidate weights on the two features
      ['0.00294', '1.65e-07']
      >>> opt = kflip.FlipLSTM(w)
    """
    if weights.hidden_size != 1 or np.any(np.delete(weights.kernel, 2, axis=1) != 0):
        raise ValueError(
            "blend_inputs: `weights` must have hidden size 1 and gates that read no "
            "input (only the candidate column of `kernel` non-zero)."
        )
    raw_scale = checks.number("raw_scale", raw_scale, low=0.0)
    normalized = checks.number("normalized", normalized)
    kernel = weights.kernel.copy()
    kernel[0, 2] = np.float32(raw_scale * float(kernel[0, 2]))
    kernel[1, 2] = np.float32(normalized)
    return dataclasses.replace(weights, kernel=kernel)


def load_weights(weights: Any = None) -> LSTMWeights:
    """Resolve ``weights``: None/"default" or the name of other shipped weights
    (``kflip/weights/<name>.npz``), a path, a config dict or LSTMWeights.

    Example:
      >>> import kflip
      >>> kflip.cell.load_weights().hidden_size  # the weights shipped with kflip
      1
      >>> config = kflip.bop_weights().get_config()
      >>> kflip.cell.load_weights(config).metadata["init"]
      'analytic-bop'
    """
    if weights is None:
        return LSTMWeights.load(DEFAULT_WEIGHTS)
    shipped = shipped_path(weights)
    if shipped:
        return LSTMWeights.load(shipped)
    if isinstance(weights, LSTMWeights):
        return weights
    if isinstance(weights, dict):
        return LSTMWeights.from_config(weights)
    if isinstance(weights, (str, os.PathLike)):
        return LSTMWeights.load(weights)
    raise TypeError(
        "`weights` must be None, 'default', a path to an .npz, an LSTMWeights or its "
        f"config dict; got {type(weights).__name__}."
    )


# ---- the pure TensorFlow rule ----------------------------------------------------------
class CellTensors(NamedTuple):
    """LSTMWeights as tensors (what the pure functions consume).

    Example:
      >>> import kflip
      >>> w = kflip.bop_weights()
      >>> kflip.cell.CellTensors.from_weights(w).kernel.shape
      TensorShape([2, 4])
      >>> type(kflip.cell.CellTensors.from_weights(w, constant=True).bias).__name__
      'ndarray'
    """

    kernel: tf.Tensor
    recurrent: tf.Tensor
    bias: tf.Tensor
    out_kernel: tf.Tensor
    out_bias: tf.Tensor
    tensor_kernel: Any = None  # None: no per-tensor conditioning

    @classmethod
    def from_weights(
        cls, w: LSTMWeights, dtype=tf.float32, constant: bool = False
    ) -> "CellTensors":
        """Tensors of ``w``; with ``constant=True`` keep numpy arrays instead.

        Numpy values are trace-time constants: :func:`lstm_cell` then skips zero
        weights and evaluates gates that do not depend on the inputs once, in Python.
        The optimizer uses this (its LSTM weights are fixed). Meta-training passes
        tensors so that one compiled program serves every candidate weight vector.
        """
        if constant:
            f = lambda a: np.asarray(a, np.float32)  # noqa: E731
        else:
            f = lambda a: tf.constant(a, dtype)  # noqa: E731
        tk = f(w.tensor_kernel) if w.conditioned else None
        return cls(f(w.kernel), f(w.recurrent), f(w.bias), f(w.out_kernel), f(w.out_bias), tk)


def lstm_cell(
    cell: CellTensors, features: Sequence[tf.Tensor], h: tf.Tensor, c: tf.Tensor,
    gate_offsets=None, out_scale=None,
):
    """One coordinatewise LSTM step.

    ``features`` is a list of F tensors of the parameter's shape ``S``; ``h`` and ``c``
    have shape ``S + [H]``. Returns ``(y, h, c)`` with ``y`` of shape ``S``.
    ``gate_offsets`` (``[4H]``, added to the gate biases) and ``out_scale`` (times the
    read-out bias) are the per-tensor conditioning (:mod:`kflip.conditioning`).

    The products with the tiny weight matrices are scalar multiply-adds on
    parameter-shaped tensors (F and H are small and static): XLA fuses the cell into
    one elementwise loop instead of dots with inner dimension 1 or 2.

    Example (the Bop cell with threshold 0 flips where ``theta * g > 0``):
      >>> import kflip
      >>> import tensorflow as tf
      >>> w = kflip.bop_weights(threshold=0.0, gamma=0.5)
      >>> cell = kflip.cell.CellTensors.from_weights(w)
      >>> theta_grad = tf.constant([1.0, -1.0])  # two weights, in their own frame
      >>> h = c = tf.zeros([2, 1])  # state shape: parameter shape + [H]
      >>> y, h, c = kflip.cell.lstm_cell(cell, [theta_grad, tf.zeros(2)], h, c)
      >>> (y < 0).numpy()  # y < 0: flip
      array([ True, False])
      >>> h.shape
      TensorShape([2, 1])
    """
    hidden = int(h.shape[-1])
    hs, cs = tf.unstack(h, axis=-1), tf.unstack(c, axis=-1)

    def gate(g, k):
        col = g * hidden + k
        z = _coef(cell.bias, col) + (0.0 if gate_offsets is None else gate_offsets[col])
        for f, x in enumerate(features):
            z = _madd(z, x, _coef(cell.kernel, f, col))
        for j, hj in enumerate(hs):
            w = _coef(cell.recurrent, j, col)
            if _absorbed(z, w):
                continue
            z = _madd(z, hj, w)
        return z

    h_list, c_list = [], []
    y = _coef(cell.out_bias) * (1.0 if out_scale is None else out_scale)
    for k in range(hidden):
        i = _sigmoid(gate(0, k))
        fg = _sigmoid(gate(1, k))
        cand = _tanh(gate(2, k))
        o = _sigmoid(gate(3, k))
        ck = fg * cs[k] + i * cand
        hk = o * _tanh(ck)
        c_list.append(ck)
        h_list.append(hk)
        y = _madd(y, hk, _coef(cell.out_kernel, k))
    h_new = tf.stack(h_list, axis=-1)
    c_new = tf.stack(c_list, axis=-1)
    if isinstance(y, float) or y.shape.rank == 0:
        y = tf.fill(tf.shape(features[0]), tf.cast(y, features[0].dtype))
    return y, h_new, c_new


def _coef(a, *idx):
    """Weight entry: a Python float for numpy weights (trace-time constant), else a tensor."""
    if isinstance(a, np.ndarray):
        return float(a[idx]) if idx else float(a)
    return a[idx] if idx else a


def _absorbed(z, w) -> bool:
    """True when ``z + h * w`` rounds to ``z`` in float32 for every ``|h| <= 1``.

    Both are trace-time constants and ``|h| = |o * tanh(c)| < 1``, so if ``|w|`` is below
    half a float32 ulp of ``z`` the term cannot change the sum: dropping it is exact,
    and a gate that reads no features stays a constant evaluated once, in Python.
    """
    if not (isinstance(z, float) and isinstance(w, float)) or w == 0.0:
        return False
    z32 = np.float32(z)
    return z32 != 0 and abs(w) < 0.5 * float(np.spacing(np.abs(z32)))


def _madd(z, x, w):
    """``z + x * w``, dropping the term when ``w`` is the constant 0."""
    if isinstance(w, float):
        if w == 0.0:
            return z
        if w == 1.0:
            return z + x
    return z + x * w


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if isinstance(z, float) else tf.sigmoid(z)


def _tanh(z):
    return math.tanh(z) if isinstance(z, float) else tf.tanh(z)


def fast_sum(x):
    """Sum of all entries of ``x`` as a matrix-vector product.

    On XLA:CPU a plain ``reduce_sum`` over a large tensor runs as one scalar loop;
    ``[rows, cols] @ ones[cols]`` goes to the vectorised, threaded dot kernel and is
    about 3x faster here (see benchmarks/fliplstm_mnist.py for the step time).

    Example:
      >>> import kflip
      >>> import tensorflow as tf
      >>> float(kflip.cell.fast_sum(tf.ones([3, 4])))
      12.0
    """
    if x.shape.rank is None or x.shape.rank < 2:
        return tf.reduce_sum(x)
    cols = x.shape[-1] if x.shape[-1] is not None else tf.shape(x)[-1]
    rows = tf.reshape(x, [-1, cols])
    return tf.reduce_sum(tf.matmul(rows, tf.ones([cols, 1], x.dtype)))


def count_true(mask):
    """Number of True entries of ``mask`` (a float32 scalar, exact below 2**24).

    :func:`fast_sum` of the 0/1 mask: XLA fuses the mask into a vectorised row
    reduction. (A vector dot of the mask with itself compiles two kernels fewer per
    tensor, but XLA:CPU runs that dot as one slow loop: the FlipLSTM update on the
    MNIST MLP's kernels took 2.85 ms with it, 1.90 ms with this; Bop 0.97 ms.)

    Example:
      >>> import kflip
      >>> float(kflip.cell.count_true([[True, False], [True, True]]))
      3.0
    """
    return fast_sum(tf.cast(mask, tf.float32))


def features_and_moment(theta, grad, v, step, beta: float, eps: float):
    """Features of :data:`FEATURES` and the updated per-tensor second moment.

    ``step`` is the 1-based step count used for bias correction of ``v``.
    Returns ``(features, v_new, ok)``: the F feature tensors, the new moment and a
    scalar that is False when the step must be skipped for this tensor: some
    gradient entry is NaN or Inf, or ``mean(g**2)`` overflows (a finite spike
    whose square is +inf would otherwise pin ``v`` at +inf for good). Then ``v`` is
    kept, and the caller flips nothing and keeps the state.

    Example:
      >>> import kflip
      >>> import numpy as np
      >>> import tensorflow as tf
      >>> theta, grad = tf.constant([1.0, -1.0]), tf.constant([0.5, 0.5])
      >>> (tg, tg_norm), v, ok = kflip.cell.features_and_moment(
      ...     theta, grad, v=tf.constant(0.0), step=1, beta=0.5, eps=1e-20)
      >>> tg.numpy(), tg_norm.numpy(), float(v), bool(ok)  # v = 0.5 * mean(g**2)
      (array([ 0.5, -0.5], dtype=float32), array([ 1., -1.], dtype=float32), 0.125, True)
      >>> grad = tf.constant([0.5, np.nan])
      >>> _, v, ok = kflip.cell.features_and_moment(theta, grad, tf.constant(0.0), 1, 0.5, 1e-20)
      >>> float(v), bool(ok)
      (0.0, False)
    """
    # NaN and Inf entries make the sum non-finite. (The `where` changes no value, but
    # without it XLA fuses the sum differently and rounds the moment differently from
    # the code the shipped weights were measured with.)
    g = tf.where(tf.math.is_finite(grad), grad, tf.constant(np.nan, grad.dtype))
    mean_sq = fast_sum(tf.square(g)) / num_entries(grad)
    ok = tf.math.is_finite(mean_sq)
    v_new = tf.where(ok, beta * v + (1.0 - beta) * mean_sq, v)
    v_hat = bias_corrected(v_new, beta, step)
    tg = theta * grad
    return [tg, tg * tf.math.rsqrt(v_hat + eps)], v_new, ok


def num_entries(x):
    """The number of entries of ``x`` (at least 1), to divide a sum by: a Python float
    where the shape is static, else a tensor of ``x``'s dtype (XLA folds it).

    Example:
      >>> import kflip
      >>> import tensorflow as tf
      >>> kflip.cell.num_entries(tf.zeros([3, 4])), kflip.cell.num_entries(tf.zeros([0]))
      (12.0, 1.0)
    """
    n = x.shape.num_elements()
    if n is not None:
        return float(max(n, 1))
    return tf.cast(tf.maximum(tf.size(x), 1), x.dtype)


def bias_corrected(v, beta: float, step):
    """``v / (1 - beta**step)``: the moving average ``v`` after ``step`` (1-based) updates,
    without its bias towards the zero it started from."""
    return v / (1.0 - tf.pow(tf.constant(beta, v.dtype), tf.cast(step, v.dtype)))


def sign_pm1(x):
    """Sign with 0 -> +1: the value a binary weight snaps to.

    Example:
      >>> import kflip
      >>> kflip.cell.sign_pm1([-0.5, 0.0, 2.0]).numpy()
      array([-1.,  1.,  1.], dtype=float32)
    """
    x = tf.convert_to_tensor(x)
    return tf.where(x >= 0, tf.constant(1, x.dtype), tf.constant(-1, x.dtype))


def state_bytes_per_weight(hidden_size: int, dtype=tf.float32) -> int:
    """Optimizer-state bytes FlipLSTM keeps per binary weight (``h`` and ``c``).

    Example:
      >>> import kflip
      >>> kflip.cell.state_bytes_per_weight(1)  # H = 1: h and c in float32
      8
      >>> kflip.cell.state_bytes_per_weight(4)
      32
    """
    return 2 * hidden_size * tf.as_dtype(dtype).size
