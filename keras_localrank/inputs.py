"""Checking and materialising the samples `x` a measurement runs on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_localrank.validation import check_positive_int

__all__ = ["as_samples", "check_positive_int"]


def _from_dataset(dataset: tf.data.Dataset, max_samples: int | None) -> np.ndarray:
    parts, count = [], 0
    for element in dataset:
        if isinstance(element, (tuple, list)):
            element = element[0]
        if isinstance(element, dict):
            raise TypeError(
                "Expected a dataset of `x` or `(x, y)` elements. Received a dataset "
                f"of dicts with keys {sorted(element)}."
            )
        batch = np.asarray(element)
        parts.append(batch)
        count += len(batch)
        if max_samples is not None and count >= max_samples:
            break
    if not parts:
        raise ValueError("Expected a non-empty `x`. Received: an empty tf.data.Dataset.")
    return np.concatenate(parts, axis=0)


def as_samples(
    x,
    *,
    input_shape: Sequence[int | None] | None,
    max_samples: int | None = None,
    name: str = "x",
) -> np.ndarray:
    """Validate `x` and return it as a NumPy array of float samples.

    Args:
        x: a NumPy array, tensor, or batched `tf.data.Dataset` of `x` or
            `(x, y)` elements, shaped `[N, *input_shape]`.
        input_shape: the model's per-sample input shape (a None entry: any
            size; None: not checked).
        max_samples: keep at most this many samples (the first ones).
        name: the argument name used in error messages.

    Returns:
        `[N, *input_shape]` float array.

    Raises:
        TypeError: non-numeric or integer/boolean `x`.
        ValueError: empty `x`, a shape that does not fit the model, NaN or Inf.
    """
    if isinstance(x, tf.data.Dataset):
        arr = _from_dataset(x, max_samples)
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"Expected `{name}` to be an array, tensor or tf.data.Dataset. "
                f"Received: {name} of type {type(x).__name__} ({e})"
            ) from None
    if arr.dtype.kind != "f":
        raise TypeError(
            f"Expected floating-point `{name}`. Received: {name} with dtype "
            f"{arr.dtype}; cast it first, e.g. `{name}.astype('float32') / 255`."
        )
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(
            f"Expected a non-empty `{name}` with a leading sample axis. "
            f"Received: {name} with shape {arr.shape}."
        )
    if max_samples is not None:
        if int(max_samples) < 1:
            raise ValueError(f"Expected `max_samples` >= 1. Received: {max_samples}")
        arr = arr[: int(max_samples)]
    expected = tuple(input_shape) if input_shape is not None else arr.shape[1:]
    got = arr.shape[1:]
    if len(got) != len(expected) or any(
        e is not None and e != g for e, g in zip(expected, got)
    ):
        raise ValueError(
            f"Expected `{name}` of shape (N, {', '.join(str(e) for e in expected)}) "
            f"to fit the model input. Received: {name} with shape {arr.shape}."
        )
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite.reshape(len(arr), -1).all(axis=1)).ravel()
        raise ValueError(
            f"Expected finite `{name}`. Received: NaN or Inf in {len(bad)} sample(s), "
            f"first at index {int(bad[0])}."
        )
    return arr
