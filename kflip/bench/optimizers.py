"""The optimizer recipes of ``kflip train`` and ``kflip bench`` (:data:`OPTIMIZERS`)."""

from __future__ import annotations

from typing import Any

from kflip import _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip.optimizer import FlipLSTM  # noqa: E402

OPTIMIZERS = ("adam-ste", "bop", "fliplstm-gradient", "fliplstm")
FLIP_OPTIMIZERS = ("fliplstm-gradient", "fliplstm")


def make_optimizer(
    name: str,
    *,
    bop_threshold: float = 1e-6,
    bop_gamma: float = 1e-3,
    lstm_weights: Any = None,
):
    """The optimizer recipe called ``name`` (one of :data:`OPTIMIZERS`).

    Example:
      >>> from kflip import bench
      >>> type(bench.make_optimizer("bop")).__name__  # Bop for binary kernels, Adam else
      'CaseOptimizer'
      >>> bench.make_optimizer("fliplstm-gradient").output
      'gradient'
    """
    if name == "adam-ste":
        return tf.keras.optimizers.legacy.Adam(1e-3)
    if name == "bop":
        if not (isinstance(bop_threshold, (int, float)) and bop_threshold >= 0):
            raise ValueError(f"`bop_threshold` must be a number >= 0, got {bop_threshold!r}.")
        if not (isinstance(bop_gamma, (int, float)) and 0 < bop_gamma <= 1):
            raise ValueError(f"`bop_gamma` must be in (0, 1], got {bop_gamma!r}.")
        return case_optimizer(lq.optimizers.Bop(threshold=bop_threshold, gamma=bop_gamma))
    if name == "fliplstm":
        return FlipLSTM(lstm_weights)
    if name == "fliplstm-gradient":
        return FlipLSTM(lstm_weights, output="gradient")
    raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {name!r}.")


def case_optimizer(binary_optimizer):
    """``binary_optimizer`` for the binary kernels, ``Adam(0.01)`` for every other variable.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> type(bench.case_optimizer(kflip.Bop2ndOrder())).__name__
      'CaseOptimizer'
    """
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, binary_optimizer),
        default_optimizer=tf.keras.optimizers.legacy.Adam(0.01),
    )
