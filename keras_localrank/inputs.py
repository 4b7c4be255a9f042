"""Checking and materialising the samples `x` a measurement runs on."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_localrank.validation import check_positive_int

# `check_positive_int` is re-exported for older imports; it lives in `validation`.
__all__ = ["as_model_samples", "as_samples", "check_positive_int", "inputs_list"]


def _check_batched(dataset: tf.data.Dataset, input_shape, name: str) -> None:
    """Raise if `dataset` yields single samples rather than batches."""
    spec = dataset.element_spec
    if isinstance(spec, (tuple, list)) and spec:
        spec = spec[0]
    shape = getattr(spec, "shape", None)
    if shape is None or shape.rank is None:
        return
    if shape.rank == 0:
        unbatched = True
    elif shape[0] is None:
        return  # a batch axis of unknown size: batched
    elif input_shape is not None:
        unbatched = shape.rank == len(input_shape)
    else:
        unbatched = shape.rank == 1
    if unbatched:
        raise ValueError(
            f"Expected `{name}` to be a batched tf.data.Dataset (elements shaped "
            "(batch, *input_shape)). Received: a dataset of single samples, element "
            f"shape {tuple(shape)}; call `{name}.batch(batch_size)` first."
        )


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
            `(x, y)` elements, shaped `[N, *input_shape]`. Not a generator or
            other iterator: the samples are reused, so materialise them first.
        input_shape: the model's per-sample input shape (a None entry: any
            size; None: not checked).
        max_samples: keep at most this many samples (the first ones); an
            int >= 1 or None (all). Default None.
        name: the argument name used in error messages.

    Returns:
        `[N, *input_shape]` float array.

    Raises:
        TypeError: non-numeric or integer/boolean `x`, a generator or iterator,
            a non-integer `max_samples`.
        ValueError: empty `x`, an unbatched dataset, a shape that does not fit
            the model, NaN or Inf, `max_samples` < 1.
    """
    if max_samples is not None:
        max_samples = check_positive_int("max_samples", max_samples)
    if isinstance(x, tf.data.Dataset):
        _check_batched(x, input_shape, name)
        arr = _from_dataset(x, max_samples)
    elif inspect.isgenerator(x) or isinstance(x, Iterator) or (
        not hasattr(x, "__array__") and not hasattr(x, "__len__")
        and hasattr(x, "__iter__")
    ):
        raise TypeError(
            f"Expected `{name}` to be an array, tensor or batched tf.data.Dataset. "
            f"Received: {name} of type {type(x).__name__} (a generator or iterator, "
            "which can be read only once); pass the samples as an array, e.g. "
            f"`np.concatenate(list({name}))`, or as a batched tf.data.Dataset."
        )
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"Expected `{name}` to be an array, tensor or tf.data.Dataset. "
                f"Received: {name} of type {type(x).__name__} ({e})"
            ) from None
        if arr.dtype == object:
            raise TypeError(
                f"Expected `{name}` to be an array, tensor or batched tf.data.Dataset "
                f"of floats. Received: {name} of type {type(x).__name__}, which NumPy "
                "reads as an array of Python objects; pass a float array."
            )
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
        arr = arr[:max_samples]
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


def inputs_list(x, inputs) -> list:
    """`x` as one entry per model input (a list in input order, a dict by
    input name, or one array for a one-input model)."""
    names = [t.name for t in inputs]
    if isinstance(x, tf.data.Dataset):
        raise TypeError(
            "Expected `x` as a list or dict of arrays for a model measured with "
            "held inputs or an intermediate `wrt`. Received: a tf.data.Dataset; "
            "materialise it first."
        )
    if isinstance(x, dict):
        unknown = sorted(set(x) - set(names))
        missing = [n for n in names if n not in x]
        if unknown or missing:
            raise ValueError(
                f"Expected `x` keys {names} (the model inputs). Received: keys "
                f"{sorted(x)}."
            )
        return [x[n] for n in names]
    if isinstance(x, (list, tuple)):
        if len(x) != len(inputs):
            raise ValueError(
                f"Expected `x` with one array per model input ({len(inputs)}: {names}). "
                f"Received: {len(x)} arrays."
            )
        return list(x)
    if len(inputs) == 1:
        return [x]
    raise TypeError(
        f"Expected `x` as a list or dict of arrays, one per model input {names}. "
        f"Received: x of type {type(x).__name__}."
    )


def as_model_samples(x, model, wrt, *, max_samples: int | None = None, dtype="float32"):
    """Samples of a measurement with held inputs or an intermediate `wrt`.

    Args:
        x: one array per model input: a list (model input order), a dict
            (input names), or one array for a one-input model.
        model: the model.
        wrt: the `graph.Wrt` of the measurement.
        max_samples: keep at most this many samples.
        dtype: dtype of the differentiated tensor and of held float inputs.

    Returns:
        `[wrt values, *held inputs]` NumPy arrays with one leading sample axis
        (held inputs in the order of `wrt.held`).

    Raises:
        TypeError: `x` of the wrong structure or dtype.
        ValueError: wrong keys, counts, shapes, sample counts, NaN or Inf.
    """
    from keras_localrank.graph import functional_graph, wrt_values

    inputs = functional_graph(model).inputs
    arrays = []
    for tensor, value in zip(inputs, inputs_list(x, inputs)):
        name = f"x[{tensor.name!r}]"
        if keras.backend.is_float_dtype(tensor.dtype):
            arr = as_samples(
                value, input_shape=tuple(tensor.shape[1:]), max_samples=max_samples, name=name
            ).astype(dtype, copy=False)
        else:
            arr = np.asarray(value)
            if arr.dtype.kind not in "iub":
                raise TypeError(
                    f"Expected integer `{name}` for the {tensor.dtype} model input. "
                    f"Received: dtype {arr.dtype}."
                )
            if max_samples is not None:
                arr = arr[: int(max_samples)]
            expected = tuple(tensor.shape[1:])
            if arr.ndim != len(expected) + 1 or any(
                e is not None and e != g for e, g in zip(expected, arr.shape[1:])
            ):
                raise ValueError(
                    f"Expected `{name}` of shape (N, {', '.join(map(str, expected))}). "
                    f"Received: shape {arr.shape}."
                )
        arrays.append(arr)
    counts = {len(a) for a in arrays}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            "Expected the same non-zero number of samples for every model input. "
            f"Received: {[len(a) for a in arrays]}."
        )
    if wrt.is_input:
        first = arrays[wrt.input_index]
    else:
        first = wrt_values(model, wrt, arrays).astype(dtype, copy=False)
    return [first, *(arrays[i] for i in wrt.held)]
