"""What the task suite runs: its models, lengths and optimizer rows (no TensorFlow).

:mod:`kflip.suite` runs these cells; the ``kflip`` CLI reads the names from here so
that ``kflip bench --help`` answers without importing TensorFlow.

Example:
  >>> from kflip import suite_grid
  >>> [f"{m}@{n}" for m in suite_grid.MODELS if suite_grid.MODELS[m].held_out
  ...  for n in suite_grid.LENGTHS][:2]
  ['mlp784-256-10@250', 'mlp784-256-10@1500']
  >>> suite_grid.FIXED["bop-example"].describe()
  'gamma 0.001, threshold 1e-06'
"""

from __future__ import annotations

from typing import NamedTuple


class ModelSpec(NamedTuple):
    """A suite model: dataset name, ``kflip.models`` builder and options, default seeds."""

    dataset: str
    builder: str
    options: dict
    held_out: bool
    seeds: int


MODELS = {
    "digits-mlp": ModelSpec("digits", "mlp", {"hidden": (256, 256)}, False, 5),
    "mlp784-256-10": ModelSpec("mnist", "mlp", {"hidden": (256,)}, True, 3),
    "mlp2x512": ModelSpec("mnist", "mlp", {"hidden": (512, 512)}, False, 3),
    "cnn": ModelSpec("mnist", "cnn", {}, False, 3),
    "resnet": ModelSpec("mnist", "resnet", {}, True, 3),
}
LENGTHS = (250, 1500, 6000)


class OptSpec(NamedTuple):
    """One optimizer setting: ``kind`` (fliplstm, bop, bop2nd, adam-ste) and its params."""

    kind: str
    params: tuple = ()  # sorted (name, value) pairs

    def describe(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in self.params if not isinstance(v, str))


def spec(kind: str, **params) -> OptSpec:
    """``OptSpec(kind, sorted params)``."""
    return OptSpec(kind, tuple(sorted(params.items())))


FIXED = {
    "fliplstm": spec("fliplstm"),
    "bop-default": spec("bop", threshold=1e-8, gamma=1e-4),  # larq's Bop defaults
    "bop-example": spec("bop", threshold=1e-6, gamma=1e-3),  # larq's example settings
    "bop2nd-paper": spec("bop2nd", threshold=1e-6, gamma=1e-6, sigma=1e-2),
    "adam-ste": spec("adam-ste"),
}
TUNED = {"bop-tuned": "bop", "bop2nd-tuned": "bop2nd"}
OPTIMIZERS = ("fliplstm", "bop-default", "bop-example", "bop-tuned", "bop2nd-paper",
              "bop2nd-tuned", "adam-ste")
