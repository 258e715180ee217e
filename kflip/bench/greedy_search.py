"""The greedy flip search after training (``kflip.greedy``, imported lazily): its
defaults here, the search on a trained model and the test accuracy after it."""

from __future__ import annotations

import importlib
import time

from kflip.bench.checks import _check_positive_int
from kflip.bench.output import _jsonable
from kflip.bench.telemetry import make_evaluator
from kflip.binary import assert_binary, snap_binary_weights

GREEDY_SUFFIX = "+greedy"
# Defaults for the greedy search that follows training: a per-layer time budget and
# the most promising candidates first (by the first-order gain -2*theta*g).
GREEDY_DEFAULTS = {"order": "gradient", "max_seconds": 10.0}


def greedy_module():
    """``kflip.greedy`` or None if this version does not have it.

    Example:
      >>> from kflip import bench
      >>> bench.greedy_module().__name__
      'kflip.greedy'
    """
    try:
        return importlib.import_module("kflip.greedy")
    except ModuleNotFoundError as e:
        if e.name in ("kflip.greedy",):
            return None
        raise


def greedy_options_with_defaults(options: dict | None, examples: int) -> dict:
    """``options`` for ``greedy_flip`` on top of :data:`GREEDY_DEFAULTS` and
    ``probe_size=examples``; a value of None removes a default (e.g. no budget).

    Example:
      >>> from kflip import bench
      >>> bench.greedy_options_with_defaults({"group_size": 2}, examples=256)
      {'order': 'gradient', 'max_seconds': 10.0, 'probe_size': 256, 'group_size': 2}
      >>> bench.greedy_options_with_defaults({"max_seconds": None}, examples=256)
      {'order': 'gradient', 'probe_size': 256}
    """
    _check_positive_int("greedy_examples", examples)
    merged = dict(GREEDY_DEFAULTS, probe_size=int(examples))
    merged.update(options or {})
    return {k: v for k, v in merged.items() if v is not None}


def run_greedy(model, dataset, *, examples: int = 1024, options: dict | None = None) -> dict:
    """Snap the binary kernels to +-1 and run ``kflip.greedy.greedy_flip`` on them.

    The probe set is ``examples`` training examples (``greedy_flip`` draws a fixed
    random subset); ``options`` override :data:`GREEDY_DEFAULTS`. Snapping does not
    change the function the model computes (its ``ste_sign`` quantizers already see
    only the signs). Returns ``{"report", "seconds", "options"}``.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
      >>> out = bench.run_greedy(model, ds, examples=64, options={"max_seconds": 1.0})
      >>> sorted(out)
      ['options', 'report', 'seconds']
      >>> out["options"]  # GREEDY_DEFAULTS, updated by `options`
      {'order': 'gradient', 'max_seconds': 1.0, 'probe_size': 64}
      >>> out["report"]["loss_after"] <= out["report"]["loss_before"]
      True
    """
    module = greedy_module()
    if module is None:
        raise ValueError(
            "`greedy` needs kflip.greedy, which is not available in this version of kflip."
        )
    options = greedy_options_with_defaults(options, examples)
    snap_binary_weights(model)
    t0 = time.perf_counter()
    report = module.greedy_flip(model, dataset.x_train, dataset.y_train, **{"verbose": 0, **options})
    seconds = time.perf_counter() - t0
    assert_binary(model)
    return {"report": _jsonable(report), "seconds": seconds, "options": _jsonable(options)}


def _require_greedy() -> None:
    if greedy_module() is None:
        raise ValueError(
            "`greedy` needs kflip.greedy (the greedy flip search), which is not "
            "available in this version of kflip."
        )


def _greedy_evaluated(net, ds, before: float, examples: int, options: dict | None):
    """:func:`run_greedy` on the trained ``net``, then its test accuracy and loss:
    ``(greedy dict with test_accuracy_before/after, accuracy, loss)``."""
    g = run_greedy(net, ds, examples=examples, options=options)
    acc, loss = make_evaluator(net)(ds.x_test, ds.y_test)
    g.update(test_accuracy_before=before, test_accuracy_after=acc)
    return g, acc, loss
