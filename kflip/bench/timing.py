"""Steady-state train-step times of compiled models, measured round-robin."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.bench.building import _defaults_for, compiled_model, resolve_dataset  # noqa: E402
from kflip.bench.checks import _check_positive_int  # noqa: E402
from kflip.bench.optimizers import OPTIMIZERS  # noqa: E402


def time_train_steps(
    models: dict, x, y, *, steps: int = 20, rounds: int = 10
) -> dict:
    """Steady-state seconds per training step of already-trained, compiled models.

    Reuses each model's compiled (XLA) train function on one fixed batch, after two
    warm-up calls. The optimizers are timed round-robin (``rounds`` rounds of
    ``steps`` steps each, the starting model rotating) so a machine whose load
    changes over time affects them alike; every step is timed on its own (its
    outputs are fetched, so it has finished) and the median over all
    ``rounds * steps`` steps is returned per key, which discounts steps that lost the
    CPU to other processes. Note: this trains the models further.

    Example: ``time_train_steps({"bop": net_a, "fliplstm": net_b}, x, y)`` with models
    from :func:`compiled_model` returns ``{"bop": seconds, "fliplstm": seconds}``.
      >>> from kflip import bench
      >>> bench.time_train_steps({}, None, None, steps=0)
      Traceback (most recent call last):
      ...
      ValueError: `steps` must be a positive int, got 0.
    """
    _check_positive_int("steps", steps)
    _check_positive_int("rounds", rounds)
    names = list(models)
    fns, its = {}, {}
    for name in names:
        m = models[name]
        its[name] = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        fns[name] = m.make_train_function()
        for _ in range(2):
            _sync(fns[name](its[name]))
    per = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, it = fns[name], its[name]
            for _ in range(steps):
                t0 = time.perf_counter()
                _sync(fn(it))
                per[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in per.items()}


def step_times(
    dataset="digits",
    *,
    model: str = "mlp",
    model_options: dict | None = None,
    optimizers: Sequence[str] = OPTIMIZERS,
    batch_size: int = 64,
    steps: int = 20,
    rounds: int = 10,
    data_dir: str | None = None,
    bop_threshold: float = 1e-6,
    bop_gamma: float = 1e-3,
    lstm_weights=None,
) -> dict:
    """Only the step-time part of :func:`bench`, on fresh (untrained) models.

    Returns ``{"step_ms": {name: ms}, "rel_bop": {name: ratio}}`` (``rel_bop`` only
    if ``"bop"`` is among ``optimizers``).

    Example: ``bench.step_times(optimizers=["bop", "fliplstm"])`` times both on the
    digits MLP (not run here: it compiles and trains a model per optimizer).
      >>> from kflip import bench
      >>> bench.step_times(optimizers=["sgd"])
      Traceback (most recent call last):
      ...
      ValueError: `optimizer` must be one of ['adam-ste', 'bop', 'fliplstm-gradient',
      'fliplstm'], got 'sgd'.
    """
    ds = resolve_dataset(dataset, data_dir)
    _, model_options = _defaults_for(ds, 1, model, model_options)
    opt_options = dict(bop_threshold=bop_threshold, bop_gamma=bop_gamma, lstm_weights=lstm_weights)
    nets = {
        name: compiled_model(
            ds, model=model, model_options=model_options, optimizer=name,
            optimizer_options=opt_options,
        )
        for name in optimizers
    }
    secs = time_train_steps(
        nets, ds.x_train[:batch_size], ds.y_train[:batch_size], steps=steps, rounds=rounds
    )
    out = {"step_ms": {k: 1e3 * v for k, v in secs.items()}}
    if "bop" in secs:
        out["rel_bop"] = {k: v / secs["bop"] for k, v in secs.items()}
    return out


def _sync(out):
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
