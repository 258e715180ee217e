"""Meta-train FlipLSTM's LSTM for a few ES iterations, then use it in Keras.

A small version of ``kflip meta-train`` (minutes on 2 cores): tiny tasks, short
horizon. The shipped weights come from the documented default run (docs/meta.md).

    python examples/meta_train.py --iterations 10 --out /tmp/kflip_meta/w.npz
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402  (selects Keras 2)
import kflip.meta  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--out", default="/tmp/kflip_meta/w.npz")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    config = kflip.meta.MetaConfig(
        iterations=args.iterations, pairs=4, horizon=500, train_examples=1024,
        val_tasks=4, eval_every=5,
        families=("mlp-32", "mlp-64-64"), family_weights=(1.0, 1.0),
    )
    weights = kflip.meta.meta_train(config, out=args.out, workers=args.workers, quiet=False)
    m = weights.metadata
    print(f"validation meta-loss: init {m['init_val_meta_loss']:.4f} -> best "
          f"{m['best_val_meta_loss']:.4f} (iteration {m['best_iteration']})")

    # The learned rule in an ordinary Keras training loop (digits, tiny BNN).
    ds = kflip.data.digits()
    for name, w in (("init", kflip.meta.initial_weights(config)), ("learned", args.out)):
        tf.keras.utils.set_random_seed(0)
        model = kflip.models.mlp(ds.input_shape, ds.num_classes, hidden=(64,))
        model.compile(kflip.FlipLSTM(weights=w), "sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=True)
        model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=10, verbose=0)
        kflip.assert_binary(model)
        print(name, "digits test accuracy", model.evaluate(ds.x_test, ds.y_test, verbose=0)[1])


if __name__ == "__main__":
    main()
