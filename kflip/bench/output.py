"""What ``kflip train`` and ``kflip bench`` write: JSON-able records, files replaced
atomically (``history.json``, ``results.json``), the trained model, the machine info."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform

import numpy as np

from kflip import _files, _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip._version import __version__  # noqa: E402


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (tf.Tensor, tf.Variable)):
        return _jsonable(obj.numpy())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    for method in ("to_dict", "as_dict"):
        if callable(getattr(obj, method, None)):
            return _jsonable(getattr(obj, method)())
    if hasattr(obj, "__dict__"):
        return _jsonable({k: v for k, v in vars(obj).items() if not k.startswith("_")})
    return str(obj)


def _write_json(obj, path: str) -> None:
    _files.write_json(path, _jsonable(obj))


def _save(net, result: dict, output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    model_path = os.path.join(output_dir, "model.keras")
    net.save(model_path)
    history_path = os.path.join(output_dir, "history.json")
    result = dict(result, model_path=model_path, history_path=history_path)
    _write_json(result, history_path)
    return result


def machine_info() -> dict:
    """Date, platform, CPU count and package versions, for ``results.json``.

    Example:
      >>> from kflip import bench
      >>> sorted(bench.machine_info())
      ['cpu_count', 'date_utc', 'kflip', 'larq', 'platform', 'processor', 'python',
       'tensorflow']
    """
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "larq": getattr(lq, "__version__", "?"),
        "kflip": __version__,
    }


def _write_partial(config: dict, runs: list, output_dir: str) -> None:
    """``results.json`` with the runs finished so far (kept if the bench is interrupted)."""
    os.makedirs(output_dir, exist_ok=True)
    _write_json(
        {"config": config, "machine": machine_info(), "runs": runs, "partial": True},
        os.path.join(output_dir, "results.json"),
    )


def _write_results(results: dict, output_dir: str | None, plots: bool) -> None:
    """``results.json`` (and, if ``plots``, the PNG plots) in ``output_dir``, if given;
    the paths go to ``results["files"]``."""
    if not output_dir:
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    results["files"]["results"] = path
    _write_json(results, path)  # first, so a plotting problem cannot lose results
    if plots:
        from kflip import plots as plots_lib

        results["files"].update(plots_lib.plot_results(results, output_dir))
        _write_json(results, path)
