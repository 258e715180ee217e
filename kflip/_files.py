"""Files written whole or not at all: a temporary file beside the target, then a rename.

An interrupted write (an error, Ctrl-C, a full disk) leaves the previous file, or no
file, and never a half-written one; the temporary file is removed.

>>> import json, os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "result.json")
>>> write_json(path, {"accuracy": 0.97})
>>> json.load(open(path))
{'accuracy': 0.97}
>>> write_json(path, {"bad": object()})  # not JSON: the old file stays, no temp file
Traceback (most recent call last):
...
TypeError: Object of type object is not JSON serializable
>>> json.load(open(path)), os.listdir(os.path.dirname(path))
({'accuracy': 0.97}, ['result.json'])
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path, obj, *, indent: int | None = 1, **dump_options) -> None:
    """``json.dump(obj)`` into ``path`` atomically, with a final newline."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=indent, **dump_options)
        fh.write("\n")
