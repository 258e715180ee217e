"""Greedy flip search after gradient training, and as a Keras callback.

Trains a small binary MLP with Bop on scikit-learn's digits (offline, ~1 minute on two
cores), then runs one greedy pass and prints what it changed. ``--callback`` instead
lets ``kflip.GreedyFlip`` run the search during ``model.fit`` every epoch.

  python examples/greedy_flip.py
  python examples/greedy_flip.py --callback
  python examples/greedy_flip.py --dataset mnist --data-dir /work/shared/data
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402  (selects Keras 2 before TensorFlow)
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import data, models  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--callback", action="store_true")
    args = ap.parse_args()

    ds = data.load(args.dataset, data_dir=args.data_dir)
    tf.keras.utils.set_random_seed(0)
    model = models.mlp(ds.input_shape, ds.num_classes, hidden=(32,))
    bop = lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=1e-6, gamma=1e-3)),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
    )
    model.compile(bop, "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=True)
    callbacks = []
    if args.callback:
        # Greedy pass on a 512-example probe set after every epoch (30 s per layer max).
        callbacks.append(kflip.GreedyFlip(ds.x_train, ds.y_train, every_n_epochs=1,
                                          at_train_end=False, probe_size=512, max_seconds=30))
    hist = model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=args.epochs, verbose=2,
                     callbacks=callbacks)
    if args.callback:
        print({k: v for k, v in hist.history.items() if k.startswith("greedy/") and "/" not in k[7:]})
        return
    _, acc = model.evaluate(ds.x_test, ds.y_test, verbose=0)
    kflip.snap_binary_weights(model)  # Bop keeps +-1 already; a no-op here
    report = kflip.greedy_flip(model, ds.x_train, ds.y_train, probe_size=1024, max_seconds=60,
                               verbose=1)
    _, acc2 = model.evaluate(ds.x_test, ds.y_test, verbose=0)
    print(f"probe loss {report.loss_before:.4f} -> {report.loss_after:.4f}; "
          f"{report.accepted}/{report.tried} flips accepted in {report.seconds:.1f}s; "
          f"test accuracy {acc:.4f} -> {acc2:.4f}")


if __name__ == "__main__":
    main()
