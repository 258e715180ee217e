"""Export sizes and fidelity: float vs bit-packed SavedModel vs LCE TFLite, on MNIST.

For each model (the 2x512 BinaryNet MLP and the larq tutorial CNN):

1. train briefly with FlipLSTM (``--epochs`` on ``--train-size`` MNIST examples, XLA)
   so BatchNorm statistics and activations are realistic (sizes do not depend on it);
2. ``kflip.export`` packed (1 bit per binary weight), ``packed=False`` (float32
   kernels) and, if ``larq-compute-engine`` imports, ``tflite=True``;
3. report SavedModel directory sizes (the kernels are graph constants; ``variables/``
   holds only BatchNorm state), and on the whole MNIST test set:
   max |difference| and argmax agreement of the reloaded SavedModels (loaded with
   ``tf.saved_model.load``) and the LCE interpreter against the Keras model, plus
   their test accuracies;
4. time batch-1 and batch-256 inference of Keras (``model(x, training=False)`` in a
   ``tf.function``), the packed SavedModel and the LCE interpreter side by side,
   interleaved (median of ``--repeats``), so ratios are fair on a shared machine.

Usage:
  python benchmarks/export_sizes.py --data-dir /work/shared/data \
      --json benchmarks/results/export_sizes.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models  # noqa: E402
from kflip._files import write_json  # noqa: E402


def dir_bytes(path):
    return sum(
        os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files
    )


def var_bytes(path):
    d = os.path.join(path, "variables")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _in_batches(fn, x, size=1000):
    """``fn`` applied to ``x`` in batches of ``size``, outputs concatenated."""
    return np.concatenate([fn(x[i : i + size]) for i in range(0, len(x), size)])


def _have_lce() -> bool:
    """Whether ``larq_compute_engine`` imports."""
    try:
        import larq_compute_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _train(name, ds, args):
    """Build ``name``, snap it binary and train it briefly with FlipLSTM; returns (model, seconds)."""
    tf.keras.utils.set_random_seed(args.seed)
    model = models.build(name, ds.input_shape, ds.num_classes)
    kflip.snap_binary_weights(model)
    model.compile(
        optimizer=kflip.FlipLSTM(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    t = time.time()
    model.fit(
        ds.x_train[: args.train_size],
        ds.y_train[: args.train_size],
        batch_size=64,
        epochs=args.epochs,
        verbose=0,
    )
    return model, time.time() - t


def _export_and_check(model, name, packed, have_lce, x, keras_out, out_root, row):
    """Export packed or float, reload it, add sizes and fidelity to ``row``; returns (serving fn, report)."""
    tag = "packed" if packed else "float"
    path = os.path.join(out_root, f"{name}_{tag}")
    report = kflip.export(model, path, packed=packed, tflite=packed and have_lce, sample=x[:256])
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    got = _in_batches(lambda xb: fn(inputs=tf.constant(xb))["output_0"].numpy(), x)
    row[f"{tag}_saved_model_bytes"] = report["saved_model_bytes"]
    row[f"{tag}_variables_bytes"] = var_bytes(path)
    row[f"{tag}_binary_kernel_bytes"] = report["binary_kernel_bytes"]
    row[f"{tag}_max_abs_diff_vs_keras"] = float(np.max(np.abs(got - keras_out)))
    row[f"{tag}_argmax_agreement"] = float(np.mean(got.argmax(1) == keras_out.argmax(1)))
    return fn, report


def _check_tflite(report, x, y, keras_out, row):
    """Run the LCE flatbuffer on ``x``, add size and fidelity to ``row``; returns (interp, interp1)."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    with open(report["tflite_path"], "rb") as fh:
        flatbuffer = fh.read()
    interp = Interpreter(flatbuffer, num_threads=1)
    interp1 = Interpreter(flatbuffer, num_threads=1)
    lite = _in_batches(interp.predict, x)
    lite = lite.reshape(keras_out.shape)
    row["tflite_bytes"] = report["tflite_bytes"]
    row["tflite_lce_ops"] = report["tflite_lce_ops"]
    row["tflite_max_abs_diff_vs_keras"] = float(np.max(np.abs(lite - keras_out)))
    row["tflite_argmax_agreement"] = float(np.mean(lite.argmax(1) == keras_out.argmax(1)))
    row["tflite_test_accuracy"] = float(np.mean(lite.argmax(1) == y))
    return interp, interp1


def _interleaved_ms(contenders, repeats):
    """Median (over ``repeats`` interleaved rounds of medians of 5 calls) milliseconds per contender."""
    for f in contenders.values():
        f()  # warm up / trace
    acc = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, f in contenders.items():
            acc[k].append(median_time(f, 5))
    return {k: round(1000 * float(np.median(v)), 3) for k, v in acc.items()}


def _latency(model, serving, interps, x, repeats):
    """Batch-1 and batch-256 inference latency of Keras, the packed SavedModel and (if any) LCE."""
    keras_fn = tf.function(lambda t: model(t, training=False))
    timings = {}
    for batch in (1, 256):
        xb = tf.constant(x[:batch])
        contenders = {
            "keras": lambda: keras_fn(xb).numpy(),
            "saved_model_packed": lambda: serving(inputs=xb)["output_0"].numpy(),
        }
        if interps is not None:
            interp, interp1 = interps
            it = interp1 if batch == 1 else interp
            xb_np = x[:batch]
            contenders["tflite_lce"] = lambda: it.predict(xb_np)
        for k, v in _interleaved_ms(contenders, repeats).items():
            timings[f"{k}_batch{batch}_ms"] = v
    return timings


def bench_model(name, ds, args, out_root):
    model, train_s = _train(name, ds, args)
    x, y = ds.x_test, ds.y_test
    # Reference: the Keras inference call (what kflip.export traces), same batches
    # as the SavedModel below. `model.predict` of a jit_compile=True model runs XLA,
    # whose fused float arithmetic may round differently; reported separately.
    keras_out = _in_batches(lambda xb: model(xb, training=False).numpy(), x)
    xla_out = model.predict(x, batch_size=1000, verbose=0)
    row = {
        "model": name,
        "train_seconds": round(train_s, 1),
        "binary_weights": int(sum(v.shape.num_elements() for v in kflip.binary_variables(model))),
        "keras_test_accuracy": float(np.mean(keras_out.argmax(1) == y)),
        "keras_xla_predict_max_abs_diff_vs_keras": float(np.max(np.abs(xla_out - keras_out))),
        "keras_xla_predict_argmax_agreement": float(np.mean(xla_out.argmax(1) == keras_out.argmax(1))),
    }

    have_lce = _have_lce()
    serving, report = _export_and_check(model, name, True, have_lce, x, keras_out, out_root, row)
    interps = _check_tflite(report, x, y, keras_out, row) if have_lce else None
    _export_and_check(model, name, False, have_lce, x, keras_out, out_root, row)
    row["packed_vs_float_saved_model"] = round(
        row["float_saved_model_bytes"] / row["packed_saved_model_bytes"], 2
    )

    # Inference latency, interleaved (median over repeats).
    row["latency"] = _latency(model, serving, interps, x, args.repeats)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--keep", default=None, help="keep the exports in this directory")
    args = p.parse_args(argv)
    ds = data.load(args.dataset, data_dir=args.data_dir)
    out_root = args.keep or tempfile.mkdtemp(prefix="kflip_export_bench_")
    os.makedirs(out_root, exist_ok=True)
    result = {
        "benchmark": "export_sizes",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": ds.name,
        "args": vars(args),
        "versions": {"tensorflow": tf.__version__, "kflip": kflip.__version__},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "models": [],
    }
    try:
        import larq_compute_engine as lce

        result["versions"]["larq_compute_engine"] = getattr(lce, "__version__", "?")
    except ImportError:
        result["versions"]["larq_compute_engine"] = None
    try:
        for name in args.models:
            row = bench_model(name, ds, args, out_root)
            result["models"].append(row)
            print(json.dumps(row, indent=2), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(out_root, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, result, indent=2)
    return result


if __name__ == "__main__":
    main()
