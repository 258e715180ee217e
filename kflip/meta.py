"""Meta-training of FlipLSTM's coordinatewise LSTM ("learning to learn").

The LSTM weights that decide flip / no flip for every binary weight are themselves
learned, on a distribution of tiny BNN training problems (:mod:`kflip.meta_tasks`;
no MNIST), with the real hard flips ``theta <- theta * sign(y)`` in the inner loop.

Outer method: antithetic evolution strategies (ES). The inner loss is a step
function of the LSTM weights (a flip either happens or not), so it has no useful
gradient; ES needs none: it estimates the gradient of the *smoothed* meta-loss
``E_eps[L(w + sigma * eps)]`` from meta-loss values only, and every member is
trained and scored with exactly the flips FlipLSTM makes at run time. Details:

* ``pairs`` antithetic pairs ``w +- sigma * eps`` per iteration; both members of a
  pair train on the *same* task, data order and initial kernels (common random
  numbers), so their difference measures the rule, not the task;
* centred-rank fitness shaping over the population, Adam on the ES gradient;
* coordinates of the LSTM that read the raw (not scale-free) gradient feature are
  frozen at their initial value (``train_raw_feature=False``, the default): the
  raw gradient scale differs between tiny meta-training nets and MNIST-size nets,
  the per-tensor normalised feature does not;
* every ``eval_every`` iterations the current mean weights are scored on a fixed set
  of held-out validation tasks (seeds never used for training); the output is the
  best of those, the initialisation included (iteration 0), so meta-training cannot
  return a rule that is worse than its starting point on the validation tasks.

Meta-loss of one inner run (lower is better): mean over all ``horizon`` steps of
``log(training minibatch loss)`` plus ``log(held-out loss)`` at the end.

The inner loop is one ``tf.function(jit_compile=True)``; a pool of ``workers``
processes (spawn, one TF thread each) evaluates the population. Everything is
deterministic given ``seed``: perturbations and tasks come from
``numpy.random.default_rng([seed, iteration])`` and results are reduced in a fixed
order, so ``workers`` does not change the result.

CLI (wired as ``kflip meta-train``)::

    kflip meta-train --out kflip/weights/default.npz --seed 0

Python::

    w = kflip.meta.meta_train(kflip.meta.MetaConfig(iterations=100), out="w.npz")
    opt = kflip.FlipLSTM(weights="w.npz")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Sequence

import numpy as np

from kflip import _keras

_keras.select_keras2()

from kflip import cell as cell_lib  # noqa: E402
from kflip import meta_tasks  # noqa: E402
from kflip._version import __version__  # noqa: E402

INITS = ("bop-normalized", "bop")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Everything that determines a meta-training run (recorded in the output).

    Attributes:
      iterations: ES iterations (outer steps).
      pairs: antithetic pairs per iteration (population = ``2 * pairs``).
      sigma: ES perturbation scale, relative: coordinate ``i`` of the LSTM weights is
        ``w0[i] + s[i] * z[i]`` with ``s[i] = |w0[i]|`` (1 where ``w0[i] = 0``), and
        ES perturbs and Adam updates ``z``. So ``sigma=0.1`` moves Bop's threshold
        by ~10% and its momentum time constant by a factor ~e^0.7.
      learning_rate: Adam step size on ``z``.
      horizon: inner training steps per task (batch 64).
      train_examples: training-set size of every task (held-out: 512).
      hidden_size: LSTM hidden size (state per binary weight: ``8 * hidden_size`` B).
      families: architecture families to sample (:data:`kflip.meta_tasks.FAMILIES`).
      family_weights: sampling probabilities of ``families`` (normalised).
      datasets: dataset variants to sample (:data:`kflip.meta_tasks.DATASETS`).
      init: ``"bop-normalized"`` (Bop on the per-tensor normalised gradient, scale 1)
        or ``"bop"`` (the analytic raw-gradient Bop of :func:`kflip.bop_weights`), or a
        path to an ``.npz`` of LSTM weights.
      init_threshold, init_gamma: Bop threshold and momentum rate of the init.
      train_raw_feature: also meta-train the weights reading the raw gradient.
      train_gate_inputs: also meta-train the input weights of the input, forget and
        output gates. Off by default: gates that read no input are evaluated once per
        step (trace-time constants), which keeps FlipLSTM's step as cheap as Bop's.
      zero_scale: ES scale ``s[i]`` of coordinates that start at 0 (see ``sigma``).
        1 suits the normalised init; the raw-gradient init lives at the scale of
        ``scale * threshold`` (~1e-8) and needs a small value.
      val_tasks: number of fixed validation tasks for model selection.
      eval_every: score the mean weights on the validation tasks every this many
        iterations.
      seed: seed of everything.
    """

    iterations: int = 8
    pairs: int = 8
    sigma: float = 0.1
    learning_rate: float = 0.05
    horizon: int = 4000
    train_examples: int = 24576
    hidden_size: int = 1
    families: tuple = ("mlp784-256-256",)
    family_weights: tuple = (1.0,)
    datasets: tuple = meta_tasks.DATASETS
    init: str = "bop"
    init_threshold: float = 1e-6
    init_gamma: float = 1e-3
    train_raw_feature: bool = True
    train_gate_inputs: bool = False
    zero_scale: float = 1e-7
    val_tasks: int = 6
    eval_every: int = 2
    seed: int = 0

    def __post_init__(self):
        def pos_int(name):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")

        for name in ("iterations", "pairs", "horizon", "train_examples", "hidden_size", "val_tasks", "eval_every"):
            pos_int(name)
        if self.train_examples < meta_tasks.BATCH_SIZE:
            raise ValueError(f"`train_examples` must be >= {meta_tasks.BATCH_SIZE}, got {self.train_examples}.")
        for name in ("sigma", "learning_rate", "zero_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {v!r}.")
        object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "family_weights", tuple(float(w) for w in self.family_weights))
        if not self.families:
            raise ValueError("`families` must not be empty.")
        for f in self.families:
            meta_tasks._check_choice("families", f, meta_tasks.FAMILIES)
        if not self.datasets:
            raise ValueError("`datasets` must not be empty.")
        for d in self.datasets:
            meta_tasks._check_choice("datasets", d, meta_tasks.DATASETS)
        if len(self.family_weights) != len(self.families) or not all(
            w >= 0 and math.isfinite(w) for w in self.family_weights
        ) or sum(self.family_weights) <= 0:
            raise ValueError(
                f"`family_weights` must be {len(self.families)} non-negative numbers "
                f"with a positive sum (one per family), got {self.family_weights!r}."
            )
        if self.init not in INITS and not os.path.exists(os.path.splitext(self.init)[0] + ".npz"):
            raise ValueError(f"`init` must be one of {INITS} or an existing .npz, got {self.init!r}.")
        if not self.init_threshold >= 0:
            raise ValueError(f"`init_threshold` must be >= 0, got {self.init_threshold!r}.")
        if not 0 < self.init_gamma < 1:
            raise ValueError(f"`init_gamma` must be in (0, 1), got {self.init_gamma!r}.")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {self.seed!r}.")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ---- initialisation, masks, ES maths (pure numpy) -----------------------------------
def initial_weights(config: MetaConfig) -> cell_lib.LSTMWeights:
    if config.init == "bop-normalized":
        w = cell_lib.bop_weights(config.init_threshold, config.init_gamma, normalized=True, scale=1.0)
    elif config.init == "bop":
        w = cell_lib.bop_weights(config.init_threshold, config.init_gamma)
    else:
        w = cell_lib.LSTMWeights.load(config.init)
    if w.hidden_size > config.hidden_size:
        raise ValueError(
            f"`hidden_size`={config.hidden_size} is smaller than the init's {w.hidden_size}."
        )
    return w.padded(config.hidden_size)


def trainable_mask(config: MetaConfig) -> np.ndarray:
    """1 for meta-trained coordinates of the flat vector, 0 for frozen ones."""
    h = config.hidden_size
    mask = np.ones(meta_tasks.num_params(h))
    kernel = mask[: len(cell_lib.FEATURES) * 4 * h].reshape(len(cell_lib.FEATURES), 4, h)  # a view
    if not config.train_raw_feature:
        kernel[cell_lib.FEATURES.index("theta_grad")] = 0.0  # kernel row of the raw feature
    if not config.train_gate_inputs:  # only the candidate reads the features
        cand = cell_lib.GATES.index("candidate")
        kernel[:, [g for g in range(len(cell_lib.GATES)) if g != cand]] = 0.0
    return mask


def coordinate_scales(w0_flat: np.ndarray, zero_scale: float = 1.0) -> np.ndarray:
    """``s[i] = |w0[i]|`` (``zero_scale`` where 0): the natural scale of each coordinate."""
    s = np.abs(np.asarray(w0_flat, np.float64))
    return np.where(s > 0, s, float(zero_scale))


def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` scaled to [-0.5, 0.5] (ties broken by position; deterministic)."""
    x = np.asarray(x, np.float64).ravel()
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return ranks / max(len(x) - 1, 1) - 0.5


def es_gradient(loss_plus, loss_minus, eps, sigma: float) -> np.ndarray:
    """Antithetic ES estimate of the gradient of the smoothed loss.

    ``loss_plus[i]``/``loss_minus[i]`` are the losses at ``w +- sigma * eps[i]``. The
    losses are replaced by their centred ranks over the whole population first.
    """
    loss_plus, loss_minus = np.asarray(loss_plus, np.float64), np.asarray(loss_minus, np.float64)
    n = len(loss_plus)
    r = centered_ranks(np.concatenate([loss_plus, loss_minus]))
    diff = r[:n] - r[n:]
    return (diff[:, None] * np.asarray(eps, np.float64)).sum(0) / (n * sigma)


class Adam:
    """Plain numpy Adam (state is three arrays and a step count: easy to checkpoint)."""

    def __init__(self, lr: float, size: int, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = np.zeros(size)
        self.v = np.zeros(size)
        self.t = 0

    def step(self, x, grad):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        mh = self.m / (1 - self.b1**self.t)
        vh = self.v / (1 - self.b2**self.t)
        return x - self.lr * mh / (np.sqrt(vh) + self.eps)


# ---- task sampling -----------------------------------------------------------------
def sample_tasks(config: MetaConfig, rng: np.random.Generator, n: int, parity: int) -> list:
    """``n`` task keys ``(family, dataset, seed)``; seeds have the given parity
    (training tasks even, validation tasks odd, so the two sets never overlap)."""
    p = np.asarray(config.family_weights) / sum(config.family_weights)
    fam = rng.choice(len(config.families), size=n, p=p)
    ds = rng.integers(0, len(config.datasets), size=n)
    seeds = rng.integers(0, 2**30, size=n) * 2 + parity
    return [(config.families[f], config.datasets[d], int(s)) for f, d, s in zip(fam, ds, seeds)]


def validation_tasks(config: MetaConfig) -> list:
    rng = np.random.default_rng([config.seed, 2**31 - 1])
    # round-robin over families so every family is validated
    keys = sample_tasks(config, rng, config.val_tasks, parity=1)
    return [(config.families[i % len(config.families)], d, s) for i, (_, d, s) in enumerate(keys)]


def iteration_draws(config: MetaConfig, iteration: int, size: int):
    """Perturbations ``[pairs, size]`` and one task key per pair for ``iteration``."""
    rng = np.random.default_rng([config.seed, iteration])
    eps = rng.standard_normal((config.pairs, size))
    tasks = sample_tasks(config, rng, config.pairs, parity=0)
    return eps, tasks


# ---- evaluation (in-process or in a worker pool) --------------------------------------
_WORKER = {}


def _init_worker(hidden_size, beta, eps, threads=1):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised in this process
        pass
    _WORKER["evaluator"] = meta_tasks.Evaluator(hidden_size, beta, eps)
    _WORKER["tasks"] = {}


def _evaluate(job):
    vec, key, horizon, n_train = job
    cache = _WORKER["tasks"]
    task = cache.get((key, horizon, n_train))
    if task is None:
        if len(cache) > 64:
            cache.clear()
        task = cache[(key, horizon, n_train)] = meta_tasks.make_task(*key, horizon, n_train)
    return _WORKER["evaluator"](vec, task)


class _Runner:
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
        if self.pool is None:
            return [_evaluate(j) for j in jobs]
        return self.pool.map(_evaluate, jobs, chunksize=1)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


# ---- checkpoints -------------------------------------------------------------------
def _save_checkpoint(path, state):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, path)


def _progress(total, initial, quiet):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="meta-train", unit="it", file=sys.stderr)


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
) -> cell_lib.LSTMWeights:
    """Meta-train the LSTM weights with ES; returns the best :class:`LSTMWeights`.

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
    """
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

    for path in (out, log, checkpoint):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w0 = initial_weights(config)
    x0 = meta_tasks.flatten(w0)
    size = len(x0)
    mask = trainable_mask(config)
    scales = coordinate_scales(x0, config.zero_scale) * mask
    val_keys = validation_tasks(config)

    state = None
    if resume and os.path.exists(checkpoint):
        with open(checkpoint) as fh:
            state = json.load(fh)
        saved = dict(state["config"])
        mine = config.to_dict()
        saved.pop("iterations"), mine.pop("iterations")
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(
                f"`resume`: checkpoint {checkpoint} was made with a different config "
                f"(differs in {diff}); use the same options or another --checkpoint."
            )
    if state is None:
        state = {
            "config": config.to_dict(),
            "iteration": 0,
            "z": [0.0] * size,
            "adam": {"m": [0.0] * size, "v": [0.0] * size, "t": 0},
            "best": None,
            "curve": [],
            "val_curve": [],
            "elapsed_s": 0.0,
        }
    state["config"] = config.to_dict()
    z = np.asarray(state["z"], np.float64)
    to_x = lambda z: x0 + scales * z  # noqa: E731
    adam = Adam(config.learning_rate, size)
    adam.m, adam.v, adam.t = (
        np.asarray(state["adam"]["m"]),
        np.asarray(state["adam"]["v"]),
        int(state["adam"]["t"]),
    )
    if log:
        _truncate_log(log, state["iteration"])

    runner = _Runner(workers, config.hidden_size, w0.beta, w0.eps)
    bar = _progress(config.iterations, state["iteration"], quiet)
    t_start = time.time()
    elapsed0 = float(state["elapsed_s"])

    def validate(it):
        x = to_x(z)
        res = runner.map([(x.astype(np.float32), k, config.horizon, config.train_examples) for k in val_keys])
        loss = float(np.mean([r["meta_loss"] for r in res]))
        acc = float(np.mean([r["held_out_accuracy"] for r in res]))
        flips = float(np.mean([r["flip_fraction"] for r in res]))
        entry = {"iteration": it, "val_meta_loss": loss, "val_accuracy": acc, "val_flip_fraction": flips}
        state["val_curve"].append(entry)
        if state["best"] is None or loss < state["best"]["val_meta_loss"]:
            state["best"] = dict(entry, x=x.tolist())
        return entry

    def save_ckpt():
        state["z"] = z.tolist()
        state["adam"] = {"m": adam.m.tolist(), "v": adam.v.tolist(), "t": adam.t}
        state["elapsed_s"] = elapsed0 + time.time() - t_start
        if checkpoint:
            _save_checkpoint(checkpoint, state)

    try:
        if state["iteration"] == 0 and not state["val_curve"]:
            validate(0)
        stopped_early = False
        while state["iteration"] < config.iterations:
            it = state["iteration"]
            t_it = time.time()
            eps, keys = iteration_draws(config, it, size)
            eps = eps * mask
            jobs = []
            for i, key in enumerate(keys):
                for sgn in (1.0, -1.0):
                    jobs.append((to_x(z + sgn * config.sigma * eps[i]).astype(np.float32), key,
                                 config.horizon, config.train_examples))
            res = runner.map(jobs)
            lp = np.array([r["meta_loss"] for r in res[0::2]])
            lm = np.array([r["meta_loss"] for r in res[1::2]])
            grad = es_gradient(lp, lm, eps, config.sigma) * mask
            z = adam.step(z, grad)
            state["iteration"] = it + 1
            entry = {
                "iteration": it + 1,
                "meta_loss": float(np.mean(np.concatenate([lp, lm]))),
                "held_out_accuracy": float(np.mean([r["held_out_accuracy"] for r in res])),
                "flip_fraction": float(np.mean([r["flip_fraction"] for r in res])),
                "grad_norm": float(np.linalg.norm(grad)),
                "tasks": [list(k) for k in keys],
                "seconds": time.time() - t_it,
            }
            if (it + 1) % config.eval_every == 0 or it + 1 == config.iterations:
                entry.update(validate(it + 1))
            state["curve"].append({k: v for k, v in entry.items() if k != "tasks"})
            if log:
                with open(log, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.set_postfix(meta_loss=f"{entry['meta_loss']:.3f}", best_val=f"{state['best']['val_meta_loss']:.3f}")
                bar.update(1)
            if (it + 1) % checkpoint_every == 0:
                save_ckpt()
            if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
                stopped_early = state["iteration"] < config.iterations
                if stopped_early and state["val_curve"][-1]["iteration"] != state["iteration"]:
                    validate(state["iteration"])
                break
        save_ckpt()
    finally:
        runner.close()
        if bar is not None:
            bar.close()

    best = state["best"]
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
            "validation_tasks": [list(k) for k in val_keys],
        },
        "iterations_done": state["iteration"],
        "stopped_early": bool(state["iteration"] < config.iterations),
        "best_iteration": best["iteration"],
        "best_val_meta_loss": best["val_meta_loss"],
        "init_val_meta_loss": state["val_curve"][0]["val_meta_loss"],
        "meta_training_time_s": float(state["elapsed_s"]),
        "workers": workers,
        "meta_loss_curve": [
            {k: e[k] for k in ("iteration", "meta_loss", "held_out_accuracy", "flip_fraction")}
            for e in state["curve"]
        ],
        "val_curve": state["val_curve"],
        "initial_weights": w0.get_config() | {"metadata": w0.metadata},
    }
    weights = meta_tasks.unflatten(best["x"], config.hidden_size, like=w0, metadata=metadata)
    if out:
        d = os.path.dirname(os.path.abspath(out))
        os.makedirs(d, exist_ok=True)
        weights.save(out)
    return weights


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
    with open(path, "w") as fh:
        fh.writelines(keep)


# ---- looking at a rule ---------------------------------------------------------------
def decision_map(weights: cell_lib.LSTMWeights, features, cells, grad_std: float = 1.0):
    """LSTM output ``y`` for one step from state ``(h, c)``, over a grid.

    ``features``: values of the normalised feature ``theta * g / rms(g)``; the raw
    feature is ``grad_std`` times that value (i.e. ``rms(g) = grad_std``). ``cells``:
    previous cell state ``c`` (for hidden size 1; extra units start at 0), with
    ``h = o * tanh(c)`` taken at the bias-only output gate. Returns ``y`` of shape
    ``[len(cells), len(features)]``; the weight flips where ``y < 0``.
    """
    import tensorflow as tf

    f = np.asarray(features, np.float32)
    cs = np.asarray(cells, np.float32)
    X, C = np.meshgrid(f, cs)
    cell = cell_lib.CellTensors.from_weights(weights)
    hdim = weights.hidden_size
    c = np.zeros(X.shape + (hdim,), np.float32)
    c[..., 0] = C
    o = 1.0 / (1.0 + np.exp(-weights.bias[3 * hdim]))
    h = (o * np.tanh(c)).astype(np.float32)
    raw = tf.constant(X * np.float32(grad_std))
    y, _, _ = cell_lib.lstm_cell(cell, [raw, tf.constant(X)], tf.constant(h), tf.constant(c))
    return y.numpy()


def flip_probability(
    weights: cell_lib.LSTMWeights, means, steps: int = 1000, trials: int = 2000, seed: int = 0,
    grad_std: float = 1.0,
):
    """Probability that a weight flips at least once within ``steps`` steps.

    Gradients are i.i.d. ``grad_std * N(mean, 1)`` per step in a fixed frame, the weight starts
    at +1 (so ``mean > 0`` means flipping lowers the loss), and the rule runs exactly
    as in FlipLSTM (:func:`kflip.cell.flip_step`, per-tensor normalisation over the
    ``trials`` coordinates). Returns an array like ``means``.
    """
    import tensorflow as tf

    cell = cell_lib.CellTensors.from_weights(weights)
    hdim = weights.hidden_size

    @tf.function(jit_compile=True)
    def run(mu, noise):
        def body(t, theta, h, c, v, flipped):
            g = grad_std * (mu + noise[t])
            r = cell_lib.flip_step(cell, theta, g, h, c, v, tf.cast(t + 1, tf.float32),
                                   beta=weights.beta, eps=weights.eps)
            return t + 1, theta * r.sign, r.h, r.c, r.v, tf.logical_or(flipped, r.sign < 0)

        init = (tf.constant(0), tf.ones([trials]), tf.zeros([trials, hdim]),
                tf.zeros([trials, hdim]), tf.zeros([]), tf.zeros([trials], tf.bool))
        out = tf.while_loop(lambda t, *_: t < steps, body, init)
        return tf.reduce_mean(tf.cast(out[-1], tf.float32))

    rng = np.random.default_rng(seed)
    noise = tf.constant(rng.standard_normal((steps, trials)).astype(np.float32))
    return np.array([float(run(tf.constant(mu, tf.float32), noise)) for mu in np.asarray(means)])


def plot_rule(rules: dict, path: str, steps: int = 1000, trials: int = 1000, grad_std: float = 1.0) -> None:
    """Figure: decision maps (flip where ``y < 0``) and flip probability vs gradient
    mean, one column per named rule in ``rules`` (name -> LSTMWeights).

    ``grad_std`` is the gradient scale the rules are shown at (it matters for rules
    that read the raw gradient; e.g. ~1e-3 for the hidden layers of the MNIST MLP).
    The cell-state axis spans +-5 thresholds (``out_bias / |out_kernel|`` of unit 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = np.linspace(-4, 4, 161)
    thresholds = [abs(w.out_bias / w.out_kernel[0]) for w in rules.values() if w.out_kernel[0]]
    span = 5 * max(thresholds) if thresholds and max(thresholds) > 0 else 0.05
    cells = np.linspace(-span, span, 161)
    means = np.linspace(-0.3, 0.3, 25)
    n = len(rules)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 3.8))
    for ax, (name, w) in zip(axes, rules.items()):
        y = decision_map(w, feats, cells, grad_std=grad_std)
        ax.contourf(feats, cells, (y < 0).astype(float), levels=[-0.5, 0.5, 1.5], colors=["#dde8f5", "#d9534f"])
        ax.contour(feats, cells, y, levels=[0.0], colors="k", linewidths=1)
        ax.set_xlabel(f"theta * g / rms(g)  (this step; rms(g) = {grad_std:g})")
        ax.set_ylabel("cell state c (previous step)")
        ax.set_title(f"{name}: flip region (red)")
    ax = axes[-1]
    for name, w in rules.items():
        p = flip_probability(w, means, steps=steps, trials=trials, grad_std=grad_std)
        ax.plot(means, p, marker=".", label=name)
    ax.set_xlabel(f"mean of theta0 * g / {grad_std:g} (gradient std {grad_std:g})")
    ax.set_ylabel(f"P(flip within {steps} steps)")
    ax.set_title("flip probability under noisy gradients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI ---------------------------------------------------------------------------
def _csv(kind):
    def parse(s):
        try:
            return tuple(kind(v) for v in s.split(",") if v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``kflip meta-train`` (defaults = the documented default run)."""
    d = MetaConfig()
    p = parser
    p.add_argument("--out", default="learned.npz", help="output .npz (+ .json metadata)")
    p.add_argument("--log", default=None, help="meta-loss log, JSON lines (default: <out>.log.jsonl)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: <out>.ckpt.json)")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--workers", type=int, default=2, help="evaluation processes (1 = in-process)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--pairs", type=int, default=d.pairs, help="antithetic pairs per iteration")
    p.add_argument("--sigma", type=float, default=d.sigma)
    p.add_argument("--lr", type=float, default=d.learning_rate, help="Adam step on the LSTM weights")
    p.add_argument("--horizon", type=int, default=d.horizon, help="inner training steps per task")
    p.add_argument("--train-examples", type=int, default=d.train_examples, help="training-set size per task")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--families", type=_csv(str), default=d.families,
                   help=f"comma list of {sorted(meta_tasks.FAMILIES)}")
    p.add_argument("--family-weights", type=_csv(float), default=d.family_weights)
    p.add_argument("--datasets", type=_csv(str), default=d.datasets,
                   help=f"comma list of {list(meta_tasks.DATASETS)}")
    p.add_argument("--init", default=d.init, help=f"{list(INITS)} or a path to an .npz")
    p.add_argument("--init-threshold", type=float, default=d.init_threshold)
    p.add_argument("--init-gamma", type=float, default=d.init_gamma)
    p.add_argument("--train-raw-feature", action=argparse.BooleanOptionalAction, default=d.train_raw_feature)
    p.add_argument("--train-gate-inputs", action=argparse.BooleanOptionalAction, default=d.train_gate_inputs,
                   help="meta-train the input weights of the input/forget/output gates")
    p.add_argument("--zero-scale", type=float, default=d.zero_scale,
                   help="ES scale of the coordinates that start at 0")
    p.add_argument("--val-tasks", type=int, default=d.val_tasks)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def config_from_args(args) -> MetaConfig:
    return MetaConfig(
        iterations=args.iterations,
        pairs=args.pairs,
        sigma=args.sigma,
        learning_rate=args.lr,
        horizon=args.horizon,
        train_examples=args.train_examples,
        hidden_size=args.hidden_size,
        families=args.families,
        family_weights=args.family_weights,
        datasets=args.datasets,
        init=args.init,
        init_threshold=args.init_threshold,
        init_gamma=args.init_gamma,
        train_raw_feature=args.train_raw_feature,
        train_gate_inputs=args.train_gate_inputs,
        zero_scale=args.zero_scale,
        val_tasks=args.val_tasks,
        eval_every=args.eval_every,
        seed=args.seed,
    )


def run(args) -> int:
    """Run ``kflip meta-train`` with parsed ``args``; returns the exit code."""
    config = config_from_args(args)
    stem = os.path.splitext(args.out)[0]
    log = args.log or stem + ".log.jsonl"
    ckpt = args.checkpoint or stem + ".ckpt.json"
    if not args.resume:
        for path in (log, ckpt):
            if os.path.exists(path):
                os.remove(path)
    w = meta_train(
        config,
        out=args.out,
        log=log,
        checkpoint=ckpt,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        workers=args.workers,
        max_minutes=args.max_minutes,
        quiet=args.quiet,
    )
    m = w.metadata
    print(
        f"wrote {stem}.npz/.json: best validation meta-loss {m['best_val_meta_loss']:.4f} "
        f"(init {m['init_val_meta_loss']:.4f}) at iteration {m['best_iteration']}, "
        f"{m['iterations_done']} iterations in {m['meta_training_time_s'] / 60:.1f} min",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kflip meta-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
