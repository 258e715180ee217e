"""Quickstart: a binarized MLP on scikit-learn's bundled digits, FlipLSTM vs larq's Bop.

    python examples/quickstart.py          # ~1 minute on 2 CPU cores, no network
"""

import kflip  # first: selects Keras 2 for larq
import larq as lq
import tensorflow as tf

from kflip import data, models

ds = data.digits()


def train(optimizer, seed=0, epochs=10):
    tf.keras.utils.set_random_seed(seed)
    model = models.mlp(input_shape=ds.input_shape, num_classes=10, hidden=(256, 256))
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=True)
    callbacks = [kflip.FlipRate()] if isinstance(optimizer, kflip.FlipLSTM) else []
    hist = model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=epochs, verbose=0, callbacks=callbacks)
    acc = model.evaluate(ds.x_test, ds.y_test, verbose=0)[1]
    return acc, hist.history


bop = lq.optimizers.CaseOptimizer(
    (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=1e-6, gamma=1e-3)),
    default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
)
acc_bop, _ = train(bop)
acc_flip, hist = train(kflip.FlipLSTM())  # shipped LSTM weights; floats -> Adam(0.01)
print(f"Bop      test accuracy: {acc_bop:.4f}")
print(f"FlipLSTM test accuracy: {acc_flip:.4f}  (flip rate last epoch: {hist['flip_rate'][-1]:.2e} per weight per step)")
