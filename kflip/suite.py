"""The task suite (``kflip bench --suite``): FlipLSTM against its baselines, cell by cell.

A *cell* is one model trained for one exact number of steps: :data:`MODELS` x
:data:`LENGTHS`. In every cell each optimizer of :data:`OPTIMIZERS` trains on the same
seeds (paired runs); the test set is evaluated ``evals`` times along the way. The
``*-tuned`` baselines pick their hyper-parameters per cell from a small grid on seed 0
with the last 10% (at most 5,000) training examples as a validation set, then run on
every seed. ``held_out`` cells (every ``resnet`` and ``mlp784-256-10`` cell) are
reported apart: keep them out of every decision about FlipLSTM.

Per cell: mean +- std per optimizer; FlipLSTM minus the best baseline as a paired
difference with its 95% t-interval (:mod:`kflip.stats`) and the verdict (win: interval
above 0, loss: below, else tie); the speed-up: the fraction of its steps FlipLSTM needs
to reach that baseline's final mean accuracy on its mean test curve (None if never).
Outputs in ``output_dir``: ``results.json`` (rewritten atomically after each run; a
rerun skips the runs it holds), ``suite.md`` and ``heatmap.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

from kflip import _files, _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import bench, stats  # noqa: E402
from kflip import data as data_lib  # noqa: E402
from kflip.bop2nd import Bop2ndOrder  # noqa: E402
from kflip.cell import load_weights  # noqa: E402
from kflip.suite_report import (cell_json, format_table, format_tables, late_scores,  # noqa: E402,F401
                                plot_heatmap)
from kflip.suite_grid import (  # noqa: E402,F401
    FIXED, LENGTHS, MODELS, OPTIMIZERS, TUNED, ModelSpec, OptSpec, spec as _spec)


BOP2ND_SIGMA = 1e-2
# the steadier score the suite reports besides the final one: mean of the last evaluations
LATE_EVALS = 3
# options a rerun into the same output_dir must keep (else its runs are not comparable)
_FINGERPRINT = ("batch_size", "evals", "val_fraction", "val_max")


def _floats(name: str, values, low: float, high: float = math.inf, low_open=False) -> tuple:
    values = tuple(values)
    ok = bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and (v > low if low_open else v >= low) and v <= high for v in values)
    if not ok:
        raise ValueError(f"`{name}` must be a non-empty list of numbers in "
                         f"{'(' if low_open else '['}{low:g}, {high:g}], got {values!r}.")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    """Everything a suite run depends on; invalid values raise ``ValueError`` naming them.

    ``cells`` filters the cells: each entry a model (``"cnn"``), a length (``"1500"``)
    or one cell (``"cnn@1500"``); a cell runs if a given model, length or cell name
    matches it (models and lengths combine: ``("cnn", "250")`` is the one cell).
    ``seeds``: seeds 0..N-1 in every cell (None: 3, 5 on digits-mlp).
    ``steps_scale`` multiplies every length (quick runs); ``evals`` test evaluations
    per run besides step 0. The grids are the tuned baselines' (Bop2ndOrder's sigma
    is 1e-2). ``runs_per_process``: runs train in a worker process that is replaced
    after this many (None: in this process), so a long suite's memory stays bounded
    (TensorFlow keeps every run's compiled programs).

    Example:
      >>> from kflip.suite import SuiteOptions
      >>> [c.name for c in SuiteOptions(cells=("digits-mlp", "250")).selected_cells()]
      ['digits-mlp@250']
      >>> SuiteOptions(seeds=0)
      Traceback (most recent call last):
      ...
      ValueError: `seeds` must be a positive int, got 0.
    """

    cells: tuple = ()
    seeds: int | None = None
    steps_scale: float = 1.0
    optimizers: tuple = OPTIMIZERS
    batch_size: int = 64
    evals: int = 10
    bop_thresholds: tuple = (1e-8, 1e-7, 1e-6)
    bop_gammas: tuple = (1e-4, 1e-3, 1e-2)
    bop2nd_thresholds: tuple = (1e-7, 1e-6, 1e-5)
    bop2nd_gammas: tuple = (1e-7, 1e-6, 1e-5)
    val_fraction: float = 0.1
    val_max: int = 5000
    lstm_weights: str | None = None
    data_dir: str | None = None
    download: bool = False
    output_dir: str = "kflip-suite"
    plots: bool = True
    runs_per_process: int | None = 20

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if isinstance(self.cells, str) or not all(isinstance(c, (str, int)) for c in self.cells):
            raise ValueError(f"`cells` must be a list of names, got {self.cells!r}.")
        put("cells", tuple(str(c) for c in self.cells))
        if self.seeds is not None:
            bench._check_positive_int("seeds", self.seeds)
        _floats("steps_scale", (self.steps_scale,), 0.0, low_open=True)
        opts = tuple(self.optimizers) if not isinstance(self.optimizers, str) else ()
        bad = [o for o in opts if o not in OPTIMIZERS]
        if not opts or bad or len(set(opts)) != len(opts):
            raise ValueError(f"`optimizers` must be distinct names from {list(OPTIMIZERS)}, "
                             f"got {self.optimizers!r}.")
        put("optimizers", opts)
        if self.runs_per_process is not None:
            bench._check_positive_int("runs_per_process", self.runs_per_process)
        for name in ("batch_size", "evals", "val_max"):
            bench._check_positive_int(name, getattr(self, name))
        _floats("val_fraction", (self.val_fraction,), 0.0, 0.5, low_open=True)
        put("bop_thresholds", _floats("bop_thresholds", self.bop_thresholds, 0.0))
        put("bop_gammas", _floats("bop_gammas", self.bop_gammas, 0.0, 1.0, low_open=True))
        put("bop2nd_thresholds", _floats("bop2nd_thresholds", self.bop2nd_thresholds, 0.0))
        put("bop2nd_gammas", _floats("bop2nd_gammas", self.bop2nd_gammas, 0.0, 1.0, True))
        if self.lstm_weights is not None and "fliplstm" not in opts:
            raise ValueError("`lstm_weights` is only used by fliplstm, which is not in "
                             f"`optimizers` {list(opts)}.")
        if not isinstance(self.output_dir, (str, os.PathLike)):
            raise ValueError(f"`output_dir` must be a path, got {self.output_dir!r}.")
        self.selected_cells()  # unknown cell names

    def selected_cells(self) -> list:
        """The selected :class:`Cell` s, models in :data:`MODELS` order, then lengths."""
        known = set(MODELS) | {str(n) for n in LENGTHS}
        known |= {f"{m}@{n}" for m in MODELS for n in LENGTHS}
        bad = [c for c in self.cells if c not in known]
        if bad:
            raise ValueError(f"`cells` has unknown name(s) {bad}: use a model "
                             f"({', '.join(MODELS)}), a length ({', '.join(map(str, LENGTHS))}) "
                             "or model@length.")
        models = [c for c in self.cells if c in MODELS]
        lengths = [c for c in self.cells if c.isdigit()]
        named = [c for c in self.cells if "@" in c]
        out = []
        for model, length in itertools.product(MODELS, LENGTHS):
            picked = (models or lengths) and (not models or model in models) and (
                not lengths or str(length) in lengths)
            if not self.cells or picked or f"{model}@{length}" in named:
                spec = MODELS[model]
                out.append(Cell(model, length, max(1, round(length * self.steps_scale)),
                                spec.held_out, tuple(range(self.seeds or spec.seeds))))
        return out


class Cell(NamedTuple):
    model: str
    length: int  # nominal steps (the cell's name)
    steps: int  # after steps_scale
    held_out: bool
    seeds: tuple

    @property
    def name(self) -> str:
        return f"{self.model}@{self.length}"


def tuning_grid(options: SuiteOptions, kind: str) -> list:
    """The :class:`OptSpec` s a ``*-tuned`` baseline of ``kind`` chooses from."""
    if kind == "bop":
        return [_spec("bop", threshold=t, gamma=g)
                for t, g in itertools.product(options.bop_thresholds, options.bop_gammas)]
    return [_spec("bop2nd", threshold=t, gamma=g, sigma=BOP2ND_SIGMA)
            for t, g in itertools.product(options.bop2nd_thresholds, options.bop2nd_gammas)]


def make_optimizer(spec: OptSpec, lstm_weights=None):
    """The Keras optimizer for ``spec`` (flip optimizers: Adam 0.01 for float variables)."""
    p = dict(spec.params)
    if spec.kind == "bop":
        return bench.make_optimizer("bop", bop_threshold=p["threshold"], bop_gamma=p["gamma"])
    if spec.kind == "bop2nd":
        return bench.case_optimizer(Bop2ndOrder(**p))
    if spec.kind == "fliplstm":
        return bench.make_optimizer("fliplstm", lstm_weights=lstm_weights)
    return bench.make_optimizer(spec.kind)


# ---- one run ----------------------------------------------------------------------
def _batches(ds: data_lib.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless shuffled batches (reshuffled every epoch), fixed by ``seed``."""
    x, y = tf.constant(ds.x_train), tf.constant(ds.y_train)
    order = tf.data.Dataset.range(len(ds.x_train)).shuffle(
        len(ds.x_train), seed=seed, reshuffle_each_iteration=True)
    return (order.repeat().batch(batch_size, drop_remainder=True)
            .map(lambda i: (tf.gather(x, i), tf.gather(y, i))).prefetch(2))


def train_run(ds, model: ModelSpec, spec: OptSpec, *, steps: int, seed: int,
              batch_size: int = 64, evals: int = 10, lstm_weights=None) -> dict:
    """Train ``steps`` steps exactly; the test accuracy at step 0, every
    ``ceil(steps / evals)`` steps and at the end (``curve``: [step, accuracy] pairs)."""
    t0 = time.perf_counter()
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(int(seed))
    net = bench.build_model(model.builder, ds, **model.options)
    net.compile(optimizer=make_optimizer(spec, lstm_weights),
                loss="sparse_categorical_crossentropy", jit_compile=True)
    timer = bench.StepTimer()
    curve = bench.TestCurve(ds.x_test, ds.y_test, every_n_steps=math.ceil(steps / evals),
                            recalibrate_x=bench.recalibration_data(model.builder, ds))
    net.fit(_batches(ds, batch_size, seed), epochs=1, steps_per_epoch=steps, verbose=0,
            callbacks=[timer, curve])
    step_s = timer.steady_state_seconds()
    return {
        "test_accuracy": curve.curve[-1]["test_accuracy"],
        "test_loss": curve.curve[-1]["test_loss"],
        "curve": [[p["step"], p["test_accuracy"]] for p in curve.curve],
        "step_ms": None if step_s is None else 1e3 * step_s,
        "wall_seconds": time.perf_counter() - t0,
    }


# ---- the run store (results.json, resumable) --------------------------------------
def weights_id(lstm_weights=None) -> str:
    """A hash of the FlipLSTM weights' numbers: a resumed run reuses FlipLSTM runs only
    if the weights (the shipped ones can change) are the same."""
    digest = hashlib.sha256()
    for name, value in sorted(vars(load_weights(lstm_weights)).items()):
        if name != "metadata":
            digest.update(name.encode() + np.asarray(value, np.float64).tobytes())
    return digest.hexdigest()[:12]


def run_key(cell: Cell, spec: OptSpec, seed: int, split: str, weights: str = "") -> str:
    params = ",".join(f"{k}={v:g}" for k, v in spec.params)
    extra = f"|weights={weights}" if spec.kind == "fliplstm" else ""
    return f"{cell.model}|{cell.steps}|{spec.kind}|{params}{extra}|seed{seed}|{split}"


class RunStore:
    """Every run's record, by :func:`run_key`; rewritten to ``path`` after each run."""

    def __init__(self, path: str, options: SuiteOptions):
        self.path, self.options = path, options
        self.records: dict = {}
        self.machines: list = []  # the machines that ran the records loaded
        self.ran = self.skipped = 0
        if os.path.exists(path):
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                old = json.load(f)
            runs = old["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"`output_dir`: {self.path} is not a suite results file ({e}).")
        before = old.get("options", {})
        changed = [k for k in _FINGERPRINT if before.get(k) != getattr(self.options, k)]
        if changed:
            raise ValueError(f"`output_dir` holds a suite run with other {changed}; "
                             "use another output directory.")
        self.records = {r["key"]: r for r in runs}
        self.machines = _machines(old)

    def get(self, key: str, run: Callable[[], dict], **fields) -> dict:
        if key in self.records:
            self.skipped += 1
            return self.records[key]
        record = dict(key=key, **fields, **run())
        self.records[key] = record
        self.ran += 1
        self.save({})
        return record

    def save(self, extra: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        machine = bench.machine_info()
        machines = _unique(self.machines + ([machine] if self.ran else []))
        payload = {"options": dataclasses.asdict(self.options), "machine": machine,
                   "machines": machines, "runs": list(self.records.values()), **extra}
        bench._write_json(payload, self.path)  # temp file + os.replace


def _machines(results: dict) -> list:
    """The machines that ran a results file's runs: its ``machines`` list, or, in a file
    written before that list existed, its ``machine``."""
    if "machines" in results:
        return list(results["machines"])
    return [results["machine"]] if "machine" in results else []


def _unique(items: list) -> list:
    return [x for i, x in enumerate(items) if x not in items[:i]]


def merge_results(paths: Sequence[str], output_dir: str) -> int:
    """Write the runs of several suites' ``results.json`` files into ``output_dir``.

    The files must agree on the options a rerun must keep (batch size, evaluations,
    validation split); a run held by several files is taken from the first. Running
    the suite on ``output_dir`` afterwards (same cells) trains nothing and summarises
    every cell in one table. Returns the number of runs written.
    """
    if not paths:
        raise ValueError("`paths`: give at least one results.json.")
    out = os.path.join(output_dir, "results.json")
    if os.path.exists(out):
        raise ValueError(f"`output_dir`: {out} exists; merge into a new directory.")
    runs, machines, first = {}, [], None
    for path in paths:
        try:
            with open(path) as f:
                d = json.load(f)
            options, records = d["options"], d["runs"]
            fingerprint = {k: options[k] for k in _FINGERPRINT}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"`paths`: {path} is not a suite results file ({e}).")
        first = first or (path, options, fingerprint)
        changed = [k for k in _FINGERPRINT if fingerprint[k] != first[2][k]]
        if changed:
            raise ValueError(f"`paths`: {path} has other {changed} than {first[0]}.")
        for r in records:
            runs.setdefault(r["key"], r)
        machines += _machines(d)
    os.makedirs(output_dir, exist_ok=True)
    payload = {"options": dict(first[1], output_dir=output_dir), "merged_from": list(paths),
               "machines": _unique(machines), "runs": list(runs.values())}
    bench._write_json(payload, out)
    return len(runs)


# ---- statistics of a cell ---------------------------------------------------------
def mean_curve(curves: Sequence) -> tuple:
    """(steps, mean accuracy) over the seeds' curves, at the steps all of them have."""
    common = set.intersection(*({s for s, _ in c} for c in curves))
    steps = sorted(common)
    means = [float(np.mean([dict(map(tuple, c))[s] for c in curves])) for s in steps]
    return steps, means


def speedup(steps: Sequence, accuracy: Sequence, target: float, total: int) -> float | None:
    """The fraction of ``total`` steps at which ``accuracy`` first reaches ``target``
    (linear between evaluations); None if it never does.

    Example:
      >>> from kflip.suite import speedup
      >>> speedup([0, 100, 200, 300, 400], [0.1, 0.5, 0.9, 0.95, 0.96], 0.9, 400)
      0.5
      >>> round(speedup([0, 100, 200], [0.1, 0.6, 0.8], 0.7, 200), 3)  # 100 -> 200, halfway
      0.75
      >>> speedup([0, 100], [0.1, 0.6], 0.7, 100) is None
      True
    """
    for i, (step, acc) in enumerate(zip(steps, accuracy)):
        if acc >= target:
            if i == 0:
                return step / total
            s0, a0 = steps[i - 1], accuracy[i - 1]
            return (s0 + (step - s0) * (target - a0) / (acc - a0)) / total
    return None


class OptimizerRow(NamedTuple):
    label: str
    spec: OptSpec
    accuracies: tuple  # per seed, in the cell's seed order (None: not run)
    mean: float | None
    std: float | None


def row(label: str, spec: OptSpec, accuracies: Sequence) -> OptimizerRow:
    """An optimizer's row of a cell: accuracies per seed (None: not run), mean, std."""
    mean, std = bench._mean_std(accuracies)
    return OptimizerRow(label, spec, tuple(accuracies), mean, std)


class CellResult(NamedTuple):
    cell: Cell
    rows: tuple
    best_baseline: str | None
    difference: stats.Paired | None  # FlipLSTM - best baseline, in points
    speedup: float | None
    tuning: dict  # label -> [(OptSpec, validation accuracy), ...]

    @property
    def verdict(self) -> str | None:
        return None if self.difference is None else self.difference.verdict


def compare_cell(cell: Cell, rows: Sequence[OptimizerRow], curves: Sequence,
                 tuning: dict | None = None) -> CellResult:
    """FlipLSTM against the best baseline by mean: the paired difference over the seeds
    both have and the speed-up from FlipLSTM's mean curve (``curves``: one per seed).

    Example:
      >>> from kflip.suite import Cell, OptimizerRow, compare_cell, FIXED
      >>> cell = Cell("cnn", 250, 250, False, (0, 1, 2))
      >>> rows = [OptimizerRow("fliplstm", FIXED["fliplstm"], (0.97, 0.975, 0.972), 0.9723, 0.0025),
      ...         OptimizerRow("adam-ste", FIXED["adam-ste"], (0.95, 0.96, 0.955), 0.955, 0.005)]
      >>> curves = [[[0, 0.1], [125, 0.96], [250, a]] for a in (0.97, 0.975, 0.972)]
      >>> r = compare_cell(cell, rows, curves)
      >>> r.best_baseline, round(r.difference.mean, 2), r.verdict, round(r.speedup, 2)
      ('adam-ste', 1.73, 'win', 0.5)
    """
    flip = next((r for r in rows if r.label == "fliplstm" and r.mean is not None), None)
    bases = [r for r in rows if r.label != "fliplstm" and r.mean is not None]
    best = max(bases, key=lambda r: r.mean) if bases else None
    difference = fraction = None
    if flip and best:
        pairs = [(a, b) for a, b in zip(flip.accuracies, best.accuracies)
                 if a is not None and b is not None]
        if pairs:
            difference = stats.paired([100 * a for a, _ in pairs], [100 * b for _, b in pairs])
        if curves:
            fraction = speedup(*mean_curve(curves), best.mean, cell.steps)
    return CellResult(cell, tuple(rows), best and best.label, difference, fraction, tuning or {})


# ---- running the suite ------------------------------------------------------------
class _Context(NamedTuple):
    options: SuiteOptions
    store: RunStore
    say: Callable[[str], None]
    weights: str  # weights_id of FlipLSTM's weights
    worker: "_Worker"


class _Worker:
    """Calls ``fn(*args)`` in a worker process replaced after ``runs`` calls (started on
    first use; ``runs=None``: in this process)."""

    def __init__(self, runs: int | None):
        self.runs, self.pool = runs, None

    def __call__(self, fn, *args):
        if self.runs is None:
            return fn(*args)
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=self.runs)
        return self.pool.apply(fn, args)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


_DATASETS: dict = {}  # per process: (name, data_dir, validation split) -> {"test", "val"}


def _dataset(options: SuiteOptions, cell: Cell, split: str) -> data_lib.Dataset:
    name = MODELS[cell.model].dataset
    key = (name, options.data_dir, options.val_fraction, options.val_max)
    if key not in _DATASETS:
        ds = data_lib.digits() if name == "digits" else data_lib.load(
            name, data_dir=options.data_dir, download=options.download)
        n_val = min(options.val_max, int(len(ds.x_train) * options.val_fraction))
        _DATASETS[key] = {"test": ds, "val": ds.validation_split(max(1, n_val))}
    return _DATASETS[key][split]


def _train(options: SuiteOptions, cell: Cell, spec: OptSpec, seed: int, split: str) -> dict:
    """One run (in whichever process calls it)."""
    return train_run(_dataset(options, cell, split), MODELS[cell.model], spec,
                     steps=cell.steps, seed=seed, batch_size=options.batch_size,
                     evals=options.evals if split == "test" else 1,
                     lstm_weights=options.lstm_weights)


def _run(ctx: _Context, cell: Cell, spec: OptSpec, seed: int, split: str) -> dict:
    key = run_key(cell, spec, seed, split, ctx.weights)

    def run():
        ctx.say(f"  {cell.name} {spec.kind} {spec.describe()} seed {seed} ({split}) ...")
        return ctx.worker(_train, ctx.options, cell, spec, seed, split)

    return ctx.store.get(key, run, cell=cell.name, model=cell.model, steps=cell.steps,
                         optimizer=spec.kind, params=dict(spec.params), seed=seed, split=split)


def _tune(ctx: _Context, cell: Cell, kind: str) -> tuple:
    """(best OptSpec, [(OptSpec, validation accuracy)]) on the first seed."""
    runs = [(spec, _run(ctx, cell, spec, cell.seeds[0], "val"))
            for spec in tuning_grid(ctx.options, kind)]
    return best_point(runs), [(spec, r["test_accuracy"]) for spec, r in runs]


def best_point(runs):
    """The spec of the highest validation accuracy; ties (digits' 143 validation images
    score many points alike) go to the lower loss, then to the first in grid order.

    >>> best_point([("a", {"test_accuracy": 1.0, "test_loss": 0.2}),
    ...             ("b", {"test_accuracy": 1.0, "test_loss": 0.1})])
    'b'
    """
    return max(runs, key=lambda r: (r[1]["test_accuracy"], -r[1].get("test_loss", np.inf)))[0]


def run_cell(ctx: _Context, cell: Cell) -> CellResult:
    """Tune, then run every optimizer on every seed of ``cell``; compare."""
    specs, tuning = {}, {}
    for label in ctx.options.optimizers:
        if label in TUNED:
            specs[label], tuning[label] = _tune(ctx, cell, TUNED[label])
        else:
            specs[label] = FIXED[label]
    rows, curves = [], []
    for label, spec in specs.items():
        records = [_run(ctx, cell, spec, seed, "test") for seed in cell.seeds]
        rows.append(row(label, spec, [r["test_accuracy"] for r in records]))
        if label == "fliplstm":
            curves = [r["curve"] for r in records]
    return compare_cell(cell, rows, curves, tuning)


class SuiteResult(NamedTuple):
    options: SuiteOptions
    cells: tuple  # CellResult
    runs: tuple  # every run record in results.json
    ran: int  # runs trained now
    skipped: int  # runs found in results.json
    table: str
    files: dict


def run_suite(options: SuiteOptions | None = None,
              print_fn: Callable[[str], None] | None = print) -> SuiteResult:
    """Run (or continue) the suite; write ``results.json``, ``suite.md``, ``heatmap.png``."""
    options = options or SuiteOptions()
    say = print_fn or (lambda s: None)
    bench.check_run_inputs(optimizers=options.optimizers, output_dir=options.output_dir,
                           lstm_weights=options.lstm_weights)
    cells = options.selected_cells()
    path = os.path.join(os.fspath(options.output_dir), "results.json")
    weights = weights_id(options.lstm_weights) if "fliplstm" in options.optimizers else ""
    worker = _Worker(options.runs_per_process)
    try:
        return _run_cells(_Context(options, RunStore(path, options), say, weights, worker), cells, path)
    finally:
        worker.close()


def _run_cells(ctx: _Context, cells, path) -> SuiteResult:
    options, say = ctx.options, ctx.say
    say(f"kflip suite: {len(cells)} cell(s), optimizers {list(options.optimizers)}"
        + (f", {len(ctx.store.records)} run(s) already in {path}" if ctx.store.records else ""))
    t0 = time.perf_counter()
    results = []
    for i, cell in enumerate(cells):
        say(f"[{i + 1}/{len(cells)}] {cell.name}: {cell.steps} steps, seeds "
            f"{list(cell.seeds)} ({time.perf_counter() - t0:.0f} s elapsed)")
        results.append(run_cell(ctx, cell))
    table, late = format_tables(results), ()
    if options.evals >= LATE_EVALS:
        late = late_scores(results, ctx.store.records, ctx.weights, LATE_EVALS)
        table += "\n\n" + format_tables(late, f"scored by the mean of the last {LATE_EVALS} "
                                         "test evaluations (a check of the verdicts above)")
    files = {"results": path, "table": os.path.join(os.fspath(options.output_dir), "suite.md")}
    with _files.atomic_write(files["table"]) as f:
        f.write(table + "\n")
    if options.plots:
        files["heatmap"] = plot_heatmap(results, os.path.join(options.output_dir, "heatmap.png"))
    ctx.store.save({"cells": [cell_json(r) for r in results], "table": table, "files": files,
                    "late_cells": [dict(cell_json(r), late_evals=LATE_EVALS) for r in late]})
    say(table)
    say(f"{ctx.store.ran} run(s) trained, {ctx.store.skipped} reused; wrote "
        + ", ".join(files.values()))
    return SuiteResult(options, tuple(results), tuple(ctx.store.records.values()),
                       ctx.store.ran, ctx.store.skipped, table, files)
