"""What a greedy search shows while it runs: a progress bar per layer, a summary line."""

from __future__ import annotations

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402


class _LayerBar:
    def __init__(self, name, target):
        print(f"greedy flip search, layer {name}: {target:,} candidates")
        self.bar = tf.keras.utils.Progbar(target, stateful_metrics=["accepted", "loss"],
                                          unit_name="candidate")

    def update(self, done, accepted, loss, finalize=False):
        self.bar.update(done, values=[("accepted", accepted), ("loss", loss)], finalize=finalize)


class Progress:
    """``verbose=0``: nothing; ``verbose>=1``: a Keras progress bar per layer search and a
    one-line summary (:meth:`~kflip.greedy.GreedyReport.summary`) at the end."""

    def __init__(self, verbose: int):
        self.verbose = verbose

    def layer(self, name, target):
        return _LayerBar(name, target) if self.verbose else None

    def done(self, report):
        if self.verbose:
            print(report.summary())
