"""Keras callbacks: thin wrappers that put kflip's numbers into Keras logs."""

from __future__ import annotations

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402


def _flip_optimizers(optimizer):
    """FlipLSTM instances reachable from ``optimizer`` (itself or inside CaseOptimizer)."""
    from kflip.optimizer import FlipLSTM

    if isinstance(optimizer, FlipLSTM):
        return [optimizer]
    return [o for o in getattr(optimizer, "optimizers", []) if isinstance(o, FlipLSTM)]


class FlipRate(tf.keras.callbacks.Callback):
    """Log the flip rate of every binary layer into the Keras logs.

    At the end of each epoch (and, with ``every_n_batches``, every so many batches)
    adds ``flip_rate/<layer>/<weight>`` (e.g. ``flip_rate/quant_dense/kernel``): the
    fraction of that variable's weights flipped per step since the last report, and
    ``flip_rate``: the same over all binary weights.
    These land in ``History`` and, if a ``TensorBoard`` callback comes after this one
    in the list, in TensorBoard. ``history`` keeps every per-batch report.

    Example:
      >>> import kflip, tensorflow as tf
      >>> tf.keras.backend.clear_session()  # fresh layer names
      >>> digits = kflip.data.digits()
      >>> net = kflip.models.mlp(input_shape=digits.input_shape, hidden=(16,))
      >>> net.compile(kflip.FlipLSTM(), "sparse_categorical_crossentropy")
      >>> rate = kflip.FlipRate(every_n_batches=1)
      >>> logs = net.fit(digits.x_train[:128], digits.y_train[:128], batch_size=64,
      ...                callbacks=[rate], verbose=0).history
      >>> sorted(k for k in logs if k.startswith("flip_rate"))
      ['flip_rate', 'flip_rate/quant_dense/kernel', 'flip_rate/quant_dense_1/kernel']
      >>> [r["step"] for r in rate.history]  # one report per batch
      [1, 2]
      >>> 0.0 <= logs["flip_rate"][0] <= 1.0
      True
    """

    def __init__(self, every_n_batches: int | None = None):
        super().__init__()
        if every_n_batches is not None and (
            not isinstance(every_n_batches, int) or every_n_batches < 1
        ):
            raise ValueError(
                f"`every_n_batches` must be a positive int or None, got {every_n_batches!r}."
            )
        self.every_n_batches = every_n_batches
        self.history: list[dict] = []
        self._marks = {"epoch": (0, {}), "batch": (0, {})}

    def _snapshot(self):
        opts = _flip_optimizers(self.model.optimizer)
        if not opts:
            raise ValueError("FlipRate needs a model compiled with kflip.FlipLSTM.")
        counts, sizes = {}, {}
        for opt in opts:
            counts.update(opt.flip_counts(self.model))
            sizes.update(opt.binary_sizes(self.model))
        return int(opts[0].iterations.numpy()), counts, sizes

    def _rates(self, mark: str):
        """Flip rates since ``mark`` was last taken; moves the mark to now."""
        step, counts, sizes = self._snapshot()
        last_step, last_counts = self._marks[mark]
        self._marks[mark] = (step, counts)
        steps = max(step - last_step, 1)
        rates = {}
        for name, count in counts.items():
            rates[f"flip_rate/{name}"] = (count - last_counts.get(name, 0)) / (steps * sizes[name])
        flipped = sum(counts.values()) - sum(last_counts.values())
        rates["flip_rate"] = flipped / (steps * max(sum(sizes.values()), 1))
        return step, rates

    def on_train_begin(self, logs=None):
        step, counts, _ = self._snapshot()
        self._marks = {"epoch": (step, counts), "batch": (step, counts)}

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_batches and (batch + 1) % self.every_n_batches == 0:
            step, rates = self._rates("batch")
            self.history.append({"step": step, **rates})

    def on_epoch_end(self, epoch, logs=None):
        _, rates = self._rates("epoch")
        if logs is not None:
            logs.update(rates)
