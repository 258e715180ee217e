"""One training run (:func:`_run`: build, compile, fit with the telemetry callbacks,
the result dict) and the ``kflip train`` command (:func:`train`)."""

from __future__ import annotations

import time

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import data as data_lib  # noqa: E402
from kflip.bench.building import (  # noqa: E402
    _defaults_for,
    compiled_model,
    recalibration_data,
    resolve_dataset,
)
from kflip.bench.greedy_search import _greedy_evaluated, _require_greedy  # noqa: E402
from kflip.bench.inputs import _check_train_inputs, _checked_eval_every  # noqa: E402
from kflip.bench.output import _jsonable, _save  # noqa: E402
from kflip.bench.telemetry import (  # noqa: E402
    SignFlipCounter,
    StepTimer,
    TestCurve,
    state_bytes_per_binary_weight,
)
from kflip.binary import assert_binary, binary_variables  # noqa: E402
from kflip.callbacks import FlipRate  # noqa: E402
from kflip.optimizer import FlipLSTM  # noqa: E402


def _run(
    ds: data_lib.Dataset,
    *,
    model: str,
    model_options: dict,
    optimizer: str,
    epochs: int,
    batch_size: int,
    seed: int,
    eval_every: int | None,
    tensorboard_dir: str | None = None,
    verbose: int = 0,
    optimizer_options: dict | None = None,
):
    """Train once; returns (result dict, trained model)."""
    eval_every = _checked_eval_every(ds, epochs, batch_size, seed, eval_every)
    t_start = time.perf_counter()
    tf.keras.backend.clear_session()  # layer names restart, so runs are comparable
    net = compiled_model(ds, model=model, model_options=model_options, optimizer=optimizer,
                         seed=seed, optimizer_options=optimizer_options)
    timer = StepTimer()
    curve = TestCurve(ds.x_test, ds.y_test, eval_every, recalibrate_x=recalibration_data(model, ds))
    counter = SignFlipCounter(eval_every)
    callbacks = _callbacks(net, [timer, curve, counter], tensorboard_dir)
    t_fit = time.perf_counter()
    hist = net.fit(
        ds.x_train,
        ds.y_train,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=verbose,
        callbacks=callbacks,
    )
    fit_seconds = time.perf_counter() - t_fit
    if optimizer == "fliplstm":
        assert_binary(net)
    result = _result(net, ds, hist, timer, curve, counter, optimizer=optimizer, seed=seed,
                     model=model, model_options=model_options, epochs=epochs,
                     batch_size=batch_size, eval_every=eval_every, fit_seconds=fit_seconds,
                     t_start=t_start)
    return result, net


def _callbacks(net, telemetry: list, tensorboard_dir: str | None) -> list:
    """``telemetry``, then :class:`kflip.FlipRate` for FlipLSTM and TensorBoard if asked."""
    callbacks = list(telemetry)
    if isinstance(net.optimizer, FlipLSTM):
        callbacks.append(FlipRate())
    if tensorboard_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=tensorboard_dir))
    return callbacks


def _result(net, ds, hist, timer, curve, counter, *, optimizer, seed, model, model_options,
            epochs, batch_size, eval_every, fit_seconds, t_start) -> dict:
    """The result dict of one run (``history.json``, ``results.json``: keys in this order)."""
    final = curve.curve[-1]
    step_s = timer.steady_state_seconds()
    result = {
        "optimizer": optimizer,
        "seed": int(seed),
        "dataset": ds.name,
        "model": model,
        "model_options": _jsonable(model_options),
        "params": int(net.count_params()),
        "binary_weights": int(sum(int(v.shape.num_elements()) for v in binary_variables(net))),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "steps": int(curve.step),
        "eval_every": int(eval_every),
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "history": _jsonable(hist.history),
        "test_curve": curve.curve,
        "flip_curve": counter.history,
        "flips": counter.totals(),
        "flips_per_step": counter.flips_per_step(),
        "step_ms": None if step_s is None else 1e3 * step_s,
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "state_bytes_per_binary_weight": state_bytes_per_binary_weight(net),
    }
    opt = net.optimizer
    if isinstance(opt, FlipLSTM):  # which LSTM weights (the shipped default can change)
        result["lstm_weights"] = {
            "hidden_size": int(opt.hidden_size),
            "metadata": _jsonable(opt.lstm_weights.metadata),
        }
    return result


def train(
    dataset="digits", *, model: str = "mlp", model_options: dict | None = None,
    optimizer: str = "fliplstm", epochs: int | None = None, batch_size: int = 64,
    seed: int = 0, eval_every: int | None = None, greedy: bool = False,
    greedy_examples: int = 1024, greedy_options: dict | None = None,
    output_dir: str | None = None, tensorboard_dir: str | None = None,
    data_dir: str | None = None, download: bool = False, n_train: int | None = None,
    n_test: int | None = None, bop_threshold: float = 1e-6, bop_gamma: float = 1e-3,
    lstm_weights=None, verbose: int = 1, return_model: bool = False,
):
    """Train one reference BNN with one optimizer (the ``kflip train`` command).

    Args:
      dataset: a name for :func:`kflip.data.load` (``"digits"``, ``"mnist"``, any
        tfds name, or a local ``.npz`` under ``data_dir``) or a ``Dataset``.
      model: ``"mlp"``, ``"cnn"``, ``"binarynet"`` or ``"resnet"``; ``model_options`` go to the
        builder (``hidden``; ``filters``/``dense``; ``width``).
      optimizer: one of :data:`OPTIMIZERS`.
      epochs: default 6 (10 on digits, whose MLP default is ``hidden=(256, 256)``).
      eval_every: evaluate the test set every this many steps (default: about five
        times per epoch).
      greedy: after training, run ``kflip.greedy_flip`` with a probe set of
        ``greedy_examples`` training examples; ``greedy_options`` (keywords of
        ``greedy_flip``) override :data:`GREEDY_DEFAULTS`.
      output_dir: if given, writes ``model.keras`` (loads back with
        ``tf.keras.models.load_model`` after ``import kflip``) and ``history.json``.
      tensorboard_dir: if given, a TensorBoard log dir.

    Returns:
      The run's result dict (also written to ``history.json``), and the model if
      ``return_model``.

    Example: ``bench.train("digits", epochs=1, verbose=0)`` trains the digits MLP with
    FlipLSTM for one epoch and returns its result dict (``"test_accuracy"``,
    ``"test_curve"``, ``"flips"``, ...). Bad options are refused before any training:
      >>> from kflip import bench
      >>> bench.train(greedy=True, greedy_options={"order": "bogus"})
      Traceback (most recent call last):
      ...
      ValueError: `order` must be one of ('index', 'random', 'gradient'), got 'bogus'.
    """
    _check_train_inputs(optimizer, output_dir, tensorboard_dir, lstm_weights, greedy,
                        greedy_examples, greedy_options)
    ds = resolve_dataset(dataset, data_dir, download, n_train, n_test)
    epochs, model_options = _defaults_for(ds, epochs, model, model_options)
    if greedy:
        _require_greedy()
    opt_options = dict(bop_threshold=bop_threshold, bop_gamma=bop_gamma, lstm_weights=lstm_weights)
    result, net = _run(ds, model=model, model_options=model_options, optimizer=optimizer,
                       epochs=epochs, batch_size=batch_size, seed=seed, eval_every=eval_every,
                       tensorboard_dir=tensorboard_dir, verbose=verbose,
                       optimizer_options=opt_options)
    if greedy:
        _add_greedy(result, net, ds, greedy_examples, greedy_options)
    if output_dir:
        result = _save(net, result, output_dir)
    return (result, net) if return_model else result


def _add_greedy(result: dict, net, ds, examples: int, options: dict | None) -> None:
    """The greedy search after training: ``result`` gets ``greedy`` and the test
    accuracy and loss after it (its wall time includes the search)."""
    g, acc, loss = _greedy_evaluated(net, ds, result["test_accuracy"], examples, options)
    g["test_loss_after"] = loss
    result.update(greedy=g, test_accuracy=acc, test_loss=loss)
    result["wall_seconds"] += g["seconds"]
