"""Reading and writing FlipLSTM weights files: ``NAME.npz`` (arrays) + ``NAME.json`` (metadata).

The arrays are loaded with ``allow_pickle=False``; a file that is not one gets a
``ValueError`` naming the file and the field. Weights without per-tensor
conditioning (``tensor_kernel`` all zero) are written without that array, in format
``kflip-lstm/1``, so files of earlier releases and of this one read alike.

>>> import os, tempfile
>>> import kflip
>>> from kflip import weights_io
>>> path = os.path.join(tempfile.mkdtemp(), "bop.npz")
>>> weights_io.save(kflip.bop_weights(), path)
>>> sorted(os.listdir(os.path.dirname(path)))
['bop.json', 'bop.npz']
>>> weights_io.load(path).metadata["init"]
'analytic-bop'
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from kflip import _files
from kflip import cell as cell_lib
from kflip import conditioning

FORMAT = "kflip-lstm/1"
FORMAT_CONDITIONED = "kflip-lstm/2"  # with a per-tensor ``tensor_kernel``
_REQUIRED = ("kernel", "recurrent", "bias", "out_kernel", "out_bias")


def save(w: "cell_lib.LSTMWeights", path: str) -> None:
    """Write ``w`` to ``path`` (``.npz``) and the ``.json`` beside it."""
    stem, _ = os.path.splitext(path)
    arrays = dict(
        kernel=w.kernel,
        recurrent=w.recurrent,
        bias=w.bias,
        out_kernel=w.out_kernel,
        out_bias=np.float32(w.out_bias),
        beta=np.float64(w.beta),
        eps=np.float64(w.eps),
    )
    meta = {"format": FORMAT, "features": list(cell_lib.FEATURES), "gates": list(cell_lib.GATES),
            "hidden_size": w.hidden_size}
    if w.conditioned:
        arrays["tensor_kernel"] = w.tensor_kernel
        meta.update(format=FORMAT_CONDITIONED, tensor_features=list(conditioning.TENSOR_FEATURES))
    text = json.dumps({**meta, **w.metadata}, indent=2, sort_keys=True) + "\n"  # fails first
    with _files.atomic_write(stem + ".npz", "wb") as fh:
        np.savez(fh, **arrays)
    with _files.atomic_write(stem + ".json") as fh:
        fh.write(text)


def load(path: str) -> "cell_lib.LSTMWeights":
    """The weights saved at ``path`` by :func:`save`."""
    stem, _ = os.path.splitext(os.fspath(path))
    npz = stem + ".npz"
    if not os.path.exists(npz):
        raise FileNotFoundError(
            f"`weights`: no LSTM weights file at {npz!r} (expected an .npz written "
            "by `kflip meta-train` or `LSTMWeights.save`)."
        )
    arrays = _read_npz(npz)
    meta = _read_metadata(stem + ".json")
    try:
        return cell_lib.LSTMWeights(
            kernel=arrays["kernel"],
            recurrent=arrays["recurrent"],
            bias=arrays["bias"],
            out_kernel=arrays["out_kernel"],
            out_bias=arrays["out_bias"],
            beta=arrays.get("beta", 0.99),
            eps=arrays.get("eps", 1e-20),
            tensor_kernel=arrays.get("tensor_kernel"),
            metadata=meta,
        )
    except ValueError as e:
        raise ValueError(f"`weights` file {npz!r}: {e}") from e


def _read_metadata(json_path: str) -> dict:
    """The free-form metadata of a weights file, its format fields checked and removed."""
    if not os.path.exists(json_path):
        return {}
    try:
        with open(json_path) as fh:
            meta = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"`weights`: {json_path} is not valid JSON ({e}).") from e
    if meta.get("format", FORMAT) not in (FORMAT, FORMAT_CONDITIONED):
        raise ValueError(
            f"`weights`: {json_path} has format {meta.get('format')!r}; "
            f"this kflip reads {FORMAT!r} and {FORMAT_CONDITIONED!r}."
        )
    checks = (("features", cell_lib.FEATURES), ("tensor_features", conditioning.TENSOR_FEATURES))
    for key, mine in checks:
        if tuple(meta.get(key, mine)) != tuple(mine):
            raise ValueError(
                f"`weights`: {json_path} uses {key} {meta.get(key)}, this kflip computes "
                f"{list(mine)}."
            )
    for key in ("format", "features", "tensor_features", "gates", "hidden_size"):
        meta.pop(key, None)
    return meta


def _read_npz(npz: str) -> dict:
    """The arrays of an LSTM weights ``.npz``; a ValueError naming the file if unreadable."""
    if os.path.isdir(npz) or not zipfile.is_zipfile(npz):
        raise ValueError(
            f"`weights` file {npz!r} is not an .npz archive (expected one written by "
            "`kflip meta-train` or `LSTMWeights.save`)."
        )
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"`weights` file {npz!r} cannot be read: {e}") from e
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"`weights` file {npz!r} has no array {missing[0]!r}.")
    return arrays
