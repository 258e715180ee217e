"""Temperature calibration of the probe loss.

A binary network's logits come out of a BatchNorm with fixed statistics, so their scale
is set by training, not by the data: a model at 98% accuracy can have a probe
cross-entropy of 0.33 at its own scale and 0.05 at three times that scale. A flip that
only makes all logits larger then lowers the loss without changing one prediction,
and a search that accepts such flips trades accuracy for confidence. Fitting one
scalar temperature ``T`` (the loss is ``CE(T * logits)``) before each layer's search
removes that direction: at the best ``T`` a uniform change of scale does not lower the
loss to first order, so accepted flips have to move the decision margins.

The temperature is only ever raised (``T >= 1``): an untrained or under-trained network
is over-confident at its own scale, its best ``T`` approaches 0 (the uniform
prediction), and every flip's loss change with it; there the search runs on the
model's own scale, as without calibration.
"""

from __future__ import annotations

import numpy as np


def fit_temperature(logits, y, t0: float = 1.0, steps: int = 50) -> float:
    """The ``T > 0`` minimising the mean cross-entropy of ``T * logits`` (Newton's method;
    the loss is convex in ``T``).

    Example:
      >>> import numpy as np
      >>> z = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
      >>> t = fit_temperature(z, np.array([0, 1, 1]))
      >>> round(t, 3)
      0.756
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    zy = z[np.arange(len(y)), y]
    t = float(t0)
    for _ in range(steps):
        s = t * z
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mean_z = (p * z).sum(1)
        grad = float(np.mean(mean_z - zy))
        hess = float(np.mean((p * z * z).sum(1) - mean_z ** 2))
        step = grad / hess if hess > 1e-12 else np.sign(grad) * t
        new = min(max(t - step, t / 4), 4 * t)  # keep T > 0, damp the first steps
        if abs(new - t) <= 1e-9 * t:
            return new
        t = new
    return t


class Calibrator:
    """Refits ``net.temperature`` (at least 1) to the probe set ``(x, y)`` on request."""

    def __init__(self, net, x, y):
        self.net, self.x, self.y = net, x, np.asarray(y)
        self.logits = net.jit(lambda t: net.forward(t))

    def __call__(self) -> float:
        temperature = self.net.temperature
        scaled = self.logits(self.x).numpy()  # at the current temperature
        best = fit_temperature(scaled / temperature.value, self.y, temperature.value)
        temperature.value = max(1.0, best)
        return temperature.value
