"""Train one reference BNN (``kflip train``) or compare optimizers on it (``kflip bench``).

Everything here is importable and returns plain JSON-able dicts; :mod:`kflip.cli` is a
thin argparse layer over :func:`train` and :func:`bench`.

Optimizers (the exact recipes the docs quote):

* ``adam-ste``: ``tf.keras.optimizers.legacy.Adam(1e-3)`` on every variable; binary
  kernels keep latent floats and the ``ste_sign`` quantizer binarizes them forward.
* ``bop``: ``larq.optimizers.CaseOptimizer((Bop.is_binary_variable, Bop(threshold,
  gamma)), default_optimizer=Adam(1e-2))``, threshold 1e-6 and gamma 1e-3 by default.
* ``fliplstm``: ``kflip.FlipLSTM(weights)`` (flip mode; default shipped weights).
* ``fliplstm-gradient``: ``kflip.FlipLSTM(weights, output="gradient")`` (ablation).

Every run compiles with ``jit_compile=True`` and is seeded with
``tf.keras.utils.set_random_seed(seed)``. Telemetry comes from three small callbacks
defined here: :class:`TestCurve` (test accuracy every K steps, an XLA-compiled
evaluation that does not touch the Keras metrics), :class:`SignFlipCounter` (sign
changes of every binary kernel per step, for any optimizer, XLA-compiled) and
:class:`StepTimer`. FlipLSTM runs also get :class:`kflip.FlipRate` so its per-epoch
flip rates land in History and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import time
from typing import Any, Callable, Sequence

import numpy as np

from kflip import _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data as data_lib  # noqa: E402
from kflip import models as models_lib  # noqa: E402
from kflip import stats  # noqa: E402
from kflip._tracing import Traced  # noqa: E402
from kflip._version import __version__  # noqa: E402
from kflip.binary import (  # noqa: E402
    assert_binary,
    binary_variables,
    named_binary_variables,
    snap_binary_weights,
)
from kflip.callbacks import FlipRate  # noqa: E402
from kflip.cell import load_weights, sign_pm1  # noqa: E402
from kflip.optimizer import FlipLSTM  # noqa: E402

OPTIMIZERS = ("adam-ste", "bop", "fliplstm-gradient", "fliplstm")
FLIP_OPTIMIZERS = ("fliplstm-gradient", "fliplstm")
GREEDY_SUFFIX = "+greedy"
MODEL_OPTIONS = {"mlp": ("hidden",), "cnn": ("filters", "dense"), "binarynet": ("width",), "resnet": ()}

# Settings of the no-argument `kflip bench` / `kflip train` on the embedded dataset.
DIGITS_DEFAULTS = dict(epochs=10, model_options={"hidden": (256, 256)})
DEFAULT_EPOCHS = 6
# Models whose BatchNorm statistics are re-estimated before every test evaluation.
RECALIBRATED_MODELS = ("resnet",)


# ---------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------
def make_optimizer(
    name: str,
    *,
    bop_threshold: float = 1e-6,
    bop_gamma: float = 1e-3,
    lstm_weights: Any = None,
):
    """The optimizer recipe called ``name`` (one of :data:`OPTIMIZERS`).

    Example:
      >>> from kflip import bench
      >>> type(bench.make_optimizer("bop")).__name__  # Bop for binary kernels, Adam else
      'CaseOptimizer'
      >>> bench.make_optimizer("fliplstm-gradient").output
      'gradient'
    """
    if name == "adam-ste":
        return tf.keras.optimizers.legacy.Adam(1e-3)
    if name == "bop":
        if not (isinstance(bop_threshold, (int, float)) and bop_threshold >= 0):
            raise ValueError(f"`bop_threshold` must be a number >= 0, got {bop_threshold!r}.")
        if not (isinstance(bop_gamma, (int, float)) and 0 < bop_gamma <= 1):
            raise ValueError(f"`bop_gamma` must be in (0, 1], got {bop_gamma!r}.")
        return case_optimizer(lq.optimizers.Bop(threshold=bop_threshold, gamma=bop_gamma))
    if name == "fliplstm":
        return FlipLSTM(lstm_weights)
    if name == "fliplstm-gradient":
        return FlipLSTM(lstm_weights, output="gradient")
    raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {name!r}.")


def case_optimizer(binary_optimizer):
    """``binary_optimizer`` for the binary kernels, ``Adam(0.01)`` for every other variable.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> type(bench.case_optimizer(kflip.Bop2ndOrder())).__name__
      'CaseOptimizer'
    """
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, binary_optimizer),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
    )


def build_model(name: str, dataset: data_lib.Dataset, **options) -> tf.keras.Model:
    """``kflip.models.build(name, ...)`` with a clear error for unusable options/inputs.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> bench.build_model("mlp", ds, hidden=(16,)).output_shape
      (None, 10)
      >>> bench.build_model("mlp", ds, width=2.0)
      Traceback (most recent call last):
      ...
      ValueError: `model_options` ['width'] do not apply to model 'mlp' (it takes ['hidden']).
    """
    if name not in MODEL_OPTIONS:
        raise ValueError(f"`model` must be one of {sorted(MODEL_OPTIONS)}, got {name!r}.")
    unknown = sorted(set(options) - set(MODEL_OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"`model_options` {unknown} do not apply to model {name!r} "
            f"(it takes {list(MODEL_OPTIONS[name])})."
        )
    try:
        return models_lib.build(name, dataset.input_shape, dataset.num_classes, **options)
    except ValueError as e:
        if str(e).startswith("`"):  # already names its parameter
            raise
        raise ValueError(
            f"`model` {name!r} cannot be built for dataset {dataset.name!r} with input "
            f"shape {dataset.input_shape}: {str(e).splitlines()[0]}"
        ) from e


def state_bytes_per_binary_weight(model: tf.keras.Model) -> float:
    """Optimizer-state bytes per binary weight, measured from the optimizer's slots.

    Sums the slot variables the (possibly nested) optimizer keeps for the binary
    kernels of ``model`` and divides by their number of weights. Call after at least
    one training step (slots are created lazily).

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> net = bench.compiled_model(ds, model="mlp", model_options={"hidden": (16,)},
      ...                            optimizer="bop")
      >>> _ = net.train_on_batch(ds.x_train[:64], ds.y_train[:64])
      >>> bench.state_bytes_per_binary_weight(net)  # Bop: one float32 momentum
      4.0
    """
    opt = model.optimizer
    candidates = [opt] + list(getattr(opt, "optimizers", []))
    variables = binary_variables(model)
    n_weights = sum(int(v.shape.num_elements()) for v in variables)
    if not n_weights:
        return 0.0
    total = 0
    for var in variables:
        for o in candidates:
            if not hasattr(o, "get_slot_names"):
                continue
            for slot_name in o.get_slot_names():
                try:
                    slot = o.get_slot(var, slot_name)
                except (KeyError, ValueError):
                    continue
                total += int(slot.shape.num_elements()) * slot.dtype.size
    return total / n_weights


def default_eval_every(steps_per_epoch: int) -> int:
    """About five test evaluations per epoch.

    Example:
      >>> from kflip import bench
      >>> bench.default_eval_every(230), bench.default_eval_every(3)
      (46, 1)
    """
    return max(1, int(round(steps_per_epoch / 5)))


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


# ---------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------
def make_evaluator(model: tf.keras.Model, batch_size: int = 1000):
    """``evaluate(x, y) -> (accuracy, mean loss)`` of ``model`` in inference mode.

    One XLA-compiled function per batch of ``batch_size`` examples; it neither resets
    nor feeds the model's Keras metrics, so it is safe to call in the middle of
    ``fit``. The model must output class probabilities (as kflip's models do).

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> evaluate = bench.make_evaluator(model, batch_size=128)
      >>> accuracy, loss = evaluate(ds.x_test[:256], ds.y_test[:256])
      >>> 0.0 <= accuracy <= 1.0, loss > 0.0
      (True, True)
    """
    _check_positive_int("batch_size", batch_size)

    def sums(x, y):
        p = model(x, training=False)
        loss = tf.keras.losses.sparse_categorical_crossentropy(y, p)
        hit = tf.cast(tf.equal(tf.argmax(p, axis=-1), tf.cast(y, tf.int64)), tf.float32)
        return tf.reduce_sum(loss), tf.reduce_sum(hit)

    batch_sums = tf.function(Traced(sums), jit_compile=True)  # one per model: no false warning

    def evaluate(x, y):
        x, y = np.asarray(x), np.asarray(y)
        if not len(x):
            raise ValueError("`x` must hold at least one example.")
        loss_sum, hit_sum = 0.0, 0.0
        for i in range(0, len(x), batch_size):
            loss, hit = batch_sums(x[i : i + batch_size], y[i : i + batch_size])
            loss_sum += float(loss)
            hit_sum += float(hit)
        return hit_sum / len(x), loss_sum / len(x)

    return evaluate


def recalibration_data(model: str, ds) -> np.ndarray | None:
    """The training images whose BatchNorm statistics model ``model`` (a name of
    :data:`kflip.models.MODELS`) is evaluated with: a fixed shuffled subset of 6,400 for
    the models in :data:`RECALIBRATED_MODELS`, else None (the moving statistics)."""
    if model not in RECALIBRATED_MODELS:
        return None
    return ds.x_train[np.random.default_rng(0).permutation(len(ds.x_train))[:6400]]


class TestCurve(tf.keras.callbacks.Callback):
    """Evaluate the test set every ``every_n_steps`` training steps.

    Uses :func:`make_evaluator` (XLA, inference mode, Keras metrics untouched).
    ``curve`` gets ``{"step", "test_accuracy", "test_loss"}`` at step 0, every
    ``every_n_steps`` steps and at every epoch end (whose logs also get
    ``test_accuracy``/``test_loss``, so they reach History and TensorBoard). With
    ``recalibrate_x``, each evaluation first re-estimates the BatchNorm statistics on it
    (:func:`kflip.models.recalibrate_batchnorm`; training itself is unaffected).

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> model.compile("adam", "sparse_categorical_crossentropy")
      >>> curve = bench.TestCurve(ds.x_test, ds.y_test, every_n_steps=1)
      >>> hist = model.fit(ds.x_train[:128], ds.y_train[:128], batch_size=64,
      ...                  callbacks=[curve], verbose=0)
      >>> [point["step"] for point in curve.curve], "test_accuracy" in hist.history
      ([0, 1, 2], True)
    """

    def __init__(self, x, y, every_n_steps: int, batch_size: int = 1000, recalibrate_x=None):
        super().__init__()
        self.recalibrate_x = recalibrate_x
        _check_positive_int("every_n_steps", every_n_steps)
        _check_positive_int("batch_size", batch_size)
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.every_n_steps = int(every_n_steps)
        self.batch_size = int(batch_size)
        self.curve: list[dict] = []
        self.step = 0
        self._evaluate = None

    def evaluate(self) -> tuple[float, float]:
        """(test accuracy, test loss) of the model now."""
        if self._evaluate is None:
            self._evaluate = make_evaluator(self.model, self.batch_size)
        if self.recalibrate_x is not None:
            models_lib.recalibrate_batchnorm(self.model, self.recalibrate_x)
        return self._evaluate(self.x, self.y)

    def _record(self):
        if self.curve and self.curve[-1]["step"] == self.step:
            return self.curve[-1]
        acc, loss = self.evaluate()
        point = {"step": self.step, "test_accuracy": acc, "test_loss": loss}
        self.curve.append(point)
        return point

    def on_train_begin(self, logs=None):
        if not self.curve:
            self._record()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every_n_steps == 0:
            self._record()

    def on_epoch_end(self, epoch, logs=None):
        point = self._record()
        if logs is not None:
            logs["test_accuracy"] = point["test_accuracy"]
            logs["test_loss"] = point["test_loss"]


class SignFlipCounter(tf.keras.callbacks.Callback):
    """Count sign changes of every binary kernel after every step, for any optimizer.

    For Bop/FlipLSTM(flip) these are the flips; for Adam+STE and FlipLSTM(gradient)
    they are the sign changes of the latent weights, i.e. the flips of the binary
    weights the forward pass uses. The per-step update is one XLA-compiled function.
    ``history`` gets ``{"step", "flip_rate/<variable>", "flip_rate"}`` (flips per
    weight per step since the previous entry) every ``every_n_steps`` steps;
    ``totals()`` the cumulative flips per variable; epoch logs get ``flips_per_step``.

    Example (calling the hooks by hand, as ``model.fit`` would):
      >>> import kflip
      >>> import tensorflow as tf
      >>> from kflip import bench
      >>> tf.keras.backend.clear_session()  # deterministic layer names
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> counter = bench.SignFlipCounter(every_n_steps=1)
      >>> counter.set_model(model)
      >>> counter.on_train_begin()
      >>> kernel = model.layers[1].kernel
      >>> _ = kernel.assign(-kernel)  # a "step" that flips every weight of layer 1
      >>> counter.on_train_batch_end(0)
      >>> counter.totals()
      {'quant_dense/kernel': 1024, 'quant_dense_1/kernel': 0}
      >>> counter.history[0]["flip_rate/quant_dense/kernel"]
      1.0
    """

    def __init__(self, every_n_steps: int):
        super().__init__()
        _check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = int(every_n_steps)
        self.history: list[dict] = []
        self.step = 0
        self._vars: list = []

    def on_train_begin(self, logs=None):
        if self._vars:
            return  # a second fit() keeps counting
        named = named_binary_variables(self.model)  # right after load_model too
        self._names = [name for name, _ in named]
        self._vars = [v for _, v in named]
        self._sizes = [int(v.shape.num_elements()) for v in self._vars]
        self._prev = [tf.Variable(sign_pm1(v), trainable=False) for v in self._vars]
        self._counts = [tf.Variable(0, dtype=tf.int64, trainable=False) for _ in self._vars]

        @tf.function(jit_compile=True)
        def update():
            for v, prev, count in zip(self._vars, self._prev, self._counts):
                s = sign_pm1(v)
                count.assign_add(tf.reduce_sum(tf.cast(tf.not_equal(s, prev), tf.int64)))
                prev.assign(s)

        self._update = update
        self._update()  # compile now (counts nothing: prev == current)
        self._mark = (0, [0] * len(self._vars))
        self._epoch_mark = (0, 0)

    def totals(self) -> dict:
        return {n: int(c.numpy()) for n, c in zip(self._names, self._counts)}

    @property
    def total_flips(self) -> int:
        return int(sum(self.totals().values()))

    def flips_per_step(self) -> float:
        return self.total_flips / max(self.step, 1)

    def on_train_batch_end(self, batch, logs=None):
        if self._vars:
            self._update()
        self.step += 1
        if self.step % self.every_n_steps == 0 and self._vars:
            counts = [int(c.numpy()) for c in self._counts]
            last_step, last = self._mark
            steps = self.step - last_step
            entry = {"step": self.step}
            for name, size, now, before in zip(self._names, self._sizes, counts, last):
                entry[f"flip_rate/{name}"] = (now - before) / (steps * size)
            entry["flip_rate"] = (sum(counts) - sum(last)) / (steps * sum(self._sizes))
            self.history.append(entry)
            self._mark = (self.step, counts)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._vars:
            return
        total = self.total_flips
        step0, flips0 = self._epoch_mark
        logs["flips_per_step"] = (total - flips0) / max(self.step - step0, 1)
        self._epoch_mark = (self.step, total)


class StepTimer(tf.keras.callbacks.Callback):
    """Wall time of every training step (put it first in the callback list).

    Example (calling the hooks by hand, as ``model.fit`` would):
      >>> from kflip import bench
      >>> timer = bench.StepTimer()
      >>> for batch in range(3):
      ...     timer.on_train_batch_begin(batch)
      ...     timer.on_train_batch_end(batch)
      >>> len(timer.times), timer.steady_state_seconds() >= 0.0
      (3, True)
    """

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._t0 = None

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)

    def steady_state_seconds(self) -> float | None:
        """Median step time, excluding the first step (tracing + XLA compilation)."""
        if len(self.times) < 2:
            return None
        return float(np.median(self.times[1:]))


# ---------------------------------------------------------------------------------
# Greedy flip search (kflip.greedy, imported lazily)
# ---------------------------------------------------------------------------------
def greedy_module():
    """``kflip.greedy`` or None if this version does not have it.

    Example:
      >>> from kflip import bench
      >>> bench.greedy_module().__name__
      'kflip.greedy'
    """
    try:
        return importlib.import_module("kflip.greedy")
    except ModuleNotFoundError as e:
        if e.name in ("kflip.greedy",):
            return None
        raise


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (tf.Tensor, tf.Variable)):
        return _jsonable(obj.numpy())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    for method in ("to_dict", "as_dict"):
        if callable(getattr(obj, method, None)):
            return _jsonable(getattr(obj, method)())
    if hasattr(obj, "__dict__"):
        return _jsonable({k: v for k, v in vars(obj).items() if not k.startswith("_")})
    return str(obj)


# Defaults for the greedy search that follows training: a per-layer time budget and
# the most promising candidates first (by the first-order gain -2*theta*g).
GREEDY_DEFAULTS = {"order": "gradient", "max_seconds": 10.0}


def greedy_options_with_defaults(options: dict | None, examples: int) -> dict:
    """``options`` for ``greedy_flip`` on top of :data:`GREEDY_DEFAULTS` and
    ``probe_size=examples``; a value of None removes a default (e.g. no budget).

    Example:
      >>> from kflip import bench
      >>> bench.greedy_options_with_defaults({"group_size": 2}, examples=256)
      {'order': 'gradient', 'max_seconds': 10.0, 'probe_size': 256, 'group_size': 2}
      >>> bench.greedy_options_with_defaults({"max_seconds": None}, examples=256)
      {'order': 'gradient', 'probe_size': 256}
    """
    _check_positive_int("greedy_examples", examples)
    merged = dict(GREEDY_DEFAULTS, probe_size=int(examples))
    merged.update(options or {})
    return {k: v for k, v in merged.items() if v is not None}


class _Progress:
    """``[k/N] what ... elapsed, ~left`` before each of ``total`` runs (mean run time so far)."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.say = total, say
        self.finished = 0
        self.t0 = time.perf_counter()

    def start(self, what: str) -> None:
        elapsed = time.perf_counter() - self.t0
        left = ""
        if self.finished:
            eta = elapsed / self.finished * (self.total - self.finished)
            left = f", about {_duration(eta)} left"
        self.say(f"[{self.finished + 1}/{self.total}] {what} ... ({_duration(elapsed)} elapsed{left})")

    def done(self) -> None:
        self.finished += 1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def check_run_inputs(
    *,
    optimizers,
    output_dir=None,
    lstm_weights=None,
    greedy: bool = False,
    greedy_examples: int = 1024,
    greedy_options: dict | None = None,
) -> None:
    """Refuse, before any training, what would otherwise fail (or be ignored) after it.

    Example:
      >>> from kflip import bench
      >>> bench.check_run_inputs(optimizers=["fliplstm"], greedy=True)  # fine: None
      >>> bench.check_run_inputs(optimizers=["bop"], lstm_weights="default")
      Traceback (most recent call last):
      ...
      ValueError: `lstm_weights` is only used by fliplstm optimizers, not by ['bop'].
    """
    if output_dir is not None:
        _check_output_dir(os.fspath(output_dir))
    if lstm_weights is not None:
        if not any(name.startswith("fliplstm") for name in optimizers):
            raise ValueError(
                f"`lstm_weights` is only used by fliplstm optimizers, not by {list(optimizers)}."
            )
        load_weights(lstm_weights)
    if greedy:
        module = greedy_module()
        if module is not None:
            module.validate_options(greedy_options_with_defaults(greedy_options, greedy_examples))


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`output_dir` {path!r} exists and is not a directory.")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"`output_dir` {path!r}: {parent!r} is not writable.")


def run_greedy(model, dataset, *, examples: int = 1024, options: dict | None = None) -> dict:
    """Snap the binary kernels to +-1 and run ``kflip.greedy.greedy_flip`` on them.

    The probe set is ``examples`` training examples (``greedy_flip`` draws a fixed
    random subset); ``options`` override :data:`GREEDY_DEFAULTS`. Snapping does not
    change the function the model computes (its ``ste_sign`` quantizers already see
    only the signs). Returns ``{"report", "seconds", "options"}``.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
      >>> out = bench.run_greedy(model, ds, examples=64, options={"max_seconds": 1.0})
      >>> sorted(out)
      ['options', 'report', 'seconds']
      >>> out["options"]  # GREEDY_DEFAULTS, updated by `options`
      {'order': 'gradient', 'max_seconds': 1.0, 'probe_size': 64}
      >>> out["report"]["loss_after"] <= out["report"]["loss_before"]
      True
    """
    module = greedy_module()
    if module is None:
        raise ValueError(
            "`greedy` needs kflip.greedy, which is not available in this version of kflip."
        )
    options = greedy_options_with_defaults(options, examples)
    snap_binary_weights(model)
    t0 = time.perf_counter()
    report = module.greedy_flip(model, dataset.x_train, dataset.y_train, **{"verbose": 0, **options})
    seconds = time.perf_counter() - t0
    assert_binary(model)
    return {"report": _jsonable(report), "seconds": seconds, "options": _jsonable(options)}


# ---------------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------------
def resolve_dataset(dataset, data_dir=None, download=False, n_train=None, n_test=None):
    """A :class:`kflip.data.Dataset` from a name or a Dataset, optionally subset.

    Example:
      >>> from kflip import bench
      >>> ds = bench.resolve_dataset("digits", n_train=100, n_test=50)
      >>> ds.name, len(ds.x_train), len(ds.x_test)
      ('digits', 100, 50)
    """
    if isinstance(dataset, data_lib.Dataset):
        ds = dataset
    elif isinstance(dataset, str):
        ds = data_lib.load(dataset, data_dir=data_dir, download=download)
    else:
        raise ValueError(f"`dataset` must be a dataset name or a kflip.data.Dataset, got {dataset!r}.")
    _check_positive_int("n_train", n_train, allow_none=True)
    _check_positive_int("n_test", n_test, allow_none=True)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test)
    return ds


def _defaults_for(ds, epochs, model, model_options):
    if ds.name == "digits":
        if epochs is None:
            epochs = DIGITS_DEFAULTS["epochs"]
        if model_options is None and model == "mlp":
            model_options = dict(DIGITS_DEFAULTS["model_options"])
    if epochs is None:
        epochs = DEFAULT_EPOCHS
    return epochs, dict(model_options or {})


def _run(
    ds: data_lib.Dataset,
    *,
    model: str,
    model_options: dict,
    optimizer: str,
    epochs: int,
    batch_size: int,
    seed: int,
    eval_every: int | None,
    tensorboard_dir: str | None = None,
    verbose: int = 0,
    optimizer_options: dict | None = None,
):
    """Train once; returns (result dict, trained model)."""
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
    steps_per_epoch = math.ceil(len(ds.x_train) / batch_size)
    if eval_every is None:
        eval_every = default_eval_every(steps_per_epoch)
    _check_positive_int("eval_every", eval_every)

    t_start = time.perf_counter()
    tf.keras.backend.clear_session()  # layer names restart, so runs are comparable
    tf.keras.utils.set_random_seed(int(seed))
    net = build_model(model, ds, **model_options)
    opt = make_optimizer(optimizer, **(optimizer_options or {}))
    net.compile(
        optimizer=opt,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    timer = StepTimer()
    curve = TestCurve(ds.x_test, ds.y_test, eval_every, recalibrate_x=recalibration_data(model, ds))
    counter = SignFlipCounter(eval_every)
    callbacks = [timer, curve, counter]
    if isinstance(opt, FlipLSTM):
        callbacks.append(FlipRate())
    if tensorboard_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=tensorboard_dir))
    t_fit = time.perf_counter()
    hist = net.fit(
        ds.x_train,
        ds.y_train,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=verbose,
        callbacks=callbacks,
    )
    fit_seconds = time.perf_counter() - t_fit
    if optimizer == "fliplstm":
        assert_binary(net)
    final = curve.curve[-1]
    step_s = timer.steady_state_seconds()
    result = {
        "optimizer": optimizer,
        "seed": int(seed),
        "dataset": ds.name,
        "model": model,
        "model_options": _jsonable(model_options),
        "params": int(net.count_params()),
        "binary_weights": int(sum(int(v.shape.num_elements()) for v in binary_variables(net))),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "steps": int(curve.step),
        "eval_every": int(eval_every),
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "history": _jsonable(hist.history),
        "test_curve": curve.curve,
        "flip_curve": counter.history,
        "flips": counter.totals(),
        "flips_per_step": counter.flips_per_step(),
        "step_ms": None if step_s is None else 1e3 * step_s,
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "state_bytes_per_binary_weight": state_bytes_per_binary_weight(net),
    }
    if isinstance(opt, FlipLSTM):  # which LSTM weights (the shipped default can change)
        result["lstm_weights"] = {
            "hidden_size": int(opt.hidden_size),
            "metadata": _jsonable(opt.lstm_weights.metadata),
        }
    return result, net


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (needed for ``tensorboard_dir``).

    Example:
      >>> from kflip import bench
      >>> isinstance(bench.tensorboard_available(), bool)
      True
    """
    return importlib.util.find_spec("tensorboard") is not None


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
    os.replace(tmp, path)


def _save(net, result: dict, output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    model_path = os.path.join(output_dir, "model.keras")
    net.save(model_path)
    history_path = os.path.join(output_dir, "history.json")
    result = dict(result, model_path=model_path, history_path=history_path)
    _write_json(result, history_path)
    return result


def train(
    dataset="digits",
    *,
    model: str = "mlp",
    model_options: dict | None = None,
    optimizer: str = "fliplstm",
    epochs: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    eval_every: int | None = None,
    greedy: bool = False,
    greedy_examples: int = 1024,
    greedy_options: dict | None = None,
    output_dir: str | None = None,
    tensorboard_dir: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    bop_threshold: float = 1e-6,
    bop_gamma: float = 1e-3,
    lstm_weights=None,
    verbose: int = 1,
    return_model: bool = False,
):
    """Train one reference BNN with one optimizer (the ``kflip train`` command).

    Args:
      dataset: a name for :func:`kflip.data.load` (``"digits"``, ``"mnist"``, any
        tfds name, or a local ``.npz`` under ``data_dir``) or a ``Dataset``.
      model: ``"mlp"``, ``"cnn"``, ``"binarynet"`` or ``"resnet"``; ``model_options`` go to the
        builder (``hidden``; ``filters``/``dense``; ``width``).
      optimizer: one of :data:`OPTIMIZERS`.
      epochs: default 6 (10 on digits, whose MLP default is ``hidden=(256, 256)``).
      eval_every: evaluate the test set every this many steps (default: about five
        times per epoch).
      greedy: after training, run ``kflip.greedy_flip`` with a probe set of
        ``greedy_examples`` training examples; ``greedy_options`` (keywords of
        ``greedy_flip``) override :data:`GREEDY_DEFAULTS`.
      output_dir: if given, writes ``model.keras`` (loads back with
        ``tf.keras.models.load_model`` after ``import kflip``) and ``history.json``.
      tensorboard_dir: if given, a TensorBoard log dir.

    Returns:
      The run's result dict (also written to ``history.json``), and the model if
      ``return_model``.

    Example: ``bench.train("digits", epochs=1, verbose=0)`` trains the digits MLP with
    FlipLSTM for one epoch and returns its result dict (``"test_accuracy"``,
    ``"test_curve"``, ``"flips"``, ...). Bad options are refused before any training:
      >>> from kflip import bench
      >>> bench.train(greedy=True, greedy_options={"order": "bogus"})
      Traceback (most recent call last):
      ...
      ValueError: `order` must be one of ('index', 'random', 'gradient'), got 'bogus'.
    """
    if tensorboard_dir and not tensorboard_available():
        raise ValueError(
            "`tensorboard_dir` needs the tensorboard package, which is not installed "
            "(pip install tensorboard)."
        )
    check_run_inputs(
        optimizers=[optimizer],
        output_dir=output_dir,
        lstm_weights=lstm_weights,
        greedy=greedy,
        greedy_examples=greedy_examples,
        greedy_options=greedy_options,
    )
    ds = resolve_dataset(dataset, data_dir, download, n_train, n_test)
    epochs, model_options = _defaults_for(ds, epochs, model, model_options)
    if greedy and greedy_module() is None:
        raise ValueError(
            "`greedy` needs kflip.greedy (the greedy flip search), which is not "
            "available in this version of kflip."
        )
    result, net = _run(
        ds,
        model=model,
        model_options=model_options,
        optimizer=optimizer,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        eval_every=eval_every,
        tensorboard_dir=tensorboard_dir,
        verbose=verbose,
        optimizer_options=dict(
            bop_threshold=bop_threshold, bop_gamma=bop_gamma, lstm_weights=lstm_weights
        ),
    )
    if greedy:
        before = result["test_accuracy"]
        g = run_greedy(net, ds, examples=greedy_examples, options=greedy_options)
        acc, loss = make_evaluator(net)(ds.x_test, ds.y_test)
        g.update(test_accuracy_before=before, test_accuracy_after=acc, test_loss_after=loss)
        result.update(greedy=g, test_accuracy=acc, test_loss=loss)
        result["wall_seconds"] += g["seconds"]
    if output_dir:
        result = _save(net, result, output_dir)
    return (result, net) if return_model else result


# ---------------------------------------------------------------------------------
# Step timing, interleaved
# ---------------------------------------------------------------------------------
def time_train_steps(
    models: dict, x, y, *, steps: int = 20, rounds: int = 10
) -> dict:
    """Steady-state seconds per training step of already-trained, compiled models.

    Reuses each model's compiled (XLA) train function on one fixed batch, after two
    warm-up calls. The optimizers are timed round-robin (``rounds`` rounds of
    ``steps`` steps each, the starting model rotating) so a machine whose load
    changes over time affects them alike; every step is timed on its own (its
    outputs are fetched, so it has finished) and the median over all
    ``rounds * steps`` steps is returned per key, which discounts steps that lost the
    CPU to other processes. Note: this trains the models further.

    Example: ``time_train_steps({"bop": net_a, "fliplstm": net_b}, x, y)`` with models
    from :func:`compiled_model` returns ``{"bop": seconds, "fliplstm": seconds}``.
      >>> from kflip import bench
      >>> bench.time_train_steps({}, None, None, steps=0)
      Traceback (most recent call last):
      ...
      ValueError: `steps` must be a positive int, got 0.
    """
    _check_positive_int("steps", steps)
    _check_positive_int("rounds", rounds)
    names = list(models)
    fns, its = {}, {}
    for name in names:
        m = models[name]
        its[name] = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        fns[name] = m.make_train_function()
        for _ in range(2):
            _sync(fns[name](its[name]))
    per = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, it = fns[name], its[name]
            for _ in range(steps):
                t0 = time.perf_counter()
                _sync(fn(it))
                per[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in per.items()}


def compiled_model(
    ds: data_lib.Dataset,
    *,
    model: str,
    model_options: dict,
    optimizer: str,
    seed: int = 0,
    optimizer_options: dict | None = None,
) -> tf.keras.Model:
    """A freshly built model compiled like the bench's (XLA), not trained.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> net = bench.compiled_model(kflip.data.digits(), model="mlp",
      ...                            model_options={"hidden": (16,)}, optimizer="fliplstm")
      >>> type(net.optimizer).__name__
      'FlipLSTM'
    """
    tf.keras.utils.set_random_seed(int(seed))
    net = build_model(model, ds, **model_options)
    net.compile(
        optimizer=make_optimizer(optimizer, **(optimizer_options or {})),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    return net


def step_times(
    dataset="digits",
    *,
    model: str = "mlp",
    model_options: dict | None = None,
    optimizers: Sequence[str] = OPTIMIZERS,
    batch_size: int = 64,
    steps: int = 20,
    rounds: int = 10,
    data_dir: str | None = None,
    bop_threshold: float = 1e-6,
    bop_gamma: float = 1e-3,
    lstm_weights=None,
) -> dict:
    """Only the step-time part of :func:`bench`, on fresh (untrained) models.

    Returns ``{"step_ms": {name: ms}, "rel_bop": {name: ratio}}`` (``rel_bop`` only
    if ``"bop"`` is among ``optimizers``).

    Example: ``bench.step_times(optimizers=["bop", "fliplstm"])`` times both on the
    digits MLP (not run here: it compiles and trains a model per optimizer).
      >>> from kflip import bench
      >>> bench.step_times(optimizers=["sgd"])
      Traceback (most recent call last):
      ...
      ValueError: `optimizer` must be one of ['adam-ste', 'bop', 'fliplstm-gradient',
      'fliplstm'], got 'sgd'.
    """
    ds = resolve_dataset(dataset, data_dir)
    _, model_options = _defaults_for(ds, 1, model, model_options)
    opt_options = dict(bop_threshold=bop_threshold, bop_gamma=bop_gamma, lstm_weights=lstm_weights)
    nets = {
        name: compiled_model(
            ds, model=model, model_options=model_options, optimizer=name,
            optimizer_options=opt_options,
        )
        for name in optimizers
    }
    secs = time_train_steps(
        nets, ds.x_train[:batch_size], ds.y_train[:batch_size], steps=steps, rounds=rounds
    )
    out = {"step_ms": {k: 1e3 * v for k, v in secs.items()}}
    if "bop" in secs:
        out["rel_bop"] = {k: v / secs["bop"] for k, v in secs.items()}
    return out


def _sync(out):
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)


# ---------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------
def machine_info() -> dict:
    """Date, platform, CPU count and package versions, for ``results.json``.

    Example:
      >>> from kflip import bench
      >>> sorted(bench.machine_info())
      ['cpu_count', 'date_utc', 'kflip', 'larq', 'platform', 'processor', 'python',
       'tensorflow']
    """
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "larq": getattr(lq, "__version__", "?"),
        "kflip": __version__,
    }


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


def summarize(runs: list[dict], step_seconds: dict) -> list[dict]:
    """One row per optimizer (in order of appearance) from the per-seed runs.

    ``step_seconds`` maps optimizer names to step times (from
    :func:`time_train_steps`).

    Example:
      >>> from kflip import bench
      >>> runs = [dict(optimizer="bop", seed=s, test_accuracy=a, wall_seconds=10.0,
      ...              state_bytes_per_binary_weight=4.0, flips_per_step=2.0)
      ...         for s, a in [(0, 0.90), (1, 0.92)]]
      >>> row, = bench.summarize(runs, {"bop": 0.004})
      >>> row["seeds"], round(row["test_accuracy_mean"], 4), row["step_ms"]
      ([0, 1], 0.91, 4.0)
    """
    order = list(dict.fromkeys(r["optimizer"] for r in runs))
    bop = step_seconds.get("bop")
    rows = []
    for name in order:
        rs = [r for r in runs if r["optimizer"] == name]
        base = name[: -len(GREEDY_SUFFIX)] if name.endswith(GREEDY_SUFFIX) else name
        acc_mean, acc_std = _mean_std([r["test_accuracy"] for r in rs])
        wall_mean, _ = _mean_std([r["wall_seconds"] for r in rs])
        greedy = name != base
        step = None if greedy else step_seconds.get(name)
        row = {
            "optimizer": name,
            "seeds": [r["seed"] for r in rs],
            "test_accuracy_mean": acc_mean,
            "test_accuracy_std": acc_std,
            "wall_seconds_mean": wall_mean,
            "step_ms": None if step is None else 1e3 * step,
            "step_time_rel_bop": None if (step is None or not bop) else step / bop,
            "state_bytes_per_binary_weight": _mean_std(
                [r["state_bytes_per_binary_weight"] for r in rs]
            )[0],
            "flips_per_step": None if greedy else _mean_std([r["flips_per_step"] for r in rs])[0],
        }
        if greedy:
            row["greedy_seconds_mean"] = _mean_std([r["greedy"]["seconds"] for r in rs])[0]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The bench table as GitHub-flavoured Markdown.

    Example:
      >>> from kflip import bench
      >>> runs = [dict(optimizer="bop", seed=s, test_accuracy=a, wall_seconds=10.0,
      ...              state_bytes_per_binary_weight=4.0, flips_per_step=2.0)
      ...         for s, a in [(0, 0.90), (1, 0.92)]]
      >>> print(bench.format_table(bench.summarize(runs, {"bop": 0.004})))
      | optimizer | test accuracy (%) | wall s / run | step ms | step time / Bop | state B / binary weight | flips / step |
      |---|---|---|---|---|---|---|
      | bop | 91.00 +/- 1.41 | 10.0 | 4.00 | 1.00 | 4.00 | 2.0 |
    """

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = (
        "| optimizer | test accuracy (%) | wall s / run | step ms | step time / Bop "
        "| state B / binary weight | flips / step |"
    )
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        acc = (
            "-"
            if r["test_accuracy_mean"] is None
            else f"{100 * r['test_accuracy_mean']:.2f} +/- {100 * r['test_accuracy_std']:.2f}"
        )
        lines.append(
            f"| {r['optimizer']} | {acc} | {f(r['wall_seconds_mean'], '.1f')} "
            f"| {f(r['step_ms'], '.2f')} | {f(r['step_time_rel_bop'], '.2f')} "
            f"| {f(r['state_bytes_per_binary_weight'], '.2f')} | {f(r['flips_per_step'], '.1f')} |"
        )
    return "\n".join(lines)


def bench(
    dataset="digits",
    *,
    model: str = "mlp",
    model_options: dict | None = None,
    optimizers: Sequence[str] = OPTIMIZERS,
    greedy_after: Sequence[str] = FLIP_OPTIMIZERS,
    seeds=2,
    epochs: int | None = None,
    batch_size: int = 64,
    eval_every: int | None = None,
    output_dir: str | None = "kflip-bench",
    plots: bool = True,
    timing_steps: int = 20,
    timing_rounds: int = 10,
    greedy_examples: int = 1024,
    greedy_options: dict | None = None,
    data_dir: str | None = None,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    bop_threshold: float = 1e-6,
    bop_gamma: float = 1e-3,
    lstm_weights=None,
    verbose: int = 1,
    print_fn: Callable[[str], None] | None = print,
    command: str | None = None,
) -> dict:
    """Same model, data, epochs and seeds under every optimizer (``kflip bench``).

    For each optimizer in ``optimizers`` and each seed: train (see :func:`train`),
    record final test accuracy, the test-accuracy-vs-step curve, sign flips per
    layer, wall time and measured optimizer-state bytes per binary weight. Optimizers
    in ``greedy_after`` get an extra row ``<name>+greedy``: the same trained model
    after one greedy flip search (skipped, with a note, if ``kflip.greedy`` is
    missing). Then the seed-``seeds[0]`` models are timed round-robin
    (:func:`time_train_steps`) for the step time relative to Bop (a Bop model is
    trained for one epoch just for timing if ``"bop"`` is not benchmarked).

    Args:
      seeds: number of seeds (``0..n-1``) or a list of seeds.
      output_dir: where ``results.json`` and the PNG plots go (None: write nothing).
      print_fn: progress and the final table go here (None: silent).
      (others as in :func:`train`)

    Returns:
      ``{"config", "machine", "runs", "summary", "table", "step_seconds", "notes",
      "files"}``.

    Example: ``bench.bench()`` (the ``kflip bench`` command) runs the full comparison
    on digits and writes ``kflip-bench/``; that takes a few minutes, so here only its
    argument checks:
      >>> from kflip import bench
      >>> bench.bench(optimizers=["bop", "bop"])
      Traceback (most recent call last):
      ...
      ValueError: `optimizers` has duplicates: ['bop', 'bop'].
    """
    say = print_fn or (lambda s: None)
    optimizers = list(optimizers)
    if not optimizers:
        raise ValueError("`optimizers` must name at least one optimizer.")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"`optimizers` entries must be in {list(OPTIMIZERS)}, got {name!r}.")
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"`optimizers` has duplicates: {optimizers!r}.")
    greedy_after = list(greedy_after or [])
    for name in greedy_after:
        if name not in OPTIMIZERS:
            raise ValueError(f"`greedy_after` entries must be in {list(OPTIMIZERS)}, got {name!r}.")
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        _check_positive_int("seeds", seeds)
        seeds = list(range(int(seeds)))
    else:
        seeds = list(seeds)
        if not seeds or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds
        ):
            raise ValueError(f"`seeds` must be a positive int or distinct ints >= 0, got {seeds!r}.")
    _check_positive_int("timing_steps", timing_steps)
    _check_positive_int("timing_rounds", timing_rounds)
    check_run_inputs(
        optimizers=optimizers,
        output_dir=output_dir,
        lstm_weights=lstm_weights,
        greedy=any(n in optimizers for n in greedy_after),
        greedy_examples=greedy_examples,
        greedy_options=greedy_options,
    )

    ds = resolve_dataset(dataset, data_dir, download, n_train, n_test)
    epochs, model_options = _defaults_for(ds, epochs, model, model_options)
    notes = []
    do_greedy = [n for n in greedy_after if n in optimizers]
    if do_greedy and greedy_module() is None:
        notes.append(
            "greedy rows skipped: kflip.greedy is not available in this version of kflip."
        )
        say("note: " + notes[-1])
        do_greedy = []
    opt_options = dict(bop_threshold=bop_threshold, bop_gamma=bop_gamma, lstm_weights=lstm_weights)
    config = {
        "dataset": ds.name,
        "dataset_source": ds.source,
        "n_train": int(len(ds.x_train)),
        "n_test": int(len(ds.x_test)),
        "model": model,
        "model_options": _jsonable(model_options),
        "optimizers": optimizers,
        "greedy_after": do_greedy,
        "greedy_examples": greedy_examples,
        "greedy_options": _jsonable(
            greedy_options_with_defaults(greedy_options, greedy_examples) if do_greedy else {}
        ),
        "seeds": [int(s) for s in seeds],
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "eval_every": eval_every,
        "bop_threshold": bop_threshold,
        "bop_gamma": bop_gamma,
        "lstm_weights": None if lstm_weights is None else str(lstm_weights),
        "jit_compile": True,
        "command": command,
    }
    say(
        f"kflip bench: {ds.name} ({len(ds.x_train)} train / {len(ds.x_test)} test), "
        f"model {model} {model_options or ''}, {epochs} epochs, batch {batch_size}, "
        f"seeds {seeds}, optimizers {optimizers}"
    )
    t_bench = time.perf_counter()
    runs, timing_models = [], {}
    progress = _Progress(len(optimizers) * len(seeds), say)
    for name in optimizers:
        for seed in seeds:
            progress.start(f"{name} seed {seed}" + (" (+greedy)" if name in do_greedy else ""))
            result, net = _run(
                ds,
                model=model,
                model_options=model_options,
                optimizer=name,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                eval_every=eval_every,
                verbose=0,
                optimizer_options=opt_options,
            )
            runs.append(result)
            say(
                f"  {name:<18} seed {seed}: test accuracy {100 * result['test_accuracy']:.2f}%"
                f"  ({result['wall_seconds']:.1f} s, {result['flips_per_step']:.1f} flips/step)"
            )
            if name in do_greedy:
                g = run_greedy(net, ds, examples=greedy_examples, options=greedy_options)
                acc, loss = make_evaluator(net)(ds.x_test, ds.y_test)
                g.update(test_accuracy_before=result["test_accuracy"], test_accuracy_after=acc)
                runs.append(
                    dict(
                        result,
                        optimizer=name + GREEDY_SUFFIX,
                        test_accuracy=acc,
                        test_loss=loss,
                        wall_seconds=result["wall_seconds"] + g["seconds"],
                        greedy=g,
                    )
                )
                say(
                    f"  {name + GREEDY_SUFFIX:<18} seed {seed}: test accuracy "
                    f"{100 * acc:.2f}%  (greedy {g['seconds']:.1f} s)"
                )
            progress.done()
            if seed == seeds[0]:
                timing_models[name] = net
            if output_dir:  # keep finished runs if the bench is interrupted
                os.makedirs(output_dir, exist_ok=True)
                _write_json(
                    {"config": config, "machine": machine_info(), "runs": runs, "partial": True},
                    os.path.join(output_dir, "results.json"),
                )
    if "bop" not in timing_models:
        timing_models["bop"] = compiled_model(
            ds, model=model, model_options=model_options, optimizer="bop",
            seed=seeds[0], optimizer_options=opt_options,
        )
        notes.append("bop was not benchmarked; a fresh Bop model was compiled to time its step.")
    say(f"  timing train steps round-robin ({timing_rounds} x {timing_steps} steps each) ...")
    x_b, y_b = ds.x_train[:batch_size], ds.y_train[:batch_size]
    step_seconds = time_train_steps(
        timing_models, x_b, y_b, steps=timing_steps, rounds=timing_rounds
    )
    rows = summarize(runs, step_seconds)
    table = format_table(rows)
    comparison = stats.compare_runs(runs, reference="bop")
    results = {
        "config": config,
        "machine": machine_info(),
        "runs": runs,
        "summary": rows,
        "table": table,
        "paired_vs_bop": comparison,
        "step_seconds": step_seconds,
        "notes": notes,
        "bench_seconds": time.perf_counter() - t_bench,
        "files": {},
    }
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "results.json")
        results["files"]["results"] = path
        _write_json(results, path)  # first, so a plotting problem cannot lose results
        if plots:
            from kflip import plots as plots_lib

            results["files"].update(plots_lib.plot_results(results, output_dir))
            _write_json(results, path)
    say("")
    say(table)
    if comparison:
        say("\ntest accuracy, paired by seed (same initial weights and data order):")
        say(stats.format_comparison(comparison))
    say(
        f"\n(test accuracy: mean +/- sample std over {len(seeds)} seed(s); step time: "
        "median steady-state XLA train step, measured round-robin in this process)"
    )
    for note in notes:
        say("note: " + note)
    if results["files"]:
        say("wrote " + ", ".join(results["files"].values()))
    say(f"total {results['bench_seconds']:.0f} s")
    return results
