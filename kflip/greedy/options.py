"""The options of a greedy flip search: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

ORDERS = ("index", "random", "gradient")
METHODS = ("incremental", "naive")
LAYER_ORDERS = ("forward", "backward")
MAX_EXHAUSTIVE = 24


def check_int(name, v, lo=1, allow_none=False):
    """``ValueError`` naming ``name`` unless ``v`` is an int >= ``lo`` (or None if allowed)."""
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}{' or None' if allow_none else ''}, got {v!r}.")


def _check_positive(name, v, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be a positive number{' or None' if allow_none else ''}, got {v!r}.")


def _check_choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {v!r}.")


@dataclasses.dataclass(frozen=True)
class GreedyOptions:
    """Options of :func:`kflip.greedy_flip`; invalid values raise ``ValueError`` naming them.

    Attributes:
      probe_size: probe examples (a fixed random subset chosen by ``probe_seed``;
        None: all).
      probe_seed: seed of the probe subset.
      memory_budget: GiB the search's caches may take: the probe is cut to as many
        examples as fit by :func:`kflip.greedy.probe.bytes_per_example` (convolutions
        cache im2col patches and a residual layer's search re-runs the rest of the
        network on copies of its activations; 16,384 examples of kflip's residual net
        needed 22 GB). The default keeps the MLP's and the larq CNN's 16,384 and gives
        the residual net 6,547. None: no cut.
      calibrate: before each layer's search, fit the temperature of the probe
        cross-entropy (one scalar on the logits, :mod:`kflip.greedy.calibrate`), so that
        flips are not kept for making the model as a whole more confident (the
        temperature is only raised, never below 1). Only for
        the default loss on logits (a model ending in softmax, or from_logits=True).
      holdout: examples (disjoint from the probe, same seed) on which every layer's
        accepted flips are checked after its search: if its loss there did not drop,
        the layer is reverted. None: no check.
      layers: binary layers to search (names, layer objects or indices among the
        binary layers); None: all.
      layer_order: ``"forward"`` (front to back) or ``"backward"``.
      order: candidate order within a layer: ``"index"``, ``"random"`` or
        ``"gradient"`` (first-order loss change ``-2*theta*g``, most negative first;
        ``g`` on the first 4,096 probe examples).
      group_size: weights of one output unit flipped together.
      exhaustive: try all ``2**group_size`` assignments of each group (at most 2**24).
      max_candidates: candidates per layer and pass (None: all).
      max_seconds: seconds per layer and pass (None: no limit of its own).
      time_budget: seconds for the whole call, shared out over the layers still to
        search (a layer that finishes early leaves its time to the next); None: none.
      passes: sweeps over the layers (stops after a pass without accepted flips).
      min_delta: accept iff the mean probe loss drops by more than this.
      loss: ``"sparse_categorical_crossentropy"`` or ``callable(y_true, y_pred)``
        returning per-example losses.
      from_logits: for models that do not end in a softmax.
      method: ``"incremental"`` (exact cached evaluation) or ``"naive"`` (the
        reference: one full forward pass per candidate; same accepted flips).
      block_size: most candidates per compiled evaluation call.
      pairs_per_block: capacity of (candidate, example) pairs whose binarized
        activations change, per call; blocks that overflow are split.
      seed: seed of ``order="random"``.
      on_step: ``callable(event: dict)`` after every block and accepted flip.
      verbose: 0 silent, 1 a progress bar per layer and a summary line.

    Example:
      >>> from kflip.greedy import GreedyOptions
      >>> GreedyOptions(order="gradient", time_budget=30).order
      'gradient'
      >>> GreedyOptions(group_size=0)
      Traceback (most recent call last):
      ...
      ValueError: `group_size` must be an int >= 1, got 0.
    """

    probe_size: int | None = 16384
    probe_seed: int = 0
    memory_budget: float | None = 12.0
    calibrate: bool = True
    holdout: int | None = None
    layers: Any = None
    layer_order: str = "forward"
    order: str = "gradient"
    group_size: int = 1
    exhaustive: bool = False
    max_candidates: int | None = None
    max_seconds: float | None = None
    time_budget: float | None = 60.0
    passes: int = 1
    min_delta: float = 1e-6
    loss: Any = "sparse_categorical_crossentropy"
    from_logits: bool | None = None
    method: str = "incremental"
    block_size: int = 512
    pairs_per_block: int = 65536
    seed: int = 0
    on_step: Callable | None = None
    verbose: int = 1

    def __post_init__(self):
        _check_choice("layer_order", self.layer_order, LAYER_ORDERS)
        _check_choice("order", self.order, ORDERS)
        _check_choice("method", self.method, METHODS)
        for name in ("group_size", "passes", "block_size", "pairs_per_block"):
            check_int(name, getattr(self, name))
        for name in ("max_candidates", "probe_size", "holdout"):
            check_int(name, getattr(self, name), allow_none=True)
        for name in ("probe_seed", "seed", "verbose"):
            check_int(name, getattr(self, name), lo=0)
        for name in ("exhaustive", "calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.exhaustive and self.group_size > MAX_EXHAUSTIVE:
            raise ValueError(
                f"`group_size` must be <= {MAX_EXHAUSTIVE} with exhaustive=True, got {self.group_size}."
            )
        _check_positive("memory_budget", self.memory_budget)
        _check_positive("max_seconds", self.max_seconds)
        _check_positive("time_budget", self.time_budget)
        if isinstance(self.min_delta, bool) or not (
                isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(f"`min_delta` must be a number >= 0, got {self.min_delta!r}.")
        if self.on_step is not None and not callable(self.on_step):
            raise ValueError(f"`on_step` must be callable or None, got {self.on_step!r}.")
        if self.from_logits is not None and not isinstance(self.from_logits, bool):
            raise ValueError(f"`from_logits` must be a bool or None, got {self.from_logits!r}.")

    @classmethod
    def from_kwargs(cls, options: "GreedyOptions | None" = None, **kwargs) -> "GreedyOptions":
        """``options`` (or the defaults) with ``kwargs`` replaced; unknown names refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kwargs) - names)
        if bad:
            raise ValueError(f"unknown greedy_flip arguments: {bad}")
        if options is not None and not isinstance(options, cls):
            raise ValueError(f"`options` must be a GreedyOptions, got {type(options).__name__}.")
        return dataclasses.replace(options or cls(), **kwargs)


def validate_options(options: dict) -> GreedyOptions:
    """The :class:`GreedyOptions` of ``greedy_flip`` keywords; ``ValueError`` if unknown or
    invalid. Checks what can be checked without a model, so that a run refuses bad
    options before it trains (``kflip train --greedy``, :class:`GreedyFlip`).

    >>> validate_options({"order": "gradient", "max_seconds": 5.0}).max_seconds
    5.0
    >>> validate_options({"order": "bogus"})
    Traceback (most recent call last):
    ...
    ValueError: `order` must be one of ('index', 'random', 'gradient'), got 'bogus'.
    """
    return GreedyOptions.from_kwargs(**options)
