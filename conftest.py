"""pytest setup for the docstring examples (doctests) of kflip's modules."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import kflip  # noqa: E402,F401  (selects Keras 2 before TensorFlow)
