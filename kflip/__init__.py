"""kflip: flip optimizers for binarized neural networks in Keras.

``import kflip`` selects Keras 2 (``TF_USE_LEGACY_KERAS=1``) before TensorFlow is
imported, because larq only runs on Keras 2.
"""

from kflip import _keras

_keras.select_keras2()

from kflip._version import __version__  # noqa: E402
from kflip.binary import (  # noqa: E402
    assert_binary,
    binary_variables,
    is_binary_variable,
    snap_binary_weights,
)
from kflip.callbacks import FlipRate  # noqa: E402
from kflip.greedy import GreedyFlip, greedy_flip  # noqa: E402
from kflip.cell import LSTMWeights, bop_weights  # noqa: E402
from kflip.optimizer import FlipLSTM  # noqa: E402
from kflip import data, models  # noqa: E402
from kflip import export  # noqa: E402  (callable module: kflip.export(model, path))

__all__ = [
    "FlipLSTM",
    "FlipRate",
    "GreedyFlip",
    "LSTMWeights",
    "__version__",
    "assert_binary",
    "binary_variables",
    "bop_weights",
    "data",
    "greedy_flip",
    "export",
    "is_binary_variable",
    "models",
    "snap_binary_weights",
]
