"""FlipRate and GreedyFlip figures land in TensorBoard event files (tensorboard is in
the test extra, so this runs in CI)."""

import glob
import os

import numpy as np
import tensorflow as tf
from conftest import small_mlp

import kflip


def _scalars(log_dir):
    """{tag: [values]} of every scalar in the event files below ``log_dir``."""
    out = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue  # graphs, histograms, hyper-parameters
                out.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return out


def test_fliprate_and_greedyflip_scalars_in_event_files(digits, tmp_path):
    model = small_mlp(hidden=(8,))
    model.compile(kflip.FlipLSTM(), "sparse_categorical_crossentropy", jit_compile=True)
    keras_dir, greedy_dir = str(tmp_path / "keras"), str(tmp_path / "greedy")
    greedy = kflip.GreedyFlip(digits.x_train, digits.y_train, every_n_epochs=1,
                              at_train_end=False, probe_size=64, max_candidates=20,
                              layers=[-1], log_dir=greedy_dir)
    hist = model.fit(digits.x_train[:256], digits.y_train[:256], epochs=2, batch_size=64,
                     verbose=0, callbacks=[kflip.FlipRate(), greedy,
                                           tf.keras.callbacks.TensorBoard(keras_dir)])
    keras = _scalars(keras_dir)
    assert keras["epoch_flip_rate"] == [float(np.float32(v)) for v in hist.history["flip_rate"]]
    per_layer = [t for t in keras if t.startswith("epoch_flip_rate/")]
    assert len(per_layer) == 2  # one per binary kernel
    assert all(0.0 <= v <= 1.0 for v in keras["epoch_flip_rate"])
    logged = _scalars(greedy_dir)
    assert logged["greedy/accepted"] == [float(r.accepted) for _, r in greedy.reports]
    assert len(logged["greedy/loss_after"]) == 2
