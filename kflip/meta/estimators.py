"""Gradient estimators for the outer loop: how to get a meta-gradient from meta-losses.

The inner loss is a step function of the LSTM weights (a flip happens or not), so
it has no useful gradient. An estimator proposes points to evaluate (and the task
each is evaluated on), then turns their meta-losses into a gradient estimate. The
outer loop (:func:`kflip.meta.meta_train`) only sees this protocol, so another
estimator (e.g. persistent ES) is a new class here, not an edit of the loop.

:class:`AntitheticES` is evolution strategies with antithetic pairs and centred-rank
fitness shaping (Salimans et al., 2017, "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning").

>>> import numpy as np
>>> from kflip.meta.config import MetaConfig
>>> from kflip.meta.estimators import AntitheticES
>>> es = AntitheticES(MetaConfig(pairs=2, seed=0), mask=np.ones(3))
>>> proposal = es.propose(np.zeros(3), iteration=0)
>>> len(proposal.points), proposal.tasks[0] == proposal.tasks[1]
(4, True)
>>> es.gradient(proposal, [1.0, 2.0, 3.0, 4.0]).shape
(3,)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np

from kflip.meta.config import MetaConfig, sample_tasks


class Proposal(NamedTuple):
    """Points (in the outer loop's coordinates) to evaluate, one task key per point,
    and whatever the estimator needs to turn their losses into a gradient."""

    points: list
    tasks: list
    noise: Any


class GradientEstimator(Protocol):
    """What the outer loop needs from a gradient estimator."""

    def propose(self, z: np.ndarray, iteration: int) -> Proposal:
        """The points to evaluate at iteration ``iteration`` around ``z``."""

    def gradient(self, proposal: Proposal, losses: Sequence[float]) -> np.ndarray:
        """The gradient estimate from the meta-losses of ``proposal.points``."""


def centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` scaled to [-0.5, 0.5] (ties broken by position; deterministic).

    >>> centered_ranks([3.0, -1.0, 10.0]).tolist()
    [0.0, -0.5, 0.5]
    """
    x = np.asarray(x, np.float64).ravel()
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return ranks / max(len(x) - 1, 1) - 0.5


def es_gradient(loss_plus, loss_minus, eps, sigma: float) -> np.ndarray:
    """Antithetic ES estimate of the gradient of the smoothed loss.

    ``loss_plus[i]``/``loss_minus[i]`` are the losses at ``w +- sigma * eps[i]``. The
    losses are replaced by their centred ranks over the whole population first.

    >>> import numpy as np
    >>> eps = np.array([[1.0, 0.0], [0.0, 1.0]])  # two pairs, one along each axis
    >>> es_gradient([2.0, 0.0], [0.0, 1.0], eps, sigma=0.1)  # up along 0, down along 1
    array([ 3.33333333, -3.33333333])
    """
    loss_plus = np.asarray(loss_plus, np.float64)
    loss_minus = np.asarray(loss_minus, np.float64)
    n = len(loss_plus)
    r = centered_ranks(np.concatenate([loss_plus, loss_minus]))
    diff = r[:n] - r[n:]
    return (diff[:, None] * np.asarray(eps, np.float64)).sum(0) / (n * sigma)


def iteration_draws(config: MetaConfig, iteration: int, size: int):
    """Perturbations ``[pairs, size]`` and one task key per pair for ``iteration``."""
    rng = np.random.default_rng([config.seed, iteration])
    eps = rng.standard_normal((config.pairs, size))
    return eps, sample_tasks(config, rng, config.pairs, parity=0)


@dataclasses.dataclass(frozen=True)
class AntitheticES:
    """Antithetic ES: ``pairs`` points ``z +- sigma * eps`` per iteration.

    Both members of a pair train on the *same* task, data order and initial kernels
    (common random numbers), so their difference measures the rule, not the task.
    ``mask`` zeroes the coordinates that are not meta-trained.
    """

    config: MetaConfig
    mask: np.ndarray

    def propose(self, z: np.ndarray, iteration: int) -> Proposal:
        eps, keys = iteration_draws(self.config, iteration, len(z))
        eps = eps * self.mask
        points, tasks = [], []
        for i, key in enumerate(keys):
            for sign in (1.0, -1.0):
                points.append(z + sign * self.config.sigma * eps[i])
                tasks.append(key)
        return Proposal(points, tasks, eps)

    def gradient(self, proposal: Proposal, losses: Sequence[float]) -> np.ndarray:
        losses = np.asarray(losses, np.float64)
        grad = es_gradient(losses[0::2], losses[1::2], proposal.noise, self.config.sigma)
        return grad * self.mask
