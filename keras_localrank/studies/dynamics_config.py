"""`DynamicsConfig`: the configuration of a training-dynamics study, and its presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import keras
import numpy as np

from keras_localrank import datasets, names
from keras_localrank.validation import (
    check_choice,
    check_finite_float,
    check_int,
    check_sequence,
)

__all__ = [
    "DynamicsConfig",
    "PRESETS",
    "get_preset",
    "rank_columns",
    "measurement_steps",
    "grid_steps",
    "METRIC_COLUMNS",
    "LOSSES",
    "INPUT_SCALINGS",
    "INITS",
    "RANK_ON",
    "SUBSETS",
    "GRIDS",
    "LOOPS",
    "MNIST_MEAN",
    "MNIST_STD",
    "PROTOCOL_FACTORS",
]

METRIC_COLUMNS = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]

#: `loss`: "logits" is cross-entropy on the logits. "double_softmax" is the
#: authors' code: their model ends in a softmax and PyTorch's `CrossEntropyLoss`
#: (which applies its own log-softmax) is applied to those probabilities, so
#: softmax is applied twice; its minimum is log(1 + (C - 1) / e), not 0.
LOSSES = ("logits", "double_softmax")
#: `input_scaling`: "unit" keeps pixels in [0, 1]; "standardize" maps them to
#: (x - MNIST_MEAN) / MNIST_STD, the authors' `transforms.Normalize`.
INPUT_SCALINGS = ("unit", "standardize")
#: `init`: "glorot_uniform" (Keras' default kernels) or "normal_fan_in"
#: (kernels N(0, 1 / fan_in), the authors' init); biases are zero in both.
INITS = ("glorot_uniform", "normal_fan_in")
#: `rank_on`: local rank averaged over training or test inputs.
RANK_ON = ("train", "test")
#: `subset`: the `n_train` / `n_test` examples are the first ones of each split
#: ("first") or drawn at random with `data_seed` ("random", the authors').
SUBSETS = ("first", "random")
#: `grid`: measurement steps `round(logspace(0, log10(T), num))` ("round") or
#: `logspace(...).astype(int)` ("floor", the authors' `np.unique(...)`).
GRIDS = ("round", "floor")
#: `loop`: Keras `fit` ("fit") or the compiled loop of
#: `keras_localrank.studies.fast_loop` ("fast"): same steps, same data order.
LOOPS = ("fit", "fast")
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: Settings that only change the summaries: a rerun may change them.
SUMMARY_FIELDS = ("drop_tolerance", "min_relative_drop", "fit_accuracy")
#: How the training loop executes, not what it computes: a run may be resumed
#: with other values (the trajectory agrees up to float rounding).
EXECUTION_FIELDS = ("loop", "steps_per_execution")


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """One training-dynamics study (one MLP per seed).

    Attributes:
        dataset: a `keras_localrank.datasets.NAMES` entry. Default "gaussian".
        data_path: an `.npz` with `x`, `y` read instead of downloading (mnist).
            Default None.
        n_train: training examples (None: all). Default 2000.
        n_test: test examples (None: all). Default 1000.
        dim: input dimension of the Gaussian task. Default 20.
        k: directions the Gaussian labels depend on (`2**k` classes). Default 2.
        data_seed: seed of the Gaussian task / of the npz split; fixed across
            model seeds so every seed sees the same task. Default 0.
        hidden: widths of the hidden ReLU layers. Default (100, 100, 100).
        activation: hidden activation. Default "relu".
        learning_rate: AdamW learning rate. Default 1e-3.
        weight_decay: AdamW decoupled weight decay (Keras multiplies it by the
            learning rate each step). Default 0.5.
        decay_bias: also decay biases. Default False (kernels only).
        batch_size: Default 64.
        epochs: Default 1000 (32,000 steps at the defaults).
        num_measurements: log-spaced measurement steps over the run (plus one
            before training). Default 50.
        atols: thresholds `eps` of the robust local rank. Default (1e-2,).
        rank_samples: training inputs the local rank averages over. Default 256.
        checkpoint_every: epochs between checkpoints. Default 50.
        seeds: one run per seed (model init and data order). Default (0,).
        drop_tolerance: see `keras_localrank.curves` ("When the drop starts").
            Default 0.1.
        min_relative_drop: smaller relative drops count as no drop. Default 0.05.
        fit_accuracy: `fit_step` is the first step whose train accuracy
            reaches this. Default 0.99.
        adam_epsilon: the `epsilon` of AdamW. Default 1e-7 (Keras' default;
            PyTorch's AdamW, in the authors' code, uses 1e-8).
        loss: one of `LOSSES`. Default "logits".
        input_scaling: one of `INPUT_SCALINGS` (image data sets only).
            Default "unit".
        init: one of `INITS`. Default "glorot_uniform".
        rank_on: one of `RANK_ON`: the local rank averages over the first
            `rank_samples` inputs of the (seeded, shuffled) training or test
            split. Default "train".
        subset: one of `SUBSETS`. Default "first".
        grid: one of `GRIDS`. Default "round".
        loop: one of `LOOPS`. Default "fit".
        steps_per_execution: optimizer steps per compiled call of the fast
            loop (it also stops at every measurement and checkpoint). Default 1024.
        information: also estimate `I(X;T)` (the pairwise noise-injection
            bounds) and `I(T;Y)` of every hidden layer's pre-activation on
            the local-rank inputs and their labels, at the same steps as local
            rank (`keras_localrank.studies.information_study`). Cheap: a few
            percent of a local-rank measurement. Default True.
        information_sigmas: the noise levels `sigma` of those estimates, in
            the units of the pre-activations. Default (0.3, 1.0, 3.0).

    Raises:
        TypeError: a field of the wrong type (e.g. `epochs=2.5`, `seeds=0`).
        ValueError: a field out of range (e.g. `epochs=0`, `k > dim`).
    """

    dataset: str = "gaussian"
    data_path: str | None = None
    n_train: int | None = 2000
    n_test: int | None = 1000
    dim: int = 20
    k: int = 2
    data_seed: int = 0
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    learning_rate: float = 1e-3
    weight_decay: float = 0.5
    decay_bias: bool = False
    adam_epsilon: float = 1e-7
    batch_size: int = 64
    epochs: int = 1000
    num_measurements: int = 50
    atols: tuple[float, ...] = (1e-2,)
    rank_samples: int = 256
    checkpoint_every: int = 50
    seeds: tuple[int, ...] = (0,)
    drop_tolerance: float = 0.1
    min_relative_drop: float = 0.05
    fit_accuracy: float = 0.99
    loss: str = "logits"
    input_scaling: str = "unit"
    init: str = "glorot_uniform"
    rank_on: str = "train"
    subset: str = "first"
    grid: str = "round"
    loop: str = "fit"
    steps_per_execution: int = 1024
    information: bool = True
    information_sigmas: tuple[float, ...] = (0.3, 1.0, 3.0)

    def __post_init__(self):
        check_choice("dataset", self.dataset, datasets.NAMES)
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in (
            "dim",
            "k",
            "batch_size",
            "epochs",
            "num_measurements",
            "rank_samples",
            "checkpoint_every",
            "steps_per_execution",
        ):
            check_int(name, getattr(self, name), minimum=1)
        for name, choices in (
            ("loss", LOSSES),
            ("input_scaling", INPUT_SCALINGS),
            ("init", INITS),
            ("rank_on", RANK_ON),
            ("subset", SUBSETS),
            ("grid", GRIDS),
            ("loop", LOOPS),
        ):
            check_choice(name, getattr(self, name), choices)
        check_int("data_seed", self.data_seed, minimum=0)
        hidden = check_sequence("hidden", self.hidden)
        if not hidden:
            raise ValueError(
                f"Expected at least one hidden layer. Received: hidden={self.hidden!r}"
            )
        hidden = tuple(check_int(f"hidden[{i}]", w, minimum=1) for i, w in enumerate(hidden))
        object.__setattr__(self, "hidden", hidden)
        seeds = check_sequence("seeds", self.seeds)
        seeds = tuple(check_int(f"seeds[{i}]", s, minimum=0) for i, s in enumerate(seeds))
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"Expected one or more distinct seeds. Received: seeds={self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        atols = check_sequence("atols", self.atols)
        atols = tuple(
            check_finite_float(f"atols[{i}]", a, low=0.0, low_open=True)
            for i, a in enumerate(atols)
        )
        object.__setattr__(self, "atols", atols)
        if not isinstance(self.information, bool):
            raise TypeError(
                f"Expected `information` to be a bool. Received: information={self.information!r}"
            )
        sigmas = check_sequence("information_sigmas", self.information_sigmas)
        sigmas = tuple(
            check_finite_float(f"information_sigmas[{i}]", v, low=0.0, low_open=True)
            for i, v in enumerate(sigmas)
        )
        if self.information and not sigmas:
            raise ValueError(
                "Expected at least one sigma with information=True. Received: "
                f"information_sigmas={self.information_sigmas!r}"
            )
        object.__setattr__(self, "information_sigmas", sigmas)
        check_finite_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_finite_float("weight_decay", self.weight_decay, low=0.0)
        check_finite_float("adam_epsilon", self.adam_epsilon, low=0.0, low_open=True)
        for name in SUMMARY_FIELDS:
            check_finite_float(name, getattr(self, name), low=0.0, high=1.0)
        if self.dataset == "gaussian":
            if not 1 <= self.k <= min(self.dim, 8):
                raise ValueError(
                    f"Expected 1 <= k <= min(dim, 8). Received: k={self.k}, dim={self.dim}"
                )
            if self.data_path is not None:
                raise ValueError(
                    "The Gaussian task is generated, not read: expected no `data_path`. "
                    f"Received: data_path={self.data_path!r}"
                )
            if self.input_scaling != "unit":
                raise ValueError(
                    "The Gaussian task is already standardised: expected input_scaling='unit'. "
                    f"Received: input_scaling={self.input_scaling!r}"
                )
            if self.n_train is None or self.n_test is None:
                raise ValueError(
                    "Expected `n_train` and `n_test` for the Gaussian task. "
                    f"Received: n_train={self.n_train}, n_test={self.n_test}"
                )
        if not isinstance(self.activation, str):
            raise TypeError(
                f"Expected `activation` to be a string. Received: activation={self.activation!r}"
            )
        keras.activations.get(self.activation)  # ValueError for unknown names

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.epochs * self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        if self.n_train is None:
            raise ValueError("steps_per_epoch needs `n_train`; resolve it from the data.")
        return math.ceil(self.n_train / self.batch_size)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("hidden", "atols", "seeds", "information_sigmas"):
            out[key] = list(out[key])
        return out

    def run_fingerprint(self) -> dict:
        """The settings one seed's run depends on (everything but the seed list,
        the summary-only settings and how the loop executes)."""
        out = self.to_dict()
        for key in ("seeds", *SUMMARY_FIELDS, *EXECUTION_FIELDS):
            out.pop(key)
        return out


#: Named configurations. `gaussian`: a d=20, k=2 study. `mnist`: a 4x200 MLP
#: on 1,000 MNIST digits with 10x the paper's learning rate and 100x its
#: weight decay, so the compression phase arrives within minutes.
#: `mnist_paper`: the paper's setting (1,000 images, lr 1e-4, weight decay 0.01
#: on kernels, batch 64, 10^6 steps, ~50 log-spaced measurements).
#: `mnist_authors`: `mnist_paper` with the protocol of the authors' code
#: (`MNIST_Full_Analysis.py`): double softmax, standardised inputs, N(0, 1/fan_in)
#: kernels, PyTorch's AdamW epsilon 1e-8, rank on 128 test images with
#: eps = 0.01, random 1,000-image train and test subsets, their floor log grid.
_MNIST = dict(dataset="mnist", n_train=1000, n_test=2000, hidden=(200, 200, 200, 200))
PRESETS: dict[str, dict] = {
    "gaussian": dict(dataset="gaussian"),
    "mnist": dict(**_MNIST, learning_rate=1e-3, weight_decay=1.0, epochs=600, checkpoint_every=50),
    "mnist_paper": dict(
        **_MNIST, learning_rate=1e-4, weight_decay=0.01, epochs=62_500, checkpoint_every=500
    ),
    "mnist_authors": dict(
        **{**_MNIST, "n_test": 1000},
        learning_rate=1e-4,
        weight_decay=0.01,
        epochs=62_500,
        checkpoint_every=500,
        atols=(1e-2,),
        adam_epsilon=1e-8,
        loss="double_softmax",
        input_scaling="standardize",
        init="normal_fan_in",
        rank_on="test",
        rank_samples=128,
        subset="random",
        grid="floor",
    ),
}

#: The five protocol factors in which `mnist_paper` and `mnist_authors` differ,
#: as `{factor: (ours, theirs)}`.
PROTOCOL_FACTORS: dict[str, tuple] = {
    "loss": ("logits", "double_softmax"),
    "adam_epsilon": (1e-7, 1e-8),
    "input_scaling": ("unit", "standardize"),
    "init": ("glorot_uniform", "normal_fan_in"),
    "rank_on": (("train", 256), ("test", 128)),
}


def get_preset(name: str, **overrides) -> DynamicsConfig:
    """A `DynamicsConfig` from a `PRESETS` name, with fields replaced by `overrides`.

    Raises:
        ValueError: an unknown preset or field, or an invalid value.
        TypeError: a field of the wrong type.
    """
    check_choice("preset", name, sorted(PRESETS))
    fields = {f.name for f in dataclasses.fields(DynamicsConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown DynamicsConfig fields: {unknown}. Expected some of {sorted(fields)}"
        )
    return DynamicsConfig(**{**PRESETS[name], **overrides})


def measurement_steps(config: DynamicsConfig) -> list[int]:
    """The config's measurement steps after step 0 (`grid`, `num_measurements`,
    `total_steps`); e.g. the authors' `np.unique(np.logspace(0, 6, 50).astype(int))`
    for `grid="floor"`, 50 measurements and 10^6 steps."""
    return grid_steps(config.total_steps, config.num_measurements, config.grid)


def grid_steps(total_steps: int, num: int, grid: str) -> list[int]:
    """`num` log-spaced steps in `[1, total_steps]`, rounded (`grid="round"`) or
    floored (`"floor"`), deduplicated and sorted."""
    check_choice("grid", grid, GRIDS)
    points = np.logspace(0, math.log10(total_steps), num)
    points = np.round(points) if grid == "round" else points.astype(int)
    return sorted({int(s) for s in points if 1 <= s <= total_steps})


def rank_columns(atols: Sequence[float]) -> list[str]:
    """The rank columns of `measurements.csv`: `local_rank`, then
    `robust_local_rank@<atol>` per threshold (`keras_localrank.names`)."""
    return [names.rank_column(names.EXACT)] + [
        names.rank_column(names.ROBUST, a) for a in atols
    ]
