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

import numpy as np
import tensorflow as tf

from keras_localrank.inputs import as_samples
from keras_localrank.jacobians import preactivation_jacobians
from keras_localrank.taps import preactivation, select_taps, tap_inputs_model

__all__ = ["LayerStatistics", "calibration_statistics", "jacobian_gram"]


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
        count: number of rows the statistics average over.
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
        layer_names: the Dense-like layers to describe.
        batch_size: samples per chunk. Default 256.

    Returns:
        `{name: LayerStatistics}`. Leading axes of a layer's input other
        than the last are treated as extra samples.

    Raises:
        ValueError, TypeError: `x` that does not fit the model (see
            `keras_localrank.inputs.as_samples`), unknown layer names.
    """
    selection = select_taps(model, list(layer_names))
    x = as_samples(x, input_shape=selection.input_shape, name="x")
    inputs_model = tap_inputs_model(model, selection.taps)
    taps = selection.taps

    @tf.function(autograph=False, reduce_retracing=True)
    def step(chunk):
        outs = inputs_model(chunk, training=False)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        result = []
        for tap, inp in zip(taps, outs):
            n_in = inp.shape[-1]
            flat_in = tf.reshape(tf.cast(inp, tf.float32), [-1, n_in])
            rows = tf.shape(flat_in)[0]
            pre = tf.reshape(tf.cast(preactivation(tap.layer, inp), tf.float32), [rows, -1])
            out = tf.reshape(tf.cast(tap.layer.call(inp), tf.float32), [rows, -1])
            mean = tf.reduce_mean(pre, axis=0)
            centred = pre - mean
            result.append(
                (
                    tf.reduce_sum(flat_in, axis=0),
                    mean,
                    tf.matmul(centred, centred, transpose_a=True),
                    tf.reduce_min(out, axis=0),
                    tf.reduce_max(out, axis=0),
                    rows,
                )
            )
        return result

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
    stats = {}
    for tap, (s_in, mean, scatter, lo, hi, count) in zip(taps, acc):
        count = int(count)
        cov = scatter / count
        stats[tap.name] = LayerStatistics(
            name=tap.name,
            input_mean=s_in / count,
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

    @tf.function(autograph=False, reduce_retracing=True)
    def step(chunk):
        jacs = preactivation_jacobians(inputs_model, taps, chunk, mode="reverse")
        return [tf.einsum("bij,bkj->ik", j, j) for j in jacs]

    sums = None
    for sl in _chunks(len(x), batch_size):
        grams = [np.asarray(g, dtype=np.float64) for g in step(tf.constant(x[sl]))]
        sums = grams if sums is None else [s + g for s, g in zip(sums, grams)]
    return {tap.name: s / len(x) for tap, s in zip(taps, sums)}
