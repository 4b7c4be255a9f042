"""Calibration statistics: what each layer's output actually uses on data.

Plain functions that run a model over calibration samples in chunks (memory
does not grow with the number of samples) and return, per layer, the moments
of the pre-activation `p_l(x)` (mean, covariance), the range of each output
unit after the activation, and optionally the Jacobian Gram matrix
`E_x[J_l(x) J_l(x)^T]` built from `keras_localrank.jacobians`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_localrank.inputs import as_samples
from keras_localrank.jacobians import preactivation_jacobians
from keras_localrank.taps import model_graph, preactivation, select_taps, tap_inputs_model
from keras_localrank.tracing import instance_function

__all__ = ["LayerStatistics", "calibration_statistics", "channel_ranges", "jacobian_gram"]


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """Statistics of one layer on the calibration data.

    Attributes:
        name: layer name.
        input_mean: `E[x_in]`, shape `[n_in]`.
        mean: `E[p]` of the pre-activation, shape `[n_out]`.
        covariance: `Cov[p]`, shape `[n_out, n_out]` (float64).
        out_min: per-unit minimum of the layer output (after activation).
        out_max: per-unit maximum of the layer output (after activation).
        count: number of rows (samples times output positions) the
            pre-activation statistics average over.
    """

    name: str
    input_mean: np.ndarray
    mean: np.ndarray
    covariance: np.ndarray
    out_min: np.ndarray
    out_max: np.ndarray
    count: int


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def calibration_statistics(
    model, x, layer_names: Sequence[str], *, batch_size: int = 256
) -> dict[str, LayerStatistics]:
    """Pre-activation moments and output ranges of `layer_names` on `x`.

    Args:
        model: a built functional or Sequential Keras model.
        x: calibration samples `[N, *input_shape]` (float).
        layer_names: the Dense-like or convolution layers to describe.
        batch_size: samples per chunk. Default 256.

    Returns:
        `{name: LayerStatistics}`. Axes other than the last (channel) axis
        are treated as extra samples: for a convolution the moments run over
        samples and output positions, the input mean over input positions.

    Raises:
        ValueError, TypeError: `x` that does not fit the model (see
            `keras_localrank.inputs.as_samples`), unknown layer names.
    """
    selection = select_taps(model, list(layer_names))
    x = as_samples(x, input_shape=selection.input_shape, name="x")
    inputs_model = tap_inputs_model(model, selection.taps)
    taps = selection.taps

    def _step(chunk):
        outs = inputs_model(chunk, training=False)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        result = []
        for tap, inp in zip(taps, outs):
            n_in = inp.shape[-1]
            flat_in = tf.reshape(tf.cast(inp, tf.float32), [-1, n_in])
            pre = tf.cast(preactivation(tap.layer, inp), tf.float32)
            n_out = pre.shape[-1]
            # Rows of the output: samples times output positions (a strided
            # or 'valid' convolution has fewer positions than its input).
            pre = tf.reshape(pre, [-1, n_out])
            out = tf.reshape(tf.cast(tap.layer.call(inp), tf.float32), [-1, n_out])
            mean = tf.reduce_mean(pre, axis=0)
            centred = pre - mean
            result.append(
                (
                    tf.reduce_sum(flat_in, axis=0),
                    mean,
                    tf.matmul(centred, centred, transpose_a=True),
                    tf.reduce_min(out, axis=0),
                    tf.reduce_max(out, axis=0),
                    tf.shape(pre)[0],
                    tf.shape(flat_in)[0],
                )
            )
        return result

    step = instance_function(_step, reduce_retracing=True)

    # Chunk moments are merged with the pairwise update of Chan, Golub and
    # LeVeque (1979), in float64: no cancellation from E[p p^T] - m m^T.
    acc = None
    for sl in _chunks(len(x), batch_size):
        parts = step(tf.constant(x[sl]))
        parts = [[np.asarray(t, dtype=np.float64) for t in item] for item in parts]
        if acc is None:
            acc = parts
            continue
        for a, p in zip(acc, parts):
            n_a, n_b = a[5], p[5]
            delta = p[1] - a[1]
            a[0] += p[0]
            a[2] += p[2] + np.outer(delta, delta) * (n_a * n_b / (n_a + n_b))
            a[1] += delta * (n_b / (n_a + n_b))
            a[3] = np.minimum(a[3], p[3])
            a[4] = np.maximum(a[4], p[4])
            a[5] = n_a + n_b
            a[6] = a[6] + p[6]
    stats = {}
    for tap, (s_in, mean, scatter, lo, hi, count, in_rows) in zip(taps, acc):
        count = int(count)
        cov = scatter / count
        stats[tap.name] = LayerStatistics(
            name=tap.name,
            input_mean=s_in / int(in_rows),
            mean=mean,
            covariance=(cov + cov.T) / 2,
            out_min=lo,
            out_max=hi,
            count=count,
        )
    return stats


def jacobian_gram(
    model, x, layer_names: Sequence[str], *, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """`E_x[J_l(x) J_l(x)^T]` of each layer's pre-activation Jacobian.

    The per-sample Jacobians come from
    `keras_localrank.jacobians.preactivation_jacobians` (reverse mode), a
    chunk of `batch_size` samples at a time.

    Args:
        model: a built functional or Sequential Keras model with a float input.
        x: calibration samples `[N, *input_shape]`.
        layer_names: the layers to describe.
        batch_size: samples per chunk (bounds memory: each chunk holds
            `batch_size * n_l * n0` Jacobian entries per layer). Default 16.

    Returns:
        `{name: [n_l, n_l] float64 array}`.
    """
    selection = select_taps(model, list(layer_names))
    x = as_samples(x, input_shape=selection.input_shape, name="x")
    inputs_model = tap_inputs_model(model, selection.taps)
    taps = selection.taps

    def _step(chunk):
        jacs = preactivation_jacobians(inputs_model, taps, chunk, mode="reverse")
        return [tf.einsum("bij,bkj->ik", j, j) for j in jacs]

    step = instance_function(_step, reduce_retracing=True)

    sums = None
    for sl in _chunks(len(x), batch_size):
        grams = [np.asarray(g, dtype=np.float64) for g in step(tf.constant(x[sl]))]
        sums = grams if sums is None else [s + g for s, g in zip(sums, grams)]
    return {tap.name: s / len(x) for tap, s in zip(taps, sums)}


def channel_ranges(
    model, x, tensors: Sequence, *, batch_size: int = 256
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel `(min, max)` of graph tensors of `model` on `x`.

    The last axis is the channel axis; the minimum and maximum run over
    samples and every other axis (positions).

    Args:
        model: a built functional or Sequential Keras model.
        x: calibration samples `[N, *input_shape]`.
        tensors: `KerasTensor`s of `model`'s graph.
        batch_size: samples per chunk. Default 256.

    Returns:
        One `(min, max)` pair of `[channels]` float64 arrays per tensor.
    """
    graph = model_graph(model)
    in_shape = tuple(graph.inputs[0].shape[1:])
    x = as_samples(x, input_shape=in_shape, name="x")
    features = keras.Model(graph.inputs[0], list(tensors))

    def _step(chunk):
        outs = features(chunk, training=False)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        result = []
        for out in outs:
            flat = tf.reshape(tf.cast(out, tf.float32), [-1, out.shape[-1]])
            result.append((tf.reduce_min(flat, axis=0), tf.reduce_max(flat, axis=0)))
        return result

    step = instance_function(_step, reduce_retracing=True)

    acc = None
    for sl in _chunks(len(x), batch_size):
        parts = [
            (np.asarray(lo, np.float64), np.asarray(hi, np.float64))
            for lo, hi in step(tf.constant(x[sl]))
        ]
        acc = parts if acc is None else [
            (np.minimum(a[0], p[0]), np.maximum(a[1], p[1])) for a, p in zip(acc, parts)
        ]
    return acc
