"""Ship a trained BNN: a larq-free SavedModel (binary kernels bit-packed) and LCE TFLite.

:func:`export` writes a TensorFlow SavedModel with one ``serving_default``
signature and nothing else: no optimizer state, no Keras metadata, no larq. With
``packed=True`` (the default) every binary kernel is stored with 1 bit per weight
(``uint8`` words, most significant bit first, bit 1 = ``-1``) and unpacked to a +-1
float kernel by bitwise ops inside the graph. The forward pass is the Keras model's
own inference call (``training=False``) traced with each binary kernel replaced by
its unpacked tensor, so the SavedModel computes exactly what the Keras model computes,
for any layer larq and Keras support. A plain ``tf.saved_model.load(path)`` in a
process that never imports kflip or larq serves it.

With ``tflite=True`` the Keras model is also converted by the Larq Compute Engine
(the optional ``lce`` extra: ``pip install 'kflip[lce]'``) to a ``.tflite`` with LCE
binary ops, and the result is checked with LCE's interpreter against the Keras model.

The CLI (``kflip export MODEL_PATH OUT_DIR``) is :func:`add_arguments` + :func:`run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip.binary import binary_variables  # noqa: E402

SIGNATURE = "serving_default"
TFLITE_NAME = "model.tflite"
REPORT_NAME = "kflip_export.json"
LCE_HINT = (
    "TFLite export needs the Larq Compute Engine converter, an optional extra of "
    "kflip: pip install 'kflip[lce]'  (i.e. larq-compute-engine==0.16.*)."
)
_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)


# ---- pure TensorFlow bit packing -------------------------------------------------------
def pack_pm1(x) -> tf.Tensor:
    """Pack a tensor of +-1 values into ``uint8`` words, 8 weights per byte.

    The tensor is flattened (row-major) and padded with +1 to a multiple of 8; in
    each byte the first weight is the most significant bit, and a set bit means
    ``-1`` (the same layout as ``np.packbits(x.ravel() < 0)``). Values are classified
    by sign (``x < 0`` is -1), so pass exact +-1 tensors. Pure TF, XLA-compilable.

    Example:
      >>> import kflip
      >>> words = kflip.export.pack_pm1([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
      >>> words.numpy()  # 0b01100000, then the 9th weight padded with seven +1s
      array([ 96, 128], dtype=uint8)
    """
    x = tf.convert_to_tensor(x)
    bits = tf.cast(tf.reshape(x, [-1]) < 0, tf.int32)
    n = int(bits.shape[0])
    pad = (-n) % 8
    bits = tf.reshape(tf.pad(bits, [[0, pad]]), [-1, 8])
    words = tf.reduce_sum(tf.bitwise.left_shift(bits, tf.constant(_SHIFTS, tf.int32)), 1)
    return tf.cast(words, tf.uint8)


def unpack_pm1(packed, shape, dtype=tf.float32) -> tf.Tensor:
    """Inverse of :func:`pack_pm1`: ``uint8`` words -> +-1 tensor of static ``shape``.

    Pure TF (shift, and, select), XLA-compilable; this is what runs inside an
    exported SavedModel.

    Example:
      >>> import kflip
      >>> import numpy as np
      >>> words = np.array([96, 128], np.uint8)  # from pack_pm1
      >>> kflip.export.unpack_pm1(words, [3, 3]).numpy()
      array([[ 1., -1., -1.],
             [ 1.,  1.,  1.],
             [ 1.,  1., -1.]], dtype=float32)
    """
    shape = [int(d) for d in shape]
    n = int(np.prod(shape, dtype=np.int64))
    packed = tf.convert_to_tensor(packed, tf.uint8)
    shifts = tf.constant(_SHIFTS, tf.uint8)
    bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(packed[:, None], shifts), tf.constant(1, tf.uint8)
    )
    bits = tf.reshape(bits, [-1])[:n]
    one = tf.ones([n], dtype)
    return tf.reshape(tf.where(bits > 0, -one, one), shape)


# ---- the exported module ---------------------------------------------------------------
class _Kernel:
    """One binary kernel: where it lives in the model and its +-1 value."""

    def __init__(self, layer, attr: str, variable, values: np.ndarray):
        self.layer, self.attr, self.variable, self.values = layer, attr, variable, values


def _binary_kernels(model) -> list[_Kernel]:
    """Find every binary variable of ``model``, its owning layer attribute and value."""
    import larq as lq

    variables = binary_variables(model)
    if not variables:
        raise ValueError(
            "`model` has no binary variables (larq layers whose kernel quantizer has "
            "precision 1, e.g. QuantDense(..., kernel_quantizer='ste_sign')); kflip "
            "export is for binarized networks. For a float model use "
            "tf.saved_model.save directly."
        )
    owners = {}
    for layer in model.submodules:
        if not isinstance(layer, tf.keras.layers.Layer):
            continue
        for attr, value in vars(layer).items():
            if isinstance(value, tf.Variable):
                owners.setdefault(id(value), (layer, attr))
    # Read the quantized values first and validate afterwards: larq's
    # `quantized_scope` does not restore its global flag when an exception
    # escapes the `with` block.
    with lq.context.quantized_scope(True):
        values = [tf.convert_to_tensor(v).numpy() for v in variables]
    kernels = []
    for v, value in zip(variables, values):
        if id(v) not in owners:
            raise ValueError(
                f"`model`: binary variable {v.name} is not an attribute of any layer, "
                "so kflip export cannot substitute its packed value; use standard "
                "larq layers (QuantDense, QuantConv2D, ...)."
            )
        if not np.all(np.abs(value) == 1.0):
            raise ValueError(
                f"`model`: binary variable {v.name} does not quantize to exactly "
                "+-1 (its kernel quantizer is not a sign quantizer, or a NoOp "
                "quantizer sees unsnapped weights); call "
                "kflip.snap_binary_weights(model) or use a sign quantizer."
            )
        kernels.append(_Kernel(*owners[id(v)], v, value))
    return kernels


def _float_variables(model, kernels) -> list:
    """The model's non-binary variables as plain resource variables (tracked by export)."""
    binary = {id(k.variable) for k in kernels}
    out, seen = [], set()
    for v in model.variables:
        if id(v) in binary:
            continue
        for attr in ("latent_variable", "_variable"):  # QuantizedVariable, AutoCast
            while hasattr(v, attr):
                v = getattr(v, attr)
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


@contextlib.contextmanager
def _substituted(kernels, tensors):
    """Temporarily point each layer's kernel attribute at a tensor (no Keras tracking)."""
    try:
        for k, t in zip(kernels, tensors):
            object.__setattr__(k.layer, k.attr, t)
        yield
    finally:
        for k in kernels:
            object.__setattr__(k.layer, k.attr, k.variable)


class ServingModule(tf.Module):
    """What :func:`export` saves: the serving function and the model's float state.

    The binary kernels are constants of the serving graph: ``uint8`` words (packed)
    or float32 (``packed=False``). Constants rather than variables so that TF's graph
    optimizer (Grappler constant folding) unpacks them once, when the loaded function
    is first run, instead of on every call (it folds tensors up to 10 MiB; a larger
    kernel is unpacked per call, which is still correct).
    """

    def __init__(self, model, kernels, packed: bool):
        super().__init__(name="kflip_export")
        self.packed = packed
        self.kernel_shapes = [list(k.values.shape) for k in kernels]
        # The model's own variables (BatchNorm statistics, biases, float layers); the
        # model object itself is deliberately *not* an attribute, so neither it nor
        # its optimizer is saved.
        self.float_variables = _float_variables(model, kernels)
        if packed:
            self._stored = [pack_pm1(k.values).numpy() for k in kernels]
        else:
            self._stored = [k.values.astype(np.float32) for k in kernels]

    @property
    def kernel_bytes(self) -> int:
        return int(sum(a.nbytes for a in self._stored))

    def trace(self, model, kernels, input_spec: tf.TensorSpec):
        """Trace ``model``'s inference call with kernels substituted; returns the
        concrete serving function (saved as the ``serving_default`` signature only:
        also keeping the ``tf.function`` as an attribute would make saving trace
        and store the graph, kernels included, a second time)."""
        stored, shapes, packed = list(self._stored), list(self.kernel_shapes), self.packed

        @tf.function(input_signature=[input_spec], autograph=False)
        def serve(inputs):
            tensors = []
            for i, (a, shape, k) in enumerate(zip(stored, shapes, kernels)):
                c = tf.constant(a, name=f"binary_kernel_{i}")
                t = unpack_pm1(c, shape) if packed else c
                # What the layer reads from its kernel variable inside its call: the
                # compute dtype under a mixed-precision policy (AutoCastVariable).
                dtype = getattr(k.layer, "compute_dtype", None) or k.variable.dtype
                tensors.append(tf.cast(t, dtype))
            with _substituted(kernels, tensors):
                y = model(inputs, training=False)
            return {"output_0": y}

        return serve.get_concrete_function()


def _input_spec(model) -> tf.TensorSpec:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            "`model` must be built with a known input shape (a functional or Sequential "
            "model with an Input layer, or call it once on data before exporting)."
        )
    if len(inputs) != 1:
        raise ValueError(f"`model` must have exactly one input, got {len(inputs)}.")
    if len(getattr(model, "outputs", None) or [None]) != 1:
        raise ValueError(f"`model` must have exactly one output, got {len(model.outputs)}.")
    shape = [None] + list(inputs[0].shape[1:])
    return tf.TensorSpec(shape, tf.float32, name="inputs")


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _saved_model_bytes(path: str) -> int:
    """Bytes of the SavedModel proper (graph, fingerprint, variables, assets)."""
    total = 0
    for name in ("saved_model.pb", "fingerprint.pb", "variables", "assets"):
        p = os.path.join(path, name)
        if os.path.isdir(p):
            total += _dir_bytes(p)
        elif os.path.exists(p):
            total += os.path.getsize(p)
    return total


def _check_out_path(path, overwrite: bool) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`path` must be a directory path, got {path!r}.")
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        raise ValueError(f"`path` {path!r} is an existing file; give a directory to create.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(
            f"`path` {path!r} is a non-empty directory; pick a new directory or pass "
            "overwrite=True (CLI: --overwrite)."
        )
    parent = os.path.dirname(path)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"`path` {path!r}: its parent {parent!r} is not a directory.")
    return path


def _sample_batch(model, n: int, seed: int = 0) -> np.ndarray:
    shape = [n] + [int(d) for d in model.inputs[0].shape[1:]]
    return np.random.RandomState(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def export(
    model,
    path,
    *,
    packed: bool = True,
    tflite: bool = False,
    overwrite: bool = False,
    sample=None,
) -> dict:
    """Export a binarized Keras model as a larq-free SavedModel (and optionally TFLite).

    Args:
      model: a built ``tf.keras`` model with at least one binary variable (larq
        ``precision == 1``) whose quantized value is exactly +-1.
      path: output directory (created; must not be a file or a non-empty directory
        unless ``overwrite``). The SavedModel goes to ``path`` itself, the TFLite file
        to ``path/model.tflite``, a JSON copy of the returned report to
        ``path/kflip_export.json``.
      packed: store binary kernels with 1 bit per weight (default) instead of float32.
      tflite: also convert with the Larq Compute Engine and verify the ``.tflite``.
      overwrite: allow writing into a non-empty directory.
      sample: inputs used to verify the exports against the Keras model (default: 16
        random inputs in [-1, 1] of the model's input shape).

    Returns:
      A report dict: ``path``, ``packed``, ``signature``, ``saved_model_bytes``,
      ``binary_weights`` (count), ``binary_kernel_bytes`` (as stored) and
      ``binary_kernel_bytes_float32`` (what float32 storage would take),
      ``max_abs_diff`` between the reloaded SavedModel and Keras on ``sample``, and
      with ``tflite`` the ``tflite_*`` entries.

    Example (``kflip.export(...)`` is short for ``kflip.export.export(...)``):
      >>> import os, tempfile
      >>> import kflip
      >>> import tensorflow as tf
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> path = os.path.join(tempfile.mkdtemp(), "bnn")
      >>> report = kflip.export(model, path)
      >>> report["binary_weights"], report["binary_kernel_bytes"]  # 1 bit per weight
      (1184, 148)
      >>> report["max_abs_diff"] < 1e-6  # the reloaded SavedModel matches Keras
      True
      >>> served = tf.saved_model.load(path).signatures["serving_default"]
      >>> served(inputs=tf.zeros([2, 8, 8, 1]))["output_0"].shape
      TensorShape([2, 10])
    """
    _check_args(model, packed=packed, tflite=tflite, overwrite=overwrite)
    path = _check_out_path(path, overwrite)
    spec = _input_spec(model)
    x = _sample_batch(model, 16) if sample is None else _check_sample(model, sample)
    kernels = _binary_kernels(model)
    if tflite:
        _require_lce()
    module = ServingModule(model, kernels, packed)
    concrete = module.trace(model, kernels, spec)

    def write(staging):
        report = _write(model, module, concrete, kernels, staging, x, tflite)
        report["path"] = path
        if tflite:
            report["tflite_path"] = os.path.join(path, TFLITE_NAME)
        _write_report(report, os.path.join(staging, REPORT_NAME))
        return report

    return _staged(path, write)


def _check_args(model, **flags):
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"`model` must be a tf.keras.Model, got {type(model).__name__}.")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"`{name}` must be a bool, got {flag!r}.")


def _staged(path, write):
    """``write(staging_dir)`` into a hidden directory beside ``path``, then moved into
    place; on any error nothing is left at ``path`` or beside it."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.partial-")
    try:
        result = write(staging)
        _move_into_place(staging, path)
        return result
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _check_sample(model, sample) -> np.ndarray:
    x = np.asarray(sample, np.float32)
    expected = tuple(int(d) for d in model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or x.shape[1:] != expected or len(x) == 0:
        raise ValueError(
            f"`sample` has shape {x.shape}; the model expects (N, {', '.join(map(str, expected))})."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("`sample` contains NaN or Inf.")
    return x


def _write(model, module, concrete, kernels, path, x, tflite: bool) -> dict:
    """Write the SavedModel (and TFLite) into ``path`` and verify them on ``x``."""
    tf.saved_model.save(module, path, signatures={SIGNATURE: concrete})
    n_weights = int(sum(k.values.size for k in kernels))
    report: dict[str, Any] = {
        "packed": module.packed,
        "signature": SIGNATURE,
        "output_key": "output_0",
        "saved_model_bytes": _saved_model_bytes(path),
        "binary_variables": len(kernels),
        "binary_weights": n_weights,
        "binary_kernel_bytes": module.kernel_bytes,
        "binary_kernel_bytes_float32": 4 * n_weights,
        "float_variables": len(module.float_variables),
    }
    expected = np.asarray(model(x, training=False))
    loaded = tf.saved_model.load(path)
    got = loaded.signatures[SIGNATURE](inputs=tf.constant(x))["output_0"].numpy()
    report["max_abs_diff"] = float(np.max(np.abs(got - expected)))
    report["verified_on"] = int(len(x))
    if report["max_abs_diff"] != 0.0:
        warnings.warn(
            f"kflip.export: the reloaded SavedModel differs from the Keras model by up "
            f"to {report['max_abs_diff']:.3g} on the verification sample.",
            stacklevel=3,
        )
    if tflite:
        report.update(_export_tflite(model, os.path.join(path, TFLITE_NAME), x, expected))
    return report


def _write_report(report: dict, path: str) -> None:
    """Strict JSON: a non-finite number (e.g. a NaN difference) is written as null."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in report.items()
    }
    with open(path, "w") as fh:
        json.dump(clean, fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")


def _move_into_place(staging: str, path: str) -> None:
    """Replace ``path`` by the finished ``staging`` directory; no stale file survives."""
    old = None
    if os.path.exists(path):
        old = staging + ".old"
        os.rename(path, old)
    os.rename(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- TFLite via the Larq Compute Engine --------------------------------------------------
def _require_lce():
    try:
        import larq_compute_engine as lce  # noqa: F401
        from larq_compute_engine.tflite.python.interpreter import Interpreter  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{LCE_HINT} (import failed: {e})") from e
    return lce


def _export_tflite(model, tflite_path: str, x: np.ndarray, expected: np.ndarray) -> dict:
    lce = _require_lce()
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    flatbuffer = lce.convert_keras_model(model)
    with open(tflite_path, "wb") as fh:
        fh.write(flatbuffer)
    got = np.asarray(Interpreter(flatbuffer, num_threads=1).predict(x))
    got = got.reshape(expected.shape)
    ops = _tflite_ops(flatbuffer)
    agree = float(np.mean(got.argmax(-1) == expected.argmax(-1))) if expected.ndim > 1 else None
    return {
        "tflite_path": tflite_path,
        "tflite_bytes": len(flatbuffer),
        "tflite_max_abs_diff": float(np.max(np.abs(got - expected))),
        "tflite_argmax_agreement": agree,
        "tflite_lce_ops": sorted(o for o in ops if o.startswith("Lce")),
    }


def _tflite_ops(flatbuffer: bytes) -> set:
    """Custom op names in a .tflite (the LCE ops are custom ops called ``Lce*``)."""
    import re

    return {m.decode() for m in re.findall(rb"Lce[A-Za-z0-9]+", flatbuffer)}


# ---- CLI -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``kflip export`` arguments to ``parser``.

    Example:
      >>> import argparse
      >>> import kflip
      >>> parser = kflip.export.add_arguments(argparse.ArgumentParser(prog="kflip export"))
      >>> args = parser.parse_args(["model.keras", "out", "--no-pack"])
      >>> args.model_path, args.out_dir, args.pack, args.tflite
      ('model.keras', 'out', False, False)
    """
    parser.add_argument(
        "model_path",
        metavar="MODEL_PATH",
        help="trained Keras model (.keras, .h5 or SavedModel directory)",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created)")
    parser.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="store binary kernels as float32 instead of 1 bit per weight",
    )
    parser.add_argument(
        "--tflite",
        action="store_true",
        help="also write OUT_DIR/model.tflite with LCE binary ops (needs kflip[lce])",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty OUT_DIR"
    )
    return parser


def load_model(model_path):
    """Load a Keras model for export (larq and kflip objects registered, no compile).

    Example:
      >>> import os, tempfile
      >>> import kflip
      >>> path = os.path.join(tempfile.mkdtemp(), "model.keras")
      >>> kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,)).save(path)
      >>> kflip.export.load_model(path).output_shape
      (None, 10)
    """
    import larq  # noqa: F401  (registers larq layers/quantizers)

    import kflip  # noqa: F401  (registers FlipLSTM)

    if not isinstance(model_path, (str, os.PathLike)) or not os.path.exists(model_path):
        raise ValueError(f"`MODEL_PATH` {model_path!r} does not exist.")
    try:
        return tf.keras.models.load_model(model_path, compile=False)
    except Exception as e:
        raise ValueError(
            f"`MODEL_PATH` {model_path!r} is not a loadable Keras model "
            f"(.keras, .h5 or SavedModel): {type(e).__name__}: {str(e)[:300]}"
        ) from e


def run(args) -> int:
    """Run ``kflip export`` with parsed ``args``.

    Prints the JSON report and returns 0; on bad input (missing or unloadable
    MODEL_PATH, bad OUT_DIR, a model without binary weights, LCE missing for
    ``--tflite``) prints ``kflip export: error: ...`` to stderr and returns 2.
    """
    try:
        model = load_model(args.model_path)
        report = export(
            model,
            args.out_dir,
            packed=getattr(args, "pack", True),
            tflite=getattr(args, "tflite", False),
            overwrite=getattr(args, "overwrite", False),
        )
    except (ValueError, ImportError, OSError) as e:
        print(f"kflip export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def main(argv=None) -> int:
    """``kflip export MODEL_PATH OUT_DIR [--no-pack] [--tflite] [--overwrite]``.

    Parses ``argv`` (default ``sys.argv[1:]``) and returns :func:`run`'s exit code.

    Example:
      >>> import kflip
      >>> kflip.export.main(["missing.keras", "out"])  # the error goes to stderr
      2
    """
    parser = add_arguments(argparse.ArgumentParser(prog="kflip export", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


class _CallableModule(type(os)):
    """``kflip.export`` is both this module (``add_arguments``, ``run``, ...) and,
    called, the :func:`export` function: ``kflip.export(model, path)``."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
