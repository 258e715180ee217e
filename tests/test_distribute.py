"""Scale-out: FlipLSTM under tf.distribute.MirroredStrategy, and mixed precision.

The MirroredStrategy run needs two logical CPU devices, which must be configured
before TensorFlow initialises its devices, so it runs in a subprocess (once per
module) that trains the same tiny model on one device and on two replicas with the
same global batch and seed, and writes everything the tests compare.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import kflip  # noqa: I001  (before TensorFlow: selects Keras 2)
import tensorflow as tf
from conftest import binary_values, is_pm1, small_mlp

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import kflip
    import larq as lq
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kflip import data

    out_dir = sys.argv[1]
    d = data.digits()
    x, y = d.x_train[:256], d.y_train[:256]
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)

    def build():
        tf.keras.utils.set_random_seed(0)
        # synchronized=True: BatchNorm statistics over the global batch, as on one
        # device (plain BatchNorm would normalise each replica's half batch).
        bn = lambda: tf.keras.layers.BatchNormalization(synchronized=True, scale=False)
        m = tf.keras.Sequential([
            tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
            lq.layers.QuantDense(32, **kw), bn(),
            lq.layers.QuantDense(10, input_quantizer="ste_sign", **kw), bn(),
            tf.keras.layers.Activation("softmax")])
        kflip.snap_binary_weights(m)
        return m

    def train(strategy):
        with strategy.scope():
            model = build()
            opt = kflip.FlipLSTM()
            model.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
        hist = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        return model, opt, hist.history

    runs = {
        "single": tf.distribute.OneDeviceStrategy("/cpu:0"),
        "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    }
    report = {}
    for name, strategy in runs.items():
        model, opt, hist = train(strategy)
        arrays = {f"model_{i}": v.numpy() for i, v in enumerate(model.weights)}
        arrays.update({f"opt_{i}": v.numpy() for i, v in enumerate(opt.weights)})
        arrays.update({f"binary_{i}": v.numpy()
                       for i, v in enumerate(kflip.binary_variables(model))})
        np.savez(os.path.join(out_dir, name + ".npz"), **arrays)
        report[name] = {
            "replicas": strategy.num_replicas_in_sync,
            "flips": list(opt.flip_counts().values()),
            "history": hist,
            "opt_names": [v.name for v in opt.weights],
        }

    # Greedy flip search on a model whose variables were created under the strategy.
    from kflip.greedy import greedy_flip
    for name, strategy in runs.items():
        with strategy.scope():
            model = build()
        try:
            r = greedy_flip(model, x, y, probe_size=128, max_candidates=64)
            report[name]["greedy"] = {"accepted": r.accepted, "loss_after": r.loss_after}
            np.savez(os.path.join(out_dir, name + "_greedy.npz"),
                     *[v.numpy() for v in kflip.binary_variables(model)])
        except Exception as e:  # reported to the test
            report[name]["greedy"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["out_dir"] = str(out)
    arrays = {k: dict(np.load(out / f"{k}.npz")) for k in ("single", "mirrored")}
    return report, arrays


def test_mirrored_flips_and_binary_weights_equal_single_device(mirrored_run):
    report, arrays = mirrored_run
    assert report["single"]["replicas"] == 1 and report["mirrored"]["replicas"] == 2
    flips = report["single"]["flips"]
    assert len(flips) == 2 and all(f > 0 for f in flips), flips
    assert report["mirrored"]["flips"] == flips
    single, mirrored = arrays["single"], arrays["mirrored"]
    binary = sorted(k for k in single if k.startswith("binary_"))
    assert len(binary) == 2
    for k in binary:
        assert is_pm1([single[k], mirrored[k]])
        np.testing.assert_array_equal(mirrored[k], single[k])


def test_mirrored_float_state_and_metrics_match_single_device(mirrored_run):
    report, arrays = mirrored_run
    single, mirrored = arrays["single"], arrays["mirrored"]
    assert sorted(single) == sorted(mirrored)
    # Cross-replica gradient sums add in a different order than one device's batch
    # reduction, so float values (BN offsets, LSTM state, Adam moments) agree to
    # rounding, not bit for bit; everything discrete is exact.
    for k in single:
        np.testing.assert_allclose(mirrored[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
    names = report["single"]["opt_names"]
    assert any(re.search(r"/h\d*:0$", n) for n in names), names
    assert any(re.search(r"/c\d*:0$", n) for n in names), names
    hs, hm = report["single"]["history"], report["mirrored"]["history"]
    assert hs["accuracy"] == hm["accuracy"]
    np.testing.assert_allclose(hm["loss"], hs["loss"], rtol=1e-5)
    assert hs["loss"][-1] < hs["loss"][0]


@pytest.mark.xfail(
    strict=True,
    reason="kflip.greedy_flip reads MirroredVariables inside its XLA functions, which "
    "captures a replica-1 component from device CPU:0 (InvalidArgumentError: 'Trying to "
    "access resource ... located in device CPU:1'); remove this mark once fixed.",
)
def test_greedy_search_under_mirrored_strategy_equals_single_device(mirrored_run, tmp_path):
    report, _ = mirrored_run
    single, mirrored = report["single"]["greedy"], report["mirrored"]["greedy"]
    assert "error" not in single, single
    assert single["accepted"] > 0
    assert "error" not in mirrored, mirrored["error"]
    assert mirrored == single
    out = report["out_dir"]
    a = np.load(os.path.join(out, "single_greedy.npz"))
    b = np.load(os.path.join(out, "mirrored_greedy.npz"))
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


# ---- mixed precision ---------------------------------------------------------------------
def test_mixed_bfloat16_keeps_binary_weights_exact_and_trains(digits):
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = small_mlp(hidden=(32,))
        assert model.layers[1].compute_dtype == "bfloat16"
        opt = kflip.FlipLSTM()
        model.compile(
            optimizer=opt,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=True,
        )
        x, y = digits.x_train[:512], digits.y_train[:512]
        before = model.evaluate(x, y, verbose=0, batch_size=256)
        hist = model.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0)
        after = model.evaluate(x, y, verbose=0, batch_size=256)
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    for v in kflip.binary_variables(model):
        assert v.dtype == tf.float32
    assert is_pm1(binary_values(model))
    assert sum(opt.flip_counts().values()) > 0
    assert model.optimizer.iterations.numpy() == 3 * 8
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    assert after[1] > before[1] + 0.2, (before, after)
