"""Meta-training of FlipLSTM's coordinatewise LSTM ("learning to learn").

The LSTM weights that decide flip / no flip for every binary weight are themselves
learned (Andrychowicz et al., 2016, "Learning to learn by gradient descent by
gradient descent"), on a distribution of tiny BNN training problems (no MNIST),
with the real hard flips ``theta <- theta * sign(y)`` in the inner loop. The parts:

* :mod:`kflip.meta.config`: :class:`MetaConfig`, the run written once (the CLI flags
  are derived from it), and the task distribution it describes;
* :mod:`kflip.meta.tasks`: the tiny binarized networks and their data;
* :mod:`kflip.meta.unroll`: one task trained for ``horizon`` steps as one XLA
  program, with the same :class:`kflip.rule.FlipRule` as FlipLSTM;
* :mod:`kflip.meta.estimators`: the gradient-estimator protocol and antithetic ES;
* :mod:`kflip.meta.loop`: the outer loop over a typed :class:`MetaState`, with
  checkpoints (JSON) and model selection on fixed validation tasks, and
  :func:`gradient_agreement`, how much of an estimate is signal;
* :mod:`kflip.meta.inspect`: decision maps and flip probabilities of a rule.

The inner loss is a step function of the LSTM weights (a flip either happens or
not), so it has no useful gradient; ES needs none: it estimates the gradient of
the *smoothed* meta-loss from meta-loss values only, and every member is trained
and scored with exactly the flips FlipLSTM makes at run time. The output is the
best of the validated means, the initialisation included (iteration 0), so
meta-training cannot return a rule that is worse than its start on the validation
tasks. Meta-loss of one inner run (lower is better): mean over all ``horizon`` steps
of ``log(training minibatch loss)`` plus ``log(held-out loss)`` at the end.

Everything is deterministic given ``seed``: perturbations and tasks come from
``numpy.random.default_rng([seed, iteration])`` and results are reduced in a fixed
order, so ``workers`` does not change the result.

CLI (wired as ``kflip meta-train``)::

    kflip meta-train --out kflip/weights/default.npz --seed 0

Python::

    w = kflip.meta.meta_train(kflip.meta.MetaConfig(iterations=100), out="w.npz")
    opt = kflip.FlipLSTM(weights="w.npz")
"""

from kflip import _keras

_keras.select_keras2()

from kflip.meta.cli import add_arguments, main, run  # noqa: E402
from kflip.meta.config import (  # noqa: E402
    INITS,
    MetaConfig,
    config_from_args,
    coordinate_scales,
    initial_weights,
    sample_tasks,
    trainable_mask,
    validation_tasks,
)
from kflip.meta.estimators import (  # noqa: E402
    AntitheticES,
    GradientEstimator,
    Proposal,
    centered_ranks,
    es_gradient,
    iteration_draws,
)
from kflip.meta.inspect import decision_map, flip_probability, plot_rule  # noqa: E402
from kflip.meta.loop import (  # noqa: E402
    MetaState, gradient_agreement, load_checkpoint, meta_train, save_checkpoint)

__all__ = [
    "AntitheticES", "GradientEstimator", "INITS", "MetaConfig", "MetaState", "Proposal",
    "add_arguments", "centered_ranks", "config_from_args", "coordinate_scales",
    "decision_map", "es_gradient", "flip_probability", "gradient_agreement", "initial_weights",
    "iteration_draws", "load_checkpoint", "main", "meta_train", "plot_rule", "run",
    "sample_tasks", "save_checkpoint", "trainable_mask", "validation_tasks",
]
