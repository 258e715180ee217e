"""Train a small BNN with FlipLSTM, export it, and serve it without kflip or larq.

Runs offline in well under a minute (scikit-learn's 8x8 digits):

    python examples/export_and_serve.py [OUT_DIR] [--tflite]

1. trains a BinaryNet-style MLP with ``kflip.FlipLSTM`` (XLA);
2. ``kflip.export(model, OUT_DIR)``: a SavedModel whose binary kernels are stored with
   1 bit per weight and unpacked inside the graph (``--tflite``: also an LCE
   ``model.tflite``, needs ``pip install 'kflip[lce]'``);
3. starts a fresh Python process that imports only TensorFlow and NumPy, loads the
   SavedModel with ``tf.saved_model.load`` and predicts the test set;
4. checks that those predictions equal the Keras model's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402  (selects Keras 2 before TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models  # noqa: E402

# What a serving process needs: TensorFlow. No kflip, no larq, no Keras.
SERVE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    model_dir, x_path, out_path = sys.argv[1:]
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    probs = serve(inputs=tf.constant(np.load(x_path)))["output_0"].numpy()
    np.save(out_path, probs)
    assert "larq" not in sys.modules and "kflip" not in sys.modules
    print("served", probs.shape, "without kflip/larq")
    """
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default=None, help="export directory (new)")
    p.add_argument("--tflite", action="store_true", help="also write an LCE .tflite")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    out_dir = args.out_dir or os.path.join(tempfile.mkdtemp(prefix="kflip_"), "digits_mlp")

    ds = data.digits()
    tf.keras.utils.set_random_seed(0)
    model = models.mlp(input_shape=ds.input_shape, num_classes=10, hidden=(256, 256))
    model.compile(
        optimizer=kflip.FlipLSTM(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=args.epochs, verbose=0)
    kflip.assert_binary(model)
    _, acc = model.evaluate(ds.x_test, ds.y_test, verbose=0)
    print(f"Keras model: test accuracy {acc:.4f}")

    report = kflip.export(model, out_dir, tflite=args.tflite)
    print(json.dumps(report, indent=2, sort_keys=True))

    x_path = os.path.join(out_dir, "x_test.npy")
    y_path = os.path.join(out_dir, "served.npy")
    np.save(x_path, ds.x_test)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    subprocess.run([sys.executable, "-c", SERVE, out_dir, x_path, y_path], check=True, env=env)
    served = np.load(y_path)
    expected = model(ds.x_test, training=False).numpy()  # same batch as served
    same = np.array_equal(served, expected)
    print(f"served == Keras (bitwise): {same}; served test accuracy "
          f"{np.mean(served.argmax(1) == ds.y_test):.4f}")
    if not same:
        raise SystemExit("served predictions differ from the Keras model")


if __name__ == "__main__":
    main()
