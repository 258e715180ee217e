"""What a run trains on: the dataset (resolved, subset, default epochs and model
options) and the model, built and compiled with its optimizer like every bench run."""

from __future__ import annotations

import numpy as np

from kflip import _keras

_keras.select_keras2()
import tensorflow as tf  # noqa: E402

from kflip import data as data_lib  # noqa: E402
from kflip import models as models_lib  # noqa: E402
from kflip.bench.checks import _check_positive_int  # noqa: E402
from kflip.bench.optimizers import make_optimizer  # noqa: E402

MODEL_OPTIONS = {"mlp": ("hidden",), "cnn": ("filters", "dense"), "binarynet": ("width",), "resnet": ()}

# Settings of the no-argument `kflip bench` / `kflip train` on the embedded dataset.
DIGITS_DEFAULTS = dict(epochs=10, model_options={"hidden": (256, 256)})
DEFAULT_EPOCHS = 6
# Models whose BatchNorm statistics are re-estimated before every test evaluation.
RECALIBRATED_MODELS = ("resnet",)


def build_model(name: str, dataset: data_lib.Dataset, **options) -> tf.keras.Model:
    """``kflip.models.build(name, ...)`` with a clear error for unusable options/inputs.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> ds = kflip.data.digits()
      >>> bench.build_model("mlp", ds, hidden=(16,)).output_shape
      (None, 10)
      >>> bench.build_model("mlp", ds, width=2.0)
      Traceback (most recent call last):
      ...
      ValueError: `model_options` ['width'] do not apply to model 'mlp' (it takes ['hidden']).
    """
    if name not in MODEL_OPTIONS:
        raise ValueError(f"`model` must be one of {sorted(MODEL_OPTIONS)}, got {name!r}.")
    unknown = sorted(set(options) - set(MODEL_OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"`model_options` {unknown} do not apply to model {name!r} "
            f"(it takes {list(MODEL_OPTIONS[name])})."
        )
    try:
        return models_lib.build(name, dataset.input_shape, dataset.num_classes, **options)
    except ValueError as e:
        if str(e).startswith("`"):  # already names its parameter
            raise
        raise ValueError(
            f"`model` {name!r} cannot be built for dataset {dataset.name!r} with input "
            f"shape {dataset.input_shape}: {str(e).splitlines()[0]}"
        ) from e


def compiled_model(
    ds: data_lib.Dataset,
    *,
    model: str,
    model_options: dict,
    optimizer: str,
    seed: int = 0,
    optimizer_options: dict | None = None,
) -> tf.keras.Model:
    """A freshly built model compiled like the bench's (XLA), not trained.

    Example:
      >>> import kflip
      >>> from kflip import bench
      >>> net = bench.compiled_model(kflip.data.digits(), model="mlp",
      ...                            model_options={"hidden": (16,)}, optimizer="fliplstm")
      >>> type(net.optimizer).__name__
      'FlipLSTM'
    """
    tf.keras.utils.set_random_seed(int(seed))
    net = build_model(model, ds, **model_options)
    net.compile(
        optimizer=make_optimizer(optimizer, **(optimizer_options or {})),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    return net


def resolve_dataset(dataset, data_dir=None, download=False, n_train=None, n_test=None):
    """A :class:`kflip.data.Dataset` from a name or a Dataset, optionally subset.

    Example:
      >>> from kflip import bench
      >>> ds = bench.resolve_dataset("digits", n_train=100, n_test=50)
      >>> ds.name, len(ds.x_train), len(ds.x_test)
      ('digits', 100, 50)
    """
    if isinstance(dataset, data_lib.Dataset):
        ds = dataset
    elif isinstance(dataset, str):
        ds = data_lib.load(dataset, data_dir=data_dir, download=download)
    else:
        raise ValueError(f"`dataset` must be a dataset name or a kflip.data.Dataset, got {dataset!r}.")
    _check_positive_int("n_train", n_train, allow_none=True)
    _check_positive_int("n_test", n_test, allow_none=True)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test)
    return ds


def _defaults_for(ds, epochs, model, model_options):
    if ds.name == "digits":
        if epochs is None:
            epochs = DIGITS_DEFAULTS["epochs"]
        if model_options is None and model == "mlp":
            model_options = dict(DIGITS_DEFAULTS["model_options"])
    if epochs is None:
        epochs = DEFAULT_EPOCHS
    return epochs, dict(model_options or {})


def recalibration_data(model: str, ds) -> np.ndarray | None:
    """The training images whose BatchNorm statistics model ``model`` (a name of
    :data:`kflip.models.MODELS`) is evaluated with: a fixed shuffled subset of 6,400 for
    the models in :data:`RECALIBRATED_MODELS`, else None (the moving statistics)."""
    if model not in RECALIBRATED_MODELS:
        return None
    return ds.x_train[np.random.default_rng(0).permutation(len(ds.x_train))[:6400]]
