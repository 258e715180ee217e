"""The outer loop of meta-training over a typed :class:`MetaState`.

Each iteration: the estimator proposes points, a pool of workers trains a task at
each (:mod:`kflip.meta.unroll`), the estimator turns the meta-losses into a gradient,
and :class:`kflip.adam.Adam` takes a step. Every ``eval_every`` iterations the mean
weights are scored on fixed validation tasks; the output is the best of those (the
initialisation included). A checkpoint is the state written as JSON (no pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from kflip import _files
from kflip import cell as cell_lib
from kflip._version import __version__
from kflip.adam import Adam, AdamState
from kflip.meta import config as config_lib
from kflip.meta.config import MetaConfig
from kflip.meta.estimators import AntitheticES, GradientEstimator


@dataclasses.dataclass
class MetaState:
    """Everything the outer loop carries from one iteration to the next."""

    config: dict
    iteration: int
    z: np.ndarray  # the meta-parameters, in units of the coordinate scales
    adam: AdamState  # the outer Adam's state over z
    best: dict | None = None  # best validation entry so far, with its weights "x"
    curve: list = dataclasses.field(default_factory=list)
    val_curve: list = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0

    @classmethod
    def start(cls, config: MetaConfig, size: int) -> "MetaState":
        z = np.zeros(size)
        return cls(config.to_dict(), 0, z, AdamState(0, np.zeros(size), np.zeros(size)))

    def to_json(self) -> dict:
        adam = {"m": self.adam.mu.tolist(), "v": self.adam.nu.tolist(), "t": self.adam.count}
        return dict(dataclasses.asdict(self), z=self.z.tolist(), adam=adam)

    @classmethod
    def from_json(cls, d: dict) -> "MetaState":
        a = d["adam"]
        adam = AdamState(int(a["t"]), np.asarray(a["m"], np.float64), np.asarray(a["v"], np.float64))
        fields = {k: d[k] for k in ("config", "iteration", "best", "curve", "val_curve")}
        return cls(**fields, z=np.asarray(d["z"], np.float64), adam=adam,
                   elapsed_s=float(d["elapsed_s"]))


def save_checkpoint(path: str, state: MetaState) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename).

    >>> import os, tempfile
    >>> from kflip.meta import MetaConfig, MetaState, load_checkpoint, save_checkpoint
    >>> config = MetaConfig()
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.json")
    >>> save_checkpoint(path, MetaState.start(config, size=13))
    >>> state = load_checkpoint(path, config)  # plain JSON, checked against config
    >>> state.iteration, state.z.shape, state.adam.count
    (0, (13,), 0)
    """
    _files.write_json(path, state.to_json(), indent=None)


def load_checkpoint(path: str, config: MetaConfig) -> MetaState:
    """The state saved at ``path``; its config must be ``config`` (``iterations`` aside)."""
    try:
        with open(path) as fh:
            state = MetaState.from_json(json.load(fh))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"`checkpoint` {path!r} is not a kflip meta-training checkpoint ({e}).") from e
    saved, mine = dict(state.config), config.to_dict()
    saved.pop("iterations"), mine.pop("iterations")
    if saved != mine:
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        raise ValueError(
            f"`resume`: checkpoint {path} was made with a different config "
            f"(differs in {diff}); use the same options or another --checkpoint."
        )
    state.config = config.to_dict()
    return state


# ---- evaluation (in-process or in a worker pool) --------------------------------------
_WORKER = {}


def _init_worker(hidden_size, beta, eps, threads=1):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from kflip.meta import unroll

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised in this process
        pass
    _WORKER["evaluator"] = unroll.Evaluator(hidden_size, beta, eps)
    _WORKER["tasks"] = {}


class Job(NamedTuple):
    """One inner run: LSTM weights ``vec`` on task ``key``, trained ``horizon`` steps."""

    vec: np.ndarray
    key: tuple
    horizon: int
    n_train: int
    bucketed: bool = False  # pad the batch table (tasks of many lengths)
    baseline_loss: float | None = None  # subtract this (the baseline rule's meta-loss)


def _evaluate(job: Job) -> dict:
    from kflip.meta import tasks

    cache, evaluate = _WORKER["tasks"], _WORKER["evaluator"]
    tkey = (tuple(job.key), job.horizon, job.n_train)
    if tkey not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[tkey] = tasks.make_task(*job.key, job.horizon, job.n_train)
    result = evaluate(job.vec, cache[tkey], job.bucketed)
    if job.baseline_loss is None:
        return result
    raw = result["meta_loss"]
    return dict(result, raw_meta_loss=raw, meta_loss=raw - job.baseline_loss)


def _cost(job: Job) -> float:
    """Relative cost of a job: its steps times its family's measured time per step."""
    from kflip.meta import tasks

    return job.horizon * tasks.STEP_MS.get(job.key[0], 10.0)


class _Runner:
    """Evaluates jobs in this process (``workers=1``) or in a spawned pool."""

    def __init__(self, workers: int, hidden_size: int, beta: float, eps: float):
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            os.environ["TF_USE_LEGACY_KERAS"] = "1"
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(hidden_size, beta, eps))
        else:
            _init_worker(hidden_size, beta, eps)

    def map(self, jobs):
        """The results of ``jobs``, in order; the costliest are started first, so the
        workers finish together (each result depends on its job alone)."""
        if self.pool is None:
            return [_evaluate(j) for j in jobs]
        order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
        done = self.pool.map(_evaluate, [jobs[i] for i in order], chunksize=1)
        results = [None] * len(jobs)
        for i, r in zip(order, done):
            results[i] = r
        return results

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


# ---- one run -----------------------------------------------------------------------
class _Trainer:
    """The fixed parts of a run: coordinates, estimator, validation tasks, workers."""

    def __init__(self, config: MetaConfig, runner: _Runner, estimator: GradientEstimator | None):
        from kflip.meta import unroll

        self.config = config
        self.w0 = config_lib.initial_weights(config)
        self.x0 = unroll.flatten(self.w0, config.tensor_features or self.w0.conditioned)
        mask = config_lib.trainable_mask(config)  # a conditioned init's extra block: frozen
        self.mask = np.concatenate([mask, np.zeros(len(self.x0) - len(mask))])
        self.scales = self.mask * config_lib.coordinate_scales(
            self.x0, config.zero_scale, config.tensor_scale, config.hidden_size)
        self.val_keys = config_lib.validation_tasks(config)
        self.estimator = estimator or AntitheticES(config, self.mask)
        self.adam = Adam(config.learning_rate, eps=1e-8)
        self.runner = runner
        base = config_lib.baseline_weights(config)
        self.baseline = None if base is None else unroll.flatten(base).astype(np.float32)
        self._baseline_losses = {}  # task key -> the baseline rule's meta-loss on it

    def to_x(self, z: np.ndarray) -> np.ndarray:
        """LSTM weight vector of the outer coordinates ``z``."""
        return self.x0 + self.scales * z

    def _job(self, x, key, baseline_loss=None) -> Job:
        c = self.config
        return Job(np.asarray(x, np.float32), key, config_lib.task_horizon(c, key),
                   c.train_examples, bool(c.min_horizon), baseline_loss)

    def _map(self, xs, keys):
        if self.baseline is None:
            return self.runner.map([self._job(x, k) for x, k in zip(xs, keys)])
        new = list(dict.fromkeys(tuple(k) for k in keys if tuple(k) not in self._baseline_losses))
        for k, r in zip(new, self.runner.map([self._job(self.baseline, k) for k in new])):
            self._baseline_losses[k] = r["meta_loss"]  # the baseline is fixed: once per task
        return self.runner.map([self._job(x, k, self._baseline_losses[tuple(k)])
                                for x, k in zip(xs, keys)])

    def validate(self, state: MetaState, iteration: int) -> dict:
        x = self.to_x(state.z)
        res = self._map([x] * len(self.val_keys), self.val_keys)
        mean = lambda key: float(np.mean([r[key] for r in res]))  # noqa: E731
        entry = {"iteration": iteration, "val_meta_loss": mean("meta_loss"),
                 "val_accuracy": mean("held_out_accuracy"),
                 "val_flip_fraction": mean("flip_fraction")}
        state.val_curve.append(entry)
        if state.best is None or entry["val_meta_loss"] < state.best["val_meta_loss"]:
            state.best = dict(entry, x=x.tolist())
        return entry

    def estimate(self, z: np.ndarray, iteration: int):
        """(gradient, proposal, results): the estimate at ``z`` from ``iteration``'s draws."""
        proposal = self.estimator.propose(z, iteration)
        res = self._map([self.to_x(p) for p in proposal.points], proposal.tasks)
        grad = self.estimator.gradient(proposal, np.array([r["meta_loss"] for r in res]))
        return grad, proposal, res

    def step(self, state: MetaState) -> dict:
        """One outer iteration on ``state`` (in place); returns its log entry."""
        t0, it = time.time(), state.iteration
        grad, proposal, res = self.estimate(state.z, it)
        state.z, state.adam = self.adam.update(grad, state.adam, state.z)
        state.iteration = it + 1
        entry = {
            "iteration": it + 1,
            "meta_loss": float(np.mean([r["meta_loss"] for r in res])),
            "held_out_accuracy": float(np.mean([r["held_out_accuracy"] for r in res])),
            "flip_fraction": float(np.mean([r["flip_fraction"] for r in res])),
            "grad_norm": float(np.linalg.norm(grad)),
            "tasks": [list(k) for k in proposal.tasks[0::2]],
            "seconds": time.time() - t0,
        }
        if (it + 1) % self.config.eval_every == 0 or it + 1 == self.config.iterations:
            entry.update(self.validate(state, it + 1))
        state.curve.append({k: v for k, v in entry.items() if k != "tasks"})
        return entry


@contextlib.contextmanager
def _session(config: MetaConfig, workers: int, estimator: GradientEstimator | None = None):
    """A :class:`_Trainer` of ``config`` whose worker pool is closed on leaving."""
    w0 = config_lib.initial_weights(config)
    runner = _Runner(workers, config.hidden_size, w0.beta, w0.eps)
    try:
        yield _Trainer(config, runner, estimator)
    finally:
        runner.close()


def _check_run(config, workers, checkpoint_every, resume, checkpoint, max_minutes) -> MetaConfig:
    config = config or MetaConfig()
    if not isinstance(config, MetaConfig):
        raise ValueError(f"`config` must be a MetaConfig, got {type(config).__name__}.")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be a positive int, got {workers!r}.")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be a positive int, got {checkpoint_every!r}.")
    if resume and not checkpoint:
        raise ValueError("`resume=True` needs a `checkpoint` path.")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"`max_minutes` must be > 0 or None, got {max_minutes!r}.")
    return config


def meta_train(
    config: MetaConfig | None = None,
    *,
    out: str | None = None,
    log: str | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 5,
    resume: bool = False,
    workers: int = 2,
    max_minutes: float | None = None,
    quiet: bool = True,
    estimator: GradientEstimator | None = None,
) -> cell_lib.LSTMWeights:
    """Meta-train the LSTM weights; returns the best :class:`kflip.LSTMWeights`.

    Args:
      config: :class:`MetaConfig` (default: the documented default run).
      out: write the weights to this ``.npz`` (+ ``.json`` metadata).
      log: append one JSON line per iteration (meta-losses, timing) to this file.
      checkpoint: checkpoint file (JSON), written every ``checkpoint_every``
        iterations and at the end.
      resume: continue from ``checkpoint`` (its config must equal ``config``, except
        ``iterations``, which may grow).
      workers: processes evaluating the population (1: in this process).
      max_minutes: stop early (checkpointed, output written) after this long. A run
        stopped by the clock is not reproducible by iteration count alone.
      quiet: no progress bar.
      estimator: a :class:`kflip.meta.estimators.GradientEstimator`; default
        :class:`~kflip.meta.estimators.AntitheticES` of ``config``.

    Example (a few seconds; the shipped weights took ``MetaConfig()``):

    >>> import kflip
    >>> from kflip.meta import MetaConfig, meta_train
    >>> tiny = MetaConfig(iterations=1, pairs=1, horizon=5, train_examples=64,
    ...                   families=("mlp-32",), val_tasks=1, eval_every=1)
    >>> weights = meta_train(tiny, workers=1)
    >>> weights.metadata["iterations_done"]
    1
    """
    config = _check_run(config, workers, checkpoint_every, resume, checkpoint, max_minutes)
    for path in (out, log, checkpoint):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _session(config, workers, estimator) as trainer:
        state = MetaState.start(config, len(trainer.x0))
        if resume and os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint, config)
        if log:
            _truncate_log(log, state.iteration)
        _loop(trainer, state, log, checkpoint, checkpoint_every, max_minutes, quiet)
    weights = _output(trainer, state, workers)
    if out:
        weights.save(out)
    return weights


def gradient_agreement(config: MetaConfig | None = None, *, draws: int = 4,
                       workers: int = 2) -> np.ndarray:
    """Cosines between ``draws`` independent gradient estimates at the start point.

    Draw ``i`` is what iteration ``i`` of :func:`meta_train` would estimate at the
    config's initial weights (``config.pairs`` pairs, each on its own task; draw 0 is
    the run's first step). If each estimate is the true gradient plus independent
    noise, the mean cosine between two draws estimates the squared cosine between
    one draw and the true gradient: near 0, a step follows noise; near 1, signal.
    Returns the ``[draws, draws]`` matrix (1 on the diagonal).

    >>> from kflip.meta import MetaConfig, gradient_agreement
    >>> tiny = MetaConfig(pairs=2, horizon=5, train_examples=64, families=("mlp-32",))
    >>> cos = gradient_agreement(tiny, draws=2, workers=1)
    >>> cos.shape, bool(abs(cos[0, 1]) <= 1)
    ((2, 2), True)
    """
    config = _check_run(config, workers, 1, False, None, None)
    if not isinstance(draws, int) or draws < 2:
        raise ValueError(f"`draws` must be an int >= 2, got {draws!r}.")
    with _session(config, workers) as trainer:
        grads = [trainer.estimate(np.zeros(len(trainer.x0)), i)[0] for i in range(draws)]
    unit = np.array([g / max(np.linalg.norm(g), 1e-300) for g in grads])
    return unit @ unit.T


def _loop(trainer: _Trainer, state: MetaState, log, checkpoint, every, max_minutes, quiet):
    config = trainer.config
    bar = _progress(config.iterations, state.iteration, quiet)
    t_start, elapsed0 = time.time(), state.elapsed_s

    def save():
        state.elapsed_s = elapsed0 + time.time() - t_start
        if checkpoint:
            save_checkpoint(checkpoint, state)

    try:
        if state.iteration == 0 and not state.val_curve:
            trainer.validate(state, 0)
        while state.iteration < config.iterations:
            entry = trainer.step(state)
            if log:
                with open(log, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.set_postfix(meta_loss=f"{entry['meta_loss']:.3f}",
                                best_val=f"{state.best['val_meta_loss']:.3f}")
                bar.update(1)
            if state.iteration % every == 0:
                save()
            if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
                if state.iteration < config.iterations and (
                    state.val_curve[-1]["iteration"] != state.iteration
                ):
                    trainer.validate(state, state.iteration)
                break
        save()
    finally:
        if bar is not None:
            bar.close()


def _output(trainer: _Trainer, state: MetaState, workers: int) -> cell_lib.LSTMWeights:
    """The best validated weights, with everything about the run in their metadata."""
    from kflip.meta import unroll

    config, best = trainer.config, state.best
    metadata = {
        "init": config.init,
        "learned": True,
        "description": (
            "FlipLSTM weights meta-trained with antithetic ES on BNN training tasks "
            "(scikit-learn digits variants and teacher-student data; no MNIST)."
        ),
        "kflip_version": __version__,
        "config": config.to_dict(),
        "seed": config.seed,
        "data": {
            "datasets": list(config.datasets),
            "families": list(config.families),
            "note": "digits = sklearn.datasets.load_digits (rendered at 28x28 for the "
            "784-input families); teacher = Gaussian inputs labelled by a random binary "
            "d-32-10 network. MNIST never used.",
            "validation_tasks": [list(k) for k in trainer.val_keys],
            "steps_per_task": (
                f"log-uniform in [{config.min_horizon}, {config.horizon}]"
                if config.min_horizon else f"{config.horizon}"
            ),
            "meta_loss": "relative to Bop's on the same task" if trainer.baseline is not None
            else "absolute",
        },
        "iterations_done": state.iteration,
        "stopped_early": bool(state.iteration < config.iterations),
        "best_iteration": best["iteration"],
        "best_val_meta_loss": best["val_meta_loss"],
        "init_val_meta_loss": state.val_curve[0]["val_meta_loss"],
        "meta_training_time_s": float(state.elapsed_s),
        "workers": workers,
        "meta_loss_curve": [
            {k: e[k] for k in ("iteration", "meta_loss", "held_out_accuracy", "flip_fraction")}
            for e in state.curve
        ],
        "val_curve": state.val_curve,
        "initial_weights": trainer.w0.get_config() | {"metadata": trainer.w0.metadata},
    }
    return unroll.unflatten(best["x"], config.hidden_size, like=trainer.w0, metadata=metadata)


def _progress(total, initial, quiet):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="meta-train", unit="it", file=sys.stderr)


def _truncate_log(path, iteration):
    """Keep only log lines of iterations <= ``iteration`` (for an exact resume)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line)["iteration"] <= iteration:
                    keep.append(line)
            except (ValueError, KeyError):
                continue
    with _files.atomic_write(path) as fh:
        fh.writelines(keep)
