"""`LocalRank`: a Keras metric accumulating local rank over batches.

For hand-written `tf.GradientTape` training loops: call
`metric.update_state(x_batch)` after (or inside) a step and read
`metric.result()`. It uses the same engine as `local_rank`, and its
`update_state` is graph-friendly (it can run inside `tf.function`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_localrank import names
from keras_localrank.estimate import LocalRankEstimator
from keras_localrank.memory import DEFAULT_MEMORY_BUDGET
from keras_localrank.spectra import Tolerance

__all__ = ["LocalRank"]


class LocalRank(keras.metrics.Metric):
    """Mean local rank of one layer over all samples given to `update_state`.

    The metric measures one tap, what `local_rank(model, x, layers=[layer])`
    reports as a single entry: a layer's only call (also a layer object
    inside a nested model, measured as `"outer/inner"`), a call name
    (`"shared@1"`, `"encoder/dense"`, `"mha/query"`), or a nested model or
    attention layer with one measurable call inside. A `layer` that
    resolves to several calls (a shared layer, a nested model with several
    layers, an attention layer's projections) is refused with a ValueError
    naming those calls: their ranks are different Jacobians (other depths,
    other widths), which `local_rank` and `LocalRankCallback` report
    separately, so one metric per call name is the equivalent here.

    Args:
        model: the model the layer belongs to (built).
        layer: the layer name, call name or layer object to measure (see
            above).
        wrt: what is differentiated, as in `local_rank`: None (the only float
            input), an input name or index (the other inputs are held at
            their values), or a layer name (e.g. `"embedding"` of a text
            model). With several inputs, `update_state` takes a list or dict
            of batches; with an intermediate `wrt`, the model's own inputs
            (e.g. the token ids).
        atol: None (exact rank, default) or the robust-rank threshold.
        rtol: relative threshold. Default None (numpy's rule).
        input_shape: per-sample input shape, for a model whose input has
            undefined (None) dimensions (a sequence of any length): the
            samples given to `update_state` must have it.
        method, dtype, jit_compile, memory_budget: passed to
            `LocalRankEstimator` (the same per-layer choice as `local_rank`:
            convolutions, attention projections, nested models). The metric
            needs only ranks: exact layers are counted without their
            singular values (`spectrum=False`, identical ranks).
        name: metric name. Default `"local_rank/<call>"`, or
            `"robust_local_rank/<call>"` with `atol`, with the measured
            call's name as `local_rank` and the callback key it (the layer
            name for a top-level layer; see `keras_localrank.names`).

    Attributes:
        layer_name: the measured call's name (a key of `local_rank`'s
            results, e.g. `"encoder/dense"` or `"shared@1"`).

    Raises:
        TypeError: `layer` is neither a string nor a layer.
        ValueError: `layer` is unknown to the model (see
            `taps.select_taps`), names several calls, or is planned for the
            randomized method (its rounds run eagerly, outside a metric update).

    Note:
        The metric holds a reference to the model, so it is meant for custom
        loops and is not serialised with the model.

    Example:
        >>> metric = LocalRank(model, "dense_1")
        >>> for x, y in dataset:
        ...     train_step(x, y)
        ...     metric.update_state(x)
        >>> float(metric.result())
    """

    def __init__(
        self,
        model,
        layer,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        method: str = "auto",
        dtype: str | None = None,
        jit_compile: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        input_shape=None,
        wrt: int | str | None = None,
        name: str | None = None,
    ):
        if not isinstance(layer, (str, keras.layers.Layer)):
            raise TypeError(
                f"Expected `layer` to be a layer name or layer. Received: layer={layer!r}"
            )
        estimator = LocalRankEstimator(
            model,
            [layer],
            tolerances=(Tolerance(atol=atol, rtol=rtol),),
            method=method,
            dtype=dtype,
            jit_compile=jit_compile,
            memory_budget=memory_budget,
            input_shape=input_shape,
            wrt=wrt,
            spectrum=False,
        )
        calls = [tap.name for tap in estimator.taps]
        if len(calls) != 1:
            shown = getattr(layer, "name", layer)
            raise ValueError(
                f"Expected `layer` to name one layer call. Received: layer={shown!r}, "
                f"which `local_rank` measures as {len(calls)} calls {calls} (a shared "
                "layer, or the layers of a nested model or attention layer); create one "
                "LocalRank per call, e.g. "
                f"LocalRank(model, {calls[0]!r})."
            )
        if estimator.plans[calls[0]].method == "randomized":
            raise ValueError(
                f"Expected a layer measured exactly or analytically. Received: "
                f"layer={calls[0]!r}, planned for the randomized method (method={method!r}, "
                "or too large for memory_budget), whose sketch rounds run eagerly and "
                "cannot be part of a metric update; pass method='exact' or a larger "
                "memory_budget, or use keras_localrank.LocalRankCallback."
            )
        kind = names.EXACT if atol is None else names.ROBUST
        default_name = names.rank_key(calls[0], kind, atol, qualify=False)
        super().__init__(name=name or default_name, dtype="float32")
        self._estimator = estimator
        #: The measured call's name: the key of its ranks in the estimator's results.
        self.layer_name = calls[0]
        self.total = self.add_variable((), initializer="zeros", dtype="float64", name="total")
        self.count = self.add_variable((), initializer="zeros", dtype="float64", name="count")

    def update_state(self, x, *y_pred, sample_weight=None):
        """Add the ranks of `J_layer(x)` for every sample of the batch `x`.

        Raises:
            TypeError: called as a compiled metric (`update_state(y_true,
                y_pred)`): those never see the inputs `x`.
            ValueError: (eagerly) non-finite `x`.
        """
        if y_pred:
            raise TypeError(
                "LocalRank measures the model inputs `x`, which metrics passed to "
                "`compile(metrics=...)` never see (Keras gives them y_true and "
                "y_pred). Use `keras_localrank.LocalRankCallback` in `model.fit`, or "
                "call `metric.update_state(x)` in a custom training loop."
            )
        if sample_weight is not None:
            raise ValueError("LocalRank does not support `sample_weight`.")
        samples = self._estimator.samples_tensor(x)
        ranks = self._estimator.measure_tensor(samples)[self.layer_name][0][0]
        self.total.assign_add(tf.reduce_sum(tf.cast(ranks, tf.float64)))
        self.count.assign_add(tf.cast(tf.size(ranks), tf.float64))

    def result(self):
        return tf.cast(tf.math.divide_no_nan(self.total, self.count), self.dtype)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)
