"""What ``train`` and ``bench`` refuse before any training: arguments that would fail
(or be ignored) only after it, each error naming its argument."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np

from kflip.bench.checks import _check_output_dir, _check_positive_int
from kflip.bench.greedy_search import greedy_module, greedy_options_with_defaults
from kflip.bench.optimizers import OPTIMIZERS
from kflip.bench.telemetry import default_eval_every
from kflip.cell import load_weights


def check_run_inputs(
    *,
    optimizers,
    output_dir=None,
    lstm_weights=None,
    greedy: bool = False,
    greedy_examples: int = 1024,
    greedy_options: dict | None = None,
) -> None:
    """Refuse, before any training, what would otherwise fail (or be ignored) after it.

    Example:
      >>> from kflip import bench
      >>> bench.check_run_inputs(optimizers=["fliplstm"], greedy=True)  # fine: None
      >>> bench.check_run_inputs(optimizers=["bop"], lstm_weights="default")
      Traceback (most recent call last):
      ...
      ValueError: `lstm_weights` is only used by fliplstm optimizers, not by ['bop'].
    """
    if output_dir is not None:
        _check_output_dir(os.fspath(output_dir))
    if lstm_weights is not None:
        if not any(name.startswith("fliplstm") for name in optimizers):
            raise ValueError(
                f"`lstm_weights` is only used by fliplstm optimizers, not by {list(optimizers)}."
            )
        load_weights(lstm_weights)
    if greedy:
        module = greedy_module()
        if module is not None:
            module.validate_options(greedy_options_with_defaults(greedy_options, greedy_examples))


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (needed for ``tensorboard_dir``).

    Example:
      >>> from kflip import bench
      >>> isinstance(bench.tensorboard_available(), bool)
      True
    """
    return importlib.util.find_spec("tensorboard") is not None


def _check_train_inputs(optimizer, output_dir, tensorboard_dir, lstm_weights, greedy,
                        greedy_examples, greedy_options) -> None:
    """:func:`kflip.bench.train`'s checks before it loads any data."""
    if tensorboard_dir and not tensorboard_available():
        raise ValueError(
            "`tensorboard_dir` needs the tensorboard package, which is not installed "
            "(pip install tensorboard)."
        )
    check_run_inputs(
        optimizers=[optimizer],
        output_dir=output_dir,
        lstm_weights=lstm_weights,
        greedy=greedy,
        greedy_examples=greedy_examples,
        greedy_options=greedy_options,
    )


def _checked_bench_inputs(optimizers, greedy_after, seeds, *, timing_steps, timing_rounds,
                          output_dir, lstm_weights, greedy_examples, greedy_options):
    """:func:`kflip.bench.bench`'s checks before it loads any data; returns
    ``(optimizers, greedy_after, seeds)`` as lists (``seeds`` an int n: ``0..n-1``)."""
    optimizers = list(optimizers)
    if not optimizers:
        raise ValueError("`optimizers` must name at least one optimizer.")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"`optimizers` entries must be in {list(OPTIMIZERS)}, got {name!r}.")
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"`optimizers` has duplicates: {optimizers!r}.")
    greedy_after = list(greedy_after or [])
    for name in greedy_after:
        if name not in OPTIMIZERS:
            raise ValueError(f"`greedy_after` entries must be in {list(OPTIMIZERS)}, got {name!r}.")
    seeds = _seed_list(seeds)
    _check_positive_int("timing_steps", timing_steps)
    _check_positive_int("timing_rounds", timing_rounds)
    check_run_inputs(
        optimizers=optimizers,
        output_dir=output_dir,
        lstm_weights=lstm_weights,
        greedy=any(n in optimizers for n in greedy_after),
        greedy_examples=greedy_examples,
        greedy_options=greedy_options,
    )
    return optimizers, greedy_after, seeds


def _seed_list(seeds) -> list:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        _check_positive_int("seeds", seeds)
        return list(range(int(seeds)))
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        raise ValueError(f"`seeds` must be a positive int or distinct ints >= 0, got {seeds!r}.")
    return seeds


def _checked_eval_every(ds, epochs, batch_size, seed, eval_every) -> int:
    """One run's checks; returns ``eval_every`` (default: about five per epoch)."""
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
    steps_per_epoch = math.ceil(len(ds.x_train) / batch_size)
    if eval_every is None:
        eval_every = default_eval_every(steps_per_epoch)
    _check_positive_int("eval_every", eval_every)
    return eval_every
