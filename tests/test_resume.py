"""Fault tolerance: BackupAndRestore resumes FlipLSTM exactly; deterministic mode.

A "killed" run is simulated by a callback that raises mid-epoch; the restart builds
a fresh model and optimizer after ``tf.keras.backend.clear_session()`` (as a new
process would) and calls ``fit`` again with the same backup directory.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import kflip  # noqa: I001  (before TensorFlow: selects Keras 2)
import tensorflow as tf
from conftest import is_pm1, small_mlp

EPOCHS, BATCH, N = 3, 64, 256  # 4 steps per epoch


class Crash(Exception):
    pass


class CrashAt(tf.keras.callbacks.Callback):
    """Raise in the middle of ``epoch`` after ``batch`` (a forced interruption)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise Crash(f"killed at epoch {self.epoch} batch {batch}")


def _make():
    tf.keras.backend.clear_session()
    model = small_mlp(hidden=(32,), seed=0)
    opt = kflip.FlipLSTM(float_optimizer=tf.keras.optimizers.legacy.Adam(0.01))
    model.compile(
        optimizer=opt,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    return model, opt


def _state(model, opt):
    """Everything that must survive: model weights and all optimizer variables."""
    return {
        "model": [v.numpy() for v in model.weights],
        "opt": {v.name: v.numpy() for v in opt.weights},
        "flips": list(opt.flip_counts().values()),
        "iterations": int(opt.iterations.numpy()),
        "float_iterations": int(opt.float_optimizer.iterations.numpy()),
    }


def _fit(model, digits, callbacks=()):
    return model.fit(
        digits.x_train[:N],
        digits.y_train[:N],
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    ).history


@pytest.fixture(scope="module")
def uninterrupted(digits):
    model, opt = _make()
    history = _fit(model, digits)
    return _state(model, opt), history, model.evaluate(digits.x_test, digits.y_test, verbose=0)


def _assert_same_state(got, want):
    assert got["iterations"] == want["iterations"] == EPOCHS * N // BATCH
    assert got["float_iterations"] == want["float_iterations"]
    assert got["flips"] == want["flips"] and sum(want["flips"]) > 0
    assert len(got["model"]) == len(want["model"])
    for a, b in zip(got["model"], want["model"]):
        np.testing.assert_array_equal(a, b)
    assert sorted(got["opt"]) == sorted(want["opt"])
    kinds = {name.rsplit("/", 1)[-1].split(":")[0].rstrip("0123456789") for name in want["opt"]}
    # FlipLSTM's LSTM state h, c and moment v (per binary variable), both iteration
    # counters and the float optimizer's Adam moments m, v.
    assert {"h", "c", "v", "iter", "m"} <= kinds, kinds
    for name, value in want["opt"].items():
        np.testing.assert_array_equal(got["opt"][name], value, err_msg=name)


def test_backup_and_restore_after_mid_epoch_kill_equals_uninterrupted(
    uninterrupted, digits, tmp_path
):
    want, want_history, want_eval = uninterrupted
    backup = str(tmp_path / "backup")

    model, opt = _make()
    with pytest.raises(Crash):
        _fit(model, digits, [tf.keras.callbacks.BackupAndRestore(backup), CrashAt(1, 2)])
    # The killed run got past the last backup (end of epoch 0): state differs now.
    assert int(opt.iterations.numpy()) == 4 + 3
    assert sum(opt.flip_counts().values()) > 0  # a restart that lost them would differ
    assert os.listdir(backup)

    model, opt = _make()  # a fresh process: new model, new optimizer, no slots yet
    history = _fit(model, digits, [tf.keras.callbacks.BackupAndRestore(backup)])
    _assert_same_state(_state(model, opt), want)
    assert is_pm1([v.numpy() for v in kflip.binary_variables(model)])
    # The restarted fit ran epochs 1 and 2 in full: their metrics equal the
    # uninterrupted run's, and so does evaluation of the final model.
    for key in ("loss", "accuracy"):
        assert history[key] == want_history[key][1:], key
    assert model.evaluate(digits.x_test, digits.y_test, verbose=0) == want_eval
    assert not os.path.exists(backup) or not os.listdir(backup)  # deleted when done


# ---- deterministic mode --------------------------------------------------------------------
_DETERMINISTIC = textwrap.dedent(
    """
    import hashlib, json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import kflip
    import tensorflow as tf
    from kflip import data, models

    tf.config.experimental.enable_op_determinism()
    d = data.digits()
    digests = []
    for run in range(2):
        tf.keras.utils.set_random_seed(1234)
        model = models.mlp(input_shape=(8, 8, 1), num_classes=10, hidden=(32,))
        model.compile(optimizer=kflip.FlipLSTM(), loss="sparse_categorical_crossentropy",
                      jit_compile=True)
        model.fit(d.x_train[:256], d.y_train[:256], batch_size=32, epochs=2,
                  shuffle=True, verbose=0)
        h = hashlib.sha256()
        for v in kflip.binary_variables(model):
            h.update(v.numpy().tobytes())
        flips = sum(model.optimizer.flip_counts().values())
        digests.append([h.hexdigest(), flips])
    print(json.dumps(digests))
    """
)


def test_op_determinism_gives_bit_identical_binary_weights():
    # enable_op_determinism is process-wide and cannot be undone: own process.
    proc = subprocess.run(
        [sys.executable, "-c", _DETERMINISTIC],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (d1, flips1), (d2, flips2) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert flips1 > 0
    assert (d1, flips1) == (d2, flips2)


@pytest.mark.parametrize("fmt", ["keras", "h5", "checkpoint"])
def test_flip_telemetry_is_keyed_by_layer_after_reloading(digits, tmp_path, fmt):
    """Reloaded kernels are all named ``kernel:0``; flip counts stay one per layer."""
    model, opt = _make()
    model.fit(digits.x_train[:N], digits.y_train[:N], batch_size=BATCH, epochs=1, verbose=0)
    want = opt.flip_counts(model)
    assert list(want) == ["quant_dense/kernel", "quant_dense_1/kernel"] and sum(want.values()) > 0
    if fmt == "checkpoint":
        tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ckpt"))
        back, back_opt = _make()
        back.train_on_batch(digits.x_train[:1], digits.y_train[:1])  # build the slots
        tf.train.Checkpoint(model=back, optimizer=back_opt).read(str(tmp_path / "ckpt"))
    else:
        path = str(tmp_path / f"m.{fmt}")
        model.save(path)
        tf.keras.backend.clear_session()
        back = tf.keras.models.load_model(path)
        back_opt = back.optimizer
        back.compile(back_opt, "sparse_categorical_crossentropy", jit_compile=True)
        back.train_on_batch(digits.x_train[:BATCH], digits.y_train[:BATCH])  # restores slots
    got = back_opt.flip_counts(back)
    assert list(got) == list(want)  # one entry per layer, not merged
    assert sorted(back_opt.flip_counts().values()) == sorted(got.values())  # no model: same
    sizes = back_opt.binary_sizes(back)
    assert sizes == {"quant_dense/kernel": 64 * 32, "quant_dense_1/kernel": 32 * 10}
    # .keras does not restore optimizer slots (docs/fliplstm.md): its counters restart
    start = {n: 0 for n in want} if fmt == "keras" else want
    for name in want:  # restored counters carry on (plus the one extra step, if any)
        assert start[name] <= got[name] <= start[name] + sizes[name]
