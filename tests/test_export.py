"""kflip.export: packed larq-free SavedModel, LCE TFLite, CLI hooks, errors."""

import argparse
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
from conftest import small_cnn, small_mlp
from kflip import export as export_lib


def _trained_like(model, seed=1):
    """Give BatchNorm layers non-trivial statistics (as after training).

    Freshly built BN layers have mean 0 / variance 1 / offset 0, so with 8x8 digits
    (multiples of 1/8) many pre-activations are exactly 0 and every binarization
    sits on a tie; real trained models have no such degeneracy.
    """
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.moving_mean.shape
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, n) + 0.01)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
            layer.beta.assign(rng.uniform(-0.3, 0.3, n))
    return model


def _train_one_step(model, digits):
    model.compile(
        optimizer=kflip.FlipLSTM(),
        loss="sparse_categorical_crossentropy",
        jit_compile=True,
    )
    model.fit(digits.x_train[:64], digits.y_train[:64], batch_size=32, epochs=1, verbose=0)
    kflip.assert_binary(model)
    return model


# ---- pure TF bit packing -----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8,), (3, 5), (2, 3, 4, 7), (1,)])
def test_pack_matches_numpy_packbits_and_roundtrips_under_xla(shape):
    rng = np.random.RandomState(sum(shape))
    x = np.where(rng.rand(*shape) < 0.5, -1.0, 1.0).astype(np.float32)
    packed = export_lib.pack_pm1(x).numpy()
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, np.packbits(x.ravel() < 0))
    back = export_lib.unpack_pm1(packed, shape).numpy()
    np.testing.assert_array_equal(back, x)

    pack_xla = tf.function(export_lib.pack_pm1, jit_compile=True)
    unpack_xla = tf.function(lambda p: export_lib.unpack_pm1(p, shape), jit_compile=True)
    np.testing.assert_array_equal(pack_xla(tf.constant(x)).numpy(), packed)
    np.testing.assert_array_equal(unpack_xla(tf.constant(packed)).numpy(), x)


# ---- SavedModel round trip ---------------------------------------------------------------
_FRESH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    out = {}
    for path in sys.argv[1:]:
        x = np.load(path + ".x.npy")
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures["serving_default"]
        y = fn(inputs=tf.constant(x))["output_0"].numpy()
        np.save(path + ".y.npy", y)
        out[path] = sorted(fn.structured_outputs)
    assert "larq" not in sys.modules and "kflip" not in sys.modules, sorted(
        m for m in sys.modules if m.startswith(("larq", "kflip")))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    """MLP and CNN, one FlipLSTM step each, exported packed; reference predictions."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, build in (("mlp", small_mlp), ("cnn", small_cnn)):
        model = _trained_like(_train_one_step(build(), digits))
        path = str(root / name)
        report = kflip.export(model, path)
        x = digits.x_test[:50]
        np.save(path + ".x.npy", x)
        out[name] = (model, path, report, x, model(x, training=False).numpy())
    return out


def test_fresh_process_without_kflip_or_larq_gives_identical_predictions(exported):
    paths = [exported[k][1] for k in ("mlp", "cnn")]
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(paths[0]),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("mlp", "cnn"):
        _, path, _, _, expected = exported[name]
        assert outputs[path] == ["output_0"]
        got = np.load(path + ".y.npy")
        assert got.shape == expected.shape == (50, 10)
        np.testing.assert_array_equal(got, expected)


def test_report_and_saved_variables_hold_packed_kernels_and_no_optimizer_state(exported):
    for name in ("mlp", "cnn"):
        model, path, report, _, _ = exported[name]
        kernels = kflip.binary_variables(model)
        n = sum(int(v.shape.num_elements()) for v in kernels)
        assert report["packed"] is True and report["max_abs_diff"] == 0.0
        assert report["binary_weights"] == n
        assert report["binary_kernel_bytes"] == sum(
            -(-int(v.shape.num_elements()) // 8) for v in kernels
        )
        assert report["binary_kernel_bytes_float32"] == 4 * n
        assert report["saved_model_bytes"] > 0
        with open(os.path.join(path, export_lib.REPORT_NAME)) as fh:
            assert json.load(fh) == report

        saved = dict(tf.train.list_variables(os.path.join(path, "variables", "variables")))
        keys = [k for k in saved if "OBJECT_GRAPH" not in k]
        # Only the model's float variables (BN statistics and offsets) are saved:
        # no optimizer slots, no latent float kernels.
        assert not [k for k in keys if "optimizer" in k.lower() or "slot" in k.lower()]
        assert len(keys) == len(model.variables) - len(kernels)
        assert sum(int(np.prod(shape)) for shape in saved.values() if shape) == sum(
            int(v.shape.num_elements()) for v in model.variables
        ) - n
        # The kernels are uint8 constants of the serving graph, 1 bit per weight.
        assert _graph_constants(path, tf.uint8) == sorted(
            -(-int(v.shape.num_elements()) // 8) for v in kernels
        )
        assert _graph_constants(path, tf.float32) == []


def _graph_constants(path, dtype):
    """Sizes of the kernel ``Const`` nodes of ``dtype`` in the serving graph."""
    fn = tf.saved_model.load(path).signatures["serving_default"]
    graph = fn.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    sizes = []
    for node in nodes:
        if (
            node.op == "Const"
            and node.name.startswith("binary_kernel_")
            and node.attr["dtype"].type == dtype.as_datatype_enum
        ):
            t = tf.make_ndarray(node.attr["value"].tensor)
            sizes.append(int(t.size))
    return sorted(sizes)


def test_exported_graph_compiles_with_xla(exported):
    # Servers may wrap the signature in an XLA function: the unpacking and the layer
    # ops must all compile. XLA fuses float arithmetic, so equal up to rounding.
    for name in ("mlp", "cnn"):
        _, path, _, x, expected = exported[name]
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures["serving_default"]
        xla = tf.function(lambda t: fn(inputs=t)["output_0"], jit_compile=True)
        hlo = xla.experimental_get_compiler_ir(tf.constant(x))(stage="hlo")
        assert "HloModule" in hlo
        got = xla(tf.constant(x)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_mixed_bfloat16_model_exports_identically(tmp_path, digits):
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _trained_like(small_cnn())
        assert model.layers[0].compute_dtype == "bfloat16"
        x = digits.x_test[:40]
        report = kflip.export(model, str(tmp_path / "bf16"), sample=x)
        expected = model(x, training=False).numpy()
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    assert report["max_abs_diff"] == 0.0
    fn = tf.saved_model.load(str(tmp_path / "bf16")).signatures["serving_default"]
    got = fn(inputs=tf.constant(x))["output_0"].numpy()
    np.testing.assert_array_equal(got, expected)


def test_unpacked_export_is_identical_and_larger(exported, tmp_path):
    model, _, packed_report, x, expected = exported["mlp"]
    report = kflip.export(model, str(tmp_path / "float"), packed=False, sample=x)
    assert report["packed"] is False and report["max_abs_diff"] == 0.0
    assert report["binary_kernel_bytes"] == report["binary_kernel_bytes_float32"]
    saved = tf.saved_model.load(str(tmp_path / "float"))
    got = saved.signatures["serving_default"](inputs=tf.constant(x))["output_0"].numpy()
    np.testing.assert_array_equal(got, expected)
    sizes = sorted(int(v.shape.num_elements()) for v in kflip.binary_variables(model))
    assert _graph_constants(str(tmp_path / "float"), tf.float32) == sizes
    assert _graph_constants(str(tmp_path / "float"), tf.uint8) == []
    saving = report["saved_model_bytes"] - packed_report["saved_model_bytes"]
    # float kernels cost 32 bits per weight, packed ones 1 bit (31/32 saved), minus the
    # graph nodes that unpack them (a fixed cost of a few KB per kernel).
    kernel_saving = report["binary_kernel_bytes"] - packed_report["binary_kernel_bytes"]
    assert kernel_saving == 4 * 2368 - (256 + 40)  # 64*32 + 32*10 weights
    assert 0 < kernel_saving - 4096 * len(sizes) <= saving < kernel_saving


# ---- errors ------------------------------------------------------------------------------
def test_bad_paths_raise_clear_errors(tmp_path):
    model = small_mlp()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="`path`.*existing file"):
        kflip.export(model, str(a_file))
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(ValueError, match="`path`.*non-empty directory"):
        kflip.export(model, str(full))
    with pytest.raises(ValueError, match="`path`.*parent"):
        kflip.export(model, str(a_file / "sub"))
    with pytest.raises(ValueError, match="`path`"):
        kflip.export(model, "")
    assert sorted(os.listdir(full)) == ["something"]


def test_non_binary_or_invalid_models_raise_clear_errors(tmp_path):
    float_model = tf.keras.Sequential(
        [tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)]
    )
    with pytest.raises(ValueError, match="no binary variables"):
        kflip.export(float_model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="`model` must be a tf.keras.Model"):
        kflip.export("model.h5", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="`packed` must be a bool"):
        kflip.export(small_mlp(), str(tmp_path / "c"), packed="yes")

    import larq as lq

    unsnapped = tf.keras.Sequential(
        [
            tf.keras.Input((4,)),
            lq.layers.QuantDense(3, kernel_quantizer=lq.quantizers.NoOp(precision=1)),
        ]
    )
    with pytest.raises(ValueError, match="exactly.*snap_binary_weights"):
        kflip.export(unsnapped, str(tmp_path / "d"))
    # The error left no global state behind (larq's quantized_scope flag).
    assert not lq.context.should_quantize()
    inp = tf.keras.Input((4,))
    head = lq.layers.QuantDense(3, kernel_quantizer="ste_sign")
    two_outputs = tf.keras.Model(inp, [head(inp), tf.keras.layers.Dense(2)(inp)])
    with pytest.raises(ValueError, match="exactly one output"):
        kflip.export(two_outputs, str(tmp_path / "e"))
    assert not [p for p in "ade" if os.path.exists(tmp_path / p)]


# ---- CLI ---------------------------------------------------------------------------------
def test_cli_add_arguments_and_run(tmp_path, capsys, digits):
    parser = export_lib.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["m.h5", "out"])
    assert (args.model_path, args.out_dir, args.pack, args.tflite) == ("m.h5", "out", True, False)
    args = parser.parse_args(["m.h5", "out", "--no-pack", "--tflite"])
    assert (args.pack, args.tflite) == (False, True)

    model = _trained_like(small_mlp())
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    out = str(tmp_path / "served")
    assert export_lib.run(parser.parse_args([model_path, out, "--no-pack"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == out and report["packed"] is False
    assert report["max_abs_diff"] == 0.0
    x = digits.x_test[:20]
    got = tf.saved_model.load(out).signatures["serving_default"](inputs=tf.constant(x))
    np.testing.assert_array_equal(got["output_0"].numpy(), model(x, training=False).numpy())

    capsys.readouterr()
    assert export_lib.run(parser.parse_args([str(tmp_path / "missing.h5"), str(tmp_path / "o")])) == 2
    assert re.search(r"kflip export: error: `MODEL_PATH`.*does not exist", capsys.readouterr().err)
    not_a_model = tmp_path / "junk.h5"
    not_a_model.write_text("junk")
    assert export_lib.run(parser.parse_args([str(not_a_model), str(tmp_path / "o2")])) == 2
    assert "`MODEL_PATH`" in capsys.readouterr().err
    assert export_lib.run(parser.parse_args([model_path, out])) == 2  # out is not empty
    assert re.search(r"`path`.*non-empty directory", capsys.readouterr().err)
    with pytest.raises(ValueError, match="`MODEL_PATH`.*not a loadable Keras model"):
        export_lib.load_model(str(not_a_model))


# ---- TFLite via LCE ----------------------------------------------------------------------
def test_tflite_without_lce_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "larq_compute_engine", None)
    with pytest.raises(ImportError, match=r"pip install 'kflip\[lce\]'"):
        kflip.export(small_mlp(), str(tmp_path / "t"), tflite=True)
    assert not os.path.exists(tmp_path / "t")


def test_tflite_with_lce_binary_ops_matches_keras(tmp_path, digits):
    pytest.importorskip("larq_compute_engine")
    model = _trained_like(small_cnn())
    x = digits.x_test[:32]
    report = kflip.export(model, str(tmp_path / "t"), tflite=True, sample=x)
    assert os.path.getsize(report["tflite_path"]) == report["tflite_bytes"] > 0
    assert "LceBconv2d" in report["tflite_lce_ops"]
    assert report["tflite_argmax_agreement"] == 1.0
    assert report["tflite_max_abs_diff"] < 1e-4
