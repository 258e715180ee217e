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

    # Greedy flip search on a model whose variables were created under the strategy:
    # first outside the scope (a user script), then inside it (as the GreedyFlip
    # callback runs during model.fit) with gradient order and groups, then the naive
    # reference; every run continues from the weights the previous one left.
    from kflip import greedy

    def summary(r, model):  # layers by position (names differ between the two models)
        pos = [layer.name for layer in model.layers]
        return {k: getattr(r, k) for k in ("tried", "accepted", "flipped", "loss_before",
                                           "loss_after", "probe_size")} | {
            "layers": [[pos.index(lr.name), lr.tried, lr.accepted, lr.flips, lr.loss_before,
                        lr.loss_after, lr.stop_reason] for lr in r.layers]}

    for name, strategy in runs.items():
        with strategy.scope():
            model = build()
        try:
            probe = dict(probe_size=128, probe_seed=1)
            runs_g = [summary(greedy.greedy_flip(model, x, y, max_candidates=64, **probe), model)]
            with strategy.scope():
                runs_g.append(summary(greedy.greedy_flip(
                    model, x, y, order="gradient", group_size=2, max_candidates=24, **probe), model))
            runs_g.append(summary(greedy.greedy_flip(
                model, x, y, method="naive", layers=[1], max_candidates=12, **probe), model))
            # the search kernels stay XLA-compiled and capture no (mirrored) variable
            net = greedy.network.Network(model, None, None)
            s = greedy.incremental.IncrementalEvaluator(net, net.linear[0], tf.constant(x[:32]),
                                                        tf.constant(y[:32]), 4096)
            lin = net.ops[net.linear[0]]
            s.start(tf.reshape(tf.convert_to_tensor(lin.var), [lin.fan_in, lin.units]))
            cc = np.zeros(8, np.int32)
            ff, mm = np.arange(8, dtype=np.int32)[:, None], np.ones((8, 1), np.float32)
            fn = s.eval_fn(8, 1, s._capacities(8)[-1])
            args = (s.P, s.Z, s.A, s.Zn, s.L, s.Wm, cc, ff, mm)
            hlo = fn.experimental_get_compiler_ir(*args, params=s.params)(stage="hlo")
            captured = [t for t in fn.get_concrete_function(*args, params=s.params).captured_inputs
                        if t.dtype == tf.resource]  # variables (the probe labels are a constant)
            report[name]["greedy"] = {"runs": runs_g, "xla": "HloModule" in hlo,
                                      "captured": len(captured)}
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


def test_greedy_search_under_mirrored_strategy_equals_single_device(mirrored_run):
    report, _ = mirrored_run
    single, mirrored = report["single"]["greedy"], report["mirrored"]["greedy"]
    assert "error" not in single, single
    assert "error" not in mirrored, mirrored["error"]
    for g in (single, mirrored):
        assert g["xla"] and g["captured"] == 0, g  # compiled; model values passed in
    # (a kernel capturing a mirrored variable is what failed with "Trying to access
    # resource ... located in device CPU:1 from device CPU:0")
    runs = single["runs"]
    assert len(runs) == 3 and all(r["accepted"] > 0 for r in runs), runs
    for a, b in zip(runs, runs[1:]):  # each run starts where the previous one stopped
        assert a["loss_after"] < a["loss_before"]
        assert b["loss_before"] == pytest.approx(a["loss_after"], rel=1e-6)
    # same accepted flips (per layer, in order), same counts, bit-identical losses
    assert mirrored["runs"] == runs
    out = report["out_dir"]
    a = np.load(os.path.join(out, "single_greedy.npz"))
    b = np.load(os.path.join(out, "mirrored_greedy.npz"))
    assert len(a.files) == 2
    for k in a.files:
        assert is_pm1([a[k], b[k]])
        np.testing.assert_array_equal(b[k], a[k])


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
