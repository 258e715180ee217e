"""kflip: flip optimizers for binarized neural networks in Keras.

``import kflip`` selects Keras 2 (``TF_USE_LEGACY_KERAS=1``) before TensorFlow is
imported, because larq only runs on Keras 2, and imports the public API (which
registers kflip's Keras objects, so ``tf.keras.models.load_model`` finds them). The
``kflip`` command defers that until a subcommand runs, so ``kflip --help`` and
``kflip --version`` answer without starting TensorFlow.
"""

import importlib
import os

from kflip import _keras

_keras.select_keras2()

from kflip._version import __version__  # noqa: E402

# public name -> (module, attribute); attribute None means the module itself.
_PUBLIC = {
    "assert_binary": ("kflip.binary", "assert_binary"),
    "binary_variables": ("kflip.binary", "binary_variables"),
    "is_binary_variable": ("kflip.binary", "is_binary_variable"),
    "snap_binary_weights": ("kflip.binary", "snap_binary_weights"),
    "FlipRate": ("kflip.callbacks", "FlipRate"),
    "GreedyFlip": ("kflip.greedy", "GreedyFlip"),
    "greedy_flip": ("kflip.greedy", "greedy_flip"),
    "LSTMWeights": ("kflip.cell", "LSTMWeights"),
    "bop_weights": ("kflip.cell", "bop_weights"),
    "FlipLSTM": ("kflip.optimizer", "FlipLSTM"),
    "Bop2ndOrder": ("kflip.bop2nd", "Bop2ndOrder"),
    "data": ("kflip.data", None),
    "models": ("kflip.models", None),
    "export": ("kflip.export", None),  # callable module: kflip.export(model, path)
}

__all__ = sorted([*_PUBLIC, "__version__"])


def _load_all() -> None:
    """Import every public module (registers FlipLSTM etc. with Keras)."""
    for name in _PUBLIC:
        __getattr__(name)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kflip' has no attribute {name!r}")
    module_name, attr = _PUBLIC[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


if os.environ.get("KFLIP_DEFER_IMPORTS") != "1":
    _load_all()
