"""What a run measures: test accuracy and loss during training (:func:`make_evaluator`,
:class:`TestCurve`), sign flips of the binary kernels (:class:`SignFlipCounter`), step
wall times (:class:`StepTimer`) and optimizer-state bytes per binary weight."""

from __future__ import annotations

import time

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import models as models_lib  # noqa: E402
from kflip._tracing import Traced  # noqa: E402
from kflip.bench.checks import _check_positive_int  # noqa: E402
from kflip.binary import binary_variables, named_binary_variables  # noqa: E402
from kflip.cell import sign_pm1  # noqa: E402


def default_eval_every(steps_per_epoch: int) -> int:
    """About five test evaluations per epoch.

    Example:
      >>> from kflip import bench
      >>> bench.default_eval_every(230), bench.default_eval_every(3)
      (46, 1)
    """
    return max(1, int(round(steps_per_epoch / 5)))


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
