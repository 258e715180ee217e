"""Checks of one argument value each, shared by the bench modules (errors name it)."""

from __future__ import annotations

import os

import numpy as np


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`output_dir` {path!r} exists and is not a directory.")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"`output_dir` {path!r}: {parent!r} is not writable.")
