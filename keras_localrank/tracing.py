"""`tf.function`s owned by one object, with retracing statistics of their own.

TensorFlow warns ("N out of the last N calls to <function> triggered
tf.function retracing") when the functions that share one Python code object
trace often. Every estimator, counter and callback builds its own functions
from the same code, so measuring a sixth model in a row warned although each
of them had traced once. `instance_function` wraps the callable in a
`functools.partial`, which TensorFlow keys by the object itself: the
statistics, and a warning, then concern that object's own retracing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf

__all__ = ["instance_function"]


def instance_function(fn: Callable, **kwargs):
    """`tf.function(fn, autograph=False, **kwargs)`, its retracing counted alone.

    Args:
        fn: a closure or bound method of the owning object.
        **kwargs: `tf.function` arguments (`jit_compile`, `input_signature`,
            `reduce_retracing`, `autograph`).
    """
    kwargs.setdefault("autograph", False)
    return tf.function(functools.partial(fn), **kwargs)
