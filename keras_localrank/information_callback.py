"""`InformationCallback`: mutual-information estimates per layer while `model.fit` runs.

A thin adapter over `keras_localrank.information`: on a fixed probe set it
computes each chosen layer's representation (the pre-activation, the same
quantity whose Jacobian rank `LocalRankCallback` measures, or the layer
output), then the noise-injection bounds, binning and, optionally, the local
Gaussian-channel information, on the same schedule machinery as the rank
callback (`ScheduledCallback`: the step is `model.optimizer.iterations`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_localrank import information as info
from keras_localrank.estimate import LocalRankEstimator
from keras_localrank.inputs import as_samples
from keras_localrank.io import read_rows, write_rows
from keras_localrank.names import information_key
from keras_localrank.scheduled import ScheduledCallback
from keras_localrank.taps import model_graph, preactivation, select_taps, tap_inputs_model
from keras_localrank.tracing import instance_function
from keras_localrank.validation import check_choice, check_finite_float, check_positive_int

__all__ = ["InformationCallback", "LayerRepresentations", "TRACE_COLUMNS"]

TRACE_COLUMNS = [
    "step", "epoch", "layer", "quantity", "estimator", "kind", "parameter", "value",
    "nats", "seconds",
]
REPRESENTATIONS = ("preactivation", "output")


class LayerRepresentations:
    """Per-sample representations `[N, n_l]` of chosen layers, computed in chunks.

    Args:
        model: a built functional or Sequential `keras.Model` with one input.
        layers: names or layers. Default None: every measurable layer (the
            layers local rank measures).
        representation: `"preactivation"` (default: the layer's output before
            its activation, the quantity whose Jacobian local rank counts) or
            `"output"` (after the activation, as in the information-plane
            literature).
        batch_size: samples per forward pass. Default 256.

    Raises:
        ValueError, TypeError: see `taps.select_taps`; a bad `representation`.
    """

    def __init__(self, model, layers=None, *, representation="preactivation", batch_size=256):
        check_choice("representation", representation, REPRESENTATIONS)
        self.model = model
        self.representation = representation
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.selection = select_taps(model, layers)
        self.taps = self.selection.taps
        graph = model_graph(model)
        if representation == "preactivation":
            self._inputs_model = tap_inputs_model(model, self.taps)
        else:
            self._inputs_model = keras.Model(
                graph.inputs[0], [t.layer.output for t in self.taps]
            )
        self._fn = instance_function(self._forward)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.taps]

    def _forward(self, x):
        outs = self._inputs_model(x, training=False)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        batch = tf.shape(x)[0]
        if self.representation == "preactivation":
            outs = [preactivation(t.layer, o) for t, o in zip(self.taps, outs)]
        return [tf.reshape(o, [batch, -1]) for o in outs]

    def check_samples(self, x, *, max_samples=None) -> np.ndarray:
        """Validate probes once (see `inputs.as_samples`)."""
        return as_samples(x, input_shape=self.selection.input_shape, max_samples=max_samples)

    def __call__(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """`{layer: [N, n_l] float64}` on samples checked by `check_samples`."""
        dtype = self.model.inputs[0].dtype if self.model.inputs else "float32"
        parts = [[] for _ in self.taps]
        for start in range(0, len(samples), self.batch_size):
            chunk = tf.constant(samples[start : start + self.batch_size], dtype=dtype)
            for i, rep in enumerate(self._fn(chunk)):
                parts[i].append(rep.numpy().astype(np.float64))
        return {t.name: np.concatenate(p) for t, p in zip(self.taps, parts)}


class _GaussianChannel:
    """Per-sample local Gaussian-channel information of each layer, at each sigma.

    A `LocalRankEstimator` with the Gaussian-channel statistics as its
    `spectral_stats`: the singular values are exactly those local rank is
    counted from (same paths, chunking and precision).
    """

    def __init__(self, model, layers, sigmas):
        self._stats = [info.gaussian_channel_stat(s) for s in sigmas]
        self._estimator = LocalRankEstimator(
            model, layers, spectral_stats={stat.__name__: stat for stat in self._stats}
        )

    def check_samples(self, x) -> np.ndarray:
        return self._estimator.check_samples(x)

    def __call__(self, samples) -> dict[str, np.ndarray]:
        """`{layer: [num_sigmas, N]}` nats."""
        (result,) = self._estimator.measure(samples)
        return {
            name: np.stack([result.stats[stat.__name__][name] for stat in self._stats])
            for name in result.layer_names
        }


def _sigmas(sigma) -> tuple[float, ...]:
    values = list(sigma) if isinstance(sigma, (list, tuple)) else [sigma]
    if not values:
        raise ValueError(f"Expected at least one `sigma`. Received: sigma={sigma!r}")
    return tuple(check_finite_float("sigma", s, low=0.0, low_open=True) for s in values)


class InformationCallback(ScheduledCallback):
    """Logs mutual-information estimates of chosen layers during `fit`.

    Every scheduled measurement computes, on a fixed probe set and for each
    layer's representation `T` (see `LayerRepresentations`):

    - for each `sigma`: the pairwise-distance bounds on `I(X; T + N(0,
      sigma^2 I))` (`kl_upper`, `bd_lower`) and, with `y`, the estimates and
      bounds on `I(T; Y)` (`kl`, `bd`, `upper`, `lower`; see
      `information.pairwise_information`);
    - with `num_bins` or `bin_width`: binned `I(X;T)` (and `I(T;Y)` with `y`);
    - with `gaussian_channel=True`: the local Gaussian-channel information
      `E_x[1/2 sum_i log(1 + s_i(x)^2 / sigma^2)]` from the pre-activation
      Jacobians, through `LocalRankEstimator(spectral_stats=...)`: the
      same singular values local rank counts, at the cost of one local-rank
      measurement (NaN on layers the estimator measures by its randomized
      method, which computes no full spectrum).

    Keys (Python floats in `logs`, so `History`, `CSVLogger` and `TensorBoard`
    pick them up): `information/<estimator>@<parameter>=<value>/<layer>` for
    `I(X;T)` and `label_information/<estimator>@<parameter>=<value>/<layer>`
    for `I(T;Y)`, e.g. `information/kl_upper@sigma=0.1/dense`. All values are
    in nats. As with `LocalRankCallback`, every epoch's logs carry the latest
    measurement (NaN before the first); put this callback before `CSVLogger`
    and `TensorBoard` in the list.

    Args:
        x: probe inputs (array or tensor); the first `max_samples` are used.
        y: optional labels for `x` (`[N]` class indices or strings; one-hot
            `[N, C]` is converted by argmax): also estimate `I(T;Y)`.
        layers: names or layers to measure. Default None: all measurable.
        sigma: noise standard deviation(s) > 0 for the noise-injection
            estimates, in the units of the representation. Default 0.1.
        bounds: log the pairwise bounds. Default True.
        num_bins, bin_width: also log binned information (at most one).
            Default None (no binning).
        value_range: `(low, high)` for `num_bins`. Default None: per
            measurement, the min and max of the layer's representation.
        gaussian_channel: also log the local Gaussian-channel information at
            every `sigma`. Default False.
        representation: `"preactivation"` (default) or `"output"`.
        schedule: as in `LocalRankCallback` (`"epoch"`, `"log"`, or a
            `schedules` object). Default `"epoch"`.
        measure_on_train_begin: also measure before training (trace and
            TensorBoard only). Default False.
        max_samples: probe-set cap. Default 256.
        chunk_size: rows of each pairwise-distance block (memory `chunk_size
            * N`). Default 256.
        log_dir: also write TensorBoard scalars here at the global step.
            Default None.
        trace_path: `.csv` or `.json` file rewritten atomically after every
            measurement with every measurement so far (one row per step,
            layer and estimate; columns `TRACE_COLUMNS`). Default None.
        verbose: 0 (default) or 1 (one line per measurement).

    Raises:
        ValueError: empty or non-finite probes, labels of the wrong length,
            a bad `sigma`, nothing to log, both `num_bins` and `bin_width`;
            at `on_train_begin`: unknown layers, probes that do not fit.
        TypeError: non-float probes, a bad `schedule`.

    Example:
        >>> cb = InformationCallback(x_probe, y_probe, sigma=[0.1, 1.0])
        >>> history = model.fit(x, y, epochs=5, callbacks=[cb])
        >>> history.history["information/kl_upper@sigma=0.1/dense"]
    """

    def __init__(
        self,
        x,
        y=None,
        layers: Iterable[str | keras.layers.Layer] | None = None,
        *,
        sigma: float | Sequence[float] = 0.1,
        bounds: bool = True,
        num_bins: int | None = None,
        bin_width: float | None = None,
        value_range: tuple[float, float] | None = None,
        gaussian_channel: bool = False,
        representation: str = "preactivation",
        schedule="epoch",
        measure_on_train_begin: bool = False,
        max_samples: int = 256,
        chunk_size: int = info.DEFAULT_CHUNK_SIZE,
        log_dir: str | os.PathLike | None = None,
        trace_path: str | os.PathLike | None = None,
        verbose: int = 0,
    ):
        super().__init__(schedule, measure_on_train_begin=measure_on_train_begin)
        self._x = as_samples(x, input_shape=None, max_samples=max_samples)
        self._y = None
        if y is not None:
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[1] > 1:
                y = y.argmax(axis=-1)
            self._y = info.check_labels(y[: len(self._x)], len(self._x))
        self.layers = None if layers is None else list(
            [layers] if isinstance(layers, (str, keras.layers.Layer)) else layers
        )
        self.sigmas = _sigmas(sigma)
        self.bounds = bool(bounds)
        if num_bins is not None and bin_width is not None:
            raise ValueError(
                "Expected at most one of `num_bins` and `bin_width`. Received: "
                f"num_bins={num_bins!r}, bin_width={bin_width!r}"
            )
        if num_bins is not None:
            check_positive_int("num_bins", num_bins)
        if bin_width is not None:
            check_finite_float("bin_width", bin_width, low=0.0, low_open=True)
        self.binning = (
            None if num_bins is None and bin_width is None
            else dict(num_bins=num_bins, bin_width=bin_width, value_range=value_range)
        )
        self.gaussian_channel = bool(gaussian_channel)
        if not (self.bounds or self.binning or self.gaussian_channel):
            raise ValueError(
                "Nothing to log: bounds=False, no binning and gaussian_channel=False."
            )
        check_choice("representation", representation, REPRESENTATIONS)
        self.representation = representation
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.trace_path = None if trace_path is None else os.fspath(trace_path)
        if self.trace_path and not self.trace_path.endswith((".csv", ".json")):
            raise ValueError(
                f"Expected `trace_path` ending in .csv or .json. Received: {self.trace_path!r}"
            )
        self.verbose = verbose
        self._representations: LayerRepresentations | None = None
        self._channel: _GaussianChannel | None = None
        self._built_for = None
        self._writer = None
        self.trace: list[dict] = self._load_trace()
        self.measurements = 0
        self.seconds = 0.0

    # -- keys ---------------------------------------------------------------------------

    def _labels(self) -> list[tuple[str, str]]:
        """`(quantity, label)` of every estimate, in measurement order."""
        out = []
        if self.bounds:
            for s in self.sigmas:
                out += [(info.IXT, f"kl_upper@sigma={s:g}"), (info.IXT, f"bd_lower@sigma={s:g}")]
                if self._y is not None:
                    out += [(info.ITY, f"{e}@sigma={s:g}") for e in ("kl", "bd", "upper", "lower")]
        if self.binning:
            p = "num_bins" if self.binning["num_bins"] is not None else "bin_width"
            v = float(self.binning[p])
            out.append((info.IXT, f"binning@{p}={v:g}"))
            if self._y is not None:
                out.append((info.ITY, f"binning@{p}={v:g}"))
        if self.gaussian_channel:
            out += [(info.IXT, f"gaussian_channel@sigma={s:g}") for s in self.sigmas]
        return out

    @property
    def keys(self) -> list[str]:
        """The `logs` keys this callback writes (known after `on_train_begin`)."""
        names = self._representations.names if self._representations else []
        return [information_key(n, q, label) for q, label in self._labels() for n in names]

    # -- Keras hooks ------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self._built_for is not self.model:
            self._representations = LayerRepresentations(
                self.model, self.layers, representation=self.representation,
                batch_size=self.chunk_size,
            )
            self._probe = self._representations.check_samples(self._x)
            if self.gaussian_channel:
                self._channel = _GaussianChannel(
                    self.model, self._representations.names, self.sigmas
                )
                self._channel_probe = self._channel.check_samples(self._x)
            self._built_for = self.model
            self._latest = {key: math.nan for key in self.keys}
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if logs is not None:
            logs.update(self._latest)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    # -- ScheduledCallback ----------------------------------------------------------------------

    def recorded_steps(self):
        return [row["step"] for row in self.trace]

    def discard_after(self, step):
        self.trace = [row for row in self.trace if row["step"] <= step]

    def on_scheduled_step(self, step, epoch, *, initial=False):
        start = time.perf_counter()
        estimates = self.measure()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.measurements += 1
        for layer, values in estimates.items():
            for e in values:
                key = information_key(layer, e.quantity, e.label)
                self._latest[key] = e.nats
                self.trace.append(
                    {
                        "step": step, "epoch": epoch, "layer": layer, "quantity": e.quantity,
                        "estimator": e.estimator, "kind": e.kind, "parameter": e.parameter,
                        "value": e.parameter_value, "nats": e.nats, "seconds": seconds,
                    }
                )
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for layer, values in estimates.items():
                    for e in values:
                        tf.summary.scalar(information_key(layer, e.quantity, e.label), e.nats)
        if self.trace_path:
            self._save_trace()
        if self.verbose:
            print(f"\nInformationCallback step {step}: {self.measurements} measurement(s), "
                  f"{seconds:.2f} s")

    # -- measuring -----------------------------------------------------------------------------

    def measure(self) -> dict[str, list[info.InformationEstimate]]:
        """Every configured estimate of every layer on the current weights."""
        reps = self._representations(self._probe)
        channel = None
        if self._channel is not None:
            channel = self._channel(self._channel_probe)
        out = {}
        for name, h in reps.items():
            values = []
            if self.bounds:
                values += info.pairwise_information(
                    h, self.sigmas, labels=self._y, chunk_size=self.chunk_size
                )
            if self.binning:
                values += info.binned_information(h, labels=self._y, **self.binning)
            if channel is not None:
                values += [
                    info.gaussian_channel_estimate(per_sample, s)
                    for per_sample, s in zip(channel[name], self.sigmas)
                ]
            out[name] = values
        return out

    # -- the trace ----------------------------------------------------------------

    def trace_frame(self) -> pd.DataFrame:
        """Every measurement so far: one row per (step, layer, estimate)."""
        return pd.DataFrame(self.trace, columns=TRACE_COLUMNS)

    def _save_trace(self):
        write_rows(self.trace_path, self.trace, TRACE_COLUMNS)

    def _load_trace(self) -> list[dict]:
        rows = read_rows(self.trace_path) if self.trace_path else None
        return [] if rows is None else rows
