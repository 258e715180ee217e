"""What a meta-training run is: :class:`MetaConfig`, written once.

Every field carries its own help text; the class docstring's attribute list and the
``kflip meta-train`` flags (``--<field-name>``, types and defaults) are both derived
from the fields, so a new option is one line here. The task distribution a config
describes (training and validation task keys) lives here too.

>>> from kflip.meta.config import MetaConfig
>>> MetaConfig(iterations=2, horizon=100).pairs
8
>>> MetaConfig(sigma=-1)
Traceback (most recent call last):
...
ValueError: `sigma` must be a finite number > 0.0, got -1.0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing

import numpy as np

from kflip import _checks as checks
from kflip import cell as cell_lib
from kflip import conditioning
from kflip.meta import tasks
from kflip.meta import unroll

INITS = ("bop-normalized", "bop")
BASELINES = ("none", "bop")


def _opt(default, help: str, flag: str | None = None):
    """A config field with its help text (and a CLI flag name other than its own)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Everything that determines a meta-training run (recorded in the output)."""

    iterations: int = _opt(8, "ES iterations (outer steps)")
    pairs: int = _opt(8, "antithetic pairs per iteration (population = 2 * pairs)")
    sigma: float = _opt(
        0.1,
        "ES perturbation scale, relative: coordinate i of the LSTM weights is "
        "w0[i] + s[i] * z[i] with s[i] = |w0[i]| (zero_scale where w0[i] = 0); ES "
        "perturbs and Adam updates z, so 0.1 moves Bop's threshold by ~10%",
    )
    learning_rate: float = _opt(0.05, "Adam step size on z", flag="lr")
    horizon: int = _opt(4000, "inner training steps per task (batch 64); with min_horizon, the longest")
    min_horizon: int = _opt(
        0,
        "0: every task trains for `horizon` steps; else each task's length is drawn "
        "log-uniformly from [min_horizon, horizon] (fixed per task)",
    )
    baseline: str = _opt(
        "none",
        "'none', or 'bop': a task's meta-loss minus Bop's (init_threshold, init_gamma) on "
        "the same task, data and initial kernels, so short and long, easy and hard "
        "tasks weigh alike",
    )
    train_examples: int = _opt(24576, "training-set size of every task (held-out: 512)")
    hidden_size: int = _opt(1, "LSTM hidden size (state per binary weight: 8 * hidden_size B)")
    families: tuple[str, ...] = _opt(
        ("mlp784-256-256",), f"architecture families to sample, of {sorted(tasks.FAMILIES)}"
    )
    family_weights: tuple[float, ...] = _opt((), "sampling probabilities of families (empty: uniform)")
    datasets: tuple[str, ...] = _opt(
        tasks.DATASETS, f"dataset variants to sample, of {list(tasks.DATASETS)}"
    )
    init: str = _opt(
        "bop",
        "'bop-normalized' (Bop on the per-tensor normalised gradient, scale 1), 'bop' "
        "(the analytic raw-gradient Bop of kflip.bop_weights), the name of weights "
        "shipped in kflip/weights ('run3') or a path to an .npz",
    )
    init_threshold: float = _opt(1e-6, "Bop threshold of the init")
    init_gamma: float = _opt(1e-3, "Bop momentum rate of the init")
    train_raw_feature: bool = _opt(True, "also meta-train the weights reading the raw gradient")
    train_gate_inputs: bool = _opt(
        False,
        "also meta-train the input weights of the input, forget and output gates (off: "
        "gates that read no input are trace-time constants, so a step costs about Bop's)",
    )
    zero_scale: float = _opt(1e-7, "ES scale s[i] of the coordinates that start at 0")
    tensor_features: bool = _opt(
        False,
        "also meta-train the per-tensor conditioning (kflip.conditioning: step, gradient "
        "trend, fan-in and flip rate set the gates and the threshold), starting at zero",
    )
    tensor_scale: float = _opt(0.1, "ES scale of the per-tensor conditioning coordinates")
    val_tasks: int = _opt(6, "fixed validation tasks for model selection")
    eval_every: int = _opt(2, "score the mean weights on the validation tasks this often")
    seed: int = _opt(0, "seed of everything")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind = _hints()[f.name]
            value = getattr(self, f.name)
            if kind is int and f.name not in ("seed", "min_horizon"):
                checks.positive_int(f.name, value)
            elif kind is float and f.name in ("sigma", "learning_rate", "zero_scale", "tensor_scale"):
                checks.number(f.name, value, low=0.0, low_open=True)
            elif typing.get_origin(kind) is tuple:
                object.__setattr__(self, f.name, tuple(value))
        self._check_choices()
        self._check_init()

    def _check_choices(self):
        if not isinstance(self.min_horizon, (int, np.integer)) or not (
                0 <= self.min_horizon <= self.horizon):
            raise ValueError(
                f"`min_horizon` must be an int in [0, horizon={self.horizon}], got "
                f"{self.min_horizon!r}."
            )
        if self.baseline not in BASELINES:
            raise ValueError(f"`baseline` must be one of {BASELINES}, got {self.baseline!r}.")
        if self.train_examples < tasks.BATCH_SIZE:
            raise ValueError(
                f"`train_examples` must be >= {tasks.BATCH_SIZE}, got {self.train_examples}."
            )
        for name, known in (("families", tasks.FAMILIES), ("datasets", tasks.DATASETS)):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must not be empty.")
            for value in getattr(self, name):
                tasks.check_choice(name, value, known)
        weights = tuple(float(w) for w in self.family_weights) or (1.0,) * len(self.families)
        object.__setattr__(self, "family_weights", weights)
        if len(weights) != len(self.families) or not all(
            w >= 0 and np.isfinite(w) for w in weights
        ) or sum(weights) <= 0:
            raise ValueError(
                f"`family_weights` must be {len(self.families)} non-negative numbers "
                f"with a positive sum (one per family), got {weights!r}."
            )

    def _check_init(self):
        if self.init not in INITS and not cell_lib.shipped_path(self.init) and not os.path.exists(
                os.path.splitext(self.init)[0] + ".npz"):
            raise ValueError(
                f"`init` must be one of {INITS}, the name of shipped weights or an existing "
                f".npz, got {self.init!r}.")
        checks.number("init_threshold", self.init_threshold, low=0.0)
        checks.number("init_gamma", self.init_gamma, low=0.0, high=1.0, low_open=True)
        if self.init_gamma == 1.0:
            raise ValueError(f"`init_gamma` must be in (0, 1), got {self.init_gamma!r}.")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {self.seed!r}.")

    def to_dict(self) -> dict:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
        }


def _hints() -> dict:
    return typing.get_type_hints(MetaConfig)


MetaConfig.__doc__ += "\n\n    Attributes:\n" + "".join(
    f"      {f.name}: {f.metadata['help']}.\n" for f in dataclasses.fields(MetaConfig)
)


# ---- the CLI flags, derived from the fields ------------------------------------------
def _csv(kind):
    def parse(s):
        try:
            return tuple(kind(v) for v in s.split(",") if v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` flag per :class:`MetaConfig` field, defaulting to the field's."""
    for f in dataclasses.fields(MetaConfig):
        kind = _hints()[f.name]
        flag = "--" + (f.metadata["flag"] or f.name).replace("_", "-")
        kw = dict(default=f.default, help=f.metadata["help"].replace("%", "%%"), dest=f.name)
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:  # a comma list; argparse parses the default
            kw.update(type=_csv(typing.get_args(kind)[0]), default=",".join(map(str, f.default)))
        else:
            kw["type"] = kind
        parser.add_argument(flag, **kw)


def config_from_args(args) -> MetaConfig:
    """The :class:`MetaConfig` of parsed ``args`` (see :func:`add_config_arguments`)."""
    return MetaConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MetaConfig)})


# ---- the run's starting point and the coordinates it trains --------------------------
def initial_weights(config: MetaConfig) -> cell_lib.LSTMWeights:
    """The LSTM weights meta-training starts from (``config.init``)."""
    if config.init == "bop-normalized":
        w = cell_lib.bop_weights(config.init_threshold, config.init_gamma, normalized=True, scale=1.0)
    elif config.init == "bop":
        w = cell_lib.bop_weights(config.init_threshold, config.init_gamma)
    else:
        w = cell_lib.load_weights(config.init)
    if w.hidden_size > config.hidden_size:
        raise ValueError(
            f"`hidden_size`={config.hidden_size} is smaller than the init's {w.hidden_size}."
        )
    return w.padded(config.hidden_size)


def trainable_mask(config: MetaConfig) -> np.ndarray:
    """1 for meta-trained coordinates of the flat vector, 0 for frozen ones.

    >>> mask = trainable_mask(MetaConfig())  # hidden size 1: 18 coordinates
    >>> int(mask.sum()), mask.size  # the 6 input weights of 3 gates are frozen
    (12, 18)
    """
    h = config.hidden_size
    mask = np.ones(unroll.num_params(h, config.tensor_features))
    n_feat = len(cell_lib.FEATURES)
    kernel = mask[: n_feat * 4 * h].reshape(n_feat, 4, h)  # a view
    if not config.train_raw_feature:
        kernel[cell_lib.FEATURES.index("theta_grad")] = 0.0  # kernel row of the raw feature
    if not config.train_gate_inputs:  # only the candidate reads the features
        cand = cell_lib.GATES.index("candidate")
        kernel[:, [g for g in range(len(cell_lib.GATES)) if g != cand]] = 0.0
    if config.tensor_features:  # the per-tensor block sets gates and threshold, not the
        # candidate: a per-tensor candidate offset is a drive that, at the scale of the
        # gates, outweighs every gradient and flips all weights or none
        cond = mask[unroll.num_params(h):].reshape(len(conditioning.TENSOR_FEATURES), 4 * h + 1)
        cand = cell_lib.GATES.index("candidate")
        cond[:, cand * h : (cand + 1) * h] = 0.0
    return mask


def coordinate_scales(w0_flat: np.ndarray, zero_scale: float = 1.0, tensor_scale: float = 1.0,
                      hidden_size: int = 1) -> np.ndarray:
    """``s[i] = |w0[i]|`` (``zero_scale`` where 0): the natural scale of each coordinate;
    ``tensor_scale`` for the per-tensor conditioning block of a conditioned vector."""
    s = np.abs(np.asarray(w0_flat, np.float64))
    s = np.where(s > 0, s, float(zero_scale))
    if len(s) == unroll.num_params(hidden_size, True):
        s[unroll.num_params(hidden_size):] = float(tensor_scale)
    return s


# ---- the task distribution -------------------------------------------------------------
def sample_tasks(config: MetaConfig, rng: np.random.Generator, n: int, parity: int) -> list:
    """``n`` task keys ``(family, dataset, seed)``; seeds have the given parity
    (training tasks even, validation tasks odd, so the two sets never overlap)."""
    p = np.asarray(config.family_weights) / sum(config.family_weights)
    fam = rng.choice(len(config.families), size=n, p=p)
    ds = rng.integers(0, len(config.datasets), size=n)
    seeds = rng.integers(0, 2**30, size=n) * 2 + parity
    return [(config.families[f], config.datasets[d], int(s)) for f, d, s in zip(fam, ds, seeds)]


def task_horizon(config: MetaConfig, key) -> int:
    """The number of training steps of task ``key``: ``config.horizon``, or with
    ``min_horizon`` a log-uniform draw fixed by the task's seed.

    >>> c = MetaConfig(min_horizon=100, horizon=10000)
    >>> [task_horizon(c, ("mlp-32", "digits", s)) for s in (0, 1, 2)]
    [147, 335, 9189]
    """
    if not config.min_horizon:
        return config.horizon
    u = np.random.default_rng([int(key[2]), 104729]).random()
    lo, hi = np.log(config.min_horizon), np.log(config.horizon)
    return int(min(config.horizon, round(float(np.exp(lo + u * (hi - lo))))))


def baseline_weights(config: MetaConfig) -> cell_lib.LSTMWeights | None:
    """The rule every task's meta-loss is measured against (None: no baseline)."""
    if config.baseline == "none":
        return None
    return cell_lib.bop_weights(config.init_threshold, config.init_gamma).padded(config.hidden_size)


def validation_tasks(config: MetaConfig) -> list:
    """The fixed validation task keys (round-robin over families)."""
    rng = np.random.default_rng([config.seed, 2**31 - 1])
    keys = sample_tasks(config, rng, config.val_tasks, parity=1)
    return [(config.families[i % len(config.families)], d, s) for i, (_, d, s) in enumerate(keys)]
