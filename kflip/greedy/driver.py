"""``greedy_flip``: probe data, layer selection, evaluators, budgets, holdout check."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.greedy import probe as probe_lib  # noqa: E402
from kflip.greedy.calibrate import Calibrator  # noqa: E402
from kflip.greedy.evaluators import NaiveEvaluator  # noqa: E402
from kflip.greedy.head import HeadEvaluator  # noqa: E402
from kflip.greedy.incremental import IncrementalEvaluator  # noqa: E402
from kflip.greedy.network import Network  # noqa: E402
from kflip.greedy.ops import sum64  # noqa: E402
from kflip.greedy.options import GreedyOptions  # noqa: E402
from kflip.greedy.progress import Progress  # noqa: E402
from kflip.greedy.report import GreedyReport, LayerReport  # noqa: E402
from kflip.greedy.search import search_layer  # noqa: E402
from kflip.greedy.suffix import SuffixEvaluator  # noqa: E402


def select_layers(net: Network, layers):
    """Op indices of the binary kernels named by ``layers`` (None: all), in model order."""
    binary = [i for i in net.linear if net.ops[i].binary]
    if layers is None:
        return binary
    if isinstance(layers, (str, int)) or isinstance(layers, tf.keras.layers.Layer):
        layers = [layers]
    chosen = []
    for spec in layers:
        if isinstance(spec, tf.keras.layers.Layer):
            match = [i for i in binary if net.ops[i].layer is spec]
        elif isinstance(spec, str):
            match = [i for i in binary if net.ops[i].name == spec]
        elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            match = [binary[spec]] if -len(binary) <= spec < len(binary) else []
        else:
            match = []
        if not match:
            names = [net.ops[i].name for i in binary]
            raise ValueError(f"`layers`: {spec!r} is not a binary layer of the model (binary layers: {names}).")
        if match[0] not in chosen:
            chosen.append(match[0])
    return sorted(chosen)


def make_evaluator(net: Network, p: int, x, y, options: GreedyOptions):
    """The evaluator ``options.method`` asks for, for the kernel of op ``p``."""
    if options.method == "naive":
        return NaiveEvaluator(net, p, x, y)
    if IncrementalEvaluator.applies(net, p):
        return IncrementalEvaluator(net, p, x, y, options.pairs_per_block)
    if HeadEvaluator.applies(net, p):
        return HeadEvaluator(net, p, x, y)
    return SuffixEvaluator(net, p, x, y)


class _Holdout:
    """The mean loss on the holdout set with the model's current weights."""

    def __init__(self, net, data):
        self.x, self.y = data
        self.n = int(self.x.shape[0])
        self.fn = net.jit(lambda t, yy: sum64(net.per_example_loss(net.forward(t), yy)))

    def __call__(self):
        return float(self.fn(self.x, self.y)) / self.n


def _prepare(model, x, y, options):
    net = Network(model, options.loss, options.from_logits)
    chosen = select_layers(net, options.layers)
    if not chosen:
        raise ValueError("`model` has no binary (precision 1) QuantDense/QuantConv2D kernels.")
    probe_lib.check_kernels(net, chosen)
    size = options.probe_size
    cap = probe_lib.max_examples(probe_lib.bytes_per_example(net, chosen), options.memory_budget)
    if cap is not None:
        size = cap if size is None else min(size, cap)
    (xp, yp), held = probe_lib.probe_sets(x, y, size, options.holdout, options.probe_seed)
    expected = tuple(model.input_shape[1:])
    if tuple(xp.shape[1:]) != expected:
        raise ValueError(f"`x` examples have shape {tuple(xp.shape[1:])}, the model expects {expected}.")
    probe_lib.check_classes(model, options.loss, yp)
    if held is not None:
        probe_lib.check_classes(model, options.loss, held[1])
    return net, chosen[::-1] if options.layer_order == "backward" else chosen, (xp, yp), held


def _deadline(options, t0, now, left):
    """This layer's deadline: its own limit and its share of the remaining budget."""
    ends = []
    if options.max_seconds is not None:
        ends.append(now + options.max_seconds)
    if options.time_budget is not None:
        ends.append(now + max(0.0, t0 + options.time_budget - now) / left)
    return min(ends) if ends else None


def _search(net, p, ev, pass_index, options, rng, deadline, progress, calibrate, holdout):
    """One layer search with the temperature refit before it and the holdout check after
    it (the layer is reverted unless its flips lowered the holdout loss)."""
    temperature = calibrate() if calibrate is not None else None
    w_before = tf.convert_to_tensor(net.ops[p].var)
    h_before = holdout() if holdout is not None else None
    rep = search_layer(ev, pass_index, options, rng, deadline, progress)
    rep.temperature = temperature
    if holdout is not None:
        rep.holdout_before, rep.holdout_after = h_before, holdout()
        if rep.accepted and not rep.holdout_after < h_before:
            net.ops[p].var.assign(w_before)
            rep.reverted, rep.holdout_after, rep.loss_after = True, h_before, rep.loss_before
    return rep


@dataclasses.dataclass
class _Run:
    """One ``greedy_flip`` call: what every layer search needs, and the reports so far."""

    net: Network
    options: GreedyOptions
    x: tf.Tensor
    y: tf.Tensor
    t0: float
    progress: Progress
    rng: np.random.RandomState
    calibrate: Calibrator | None
    holdout: _Holdout | None
    evaluators: dict = dataclasses.field(default_factory=dict)  # compiled, reused across passes
    reports: list = dataclasses.field(default_factory=list)

    def layer(self, p, left, pass_index):
        """Search op ``p``'s kernel with its share of the time left (``left`` layers to go);
        a layer with no time left is not started."""
        options = self.options
        deadline = _deadline(options, self.t0, time.perf_counter(), left)
        if self.reports and deadline is not None and time.perf_counter() >= deadline:
            rep = _skipped(self.net.ops[p], pass_index, self.reports[-1].loss_after, options.group_size)
        else:
            if p not in self.evaluators:
                self.evaluators[p] = make_evaluator(self.net, p, self.x, self.y, options)
            rep = _search(self.net, p, self.evaluators[p], pass_index, options, self.rng, deadline,
                          self.progress, self.calibrate, self.holdout)
        self.reports.append(rep)
        return rep


def greedy_flip(model, x, y=None, *, options: GreedyOptions | None = None, **kwargs) -> GreedyReport:
    """Greedy flip search on the binary kernels of ``model`` (modified in place).

    Layer by layer, every candidate (one binary weight or a group of one output unit) is
    flipped in a preset order and kept iff the mean probe loss drops by more than
    ``min_delta``. The keywords are the fields of :class:`GreedyOptions` (or pass
    ``options=``); by default one pass in gradient order, 16,384 probe examples, the
    probe loss's temperature refit per layer, at most 60 s in all, a progress bar and
    a summary line (``verbose=0``: silent).

    Args:
      model: a built Sequential or functional tf.keras model (residual ``Add``
        shortcuts included) of larq ``QuantDense``/``QuantConv2D`` and
        BatchNorm/pooling/Flatten/Activation layers. Binary kernels (larq
        ``precision == 1``) must hold exactly +-1 (see :func:`kflip.snap_binary_weights`).
      x, y: the probe data: arrays, or ``x`` a batched ``tf.data.Dataset`` of ``(x, y)``
        (its first examples) and ``y=None``.
      options, **kwargs: see :class:`GreedyOptions`.

    Returns:
      A :class:`GreedyReport`; on any exception (``KeyboardInterrupt`` included) the
      model is left as after the last accepted flip.

    Example:
      >>> import kflip
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(8,))
      >>> _ = kflip.snap_binary_weights(model)
      >>> report = kflip.greedy_flip(model, ds.x_train, ds.y_train, probe_size=64,
      ...                            time_budget=2.0, verbose=0)
      >>> type(report).__name__, report.probe_size, len(report.layers)
      ('GreedyReport', 64, 2)
      >>> report.loss_after <= report.loss_before  # only improving flips are kept
      True
      >>> kflip.assert_binary(model)
    """
    options = GreedyOptions.from_kwargs(options, **kwargs)
    net, chosen, (xp, yp), held = _prepare(model, x, y, options)
    run = _Run(net, options, xp, yp, time.perf_counter(), Progress(options.verbose),
               np.random.RandomState(options.seed),
               Calibrator(net, xp, yp) if options.calibrate and net.temperature else None,
               _Holdout(net, held) if held is not None else None)
    for pass_index in range(options.passes):
        reps = [run.layer(p, len(chosen) - k, pass_index) for k, p in enumerate(chosen)]
        if not any(r.accepted and not r.reverted for r in reps):
            break
    report = _report(options, run.reports, xp, held, time.perf_counter() - run.t0)
    run.progress.done(report)
    return report


def _skipped(lin, pass_index, loss, group_size):
    """The report of a layer the time budget left no time for: not started (no caches
    built, nothing tried), the probe loss carried over."""
    return LayerReport(name=lin.name, pass_index=pass_index, candidates=-(-lin.fan_in // group_size) * lin.units,
                       tried=0,
                       accepted=0, flipped=0, loss_before=loss, loss_after=loss, seconds=0.0,
                       stop_reason="time_budget")


def _report(options, reports, xp, held, seconds) -> GreedyReport:
    kept = [r for r in reports if not r.reverted]
    return GreedyReport(
        method=options.method, probe_size=int(xp.shape[0]), tried=sum(r.tried for r in reports),
        accepted=sum(r.accepted for r in kept), flipped=sum(r.flipped for r in kept),
        loss_before=reports[0].loss_before, loss_after=reports[-1].loss_after,
        seconds=seconds, layers=reports, holdout_size=0 if held is None else int(held[0].shape[0]),
    )
