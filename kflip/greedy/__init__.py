"""Greedy flip search: train a BNN by trying flips and keeping those that lower the loss.

:func:`greedy_flip` is the engine, :class:`GreedyFlip` the Keras callback.

On a probe set, layer by layer (front to back by default), every candidate (one binary
weight, or a group of weights of one output unit) is flipped in a preset order; the
flip is kept if the probe loss (inference mode, BatchNorm moving statistics) decreases
by more than ``min_delta``, otherwise reverted. ``exhaustive=True`` instead evaluates
all ``2**n`` sign assignments of each group of ``n`` weights and keeps the best one.

The package, in the order data flows:

* :mod:`~kflip.greedy.options`: :class:`GreedyOptions`, one frozen, validated dataclass;
* :mod:`~kflip.greedy.probe`: probe and holdout selection, the checks before any flip;
* :mod:`~kflip.greedy.lowering`, :mod:`~kflip.greedy.ops`, :mod:`~kflip.greedy.network`:
  the model as a graph of primitive ops (chains and residual ``Add`` shortcuts);
* :mod:`~kflip.greedy.evaluators`: the :class:`~kflip.greedy.evaluators.Evaluator`
  protocol and its implementations: :mod:`~kflip.greedy.incremental` (cached
  activations, only changed examples recomputed), :mod:`~kflip.greedy.suffix` (layers a
  shortcut crosses: cached prefix, batched suffix) and the naive reference;
* :mod:`~kflip.greedy.search`: one driver for every evaluator (sequential acceptance,
  budgets, interrupt safety); :mod:`~kflip.greedy.driver`: :func:`greedy_flip`;
* :mod:`~kflip.greedy.report`, :mod:`~kflip.greedy.progress`, :mod:`~kflip.greedy.callback`.

How the incremental evaluator is fast
------------------------------------
The model is split at the layer under search. The prefix (everything before the
layer's kernel product, including its input quantizer) runs once; its output ``X`` is
cached together with the layer's pre-activation ``Z``, the binarized *boundary* ``A``
(``Z`` pushed through the channel-local layers up to and including the next layer's
input quantizer: bias, activation, BatchNorm, pooling), the next layer's
pre-activation ``Znext`` and the per-example loss. Flipping ``W[f, c]`` changes only
output channel ``c``: ``Z[..., c] -= 2 W[f, c] P[..., f]`` where ``P`` are the input
patches (``X`` itself for Dense). For a block of candidates the engine computes, in one
XLA call, the new channel ``c`` at the boundary for every probe example; examples whose
binarized boundary does not change keep their loss (no further work). For the others
the next layer's pre-activation gets a rank-1 (Dense) or local (Conv) update, the rest
of the network runs on those rows only, and the loss deltas are summed per candidate.
For the last binary layer the boundary is the logits: the loss delta is computed in
closed form from one changed logit column.

Acceptance is sequential and exact: a block is evaluated against the current weights;
the first improving candidate is accepted, the caches are updated, and evaluation
restarts after it (candidates of untouched channels whose flip changes no boundary
value are rejected without re-evaluation: their loss change is exactly zero). The
accepted sequence is the one a one-at-a-time search produces; ``method="naive"`` is
that reference (one full forward pass of the probe set per candidate).

Model variables are only written when a flip is accepted, one ``assign`` per accepted
candidate; on any exception (including ``KeyboardInterrupt``) the model is left as
after the last accepted flip.

Distribution: the compiled kernels never capture model variables. Their values are
read eagerly (``Network.values``) when a layer's search starts and passed in as
tensors (``params=``), and accepted kernels are written back with ``var.assign``
outside the compiled functions, so models whose variables were created under a
``tf.distribute`` strategy (``MirroredVariable``, ``SyncOnReadVariable``) are searched
on the current device with the same result as on a single device.
"""

from kflip.greedy.callback import GreedyFlip
from kflip.greedy.driver import greedy_flip
from kflip.greedy.options import GreedyOptions, validate_options
from kflip.greedy.report import GreedyReport, LayerReport

__all__ = ["GreedyFlip", "GreedyOptions", "GreedyReport", "LayerReport", "greedy_flip",
           "validate_options"]
