"""Train one reference BNN (``kflip train``) or compare optimizers on it (``kflip bench``).

Everything here is importable and returns plain JSON-able dicts; :mod:`kflip.cli` is a
thin argparse layer over :func:`train` and :func:`bench`.

Optimizers (the exact recipes the docs quote):

* ``adam-ste``: ``tf.keras.optimizers.legacy.Adam(1e-3)`` on every variable; binary
  kernels keep latent floats and the ``ste_sign`` quantizer binarizes them forward.
* ``bop``: ``larq.optimizers.CaseOptimizer((Bop.is_binary_variable, Bop(threshold,
  gamma)), default_optimizer=Adam(1e-2))``, threshold 1e-6 and gamma 1e-3 by default.
* ``fliplstm``: ``kflip.FlipLSTM(weights)`` (flip mode; default shipped weights).
* ``fliplstm-gradient``: ``kflip.FlipLSTM(weights, output="gradient")`` (ablation).

Every run compiles with ``jit_compile=True`` and is seeded with
``tf.keras.utils.set_random_seed(seed)``. Telemetry comes from three small callbacks
defined here: :class:`TestCurve` (test accuracy every K steps, an XLA-compiled
evaluation that does not touch the Keras metrics), :class:`SignFlipCounter` (sign
changes of every binary kernel per step, for any optimizer, XLA-compiled) and
:class:`StepTimer`. FlipLSTM runs also get :class:`kflip.FlipRate` so its per-epoch
flip rates land in History and TensorBoard.

The package, in the order a bench runs:

* :mod:`~kflip.bench.inputs` (with :mod:`~kflip.bench.checks`): what ``train`` and
  ``bench`` refuse before any training;
* :mod:`~kflip.bench.optimizers`: the optimizer recipes; :mod:`~kflip.bench.building`:
  the dataset and the model, compiled;
* :mod:`~kflip.bench.telemetry`: the evaluator and the callbacks;
  :mod:`~kflip.bench.training`: one run (``_run``) and :func:`train`;
* :mod:`~kflip.bench.greedy_search`: the greedy flip search after training;
* :mod:`~kflip.bench.timing`: step times, round-robin; :mod:`~kflip.bench.summary`: the
  rows, the table and the final report; :mod:`~kflip.bench.output`: what is written;
* :mod:`~kflip.bench.driver`: :func:`bench`.
"""

from kflip import _keras

_keras.select_keras2()

from kflip.bench.building import (  # noqa: E402,F401
    DEFAULT_EPOCHS,
    DIGITS_DEFAULTS,
    MODEL_OPTIONS,
    RECALIBRATED_MODELS,
    _defaults_for,
    build_model,
    compiled_model,
    recalibration_data,
    resolve_dataset,
)
from kflip.bench.checks import _check_output_dir, _check_positive_int  # noqa: E402,F401
from kflip.bench.driver import _duration, _Progress, bench  # noqa: E402,F401
from kflip.bench.greedy_search import (  # noqa: E402,F401
    GREEDY_DEFAULTS,
    GREEDY_SUFFIX,
    greedy_module,
    greedy_options_with_defaults,
    run_greedy,
)
from kflip.bench.inputs import check_run_inputs, tensorboard_available  # noqa: E402,F401
from kflip.bench.optimizers import (  # noqa: E402,F401
    FLIP_OPTIMIZERS,
    OPTIMIZERS,
    case_optimizer,
    make_optimizer,
)
from kflip.bench.output import _jsonable, _save, _write_json, machine_info  # noqa: E402,F401
from kflip.bench.summary import _mean_std, format_table, summarize  # noqa: E402,F401
from kflip.bench.telemetry import (  # noqa: E402,F401
    SignFlipCounter,
    StepTimer,
    TestCurve,
    default_eval_every,
    make_evaluator,
    state_bytes_per_binary_weight,
)
from kflip.bench.timing import _sync, step_times, time_train_steps  # noqa: E402,F401
from kflip.bench.training import _run, train  # noqa: E402,F401
