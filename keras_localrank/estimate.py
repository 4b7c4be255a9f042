"""The local-rank estimator: chunks of samples -> spectra -> `LocalRankResult`.

`LocalRankEstimator` is built once per model (it selects taps, picks the
fastest path per layer, and traces one `tf.function` per input shape) and can
be called many times as the weights change, which is what the training
callbacks do. `local_rank` is the one-call convenience wrapper.

References:
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_localrank.dense_chain import dense_forest_singular_values, find_dense_forest
from keras_localrank.graph import cast_model, functional_graph
from keras_localrank.inputs import as_model_samples, as_samples, check_positive_int
from keras_localrank.jacobians import choose_mode, preactivation_jacobians
from keras_localrank.result import LayerInfo, LocalRankResult
from keras_localrank.spectra import (
    Tolerance,
    effective_rank,
    rank_from_singular_values,
    singular_values,
    stable_rank,
)
from keras_localrank.taps import select_taps, tap_inputs_model

__all__ = ["LocalRankEstimator", "local_rank"]

_METHODS = ("auto", "analytic", "autodiff", "autodiff-reverse", "autodiff-forward")
#: Jacobian elements (all taps) held per chunk when `batch_size` is None.
_ELEMENT_BUDGET = 2**25
_MAX_AUTO_BATCH = 128


def _cast_model(model, dtype: str):
    """A copy of `model` computing in `dtype` (for float64 autodiff Jacobians)."""
    return cast_model(model, dtype)


def _replicas(model):
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or strategy.num_replicas_in_sync <= 1:
        return None
    return strategy


class LocalRankEstimator:
    """Measures local rank of chosen layers of a model, many times.

    Args:
        model: a built functional or Sequential `keras.Model` (nested models,
            shared layers and several inputs are supported, see `wrt` and
            docs/graph_coverage.md). Models built under a `tf.distribute` strategy are measured
            with the chunk split over the strategy's replicas.
        layers: names or layer objects to measure. Default None: all
            measurable layers (`Dense`, `EinsumDense`, convolutions,
            `RankProbe`).
        tolerances: one or more `Tolerance` rules, all evaluated on the same
            singular values. Default: the exact (numpy) rule.
        dtype: `"float32"` or `"float64"`, the precision of the Jacobians.
            Default None: float64 if the model input is float64, else float32.
        batch_size: samples per chunk. Default None: as many as keep all
            Jacobians of a chunk under ~128 MiB (at most 128).
        method: `"auto"` (default: the analytic path for Dense chains, autodiff
            for the rest), `"analytic"` (error if a layer does not qualify),
            `"autodiff"` (mode chosen by size), `"autodiff-reverse"`,
            `"autodiff-forward"`.
        jit_compile: compile the measurement with XLA. Default False.
        input_shape: per-sample input shape, only for models whose input has
            undefined dimensions.
        wrt: the tensor to differentiate: None (the only float model input),
            a model input's index or name (other inputs are held at their
            sample values), or the name of a layer call whose output is used
            (`"embedding"` for a text model). See `taps.select_taps`.

    Raises:
        TypeError, ValueError: see `local_rank`.
    """

    def __init__(
        self,
        model,
        layers: Iterable[str | keras.layers.Layer] | None = None,
        *,
        tolerances: Sequence[Tolerance] = (Tolerance(),),
        dtype: str | None = None,
        batch_size: int | None = None,
        method: str = "auto",
        jit_compile: bool = False,
        input_shape: Sequence[int] | None = None,
        wrt: int | str | None = None,
    ):
        if method not in _METHODS:
            raise ValueError(f"Expected `method` in {_METHODS}. Received: method={method!r}")
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        tolerances = tuple(tolerances)
        if not tolerances or not all(isinstance(t, Tolerance) for t in tolerances):
            raise TypeError(
                f"Expected `tolerances` to be Tolerance objects. Received: {tolerances!r}"
            )
        self.model = model
        self.selection = select_taps(model, layers, input_shape=input_shape, wrt=wrt)
        self.taps = self.selection.taps
        self.wrt = self.selection.wrt
        input_dtype = self.wrt.dtype
        if dtype is None:
            dtype = "float64" if input_dtype == "float64" else "float32"
        if dtype not in ("float32", "float64"):
            raise ValueError(
                f"Expected `dtype` 'float32' or 'float64'. Received: dtype={dtype!r}"
            )
        self.dtype = dtype
        self.tolerances = tolerances
        self.jit_compile = bool(jit_compile)
        # float64 Gram eigenvalues: faster and more accurate than a float32
        # SVD on CPU; XLA keeps the float32 SVD (float64 is not on TPUs).
        self._via_gram = not self.jit_compile

        if method in ("auto", "analytic") and self.selection.single_input:
            self._forest = find_dense_forest(model, self.taps)
        else:
            self._forest = {}
        general = [t for t in self.taps if t.name not in self._forest]
        if method == "analytic" and general:
            raise ValueError(
                "method='analytic' needs chains of Dense layers with element-wise "
                "activations fed by the model input. Received layers that do not "
                f"qualify: {[t.name for t in general]}."
            )
        self._general = general
        self._mode = None
        self._work_model = None
        if general:
            self._mode = (
                method.split("-", 1)[1] if method.startswith("autodiff-") else choose_mode(general)
            )
            self._work_model = (
                model
                if all(t.layer.compute_dtype == dtype for t in general)
                else _cast_model(model, dtype)
            )
            work_taps = select_taps(
                self._work_model,
                [t.name for t in general],
                input_shape=input_shape,
                wrt=self.wrt.input_index if self.wrt.is_input else self.wrt.name,
            ).taps
            self._general_taps = work_taps
            self._inputs_model = tap_inputs_model(self._work_model, work_taps)

        self._strategy = _replicas(model)
        self.batch_size = batch_size or self._auto_batch_size()
        if self._strategy is not None:
            n = self._strategy.num_replicas_in_sync
            self.batch_size = max(n, self.batch_size - self.batch_size % n)
        self._fn = tf.function(self._chunk, jit_compile=self.jit_compile, autograph=False)

    # -- construction helpers -------------------------------------------------

    def _auto_batch_size(self) -> int:
        n0 = self.selection.input_dim
        per_sample = 0
        for tap in self.taps:
            if tap.name in self._forest:
                per_sample += tap.units * min(n0, self._forest_width(tap.name))
            else:
                per_sample += tap.units * n0
        return int(max(1, min(_MAX_AUTO_BATCH, _ELEMENT_BUDGET // max(per_sample, 1))))

    def _forest_width(self, name) -> int:
        link = self._forest[name]
        while link.parent is not None:
            link = link.parent
        return int(link.layer.kernel.shape[1])

    @property
    def layer_infos(self) -> list[LayerInfo]:
        methods = {}
        for tap in self.taps:
            methods[tap.name] = (
                "analytic" if tap.name in self._forest else f"autodiff-{self._mode}"
            )
        return [
            LayerInfo(t.name, t.class_name, t.units, t.input_dim, methods[t.name])
            for t in self.taps
        ]

    @property
    def trace_count(self) -> int:
        """How many times the measurement function has been traced."""
        return self._fn.experimental_get_tracing_count()

    # -- the traced measurement ------------------------------------------------

    def _chunk(self, x):
        held = ()
        if isinstance(x, (list, tuple)):  # [wrt tensor, *held model inputs]
            x, *held = x
        x = tf.cast(x, self.dtype)
        batch = tf.shape(x)[0]
        n0 = self.selection.input_dim
        spectra = {}
        if self._forest:
            spectra.update(
                dense_forest_singular_values(
                    tf.reshape(x, [batch, n0]),
                    self._forest,
                    dtype=self.dtype,
                    shrink=not self.jit_compile,
                    via_gram=self._via_gram,
                )
            )
        if self._general:
            jacobians = preactivation_jacobians(
                self._inputs_model, self._general_taps, x, mode=self._mode, held=held
            )
            for tap, jac in zip(self._general_taps, jacobians):
                spectra[tap.name] = singular_values(jac, via_gram=self._via_gram)
        out = {}
        for tap in self.taps:
            s = spectra[tap.name]
            ranks = [
                rank_from_singular_values(s, tol, shape=(tap.units, n0), dtype=self.dtype)
                for tol in self.tolerances
            ]
            out[tap.name] = (tf.stack(ranks), effective_rank(s), stable_rank(s))
        return out

    def _run(self, chunk):
        if self._strategy is None:
            if isinstance(chunk, list):
                return self._fn([tf.constant(c) for c in chunk])
            return self._fn(tf.constant(chunk))
        n = self._strategy.num_replicas_in_sync
        if isinstance(chunk, list):
            raise ValueError("Models with held inputs are not measured under a strategy.")
        parts = np.split(chunk, n)
        values = self._strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
        )
        per_replica = self._strategy.run(self._fn, args=(values,))
        local = self._strategy.experimental_local_results(per_replica)
        return {
            name: tuple(
                tf.concat([r[name][i] for r in local], axis=-1) for i in range(3)
            )
            for name in local[0]
        }

    def measure_tensor(self, x: tf.Tensor) -> dict[str, tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        """Graph-friendly measurement of one batch (usable inside `tf.function`).

        No input checks and no chunking: `x` is one batch.

        Returns:
            `{layer: (ranks [num_tolerances, B] int32, effective rank [B],
            stable rank [B])}`.
        """
        return self._fn(x)

    # -- the public call ---------------------------------------------------------

    def __call__(
        self, x, *, verbose: int = 0, max_samples: int | None = None
    ) -> list[LocalRankResult]:
        """Measure on samples `x`; one `LocalRankResult` per tolerance.

        Args:
            x: `[N, *input_shape]` float array, tensor or `tf.data.Dataset`.
            verbose: 1 shows a progress bar over chunks. Default 0.
            max_samples: use at most this many samples. Default None: all.
        """
        return self.measure(self.check_samples(x, max_samples=max_samples), verbose=verbose)

    def check_samples(self, x, *, max_samples: int | None = None):
        """Validate `x` once (see `inputs.as_samples`) for repeated `measure` calls.

        Returns an array, or `[wrt values, *held inputs]` when the model has
        several inputs or `wrt` is an intermediate tensor.
        """
        if not self.selection.single_input:
            return as_model_samples(
                x, self.model, self.wrt, max_samples=max_samples, dtype=self.dtype
            )
        samples = as_samples(x, input_shape=self.selection.input_shape, max_samples=max_samples)
        return samples.astype(self.dtype, copy=False)

    def measure(self, samples: np.ndarray, *, verbose: int = 0) -> list[LocalRankResult]:
        """Measure on samples already checked by `check_samples`."""
        if self._work_model is not None and self._work_model is not self.model:
            self._work_model.set_weights(self.model.get_weights())
        n = len(samples[0]) if isinstance(samples, list) else len(samples)
        size = min(self.batch_size, n)
        if self._strategy is not None:
            r = self._strategy.num_replicas_in_sync
            size = max(r, size - size % r)
        chunks = math.ceil(n / size)
        bar = keras.utils.Progbar(chunks, unit_name="chunk") if verbose else None
        collected = {t.name: ([], [], []) for t in self.taps}
        for i in range(chunks):
            chunk = _take(samples, i * size, (i + 1) * size, size)
            valid = min(size, n - i * size)
            out = self._run(chunk)
            for name, (ranks, eff, stab) in out.items():
                collected[name][0].append(ranks.numpy()[:, :valid])
                collected[name][1].append(eff.numpy()[:valid])
                collected[name][2].append(stab.numpy()[:valid])
            if bar is not None:
                bar.update(i + 1)
        merged = {
            name: [np.concatenate(parts, axis=-1) for parts in triple]
            for name, triple in collected.items()
        }
        infos = self.layer_infos
        return [
            LocalRankResult(
                layers=infos,
                per_sample={name: m[0][j].astype(np.int64) for name, m in merged.items()},
                effective_rank_per_sample={name: m[1] for name, m in merged.items()},
                stable_rank_per_sample={name: m[2] for name, m in merged.items()},
                tolerance=tol,
                dtype=self.dtype,
                skipped=self.selection.skipped,
            )
            for j, tol in enumerate(self.tolerances)
        ]


def local_rank(
    model,
    x,
    *,
    layers: Iterable[str | keras.layers.Layer] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    method: str = "auto",
    jit_compile: bool = False,
    max_samples: int | None = None,
    verbose: int = 0,
    wrt: int | str | None = None,
) -> LocalRankResult:
    """Local rank `E_x[rank(J_l(x))]` of each layer's pre-activation Jacobian.

    Args:
        model: a built functional or Sequential `keras.Model`.
        x: `[N, *input_shape]` samples: NumPy array, tensor or `tf.data.Dataset`;
            a list or dict of arrays (one per model input) with held inputs.
        layers: names or layers to measure. Default None: all measurable layers.
        atol: absolute singular-value threshold (the paper's robust rank
            `rank_eps` with `atol=eps`). Default None.
        rtol: relative threshold. Default None (numpy's rule, see `spectra`).
        dtype: `"float32"` or `"float64"` Jacobians. Default None (float32
            unless the model input is float64).
        batch_size: samples per chunk; bounds memory. Default None: automatic.
        method: `"auto"`, `"analytic"`, `"autodiff"`, `"autodiff-reverse"`,
            `"autodiff-forward"`. Default `"auto"`.
        jit_compile: run the measurement under XLA. Default False.
        max_samples: use at most this many samples. Default None: all.
        verbose: 1 shows a progress bar. Default 0.
        wrt: the tensor to differentiate: None (the only float model input),
            a model input's index or name, or the name of a layer call whose
            output is used (`"embedding"`). With several inputs, pass `x` as
            a list (model input order) or a dict (input names) of arrays.

    Returns:
        A `LocalRankResult`.

    Raises:
        TypeError: `model` is not a Keras model; non-float `x` or model input;
            bad `layers` entries; non-numeric `atol`/`rtol`.
        ValueError: NaN/Inf, empty or wrongly shaped `x`; an unbuilt model; a
            bad or (with several float inputs) missing `wrt`; unknown layer
            names; no measurable layer; negative `atol`/`rtol`; bad `method`/`batch_size`/`dtype`.

    Example:
        >>> import keras, numpy as np, keras_localrank as klr
        >>> model = keras.Sequential([keras.Input((8,)),
        ...     keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
        >>> result = klr.local_rank(model, np.random.rand(16, 8).astype("float32"))
        >>> sorted(result.mean)
        ['dense', 'dense_1']
    """
    estimator = LocalRankEstimator(
        model,
        layers,
        tolerances=(Tolerance(atol=atol, rtol=rtol),),
        dtype=dtype,
        batch_size=batch_size,
        method=method,
        jit_compile=jit_compile,
        input_shape=_input_shape_hint(model, x),
        wrt=wrt,
    )
    return estimator(x, verbose=verbose, max_samples=max_samples)[0]


def _input_shape_hint(model, x):
    """Per-sample shape from `x` for models whose input has None dimensions."""
    graph = functional_graph(model)
    if len(graph.inputs) != 1 or all(d is not None for d in graph.inputs[0].shape[1:]):
        return None
    shape = getattr(x, "shape", None)
    return tuple(shape[1:]) if shape is not None and len(shape) > 1 else None


def _take(samples, start: int, stop: int, size: int):
    """Rows `start:stop` of an array or of each array of a list, padded to
    `size` rows by repeating the first (one shape: one trace, XLA-friendly)."""
    def one(a):
        part = a[start:stop]
        if len(part) < size:
            part = np.concatenate([part, np.repeat(part[:1], size - len(part), axis=0)])
        return part

    return [one(a) for a in samples] if isinstance(samples, list) else one(samples)
