"""Validation of user-given numbers: Python and NumPy scalars alike, named in errors.

>>> number("flip_threshold", np.float32(0.5), low=0.0)
0.5
>>> number("flip_threshold", np.float32(-5), low=0.0)
Traceback (most recent call last):
...
ValueError: `flip_threshold` must be a finite number >= 0.0, got -5.0.
>>> positive_int("hidden_size", np.int64(2))
2
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _scalar(value):
    """``value`` as a Python scalar if it is a real (non-bool) 0-d number, else None."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return value.item() if isinstance(value, np.generic) else value


def number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    x = _scalar(value)
    if x is not None:
        x = float(x)
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    ok = x is not None and math.isfinite(x)
    ok = ok and (low is None or (x > low if low_open else x >= low))
    ok = ok and (high is None or x <= high)
    if not ok:
        shown = x if x is not None else value
        raise ValueError(f"`{name}` must be {what}, got {shown!r}.")
    return x


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (Python or NumPy integer; not bool, not float)."""
    x = _scalar(value)
    if not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(x)
