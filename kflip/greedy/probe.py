"""Probe data for a greedy flip search: selection and the checks before any flip."""

from __future__ import annotations

import numpy as np

from kflip import _keras
from kflip import data as data_lib

_keras.select_keras2()
import tensorflow as tf  # noqa: E402


def check_arrays(x, y):
    """Probe arrays as float inputs and int64 class ids (one-hot ``y`` allowed);
    ``ValueError`` for a length mismatch, NaN/Inf inputs or non-class labels."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"`y` has {len(y)} examples but `x` has {len(x)}.")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise ValueError("`x`: the probe inputs must be finite numbers (found NaN, Inf or non-numbers).")
    if y.ndim > 1:
        y = y.reshape(len(y), -1)
        y = y[:, 0] if y.shape[1] == 1 else np.argmax(y, axis=1)
    return x, data_lib.class_labels(y, "`y`")


def _from_dataset(ds, y, count):
    if y is not None:
        raise ValueError("`y` must be None when `x` is a tf.data.Dataset of (x, y).")
    xs, ys, n = [], [], 0
    for item in ds:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError("`x`: the tf.data.Dataset must yield (x, y) pairs.")
        bx, by = np.asarray(item[0]), np.asarray(item[1])
        if bx.ndim == 0 or by.ndim == 0:
            raise ValueError("`x`: the tf.data.Dataset must be batched.")
        xs.append(bx)
        ys.append(by)
        n += len(bx)
        if count is not None and n >= count:
            break
    if not xs:
        raise ValueError("`x`: the tf.data.Dataset is empty.")
    return np.concatenate(xs)[: count or None], np.concatenate(ys)[: count or None]


def _split(n, probe_size, holdout, seed, shuffle):
    """Probe and holdout indices into ``n`` examples (disjoint)."""
    if holdout and n <= holdout:
        raise ValueError(f"`holdout`: {holdout} examples leave none of the {n} for the probe.")
    if not shuffle:  # a dataset: its first examples, the holdout after the probe
        n_probe = n - holdout if probe_size is None else min(probe_size, n - holdout)
        return np.arange(n_probe), np.arange(n_probe, n_probe + holdout)
    rng = np.random.RandomState(seed)
    if not holdout:
        if probe_size is None or n <= probe_size:
            return np.arange(n), np.arange(0)
        return np.sort(rng.choice(n, probe_size, replace=False)), np.arange(0)
    perm = rng.permutation(n)
    rest = perm[holdout:] if probe_size is None else perm[holdout:holdout + probe_size]
    return np.sort(rest), np.sort(perm[:holdout])


def probe_sets(x, y, probe_size, holdout=None, seed=0):
    """``(x_probe, y_probe), (x_holdout, y_holdout) or None``, as checked tensors.

    Arrays: a random subset of ``probe_size`` examples (None: all but the holdout) and,
    disjoint from it, ``holdout`` more, both chosen by ``seed``. A batched dataset of
    ``(x, y)`` gives its first ``probe_size`` examples and the ``holdout`` after them.
    """
    holdout = holdout or 0
    dataset = isinstance(x, tf.data.Dataset)
    if dataset:
        x, y = _from_dataset(x, y, None if probe_size is None else probe_size + holdout)
    elif y is None:
        raise ValueError("`y` is required when `x` is an array.")
    x, y = check_arrays(x, y)
    if len(x) == 0:
        raise ValueError("`x` is empty.")
    pi, hi = _split(len(x), probe_size, holdout, seed, shuffle=not dataset)
    probe = tf.constant(x[pi], tf.float32), tf.constant(y[pi])
    return probe, ((tf.constant(x[hi], tf.float32), tf.constant(y[hi])) if holdout else None)


def check_classes(model, loss, y) -> None:
    """With the sparse cross-entropy, every label must be one of the model's outputs."""
    if loss not in (None, "sparse_categorical_crossentropy"):
        return
    n_out = int(model.output_shape[-1])
    top = int(tf.reduce_max(y))
    if top >= n_out:
        raise ValueError(
            f"`y` has label {top}, but the model has {n_out} outputs (classes 0..{n_out - 1})."
        )


def check_kernels(net, chosen) -> None:
    """Binary kernels must hold exactly +-1 and their quantizer map +-1 to itself."""
    for i in chosen:
        lin = net.ops[i]
        k = tf.convert_to_tensor(lin.var)
        if not bool(tf.reduce_all(tf.abs(k) == 1.0)):
            raise ValueError(
                f"`model`: binary kernel of layer {lin.name!r} is not exactly +-1; call "
                "kflip.snap_binary_weights(model) first."
            )
        if lin.quantizer is not None and not bool(tf.reduce_all(lin.quantizer(k) == k)):
            raise ValueError(
                f"`model`: the kernel quantizer of layer {lin.name!r} does not map +-1 to "
                "itself; greedy search needs a sign-like quantizer (e.g. 'ste_sign')."
            )


def bytes_per_example(net, chosen) -> int:
    """An estimate of the search's cache bytes per probe example: twice every layer's
    output (forward caches and the ranking gradient) plus, for the largest searched
    layer, twice its im2col patches (``positions x fan_in``) and its output.

    >>> import kflip
    >>> from kflip.greedy.network import Network
    >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
    >>> net = Network(model, "sparse_categorical_crossentropy", None)
    >>> bytes_per_example(net, net.linear) > 4 * 64  # at least the input patches
    True
    """
    from kflip.greedy.incremental import IncrementalEvaluator

    acts = sum(int(np.prod(layer.output_shape[1:])) for layer in net.model.layers
               if not isinstance(layer.output_shape, list))
    largest = 0
    for i in chosen:
        op = net.ops[i]
        out = op.layer.output_shape[1:]
        positions = int(np.prod(out[:-1])) if len(out) > 1 else 1
        largest = max(largest, positions * (op.fan_in + int(out[-1])))
    # a layer a shortcut crosses re-runs the rest of the network on copies of its
    # activations (the suffix evaluator): measured 1.6x more on kflip.models.resnet
    suffix = any(not IncrementalEvaluator.applies(net, i) for i in chosen)
    return int(4 * 2 * (acts + largest) * (1.6 if suffix else 1.0))


def max_examples(per_example: int, memory_budget) -> int | None:
    """The most probe examples that fit ``memory_budget`` GiB (at least 64; None: any).

    >>> max_examples(2**20, 8.0), max_examples(2**20, None)
    (8192, None)
    """
    if memory_budget is None:
        return None
    return max(64, int(memory_budget * 2**30 // max(per_example, 1)))
