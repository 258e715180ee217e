"""RMS gradient of every binary kernel of a model, at initialisation and after training.

How differently scaled the layers' gradients are, which a flip rule with one raw
threshold for every tensor has to live with (docs/meta.md, "A lead, not a rule"):

    python benchmarks/gradient_scales.py --data-dir ../shared/data --models cnn mlp

Each model is built with seed 0, trained with the default FlipLSTM for ``--steps``
steps of batch 64 on the first training images, and measured on ``--batches``
batches of 64 before and after (the mean over batches of each kernel's RMS gradient).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import kflip  # noqa: E402  (first: selects Keras 2 for larq)
import tensorflow as tf  # noqa: E402
from kflip import data, models  # noqa: E402
from kflip.binary import named_binary_variables  # noqa: E402


def rms_gradients(model, ds, batches: int) -> dict:
    """Mean over ``batches`` batches of 64 of each binary kernel's RMS gradient."""
    loss = tf.keras.losses.SparseCategoricalCrossentropy()
    named = dict(named_binary_variables(model))
    out = {name: [] for name in named}
    for b in range(batches):
        x, y = ds.x_train[b * 64 : (b + 1) * 64], ds.y_train[b * 64 : (b + 1) * 64]
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, list(named.values()))
        for name, g in zip(named, grads):
            out[name].append(float(tf.sqrt(tf.reduce_mean(tf.square(g)))))
    return {name: float(np.mean(v)) for name, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args(argv)
    ds = data.load(args.dataset, data_dir=args.data_dir)
    for name in args.models:
        tf.keras.utils.set_random_seed(0)
        model = models.build(name, ds.input_shape, ds.num_classes)
        model.compile(kflip.FlipLSTM(), "sparse_categorical_crossentropy", jit_compile=True)
        before = rms_gradients(model, ds, args.batches)
        n = args.steps * 64
        model.fit(ds.x_train[:n], ds.y_train[:n], batch_size=64, epochs=1, verbose=0)
        after = rms_gradients(model, ds, args.batches)
        for kernel in before:
            print(f"{name:4s} {kernel:28s} step 0: {before[kernel]:.2e}  "
                  f"step {args.steps}: {after[kernel]:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
