"""The ``kflip bench`` driver: every optimizer and seed trained in turn (with progress
and a partial ``results.json`` after each run), greedy rows, step timing, the results."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from kflip import data as data_lib
from kflip import stats
from kflip.bench import training
from kflip.bench.building import _defaults_for, compiled_model, resolve_dataset
from kflip.bench.greedy_search import (
    GREEDY_SUFFIX,
    _greedy_evaluated,
    greedy_module,
    greedy_options_with_defaults,
)
from kflip.bench.inputs import _checked_bench_inputs
from kflip.bench.optimizers import FLIP_OPTIMIZERS, OPTIMIZERS
from kflip.bench.output import _jsonable, _write_partial, _write_results, machine_info
from kflip.bench.summary import _print_report, format_table, summarize
from kflip.bench.timing import time_train_steps


class _Progress:
    """``[k/N] what ... elapsed, ~left`` before each of ``total`` runs (mean run time so far)."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.say = total, say
        self.finished = 0
        self.t0 = time.perf_counter()

    def start(self, what: str) -> None:
        elapsed = time.perf_counter() - self.t0
        left = ""
        if self.finished:
            eta = elapsed / self.finished * (self.total - self.finished)
            left = f", about {_duration(eta)} left"
        self.say(f"[{self.finished + 1}/{self.total}] {what} ... ({_duration(elapsed)} elapsed{left})")

    def done(self) -> None:
        self.finished += 1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@dataclasses.dataclass
class _Bench:
    """One :func:`bench` call, its arguments checked: the runs, their timing, the results."""

    ds: data_lib.Dataset
    say: Callable[[str], None]
    optimizers: list
    seeds: list
    model: str
    model_options: dict
    epochs: int
    batch_size: int
    eval_every: int | None
    output_dir: str | None
    greedy_examples: int
    greedy_options: dict | None
    bop_threshold: float
    bop_gamma: float
    lstm_weights: object
    command: str | None
    notes: list = dataclasses.field(default_factory=list)
    runs: list = dataclasses.field(default_factory=list)
    timing_models: dict = dataclasses.field(default_factory=dict)
    opt_options: dict = dataclasses.field(init=False)  # the keywords of make_optimizer
    do_greedy: list = dataclasses.field(init=False)  # optimizers that get a greedy row
    config: dict = dataclasses.field(init=False)
    t_bench: float = dataclasses.field(init=False)

    def __post_init__(self):
        self.opt_options = dict(bop_threshold=self.bop_threshold, bop_gamma=self.bop_gamma,
                                lstm_weights=self.lstm_weights)

    def train_all(self, greedy_after: list) -> None:
        """Every optimizer x seed (+ the greedy rows of ``greedy_after``), in order."""
        self.do_greedy = self._greedy_rows(greedy_after)
        self.config = self._config()
        ds = self.ds
        self.say(
            f"kflip bench: {ds.name} ({len(ds.x_train)} train / {len(ds.x_test)} test), "
            f"model {self.model} {self.model_options or ''}, {self.epochs} epochs, "
            f"batch {self.batch_size}, seeds {self.seeds}, optimizers {self.optimizers}"
        )
        self.t_bench = time.perf_counter()
        progress = _Progress(len(self.optimizers) * len(self.seeds), self.say)
        for name in self.optimizers:
            for seed in self.seeds:
                greedy = " (+greedy)" if name in self.do_greedy else ""
                progress.start(f"{name} seed {seed}{greedy}")
                net = self._train(name, seed)
                progress.done()
                if seed == self.seeds[0]:
                    self.timing_models[name] = net
                if self.output_dir:  # keep finished runs if the bench is interrupted
                    _write_partial(self.config, self.runs, self.output_dir)

    def _greedy_rows(self, greedy_after: list) -> list:
        do_greedy = [n for n in greedy_after if n in self.optimizers]
        if do_greedy and greedy_module() is None:
            self.notes.append(
                "greedy rows skipped: kflip.greedy is not available in this version of kflip."
            )
            self.say("note: " + self.notes[-1])
            do_greedy = []
        return do_greedy

    def _config(self) -> dict:
        ds, do_greedy = self.ds, self.do_greedy
        return {
            "dataset": ds.name,
            "dataset_source": ds.source,
            "n_train": int(len(ds.x_train)),
            "n_test": int(len(ds.x_test)),
            "model": self.model,
            "model_options": _jsonable(self.model_options),
            "optimizers": self.optimizers,
            "greedy_after": do_greedy,
            "greedy_examples": self.greedy_examples,
            "greedy_options": _jsonable(
                greedy_options_with_defaults(self.greedy_options, self.greedy_examples)
                if do_greedy
                else {}
            ),
            "seeds": [int(s) for s in self.seeds],
            "epochs": int(self.epochs),
            "batch_size": int(self.batch_size),
            "eval_every": self.eval_every,
            "bop_threshold": self.bop_threshold,
            "bop_gamma": self.bop_gamma,
            "lstm_weights": None if self.lstm_weights is None else str(self.lstm_weights),
            "jit_compile": True,
            "command": self.command,
        }

    def _train(self, name: str, seed):
        """One run (and its greedy row), appended to ``runs``; returns the trained model."""
        result, net = training._run(  # looked up on the module, where tests patch it
            self.ds,
            model=self.model,
            model_options=self.model_options,
            optimizer=name,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=seed,
            eval_every=self.eval_every,
            verbose=0,
            optimizer_options=self.opt_options,
        )
        self.runs.append(result)
        self.say(
            f"  {name:<18} seed {seed}: test accuracy {100 * result['test_accuracy']:.2f}%"
            f"  ({result['wall_seconds']:.1f} s, {result['flips_per_step']:.1f} flips/step)"
        )
        if name in self.do_greedy:
            g, acc, loss = _greedy_evaluated(net, self.ds, result["test_accuracy"],
                                             self.greedy_examples, self.greedy_options)
            self.runs.append(
                dict(
                    result,
                    optimizer=name + GREEDY_SUFFIX,
                    test_accuracy=acc,
                    test_loss=loss,
                    wall_seconds=result["wall_seconds"] + g["seconds"],
                    greedy=g,
                )
            )
            self.say(
                f"  {name + GREEDY_SUFFIX:<18} seed {seed}: test accuracy "
                f"{100 * acc:.2f}%  (greedy {g['seconds']:.1f} s)"
            )
        return net

    def step_seconds(self, timing_steps: int, timing_rounds: int) -> dict:
        """:func:`time_train_steps` on the seed-``seeds[0]`` models (+ a fresh Bop model)."""
        if "bop" not in self.timing_models:
            self.timing_models["bop"] = compiled_model(
                self.ds, model=self.model, model_options=self.model_options, optimizer="bop",
                seed=self.seeds[0], optimizer_options=self.opt_options,
            )
            self.notes.append(
                "bop was not benchmarked; a fresh Bop model was compiled to time its step."
            )
        self.say(
            f"  timing train steps round-robin ({timing_rounds} x {timing_steps} steps each) ..."
        )
        x_b, y_b = self.ds.x_train[: self.batch_size], self.ds.y_train[: self.batch_size]
        return time_train_steps(
            self.timing_models, x_b, y_b, steps=timing_steps, rounds=timing_rounds
        )

    def results(self, step_seconds: dict) -> dict:
        """The dict :func:`bench` returns (``files`` still empty)."""
        rows = summarize(self.runs, step_seconds)
        table = format_table(rows)
        comparison = stats.compare_runs(self.runs, reference="bop")
        return {
            "config": self.config,
            "machine": machine_info(),
            "runs": self.runs,
            "summary": rows,
            "table": table,
            "paired_vs_bop": comparison,
            "step_seconds": step_seconds,
            "notes": self.notes,
            "bench_seconds": time.perf_counter() - self.t_bench,
            "files": {},
        }


def bench(
    dataset="digits", *, model: str = "mlp", model_options: dict | None = None,
    optimizers: Sequence[str] = OPTIMIZERS, greedy_after: Sequence[str] = FLIP_OPTIMIZERS,
    seeds=2, epochs: int | None = None, batch_size: int = 64, eval_every: int | None = None,
    output_dir: str | None = "kflip-bench", plots: bool = True, timing_steps: int = 20,
    timing_rounds: int = 10, greedy_examples: int = 1024, greedy_options: dict | None = None,
    data_dir: str | None = None, download: bool = False, n_train: int | None = None,
    n_test: int | None = None, bop_threshold: float = 1e-6, bop_gamma: float = 1e-3,
    lstm_weights=None, verbose: int = 1, print_fn: Callable[[str], None] | None = print,
    command: str | None = None,
) -> dict:
    """Same model, data, epochs and seeds under every optimizer (``kflip bench``).

    For each optimizer in ``optimizers`` and each seed: train (see :func:`train`),
    record final test accuracy, the test-accuracy-vs-step curve, sign flips per
    layer, wall time and measured optimizer-state bytes per binary weight. Optimizers
    in ``greedy_after`` get an extra row ``<name>+greedy``: the same trained model
    after one greedy flip search (skipped, with a note, if ``kflip.greedy`` is
    missing). Then the seed-``seeds[0]`` models are timed round-robin
    (:func:`time_train_steps`) for the step time relative to Bop (a Bop model is
    trained for one epoch just for timing if ``"bop"`` is not benchmarked).

    Args:
      seeds: number of seeds (``0..n-1``) or a list of seeds.
      output_dir: where ``results.json`` and the PNG plots go (None: write nothing).
      print_fn: progress and the final table go here (None: silent).
      (others as in :func:`train`)

    Returns:
      ``{"config", "machine", "runs", "summary", "table", "step_seconds", "notes",
      "files"}``.

    Example: ``bench.bench()`` (the ``kflip bench`` command) runs the full comparison
    on digits and writes ``kflip-bench/``; that takes a few minutes, so here only its
    argument checks:
      >>> from kflip import bench
      >>> bench.bench(optimizers=["bop", "bop"])
      Traceback (most recent call last):
      ...
      ValueError: `optimizers` has duplicates: ['bop', 'bop'].
    """
    say = print_fn or (lambda s: None)
    optimizers, greedy_after, seeds = _checked_bench_inputs(
        optimizers, greedy_after, seeds, timing_steps=timing_steps, timing_rounds=timing_rounds,
        output_dir=output_dir, lstm_weights=lstm_weights, greedy_examples=greedy_examples,
        greedy_options=greedy_options)
    ds = resolve_dataset(dataset, data_dir, download, n_train, n_test)
    epochs, model_options = _defaults_for(ds, epochs, model, model_options)
    run = _Bench(ds, say, optimizers, seeds, model=model, model_options=model_options,
                 epochs=epochs, batch_size=batch_size, eval_every=eval_every,
                 output_dir=output_dir, greedy_examples=greedy_examples,
                 greedy_options=greedy_options, bop_threshold=bop_threshold,
                 bop_gamma=bop_gamma, lstm_weights=lstm_weights, command=command)
    run.train_all(greedy_after)
    results = run.results(run.step_seconds(timing_steps, timing_rounds))
    _write_results(results, output_dir, plots)
    _print_report(results, say)
    return results
