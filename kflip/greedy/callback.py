"""``GreedyFlip``: greedy flip search from inside ``model.fit``."""

from __future__ import annotations

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy.driver import greedy_flip  # noqa: E402
from kflip.greedy.options import GreedyOptions, check_int  # noqa: E402
from kflip.greedy.probe import check_arrays  # noqa: E402


class GreedyFlip(tf.keras.callbacks.Callback):
    """Run :func:`greedy_flip` during ``model.fit``.

    Args:
      x, y: probe data (arrays, or a batched ``tf.data.Dataset`` of ``(x, y)`` with
        ``y=None``); ``probe_size``/``probe_seed`` select the fixed subset.
      every_n_epochs: run after every so many epochs (None: never during training).
      at_train_end: run once when training ends.
      snap: snap binary weights to +-1 before searching (needed for latent-weight
        training such as Adam+STE; FlipLSTM and Bop keep them +-1 already).
      log_dir: if given, also write the figures as TensorBoard scalars there.
      prefix: key prefix in the logs (default ``"greedy/"``).
      **kwargs: :class:`~kflip.greedy.GreedyOptions` fields for :func:`greedy_flip`
        (order, group_size, time_budget, verbose, ...); checked here, before training.

    After an epoch-end run the figures (``greedy/loss_before``, ``greedy/loss_after``,
    ``greedy/accepted``, ``greedy/tried``, ``greedy/seconds``, per layer
    ``greedy/<layer>/accepted`` ...) are added to that epoch's logs, so they land in
    ``History`` and in TensorBoard when a ``TensorBoard`` callback comes after this one
    in the list. The run at train end adds them to the ``logs`` of ``on_train_end``
    and to ``model.history.history`` (one entry per key). Every report is kept in
    ``reports`` as ``(epoch, GreedyReport)``.

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
      >>> model.compile(kflip.FlipLSTM(), "sparse_categorical_crossentropy")
      >>> greedy = kflip.GreedyFlip(ds.x_train, ds.y_train, probe_size=64, time_budget=1.0,
      ...                           verbose=0)
      >>> hist = model.fit(ds.x_train[:128], ds.y_train[:128], batch_size=64,
      ...                  callbacks=[greedy], verbose=0)
      >>> [(epoch, type(r).__name__) for epoch, r in greedy.reports]  # at train end
      [(1, 'GreedyReport')]
      >>> "greedy/loss_after@train_end" in hist.history
      True
    """

    def __init__(self, x, y=None, every_n_epochs=None, at_train_end=True, snap=False,
                 log_dir=None, prefix="greedy/", **kwargs):
        super().__init__()
        check_int("every_n_epochs", every_n_epochs, allow_none=True)
        if not isinstance(at_train_end, bool):
            raise ValueError(f"`at_train_end` must be a bool, got {at_train_end!r}.")
        if every_n_epochs is None and not at_train_end:
            raise ValueError("`every_n_epochs` is None and `at_train_end` is False: nothing to do.")
        self.options = GreedyOptions.from_kwargs(**kwargs)
        if not isinstance(x, tf.data.Dataset):
            if y is None:
                raise ValueError("`y` is required when `x` is an array.")
            check_arrays(x, y)
        if log_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "`log_dir` needs the tensorboard package (pip install tensorboard); without "
                    "it, put a TensorBoard callback after GreedyFlip or read model.history."
                ) from e
        self.x, self.y = x, y
        self.every_n_epochs = every_n_epochs
        self.at_train_end = at_train_end
        self.snap = snap
        self.log_dir = log_dir
        self.prefix = prefix
        self.reports: list = []
        self._epoch = 0
        self._writer = None

    def _run(self, epoch):
        if self.snap:
            from kflip.binary import snap_binary_weights

            snap_binary_weights(self.model)
        report = greedy_flip(self.model, self.x, self.y, options=self.options)
        self.reports.append((epoch, report))
        logs = report.as_logs(self.prefix)
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                for k, v in logs.items():
                    tf.summary.scalar(k, v, step=epoch)
            self._writer.flush()
        return logs

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            figures = self._run(epoch + 1)
            if logs is not None:
                logs.update(figures)

    def on_train_end(self, logs=None):
        if not self.at_train_end:
            return
        figures = self._run(self._epoch)
        if logs is not None:
            logs.update(figures)
        history = getattr(self.model, "history", None)
        if history is not None and hasattr(history, "history"):
            for k, v in figures.items():
                history.history.setdefault(f"{k}@train_end", []).append(v)
