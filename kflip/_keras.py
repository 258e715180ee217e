"""Select Keras 2 (``tf_keras``) for TensorFlow before TensorFlow is imported.

Larq only runs on Keras 2. TensorFlow >= 2.16 routes ``tf.keras`` to Keras 3 unless
``TF_USE_LEGACY_KERAS=1`` is set *before* ``tf.keras`` is first touched. kflip sets it
on import; if TensorFlow already resolved ``tf.keras`` to Keras 3 there is no way back
inside this process, so we fail loudly and say what to do.
"""

import os
import sys

_HOWTO = (
    "kflip needs Keras 2 (the `tf_keras` package) as `tf.keras`, because larq only runs "
    "on Keras 2, but TensorFlow was already imported with Keras {version} as `tf.keras`. "
    "Fix: `import kflip` (or `import larq`) before anything touches `tf.keras`, or set "
    "the environment variable TF_USE_LEGACY_KERAS=1 before starting Python "
    "(e.g. `export TF_USE_LEGACY_KERAS=1`)."
)


def select_keras2() -> None:
    """Make ``tf.keras`` resolve to ``tf_keras``; raise ImportError if it is too late."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    # TensorFlow is imported; `tf.keras` is resolved lazily on first access, which now
    # sees the variable above unless it was already resolved to Keras 3.
    module = getattr(getattr(tf.keras, "Model", None), "__module__", "")
    if not module.startswith("tf_keras"):
        version = getattr(sys.modules.get("keras"), "__version__", "3")
        raise ImportError(_HOWTO.format(version=version))
