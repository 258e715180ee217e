"""Looking at a flip rule: where it flips, and how likely it flips under noise.

>>> import numpy as np, kflip
>>> from kflip.meta.inspect import decision_map
>>> y = decision_map(kflip.bop_weights(), features=np.array([-1.0, 1.0]), cells=[0.0])
>>> y.shape
(1, 2)
"""

from __future__ import annotations

import os

import numpy as np

from kflip import cell as cell_lib
from kflip.rule import FlipRule


def decision_map(weights: cell_lib.LSTMWeights, features, cells, grad_std: float = 1.0):
    """LSTM output ``y`` for one step from state ``(h, c)``, over a grid.

    ``features``: values of the normalised feature ``theta * g / rms(g)``; the raw
    feature is ``grad_std`` times that value (i.e. ``rms(g) = grad_std``). ``cells``:
    previous cell state ``c`` (for hidden size 1; extra units start at 0), with
    ``h = o * tanh(c)`` taken at the bias-only output gate. Returns ``y`` of shape
    ``[len(cells), len(features)]``; the weight flips where ``y < 0``.
    """
    import tensorflow as tf

    f = np.asarray(features, np.float32)
    cs = np.asarray(cells, np.float32)
    X, C = np.meshgrid(f, cs)
    cell = cell_lib.CellTensors.from_weights(weights)
    hdim = weights.hidden_size
    c = np.zeros(X.shape + (hdim,), np.float32)
    c[..., 0] = C
    o = 1.0 / (1.0 + np.exp(-weights.bias[3 * hdim]))
    h = (o * np.tanh(c)).astype(np.float32)
    raw = tf.constant(X * np.float32(grad_std))
    y, _, _ = cell_lib.lstm_cell(cell, [raw, tf.constant(X)], tf.constant(h), tf.constant(c))
    return y.numpy()


def flip_probability(
    weights: cell_lib.LSTMWeights, means, steps: int = 1000, trials: int = 2000, seed: int = 0,
    grad_std: float = 1.0,
):
    """Probability that a weight flips at least once within ``steps`` steps.

    Gradients are i.i.d. ``grad_std * N(mean, 1)`` per step in a fixed frame, the weight starts
    at +1 (so ``mean > 0`` means flipping lowers the loss), and the rule runs exactly
    as in FlipLSTM (:class:`kflip.rule.FlipRule`, per-tensor normalisation over the
    ``trials`` coordinates). Returns an array like ``means``.

    >>> import kflip
    >>> from kflip.meta.inspect import flip_probability
    >>> p = flip_probability(kflip.bop_weights(0.0, 0.5, normalized=True, scale=1.0),
    ...                      means=[-1.0, 1.0], steps=20, trials=100)
    >>> bool(p[1] > p[0])  # evidence for a flip makes flipping likelier
    True
    """
    import tensorflow as tf

    rule = FlipRule.from_weights(weights)

    @tf.function(jit_compile=True)
    def run(mu, noise):
        def body(t, theta, state, flipped):
            signs, state = rule.update(grad_std * (mu + noise[t]), state, theta)
            return t + 1, theta * signs, state, tf.logical_or(flipped, signs < 0)

        theta = tf.ones([trials])
        init = (tf.constant(0), theta, rule.init(theta), tf.zeros([trials], tf.bool))
        out = tf.while_loop(lambda t, *_: t < steps, body, init)
        return tf.reduce_mean(tf.cast(out[-1], tf.float32))

    rng = np.random.default_rng(seed)
    noise = tf.constant(rng.standard_normal((steps, trials)).astype(np.float32))
    return np.array([float(run(tf.constant(mu, tf.float32), noise)) for mu in np.asarray(means)])


def plot_rule(rules: dict, path: str, steps: int = 1000, trials: int = 1000, grad_std: float = 1.0) -> None:
    """Figure: decision maps (flip where ``y < 0``) and flip probability vs gradient
    mean, one column per named rule in ``rules`` (name -> LSTMWeights).

    ``grad_std`` is the gradient scale the rules are shown at (it matters for rules
    that read the raw gradient; e.g. ~1e-3 for the hidden layers of the MNIST MLP).
    The cell-state axis spans +-5 thresholds (``out_bias / |out_kernel|`` of unit 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = np.linspace(-4, 4, 161)
    thresholds = [abs(w.out_bias / w.out_kernel[0]) for w in rules.values() if w.out_kernel[0]]
    span = 5 * max(thresholds) if thresholds and max(thresholds) > 0 else 0.05
    cells = np.linspace(-span, span, 161)
    means = np.linspace(-0.3, 0.3, 25)
    n = len(rules)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 3.8))
    for ax, (name, w) in zip(axes, rules.items()):
        y = decision_map(w, feats, cells, grad_std=grad_std)
        ax.contourf(feats, cells, (y < 0).astype(float), levels=[-0.5, 0.5, 1.5], colors=["#dde8f5", "#d9534f"])
        ax.contour(feats, cells, y, levels=[0.0], colors="k", linewidths=1)
        ax.set_xlabel(f"theta * g / rms(g)  (this step; rms(g) = {grad_std:g})")
        ax.set_ylabel("cell state c (previous step)")
        ax.set_title(f"{name}: flip region (red)")
    ax = axes[-1]
    for name, w in rules.items():
        p = flip_probability(w, means, steps=steps, trials=trials, grad_std=grad_std)
        ax.plot(means, p, marker=".", label=name)
    ax.set_xlabel(f"mean of theta0 * g / {grad_std:g} (gradient std {grad_std:g})")
    ax.set_ylabel(f"P(flip within {steps} steps)")
    ax.set_title("flip probability under noisy gradients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


