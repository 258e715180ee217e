"""A function as its own ``tf.function`` key.

``tf.function`` keys its retracing statistics on a Python function's code, so many
compiled functions made from the same code (one per model, layer, task family or block
size, each traced once) read as one function retraced on every call and log
TensorFlow's retracing warning. Wrapping each in a :class:`Traced` object makes each its
own key: the same compilations, no false warning.

>>> import tensorflow as tf
>>> from kflip._tracing import Traced
>>> fns = [tf.function(Traced(lambda x, k=k: x * k)) for k in range(3)]
>>> [int(f(tf.constant(2))) for f in fns]
[0, 2, 4]
"""


class Traced:
    """``fn`` as a callable object (see the module docstring)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)
