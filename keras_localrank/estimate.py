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

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_localrank import host_linalg
from keras_localrank.active_units import ActiveUnitAccumulator, ActiveUnitCounter
from keras_localrank.colored import (
    colored_jacobian_gram,
    colored_spectra,
    positions_per_block,
    positions_per_rows_block,
    recovered_rows_are_cheaper,
    tap_coloring,
    window_gram_applies,
)
from keras_localrank.dense_chain import dense_forest_singular_values, find_dense_forest
from keras_localrank.factor import find_linear_root, is_constant_tap, row_space_basis
from keras_localrank.graph import (
    RECURRENT_LAYERS,
    CaptureModel,
    cast_model,
    functional_graph,
    wrt_tensor,
)
from keras_localrank.inputs import as_model_samples, as_samples, check_positive_int, inputs_list
from keras_localrank.jacobians import Preactivations
from keras_localrank.linearize import linearizable
from keras_localrank.matfree import (
    forward_spectra,
    gram_singular_values,
    jvp,
    reverse_spectra,
    vjp,
)
from keras_localrank.memory import (
    ACTIVATION_FACTOR,
    DEFAULT_MEMORY_BUDGET,
    REPLICA_SHARE,
    activation_elements,
    check_memory_budget,
    colored_storage_bytes,
    exact_storage_bytes,
    pack_by_storage,
    plan_sizes,
    release_free_heap,
)
from keras_localrank.randomized import certified_sketch, robust_rank_interval
from keras_localrank.result import LayerInfo, LocalRankResult
from keras_localrank.spectra import (
    HOST_LAPACK_MIN_ORDER,
    Tolerance,
    effective_rank,
    rank_from_singular_values,
    record_spec,
    stable_rank,
    tolerance_threshold,
)
from keras_localrank.taps import select_taps, tap_inputs_model
from keras_localrank.thin import thin_factor, thin_width
from keras_localrank.tracing import instance_function
from keras_localrank.validation import check_choice, check_fraction, check_int

__all__ = ["LocalRankEstimator", "local_rank"]

_METHODS = (
    "auto",
    "analytic",
    "exact",
    "randomized",
    "autodiff",
    "autodiff-reverse",
    "autodiff-forward",
)
#: Jacobian elements (all taps) held per chunk by the analytic path when
#: `batch_size` is None.
_ELEMENT_BUDGET = 2**25
_MAX_AUTO_BATCH = 128
#: Widest block of the randomized sketch (blocks double up to it).
_MAX_SKETCH_BLOCK = 256
#: A singular value within this fraction of the threshold is "near" it.
NEAR_THRESHOLD = 0.1
#: The randomized path certifies a residual below this fraction of `atol`.
RESIDUAL_FRACTION = 0.5
#: Summary columns a `spectral_stats` name must not shadow.
_RESERVED = frozenset(
    "layer class units input_dim bound samples mean std stderr min max "
    "effective_rank stable_rank atol rtol method mode dtype directions upper "
    "failure_probability sketch_size margin near_threshold active_units dead_units "
    "rank_bound rank_deficit".split()
)


def _cast_model(model, dtype: str):
    """A copy of `model` computing in `dtype` (for float64 autodiff Jacobians)."""
    return cast_model(model, dtype)


def _replicas(model):
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or strategy.num_replicas_in_sync <= 1:
        return None
    if len(getattr(strategy.extended, "worker_devices", ())) < strategy.num_replicas_in_sync:
        # Several workers (MultiWorkerMirroredStrategy): each measures the whole
        # probe set on its own device, so no worker waits for another's
        # measurement and every worker gets every sample's rank.
        return None
    return strategy


def _needs_reverse_mode(model, taps, inputs_model) -> bool:
    """True when forward mode cannot be used: a recurrent layer lies between
    the differentiated tensor and a tap, or a capture model (which runs the
    whole model, recurrent layers included) is used with a recurrent model.
    TensorFlow's forward mode does not pass through recurrent loops."""
    if not all(t.forward_mode_ok for t in taps):
        return True
    if isinstance(inputs_model, CaptureModel):
        return any(
            isinstance(layer, RECURRENT_LAYERS)
            for layer in model._flatten_layers(include_self=False, recursive=True)
        )
    return False


def _split(x):
    """`(wrt values, held inputs)` of a chunk (an array/tensor or a list)."""
    if isinstance(x, (list, tuple)):
        return x[0], tuple(x[1:])
    return x, ()


def _check_spectral_stats(stats) -> dict:
    if stats is None:
        return {}
    if not isinstance(stats, Mapping):
        raise TypeError(
            "Expected `spectral_stats` to be a mapping of names to callables. "
            f"Received: spectral_stats={stats!r}"
        )
    for name, fn in stats.items():
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"Expected `spectral_stats` keys to be non-empty strings. Received: {name!r}"
            )
        if name in _RESERVED:
            raise ValueError(
                f"Expected `spectral_stats` names other than the summary columns "
                f"{sorted(_RESERVED)}. Received: {name!r}"
            )
        if not callable(fn):
            raise TypeError(
                f"Expected `spectral_stats[{name!r}]` to be callable. Received: {fn!r}"
            )
    return dict(stats)


#: The planner warns when the only mode that fits the budget needs this many
#: times the products of the faster mode.
SLOW_MODE_FACTOR = 10


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer is measured.

    Attributes:
        method: `"analytic"`, `"exact"` or `"randomized"`.
        mode: `"forward"` / `"reverse"` products, `"colored"` (compressed
            forward mode of a spatially local layer, see `colored`), or None
            (analytic).
        directions: `k`, the input directions pushed through the network
            (`n0`, `n_1` when reduced through a constant first layer, or the
            number of colours).
        in_flight: directions per pass (the memory knob).
        rows: rows of the Jacobian the exact path forms: `n_l`, or fewer for
            a pointwise layer measured through its narrower input (see
            `keras_localrank.thin`); 0 when no Jacobian rows are formed.
    """

    method: str
    mode: str | None
    directions: int
    in_flight: int = 0
    rows: int = 0


class LocalRankEstimator:
    """Measures local rank of chosen layers of a model, many times.

    Args:
        model: a built functional or Sequential `keras.Model` (nested models,
            shared layers and several inputs are supported, see `wrt` and
            docs/graph_coverage.md). Models built under a `tf.distribute`
            strategy are measured with the chunk split over the strategy's
            replicas.
        layers: names or layer objects to measure. Default None: all
            measurable layers (`Dense`, `EinsumDense`, convolutions,
            `RankProbe`).
        tolerances: one or more `Tolerance` rules, all evaluated on the same
            singular values. Default: the exact (numpy) rule.
        dtype: `"float32"` or `"float64"`, the precision of the Jacobians.
            Default None: float64 if the model input is float64, else float32.
        batch_size: samples per chunk. Default None: as many as the memory
            budget allows (at most 128).
        method: `"auto"` (default: analytic for Dense chains, exact Gram where
            it fits the memory budget, else randomized, per layer),
            `"analytic"` (error if a layer does not qualify), `"exact"` (exact
            everywhere but the analytic Dense chains; products' mode chosen by
            size), `"randomized"` (certified estimate of the robust rank on
            every layer; needs `atol`), and the older names `"autodiff"`,
            `"autodiff-reverse"`, `"autodiff-forward"` (exact, everywhere, in
            the given mode).
        jit_compile: compile the measurement with XLA. Default False.
        input_shape: per-sample input shape, only for models whose input has
            undefined dimensions.
        memory_budget: bound, in bytes, on the memory one chunk may use
            (replicated activations of matrix-free products plus Grams and
            sketches). Default 2 GiB.
        count_active: also count active units, dead units and the
            active-unit rank bound (`keras_localrank.active_units`) of layers
            on a Dense forest fed by the input (one extra forward pass per
            chunk); other layers get NaN. Default True.
        failure_probability: `delta` of the randomized estimate: the chance
            that a certified interval misses the true robust rank of a
            sample. Default 1e-3.
        seed: seed of the randomized estimate (results are deterministic
            given the seed and the chunking). Default 0.
        sketch_block: basis vectors added per round by the randomized
            estimate. Default 8.
        power_iterations: power iterations per sketch block. Default 1.
        spectral_stats: `{name: fn}`, each `fn` mapping per-sample singular
            values `s` (`[B, k]`, zero-padded, float) to a per-sample `[B]`
            tensor; results carry them per layer (`result.stats[name]`). NaN
            on layers measured by the randomized method. Default None.
        directions_per_pass: at most this many directions in flight per pass
            (below what the budget allows). Default None: set by the budget.
        wrt: the tensor to differentiate: None (the only float model input),
            a model input's index or name (other inputs are held at their
            sample values), or the name of a layer call whose output is used
            (`"embedding"` for a text model). See `taps.select_taps`.
        spectrum: compute the singular values of every exact layer (True,
            the default). False counts the ranks of the exact path without
            its eigenvalues (the inertia of the shifted Gram, see
            `host_linalg.rank_record`; identical ranks, about 2-6x cheaper
            per Gram of order 3,072) and keeps the stable rank (NaN for Grams
            counted on the host under absolute thresholds only, which need
            no `s_max`); the effective rank, margin and near-threshold counts
            of those layers are then NaN, and `spectral_stats` is not
            allowed. Analytic and randomized layers are unaffected.

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
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        failure_probability: float = 1e-3,
        seed: int = 0,
        sketch_block: int = 8,
        power_iterations: int = 1,
        spectral_stats: Mapping[str, Callable[[tf.Tensor], tf.Tensor]] | None = None,
        directions_per_pass: int | None = None,
        wrt: int | str | None = None,
        count_active: bool = True,
        spectrum: bool = True,
    ):
        check_choice("method", method, _METHODS)
        if not isinstance(spectrum, (bool, np.bool_)):
            raise TypeError(f"Expected `spectrum` to be a bool. Received: spectrum={spectrum!r}")
        self.spectrum = bool(spectrum)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        self.memory_budget = check_memory_budget(memory_budget)
        self.failure_probability = check_fraction(
            "failure_probability", failure_probability, allow_one=False
        )
        self.seed = check_int("seed", seed, minimum=0)
        self.sketch_block = check_positive_int("sketch_block", sketch_block)
        self.power_iterations = check_int("power_iterations", power_iterations, minimum=0)
        self.spectral_stats = _check_spectral_stats(spectral_stats)
        if self.spectral_stats and not self.spectrum:
            raise ValueError(
                "`spectral_stats` needs the singular values: pass spectrum=True. "
                f"Received: spectrum=False, spectral_stats={sorted(self.spectral_stats)}"
            )
        self._max_in_flight = (
            None
            if directions_per_pass is None
            else check_positive_int("directions_per_pass", directions_per_pass)
        )
        tolerances = tuple(tolerances)
        if not tolerances or not all(isinstance(t, Tolerance) for t in tolerances):
            raise TypeError(
                f"Expected `tolerances` to be Tolerance objects. Received: {tolerances!r}"
            )
        self.model = model
        self.method = method
        self.selection = select_taps(model, layers, input_shape=input_shape, wrt=wrt)
        self.taps = self.selection.taps
        self.wrt = self.selection.wrt
        #: Forward-mode products come from the layers' own linear maps, the
        #: primal once per sample (`linearize`): True for a model made of
        #: `linearize.LINEARIZED_LAYERS` measured with respect to its only
        #: input. (Each product decides for itself, `jacobians.Preactivations`:
        #: layers reached through listed layers only are linearized even when
        #: layers after them are not listed.)
        self.linearized_tangents = (
            linearizable(model, xla=bool(jit_compile))
            and self.wrt.is_input
            and not self.wrt.held
        )
        input_dtype = self.wrt.dtype
        if dtype is None:
            dtype = "float64" if input_dtype == "float64" else "float32"
        check_choice("dtype", dtype, ("float32", "float64"))
        self.dtype = dtype
        self.tolerances = tolerances
        self.jit_compile = bool(jit_compile)
        # float64 Gram eigenvalues: faster and more accurate than a float32
        # SVD on CPU; XLA keeps the float32 SVD (float64 is not on TPUs).
        self._via_gram = not self.jit_compile
        self._use_gram = self._via_gram and dtype == "float32"

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
        self._plans = {name: LayerPlan("analytic", None, 0) for name in self._forest}
        self._thin: dict[str, int] = {}
        self._recovered: dict[str, bool] = {}
        self._work_model = None
        self._exact_taps: list = []
        self._random_taps: list = []
        self._constant_taps: list = []
        self._root = None
        self._modes: dict = {}
        self._colorings: dict = {}
        self._dense_taps: list = []
        in_flight = 0
        if general:
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
            in_flight = self._plan_general(work_taps, method, batch_size)
        self._strategy = _replicas(model)
        if self._general:
            self.batch_size = self._general_batch
        else:
            self.batch_size = batch_size or self._auto_batch_size()
        if self._forest and batch_size is None:
            self.batch_size = min(self.batch_size, self._auto_batch_size())
        if self._strategy is not None:
            n = self._strategy.num_replicas_in_sync
            self.batch_size = max(n, self.batch_size - self.batch_size % n)
        self._in_flight = in_flight
        self._fn = instance_function(
            self._chunk, jit_compile=self.jit_compile, reduce_retracing=True
        )
        self._basis_fn = instance_function(self._basis) if self._root else None
        self._count_active = bool(count_active)
        self._counter = self._active_counter(layers, input_shape) if count_active else None
        self._constant_fn = (
            instance_function(self._constant_spectra)
            if self._general and self._constant_taps
            else None
        )

    # -- construction helpers -------------------------------------------------

    def _active_counter(self, layers, input_shape) -> ActiveUnitCounter | None:
        """The active-unit counter of the taps (None: several inputs)."""
        if not self.selection.single_input:
            return None
        all_taps = self.taps
        if layers is not None:  # every Dense layer: which one feeds which
            with warnings.catch_warnings():  # skipped layers were reported already
                warnings.simplefilter("ignore")
                all_taps = select_taps(self.model, None, input_shape=input_shape).taps
        return ActiveUnitCounter(self.model, self.taps, all_taps=all_taps, dtype=self.dtype)

    def _plan_general(self, work_taps, method: str, batch_size: int | None) -> int:
        """Choose exact/randomized and forward/reverse per layer, the reduction
        through a constant first layer, samples per chunk and directions in
        flight. Returns the directions in flight of the exact path."""
        n0 = self.selection.input_dim
        itemsize = 8 if self.dtype == "float64" else 4
        budget = self.memory_budget
        recurrent = _needs_reverse_mode(
            self._work_model, work_taps, tap_inputs_model(self._work_model, work_taps)
        )
        elements = activation_elements(self._work_model, self.selection.open_input_shape)
        per_replica = ACTIVATION_FACTOR * itemsize * elements
        self._per_replica_bytes = per_replica

        root = find_linear_root(self._work_model, work_taps)
        if root is not None:
            # K_1 rows, their float64 QR and the basis are built once per call
            # (n1 replicas of the first layers in flight); the basis is then
            # held while chunks run.
            once = root.tap.units * (n0 * (2 * itemsize + 16) + per_replica)
            if once > budget // 2:
                root = None
            else:
                budget -= root.tap.units * n0 * itemsize
        self._root = root

        def directions(tap):
            return root.tap.units if root is not None and tap.name in root.covered else n0

        if method.startswith("autodiff-"):
            forced_mode = method.split("-", 1)[1]
        else:
            forced_mode = None
        if recurrent and forced_mode == "forward":
            raise ValueError(
                "method='autodiff-forward' cannot differentiate through recurrent "
                "layers (LSTM/GRU/RNN) in forward mode; use method='autodiff-reverse'."
            )
        if recurrent and method == "randomized":
            raise ValueError(
                "method='randomized' needs forward-mode products, which recurrent "
                "layers (LSTM/GRU/RNN) do not support; use method='exact'."
            )

        # Pointwise layers wider than their input give thin rows (same Gram).
        self._thin = {}
        for tap in work_taps:
            width = thin_width(tap.layer, tap.units)
            if width is not None:
                self._thin[tap.name] = width
        rows = self._rows

        def storage(tap, mode):
            k = directions(tap)
            along = rows(tap) <= k if mode == "forward" else k <= rows(tap)
            accumulate = self._use_gram and along
            return exact_storage_bytes(rows(tap), k, itemsize, accumulate=accumulate)

        if forced_mode:
            modes = [forced_mode]
        else:
            modes = ["reverse"] if recurrent else ["forward", "reverse"]
        exact, random = [], []
        for tap in work_taps:
            k = directions(tap)
            need = min(storage(tap, m) for m in modes) + per_replica
            fits = need <= budget
            if method == "randomized" or (method == "auto" and not fits and not recurrent):
                random.append(tap)
            else:
                if not fits:
                    raise ValueError(
                        f"Exact measurement of layer {tap.name!r} needs about "
                        f"{need / 2**20:.1f} MiB per sample "
                        f"(n_l={tap.units}, k={k}), more than memory_budget="
                        f"{self.memory_budget}. Pass a larger `memory_budget`, or "
                        "`method='randomized'` with an `atol`."
                    )
                exact.append(tap)
        if random:
            bad = [t for t in self.tolerances if t.atol is None or t.atol <= 0 or t.rtol]
            if bad:
                raise ValueError(
                    "The randomized estimate certifies robust ranks #{s_i > atol}: every "
                    "tolerance needs atol > 0 and no rtol. Received: tolerances="
                    f"{list(self.tolerances)} for layers {[t.name for t in random]} "
                    "(pass `atol`, a larger `memory_budget`, or method='exact')."
                )

        # Spatially local layers (convolutions reached through local layers)
        # by colored forward mode, when it pushes fewer directions.
        self._colorings = self._plan_colored(exact, forced_mode, recurrent, directions, budget)
        colored_taps = [t for t in exact if t.name in self._colorings]
        exact = [t for t in exact if t.name not in self._colorings]

        mode = forced_mode
        if mode is None and exact:
            if recurrent:
                mode = "reverse"
            else:  # the faster mode, unless only the other fits the budget
                k = max(directions(t) for t in exact)
                mode = "forward" if k < sum(rows(t) for t in exact) else "reverse"
                other = "reverse" if mode == "forward" else "forward"

                def total(m):  # reverse mode holds one tap's results at a time
                    held = sum if m == "forward" else max
                    return held(storage(t, m) for t in exact) + per_replica

                products = {"forward": k, "reverse": sum(rows(t) for t in exact)}
                if total(mode) > budget >= total(other):
                    if products[other] >= SLOW_MODE_FACTOR * products[mode]:
                        warnings.warn(
                            f"Layers {[t.name for t in exact]} are measured in {other} "
                            f"mode ({products[other]:,} products per sample) because "
                            f"{mode} mode ({products[mode]:,} products) needs about "
                            f"{total(mode) / 2**20:,.0f} MiB, more than memory_budget="
                            f"{self.memory_budget}; a larger `memory_budget` (or "
                            "`layers=` fewer layers) measures them faster.",
                            stacklevel=4,
                        )
                    mode = other
        # A layer whose results fit the budget only in the other mode is
        # measured in that mode (forward packs first, then reverse taps):
        # e.g. Xception at 71x71, whose wide early layers fit only in
        # reverse mode and whose late ones only in forward mode.
        tap_modes = {t.name: mode for t in exact}
        if mode is not None and not forced_mode and not recurrent:
            other = "reverse" if mode == "forward" else "forward"
            for t in exact:
                if storage(t, mode) + per_replica > budget >= storage(t, other) + per_replica:
                    tap_modes[t.name] = other
        self._modes = tap_modes

        # Samples per chunk and directions in flight within the budget. Reverse
        # mode measures one tap at a time; forward mode measures packs of taps
        # (one pass of all directions per pack), each pack's results within
        # what the budget leaves beside the replicas in flight.
        varying = [t for t in exact if not is_constant_tap(self._work_model, t)]
        room = budget - min(32, max((directions(t) for t in exact), default=1)) * per_replica

        def forward_packs():
            forward = [t for t in varying if tap_modes[t.name] == "forward"]
            return pack_by_storage(forward, lambda t: storage(t, "forward"), room)

        def products(packs):  # per sample: a pass of all directions per pack, rows in reverse
            return sum(max(directions(t) for t in p) for p in packs) + sum(
                rows(t) for t in varying if tap_modes[t.name] == "reverse"
            )

        packs = forward_packs()
        if len(packs) > 1 and forced_mode is None and not recurrent:
            # Forward layers split over several packs: a layer moves to
            # reverse mode when that saves products (e.g. a classifier head
            # alone in the last pack).
            for t in sorted((t for p in packs for t in p), key=rows):
                if storage(t, "reverse") + per_replica > budget:
                    continue
                before = products(packs)
                tap_modes[t.name] = "reverse"
                moved = forward_packs()
                if products(moved) < before:
                    packs = moved
                else:
                    tap_modes[t.name] = "forward"
        self._packs = packs
        per_sample = max(
            [sum(storage(t, "forward") for t in p) for p in self._packs]
            + [storage(t, tap_modes[t.name]) for t in exact],
            default=0,
        )
        # Colored taps are measured one after the other, before the packs
        # (control dependencies): at most one of them is in flight, and what
        # each leaves behind is its spectrum (`k` float64 values per sample),
        # plus, while the next tap (or pack) runs, the previous tap's `n0 x n0`
        # Gram and the eigen-solver's copy of it.
        if colored_taps:
            per_sample = max([per_sample] + [self._colored_bytes(t) for t in colored_taps])
            per_sample += sum(8 * directions(t) for t in colored_taps)
            per_sample += max(2 * 8 * t.input_dim**2 for t in colored_taps)
        for t in random:
            k = directions(t)
            # Room for the basis to reach min(n_l, k), up to half the budget.
            sketch = 16 * (t.units + k) * min(t.units, k)
            per_sample = max(per_sample, min(sketch, budget // 2))
        if exact:
            widest = max(
                directions(t) if tap_modes[t.name] == "forward" else rows(t) for t in exact
            )
        else:
            widest = self.sketch_block
        if colored_taps:
            widest = max(
                [self._colorings[t.name].num_colors for t in colored_taps]
                + ([widest] if exact else [])
            )
        self._per_sample_bytes = per_sample
        sizes = plan_sizes(
            budget=budget,
            per_sample=per_sample,
            per_replica=per_replica,
            # randomized layers: room for the sketch's blocks to grow
            max_directions=max(widest, self.sketch_block, _MAX_SKETCH_BLOCK if random else 0),
            batch_size=batch_size,
            max_batch=_MAX_AUTO_BATCH,
        )
        if sizes is None:
            raise ValueError(
                f"memory_budget={self.memory_budget} is too small for one sample of model "
                f"{self.model.name!r} with batch_size={batch_size} (about "
                f"{(per_sample + per_replica) / 2**20:.1f} MiB per sample); pass a "
                "larger `memory_budget` or a smaller `batch_size`."
            )
        self._general_batch, affordable = sizes
        # Unless asked for more, replicas take at most a share of the budget.
        useful = max(1, int(REPLICA_SHARE * budget) // (self._general_batch * per_replica))
        in_flight = min(affordable, widest, self._max_in_flight or useful)
        self._sketch_max_block = 0
        if random:
            self.sketch_block = max(
                1, min(self.sketch_block, affordable, self._max_in_flight or affordable)
            )
            # Blocks double up to what half the budget carries in flight.
            grow = (budget // 2) // max(1, self._general_batch * per_replica)
            self._sketch_max_block = max(
                self.sketch_block,
                min(_MAX_SKETCH_BLOCK, grow, affordable, self._max_in_flight or affordable),
            )

        self._dense_taps = exact
        exact = [t for t in work_taps if t in exact or t in colored_taps]
        self._exact_taps = exact
        self._random_taps = random
        # Taps affine in the input have one Jacobian for all samples:
        # measured once per call, on one sample.
        self._constant_taps = [t for t in exact if is_constant_tap(self._work_model, t)]
        self._directions = {t.name: directions(t) for t in work_taps}
        for t in exact:
            if t.name in self._colorings:
                k = self._colorings[t.name].num_colors
                self._directions[t.name] = k
                self._plans[t.name] = LayerPlan(
                    "exact", "colored", k, min(in_flight, k), rows=rows(t)
                )
            else:
                self._plans[t.name] = LayerPlan(
                    "exact", tap_modes[t.name], directions(t), in_flight, rows=rows(t)
                )
        for t in random:
            self._plans[t.name] = LayerPlan(
                "randomized", "forward+reverse", directions(t), self._sketch_max_block
            )
        # Feature models: one for the forward pass over all exact taps, one
        # per tap for reverse mode and the randomized operators.
        self._tap_inputs = {
            t.name: tap_inputs_model(self._work_model, [t])
            for t in work_taps
            if tap_modes.get(t.name) == "reverse"
            or t in random
            or t in self._constant_taps
            or t.name in self._colorings
        }
        self._work_taps = {t.name: t for t in work_taps}
        self._forward_groups = []
        for pack in self._packs:
            for reduced in (False, True):
                group = [
                    t for t in pack if (root is not None and t.name in root.covered) == reduced
                ]
                if group:
                    model = tap_inputs_model(self._work_model, group)
                    self._forward_groups.append((reduced, group, model))
        if random:
            self._operators = {t.name: self._make_operators(t) for t in random}
        return in_flight

    def _plan_colored(self, exact, forced_mode, recurrent, directions, budget) -> dict:
        """`{tap name: Coloring}` of the exact taps measured by colored forward
        mode: a structurally local Jacobian (see `colored.receptive_window`)
        with at least `n0` rows (the Gram `J^T J` is in the smaller dimension;
        a pointwise layer's thin rows count), fewer colours than the dense
        path's directions, and a fit in the budget. Only for float32
        Jacobians through the float64 Gram (the path whose spectra it
        reproduces), one differentiated model input, and the automatic
        product mode. Also decides, per tap, whether its Gram comes from
        recovered rows (`self._recovered`)."""
        self._recovered = {}
        if forced_mode or recurrent or not self._use_gram or not self.selection.single_input:
            return {}
        model_input = functional_graph(self._work_model).inputs[0]
        host = not self.jit_compile and self.selection.input_dim >= HOST_LAPACK_MIN_ORDER
        out = {}
        for tap in exact:
            rows = self._rows(tap)
            if tap.call is None or not tap.call.top_level or rows < tap.input_dim:
                continue
            coloring = tap_coloring(model_input, tap, tap.call.output_shape)
            if coloring is None or coloring.num_colors >= directions(tap):
                continue
            self._recovered[tap.name] = host and recovered_rows_are_cheaper(coloring, rows)
            if self._colored_bytes(tap, coloring) + self._per_replica_bytes > budget:
                del self._recovered[tap.name]
                continue
            out[tap.name] = coloring
        return out

    def _colored_bytes(self, tap, coloring=None) -> int:
        coloring = coloring or self._colorings[tap.name]
        rows = self._rows(tap)
        itemsize = 8 if self.dtype == "float64" else 4
        if self._recovered.get(tap.name):
            channels = rows // coloring.positions
            block = positions_per_rows_block(coloring, channels, itemsize)
            work = (itemsize + 8) * block * channels * coloring.input_dim
        elif not self.jit_compile and window_gram_applies(coloring):
            # A block of local Grams per core and a partial Gram.
            work = host_linalg.WINDOW_BLOCK_BYTES + 4 * tap.input_dim**2
        else:
            work = 8 * coloring.num_colors**2 * positions_per_block(coloring)
        return colored_storage_bytes(
            units=rows,
            input_dim=tap.input_dim,
            num_colors=coloring.num_colors,
            local_gram_bytes=work,
            itemsize=itemsize,
        )

    def _colored_tables(self, name):
        """Constant tables of a colored tap (built in the traced graph)."""
        coloring = self._colorings[name]
        index, valid = coloring.indices()
        return (
            tf.constant(coloring.color_ids()),
            tf.constant(index.astype(np.int64 if coloring.input_dim**2 >= 2**31 - 1 else np.int32)),
            tf.constant(valid),
        )

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
    def active_layers(self) -> list[str]:
        """Layers whose active units and active-unit bound are counted."""
        return list(self._counter.supported) if self._counter is not None else []

    @property
    def plans(self) -> dict[str, LayerPlan]:
        """`{layer: LayerPlan}`: method, mode and directions of each layer."""
        return {t.name: self._plans[t.name] for t in self.taps}

    @property
    def directions_in_flight(self) -> int:
        """Directions per pass of the matrix-free products (0: analytic only)."""
        return self._in_flight if self._general else 0

    @property
    def estimated_peak_bytes(self) -> int:
        """The budgeted peak of one chunk of the matrix-free path."""
        if not self._general:
            return 0
        storage = self._per_sample_bytes  # the largest pack's results
        flight = max(self._in_flight, self._sketch_max_block if self._random_taps else 0)
        return self.batch_size * (storage + flight * self._per_replica_bytes)

    @property
    def layer_infos(self) -> list[LayerInfo]:
        infos = []
        for t in self.taps:
            plan = self._plans[t.name]
            infos.append(
                LayerInfo(
                    t.name,
                    t.class_name,
                    t.units,
                    t.input_dim,
                    plan.method,
                    mode=plan.mode,
                    directions=plan.directions or min(t.input_dim, self._forest_width(t.name))
                    if plan.method == "analytic"
                    else plan.directions,
                    failure_probability=(
                        self.failure_probability if plan.method == "randomized" else 0.0
                    ),
                    rows=plan.rows,
                )
            )
        return infos

    @property
    def trace_count(self) -> int:
        """How many times the measurement function has been traced."""
        return self._fn.experimental_get_tracing_count()

    # -- the traced measurement ------------------------------------------------

    def _basis(self, held=()):
        """`[n_1, n0]` orthonormal rows spanning the row space of `K_1`.

        `held`: the held inputs of one sample (`K_1` does not depend on them,
        but the model needs them to run)."""
        tap = self._root.tap
        x0 = tf.zeros([1, *self.selection.input_shape], self.dtype)
        eye = tf.eye(tap.units, dtype=self.dtype)[None]
        fn = Preactivations(self._tap_inputs[tap.name], [tap], tuple(held))
        rows = vjp(fn, x0, eye)[0]  # K_1: [n1, n0]
        return tf.cast(row_space_basis(rows), self.dtype)

    def _record(self, tap):
        """The rule of `tap`'s rank record (`spectra.record_spec`), or None
        when its singular values are computed."""
        if self.spectrum or tap.name not in {t.name for t in self._exact_taps}:
            return None
        return record_spec(
            self.tolerances, shape=(tap.units, self.selection.input_dim), dtype=self.dtype
        )

    def _summaries(self, s, tap):
        if self._record(tap) is not None:  # a rank record: [B, 2 + T]
            nan = tf.fill(tf.shape(s)[:1], tf.constant(np.nan, tf.float64))
            top = s[:, 0]
            counts = tf.cast(tf.transpose(s[:, 2:]), tf.int32)
            missing = tf.fill(tf.shape(counts), tf.constant(np.nan, tf.float64))
            return (
                counts,
                nan,
                tf.math.divide_no_nan(s[:, 1], top * top),
                missing,
                missing,
            )
        n0 = self.selection.input_dim
        ranks, margins, near = [], [], []
        for tol in self.tolerances:
            ranks.append(rank_from_singular_values(s, tol, shape=(tap.units, n0), dtype=self.dtype))
            thr = tolerance_threshold(s, tol, shape=(tap.units, n0), dtype=self.dtype)
            ratio = tf.abs(s - thr[:, None]) / tf.where(thr > 0, thr, 1)[:, None]
            margin = tf.reduce_min(
                tf.concat([ratio, tf.fill([tf.shape(s)[0], 1], tf.cast(np.inf, s.dtype))], -1),
                axis=-1,
            )
            margins.append(tf.where(thr > 0, margin, tf.cast(np.nan, s.dtype)))
            near.append(
                tf.reduce_sum(tf.cast((ratio <= NEAR_THRESHOLD) & (thr[:, None] > 0), tf.int32), -1)
            )
        stats = tuple(
            tf.cast(tf.reshape(fn(s), [-1]), tf.float64) for fn in self.spectral_stats.values()
        )
        return (
            tf.stack(ranks),
            effective_rank(s),
            stable_rank(s),
            tf.cast(tf.stack(margins), tf.float64),
            tf.stack(near),
            *stats,
        )

    def _rows(self, tap) -> int:
        """Rows of `tap`'s Jacobian formed by the exact path (`thin`)."""
        return self._thin.get(tap.name, tap.units)

    def _thin_factors(self) -> dict:
        """`{name: thin_factor}` of the exact taps with thin rows, from the
        current weights, computed once per traced measurement (outside the
        loops over directions; the randomized sketch uses `J_l` itself)."""
        return {t.name: thin_factor(t.layer) for t in self._exact_taps if t.name in self._thin}

    def _padded(self, s, tap):
        """Singular values of thin rows, padded with the zeros of the
        `min(n_l, k)` the layer's own Jacobian has."""
        k = self._directions[tap.name]
        missing = min(tap.units, k) - min(self._rows(tap), k)
        if missing <= 0 or self._record(tap) is not None:  # zeros change no record
            return s
        return tf.pad(s, [[0, 0], [0, missing]])

    def _chunk(self, x, basis=None, constants=None):
        x, held = _split(x)  # [wrt tensor, *held model inputs] or one tensor
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
        if self._exact_taps:
            if constants is None:
                constants = self._constant_spectra([x[:1], *(h[:1] for h in held)], basis)
            spectra.update(self._exact_spectra(x, held, basis, constants))
        out = {}
        for tap in self.taps:
            if tap.name in spectra:
                out[tap.name] = self._summaries(spectra[tap.name], tap)
        return out

    def _constant_spectra(self, x1, basis):
        """`{name: [1, k]}` singular values of the constant taps at one sample
        (`x1`: `[wrt value, *held inputs]` of one sample, or one tensor)."""
        x1, held = _split(x1)
        x1 = tf.cast(x1, self.dtype)
        root = self._root
        block = max(1, self._in_flight * self.batch_size)
        thin = self._thin_factors()
        out = {}
        for tap in self._constant_taps:
            model = self._tap_inputs[tap.name]
            reduced = root is not None and tap.name in root.covered

            fn = Preactivations(model, [tap], held, thin)
            b = basis if reduced else None
            k = self._directions[tap.name]
            rows = self._rows(tap)
            if tap.name in self._colorings:
                s = colored_spectra(
                    fn,
                    x1,
                    self._colorings[tap.name],
                    self._colored_tables(tap.name),
                    block=min(block, k),
                    recovered=self._recovered[tap.name],
                    rows=rows,
                    record=self._record(tap),
                )
            elif self._modes[tap.name] == "forward":
                s = forward_spectra(
                    fn,
                    x1,
                    b,
                    [rows],
                    block=min(block, k),
                    use_gram=self._use_gram,
                    records=None if self.spectrum else [self._record(tap)],
                )[0]
            else:
                s = reverse_spectra(
                    fn,
                    x1,
                    b,
                    rows,
                    block=min(block, rows),
                    use_gram=self._use_gram,
                    record=self._record(tap),
                )
            out[tap.name] = self._padded(s, tap)
        return out

    def _exact_spectra(self, x, held, basis, constants):
        n0 = self.selection.input_dim
        root = self._root
        block = self._in_flight
        spectra = {}
        batch = tf.shape(x)[0]
        for name, s in constants.items():
            spectra[name] = tf.broadcast_to(s, tf.stack([batch, tf.shape(s)[1]]))
        taps = [t for t in self._dense_taps if t not in self._constant_taps]
        thin = self._thin_factors()

        def tap_basis(tap):
            return basis if root is not None and tap.name in root.covered else None

        # Dense taps first: their Grams are held on the host
        # (`host_linalg`) and released before the colored taps run, whose
        # buffers then come from what TensorFlow's allocator already holds.
        previous = []
        for reduced, group, model in self._forward_groups:
            # One pack after the other: their results must not coexist.
            with tf.control_dependencies(previous):
                values = forward_spectra(
                    Preactivations(model, group, held, thin),
                    tf.identity(x),
                    basis if reduced else None,
                    [self._rows(t) for t in group],
                    block=min(block, self._root.tap.units if reduced else n0),
                    use_gram=self._use_gram,
                    records=None if self.spectrum else [self._record(t) for t in group],
                )
            spectra.update({t.name: self._padded(v, t) for t, v in zip(group, values)})
            previous = list(values)
        # Reverse-mode taps one at a time: their loops must not overlap.
        for tap in [t for t in taps if self._modes[t.name] == "reverse"]:
            with tf.control_dependencies(previous):
                s = reverse_spectra(
                    Preactivations(self._tap_inputs[tap.name], [tap], held, thin),
                    tf.identity(x),
                    tap_basis(tap),
                    self._rows(tap),
                    block=min(block, self._rows(tap)),
                    use_gram=self._use_gram,
                    record=self._record(tap),
                )
            spectra[tap.name] = self._padded(s, tap)
            previous = [s]
        # Colored taps one at a time: their loops must not overlap. Each
        # waits for the previous tap's Gram, not its eigen-solve, which runs
        # on the host beside the next tap's products; and for the spectrum
        # before that, so at most one solve is pending (`_plan` budgets its
        # Gram and the solver's copy).
        solved = None
        for tap in self._exact_taps:
            if tap.name not in self._colorings or tap in self._constant_taps:
                continue
            with tf.control_dependencies(previous):
                gram = colored_jacobian_gram(
                    Preactivations(self._tap_inputs[tap.name], [tap], held, thin),
                    tf.identity(x),
                    self._colorings[tap.name],
                    self._colored_tables(tap.name),
                    block=min(block, self._directions[tap.name]),
                    recovered=self._recovered[tap.name],
                    rows=self._rows(tap),
                )
            previous = [gram] + ([] if solved is None else [solved])
            solved = spectra[tap.name] = gram_singular_values(gram, self._record(tap))
        return spectra

    # -- the randomized path (eager loop over sketch rounds) -------------------

    def _make_operators(self, tap):
        model = self._tap_inputs[tap.name]
        reduced = self._root is not None and tap.name in self._root.covered
        k = self._directions[tap.name]
        n0 = self.selection.input_dim
        x_spec = tf.TensorSpec([None, *self.selection.input_shape], self.dtype)
        held_spec = tuple(self._held_specs)

        def matvec(x, v, basis, held):
            if reduced:
                v = tf.linalg.matmul(v, basis)
            return jvp(Preactivations(model, [tap], held), x, v)[0]

        def rmatvec(x, u, basis, held):
            g = vjp(Preactivations(model, [tap], held), x, u)
            if reduced:
                g = tf.linalg.matmul(g, basis, transpose_b=True)
            return g

        # Fixed signatures: the sketch calls these with several widths.
        basis_spec = tf.TensorSpec([k, n0] if reduced else [0], self.dtype)
        return (
            instance_function(
                matvec,
                input_signature=[
                    x_spec, tf.TensorSpec([None, None, k], self.dtype), basis_spec, held_spec
                ],
            ),
            instance_function(
                rmatvec,
                input_signature=[
                    x_spec,
                    tf.TensorSpec([None, None, tap.units], self.dtype),
                    basis_spec,
                    held_spec,
                ],
            ),
        )

    @property
    def _held_specs(self) -> list[tf.TensorSpec]:
        """Specs of the held model inputs (float ones in the compute dtype)."""
        inputs = functional_graph(self.model).inputs
        specs = []
        for i in self.wrt.held:
            t = inputs[i]
            dtype = self.dtype if keras.backend.is_float_dtype(t.dtype) else str(t.dtype)
            specs.append(tf.TensorSpec([None, *t.shape[1:]], dtype))
        return specs

    def _randomized(self, x, basis, chunk_index: int) -> dict:
        out = {}
        atol_min = min(t.atol for t in self.tolerances)
        x, held = _split(x)
        x = tf.constant(x, self.dtype)
        held = tuple(
            tf.cast(tf.constant(h), spec.dtype) for h, spec in zip(held, self._held_specs)
        )
        batch = int(x.shape[0])
        for index, tap in enumerate(self._random_taps):
            matvec, rmatvec = self._operators[tap.name]
            reduced = self._root is not None and tap.name in self._root.covered
            b = basis if reduced else tf.zeros([0], self.dtype)
            k = self._directions[tap.name]
            room = self.memory_budget - batch * self._sketch_max_block * self._per_replica_bytes
            max_size = max(self.sketch_block, room // max(1, batch * 16 * (tap.units + k)))
            seed = np.random.SeedSequence([self.seed, index, chunk_index]).generate_state(1)[0]
            sketch = certified_sketch(
                lambda v, b=b, mv=matvec: mv(x, tf.cast(v, self.dtype), b, held),
                lambda u, b=b, rmv=rmatvec: rmv(x, tf.cast(u, self.dtype), b, held),
                batch=batch,
                shape=(tap.units, k),
                target=RESIDUAL_FRACTION * atol_min,
                failure_probability=self.failure_probability,
                block=self.sketch_block,
                max_block=self._sketch_max_block,
                power_iterations=self.power_iterations,
                seed=int(seed),
                max_size=int(max_size),
            )
            s = sketch.singular_values
            low, high, margins, near = [], [], [], []
            for tol in self.tolerances:
                lo, hi = robust_rank_interval(s, sketch.residual_bound, tol.atol, min(tap.units, k))
                low.append(lo)
                high.append(hi)
                ratio = np.abs(s - tol.atol) / tol.atol
                margins.append(np.min(ratio, axis=-1, initial=np.inf))
                near.append((ratio <= NEAR_THRESHOLD).sum(axis=-1))
            nan = np.full(batch, np.nan)
            out[tap.name] = (
                np.stack(low),
                nan,
                nan,
                np.stack(margins),
                np.stack(near),
                *([nan] * len(self.spectral_stats)),
                np.stack(high),
                np.full(batch, sketch.sketch_size),
            )
        return out

    def _run(self, chunk, basis=None, constants=None):
        if self._strategy is None:
            if isinstance(chunk, list):
                return self._fn([tf.constant(c) for c in chunk], basis, constants)
            return self._fn(tf.constant(chunk), basis, constants)
        n = self._strategy.num_replicas_in_sync
        if isinstance(chunk, list):
            raise ValueError("Models with held inputs are not measured under a strategy.")
        parts = np.split(chunk, n)
        values = self._strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
        )
        per_replica = self._strategy.run(self._fn, args=(values, basis, constants))
        local = self._strategy.experimental_local_results(per_replica)
        return {
            name: tuple(
                tf.concat([r[name][i] for r in local], axis=-1)
                for i in range(len(local[0][name]))
            )
            for name in local[0]
        }

    def measure_tensor(self, x: tf.Tensor) -> dict[str, tuple[tf.Tensor, ...]]:
        """Graph-friendly measurement of one batch (usable inside `tf.function`).

        No input checks and no chunking: `x` is one batch (a tensor, or
        `[wrt values, *held inputs]` as `check_samples` returns them). Layers
        planned for the randomized method are not measured here.

        Returns:
            `{layer: (ranks [num_tolerances, B] int32, effective rank [B],
            stable rank [B], margin [num_tolerances, B], near-threshold counts
            [num_tolerances, B], *spectral stats [B])}`.
        """
        _, held = _split(x)
        basis = self._basis([h[:1] for h in held]) if self._root is not None else None
        return self._fn(x, basis)

    # -- the public call ---------------------------------------------------------

    def __call__(
        self, x, *, verbose: int = 0, max_samples: int | None = None
    ) -> list[LocalRankResult]:
        """Measure on samples `x`; one `LocalRankResult` per tolerance.

        Args:
            x: `[N, *input_shape]` float array, tensor or `tf.data.Dataset`;
                a list or dict of arrays (one per model input) with held
                inputs or an intermediate `wrt`.
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

    def samples_tensor(self, x):
        """Graph-friendly `check_samples` of one batch (usable inside
        `tf.function`): `x` as `measure_tensor` takes it.

        Args:
            x: a float batch `[B, *input_shape]`; with held inputs or an
                intermediate `wrt`, a list (model input order) or dict (input
                names) of batches, or the one integer batch of a text model.

        Raises:
            TypeError: a non-float batch where a float one is differentiated.
            tf.errors.InvalidArgumentError: (at run time) NaN or Inf in a float
                batch.
        """

        def checked(value, what):
            value = tf.convert_to_tensor(value)
            if not value.dtype.is_floating:
                raise TypeError(
                    f"Expected floating-point {what}. Received dtype {value.dtype.name}."
                )
            return tf.debugging.assert_all_finite(
                tf.cast(value, self.dtype), f"NaN or Inf in {what}"
            )

        if self.selection.single_input:
            return checked(x, "`x`")
        inputs = functional_graph(self.model).inputs
        values = [
            checked(value, f"`x[{tensor.name!r}]`")
            if keras.backend.is_float_dtype(tensor.dtype)
            else tf.convert_to_tensor(value)
            for tensor, value in zip(inputs, inputs_list(x, inputs))
        ]
        if self.wrt.is_input:
            first = values[self.wrt.input_index]
        else:
            first = tf.cast(wrt_tensor(self.model, self.wrt, values), self.dtype)
        return [first, *(values[i] for i in self.wrt.held)]

    def measure(self, samples, *, verbose: int = 0) -> list[LocalRankResult]:
        """Measure on samples already checked by `check_samples`.

        Raises:
            TypeError, ValueError: `verbose` not a bool or an int >= 0.
        """
        verbose = check_int("verbose", int(verbose) if isinstance(verbose, bool) else verbose,
                            minimum=0)
        if self._work_model is not None and self._work_model is not self.model:
            self._work_model.set_weights(self.model.get_weights())
        first = _take(samples, 0, 1, 1)  # one sample: the constant parts
        if isinstance(first, list):
            first = [tf.constant(c) for c in first]
        else:
            first = tf.constant(first)
        basis = self._basis_fn(_split(first)[1]) if self._root is not None else None
        constants = (
            self._constant_fn(first, basis) if self._constant_fn is not None else None
        )
        n = len(samples[0]) if isinstance(samples, list) else len(samples)
        size = min(self.batch_size, n)
        if self._strategy is not None:
            r = self._strategy.num_replicas_in_sync
            size = max(r, size - size % r)
        chunks = math.ceil(n / size)
        bar = keras.utils.Progbar(chunks, unit_name="chunk") if verbose else None
        width = 5 + len(self.spectral_stats)
        collected = {t.name: [[] for _ in range(width + 2)] for t in self.taps}
        names = [t.name for t in self.taps]
        active = (
            ActiveUnitAccumulator(self._counter, names) if self._counter is not None else None
        )
        for i in range(chunks):
            chunk = _take(samples, i * size, (i + 1) * size, size)
            valid = min(size, n - i * size)
            out = {}
            if self._forest or self._exact_taps:
                with host_linalg.released_on_error():
                    summaries = self._run(chunk, basis, constants)
                for name, values in summaries.items():
                    out[name] = tuple(np.asarray(v) for v in values)
            if self._random_taps:
                out.update(self._randomized(chunk, basis, i))
            if active is not None:
                active.add(chunk, valid)
            for name, values in out.items():
                if len(values) == width:  # exact: the upper bound is the rank
                    values = (*values, values[0], np.zeros(size))
                for j, v in enumerate(values):
                    collected[name][j].append(v[..., :valid])
            release_free_heap()
            if bar is not None:
                bar.update(i + 1)
        merged = {
            name: [np.concatenate(parts, axis=-1) for parts in parts_list]
            for name, parts_list in collected.items()
        }
        infos = self.layer_infos
        stat_names = list(self.spectral_stats)
        if active is not None:
            active_per_sample, dead, bound = active.results(n)
            active_skipped = dict(self._counter.skipped)
        else:
            active_per_sample = dead = bound = None
            active_skipped = dict.fromkeys(
                names, "several model inputs" if self._count_active else "count_active=False"
            )
        results = []
        for j, tol in enumerate(self.tolerances):
            results.append(
                LocalRankResult(
                    layers=infos,
                    per_sample={name: m[0][j].astype(np.int64) for name, m in merged.items()},
                    effective_rank_per_sample={name: m[1] for name, m in merged.items()},
                    stable_rank_per_sample={name: m[2] for name, m in merged.items()},
                    tolerance=tol,
                    dtype=self.dtype,
                    skipped=self.selection.skipped,
                    margin_per_sample={name: m[3][j] for name, m in merged.items()},
                    near_threshold_per_sample={
                        name: _counts(m[4][j]) for name, m in merged.items()
                    },
                    stats={
                        stat: {name: m[5 + s] for name, m in merged.items()}
                        for s, stat in enumerate(stat_names)
                    },
                    upper_per_sample={
                        name: m[width][j].astype(np.int64) for name, m in merged.items()
                    },
                    sketch_size_per_sample={name: m[width + 1] for name, m in merged.items()},
                    active_per_sample=active_per_sample,
                    dead_units=dead,
                    bound_per_sample=bound,
                    active_skipped=active_skipped,
                )
            )
        return results


#: Estimators kept per model by `local_rank`, so repeated calls reuse one trace.
_CACHE_ATTR = "_keras_localrank_estimators"
_CACHE_SIZE = 8


def _cached_estimator(model, key, build):
    """The estimator for `(model, key)`, built once and kept on the model.

    Stored with `object.__setattr__` so Keras does not track it (nothing is
    saved with the model); the cache lives as long as the model.
    """
    if not isinstance(model, keras.Model):
        return build()
    cache = getattr(model, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        object.__setattr__(model, _CACHE_ATTR, cache)
    if key not in cache:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = build()
    return cache[key]


def _layers_key(layers):
    if layers is None:
        return None
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    layers = list(layers)
    return tuple(
        ("name", item) if isinstance(item, str) else ("layer", id(item)) for item in layers
    ), layers


def _counts(values: np.ndarray) -> np.ndarray:
    """Per-sample counts as integers, kept as floats where they are NaN (not
    computed: `spectrum=False`)."""
    values = np.asarray(values)
    return values if np.isnan(values.astype(np.float64)).any() else values.astype(np.int64)


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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    failure_probability: float = 1e-3,
    seed: int = 0,
    wrt: int | str | None = None,
    spectrum: bool = True,
) -> LocalRankResult:
    """Local rank `E_x[rank(J_l(x))]` of each layer's pre-activation Jacobian.

    Repeated calls on one model with the same options reuse one estimator
    (and its traced function): no retracing.

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
        method: `"auto"`, `"analytic"`, `"exact"`, `"randomized"`,
            `"autodiff"`, `"autodiff-reverse"`, `"autodiff-forward"` (see
            `LocalRankEstimator`). Default `"auto"`.
        jit_compile: run the measurement under XLA. Default False.
        max_samples: use at most this many samples. Default None: all.
        verbose: 1 shows a progress bar. Default 0.
        memory_budget: bytes one chunk may use. Default 2 GiB.
        failure_probability: `delta` of randomized estimates. Default 1e-3.
        seed: seed of randomized estimates. Default 0.
        wrt: the tensor to differentiate: None (the only float model input),
            a model input's index or name, or the name of a layer call whose
            output is used (`"embedding"`). With several inputs, pass `x` as
            a list (model input order) or a dict (input names) of arrays.
        spectrum: False counts the exact layers' ranks without their
            singular values (faster; effective rank, margin and
            near-threshold counts NaN there, see `LocalRankEstimator`).
            Default True.

    Returns:
        A `LocalRankResult`.

    Raises:
        TypeError: `model` is not a Keras model; non-float `x` or model input;
            bad `layers` entries; non-numeric `atol`/`rtol`; non-integer
            `memory_budget`/`seed`.
        ValueError: NaN/Inf, empty or wrongly shaped `x`; an unbuilt model; a
            bad or (with several float inputs) missing `wrt`; unknown layer
            names; no measurable layer; negative `atol`/`rtol`; bad `method`/`batch_size`/`dtype`;
            a `memory_budget` too small for one sample; `method="randomized"`
            without `atol`; `failure_probability` outside (0, 1).

    Example:
        >>> import keras, numpy as np, keras_localrank as klr
        >>> model = keras.Sequential([keras.Input((8,)),
        ...     keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
        >>> result = klr.local_rank(model, np.random.rand(16, 8).astype("float32"))
        >>> sorted(result.mean)
        ['dense', 'dense_1']
    """
    tolerance = Tolerance(atol=atol, rtol=rtol)
    input_shape = input_shape_hint(model, x)
    layers_key = _layers_key(layers)
    key = (
        None if layers_key is None else layers_key[0],
        tolerance,
        dtype,
        batch_size,
        method,
        bool(jit_compile),
        input_shape,
        memory_budget,
        failure_probability,
        seed,
        wrt,
        bool(spectrum),
    )

    def build():
        return LocalRankEstimator(
            model,
            layers,
            tolerances=(tolerance,),
            dtype=dtype,
            batch_size=batch_size,
            method=method,
            jit_compile=jit_compile,
            input_shape=input_shape,
            memory_budget=memory_budget,
            failure_probability=failure_probability,
            seed=seed,
            wrt=wrt,
            spectrum=spectrum,
        )

    try:
        hash(key)
    except TypeError:  # unhashable option values: validated by the estimator
        return build()(x, verbose=verbose, max_samples=max_samples)[0]
    estimator = _cached_estimator(model, key, build)
    return estimator(x, verbose=verbose, max_samples=max_samples)[0]


def input_shape_hint(model, x):
    """Per-sample shape from `x` for models whose input has None dimensions
    (`x` an array, or the model's one input as a one-entry dict or list)."""
    graph = functional_graph(model)
    if len(graph.inputs) != 1 or all(d is not None for d in graph.inputs[0].shape[1:]):
        return None
    if isinstance(x, Mapping) and len(x) == 1:
        x = next(iter(x.values()))
    elif isinstance(x, (list, tuple)) and len(x) == 1 and np.ndim(x[0]) >= 2:
        x = x[0]
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
