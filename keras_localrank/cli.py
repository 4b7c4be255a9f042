"""The main job behind `python -m keras_localrank` (no absl flags in here).

`run(config)` either trains a small MLP on synthetic Gaussian data and reports
the local-rank table before and after training (no `model`), or measures a
saved `.keras` model on the chosen data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import keras
import numpy as np
import pandas as pd

from keras_localrank import datasets
from keras_localrank.estimate import local_rank
from keras_localrank.io import read_keras_model, read_npz
from keras_localrank.result import LocalRankResult
from keras_localrank.validation import check_int, check_positive_int, check_writable_dir

__all__ = ["Config", "run", "load_samples", "check_output", "TABLE_COLUMNS"]

TABLE_COLUMNS = ["layer", "class", "units", "bound", "mean", "std", "stderr", "min", "max",
                 "effective_rank", "stable_rank"]


@dataclasses.dataclass
class Config:
    """Options of the main job (the flags of `python -m keras_localrank`).

    Attributes:
        model: path of a `.keras` model to measure; None trains the demo MLP.
        data: `gaussian`, `digits`, `mnist`, `fashion_mnist`, or an `.npz`
            path with an `x` array (uint8 images are scaled to [0, 1] for a
            float model input, and passed unchanged to an integer one).
        data_path: `.npz` with `x`, `y` read instead of downloading mnist /
            fashion_mnist.
        samples: number of samples to measure on.
        atol, rtol: rank tolerance (None: numpy's default rule).
        layers: layer names (None: every measurable layer).
        output: write the final table to this `.csv` / `.json`.
        epochs: training epochs of the demo MLP.
        seed: seed of data, weights and training.
        method, dtype, batch_size, jit_compile, spectrum: passed to `local_rank`.
        wrt: the tensor differentiated: None (the model input), or a layer
            name whose output is used (`embedding` for a text model fed
            integer token ids from an `.npz`).
        safe_mode, imports: how `model` is loaded (see
            `keras_localrank.io.read_keras_model`): False loads `Lambda`
            layers; modules that register custom layers.
    """

    model: str | None = None
    data: str = "gaussian"
    data_path: str | None = None
    samples: int = 512
    atol: float | None = None
    rtol: float | None = None
    layers: list[str] | None = None
    output: str | None = None
    epochs: int = 30
    seed: int = 0
    method: str = "auto"
    dtype: str | None = None
    batch_size: int | None = None
    jit_compile: bool = False
    wrt: str | None = None
    safe_mode: bool = True
    imports: list[str] | None = None
    spectrum: bool = True

    def __post_init__(self):
        self.samples = check_positive_int("samples", self.samples)
        self.epochs = check_int("epochs", self.epochs, minimum=0)
        self.seed = check_int("seed", self.seed, minimum=0)
        if self.output and not self.output.endswith((".csv", ".json")):
            raise ValueError(
                f"Expected `output` ending in .csv or .json. Received: output={self.output!r}"
            )


def check_output(output: str) -> None:
    """Check, before any work, that the table can be written to `output`.

    Raises:
        ValueError: `output` is a directory, or its folder is a file, cannot
            be created or is not writable.
    """
    if os.path.isdir(output):
        raise ValueError(
            f"Expected `output` to be a file path. Received: output={output!r} (a directory)"
        )
    try:
        check_writable_dir("output folder", os.path.dirname(os.path.abspath(output)))
    except ValueError as e:
        raise ValueError(f"Cannot write output={output!r}: {e}") from None


def load_samples(
    data: str, input_shape, *, samples: int, seed: int, data_path=None, input_dtype=None
):
    """`samples` inputs for a model with `input_shape` from a named source.

    Images whose size matches the model input are reshaped to it. A uint8
    `.npz` is scaled to float32 in [0, 1] for a float model input; for an
    integer model input (`input_dtype`, e.g. uint8 images rescaled inside the
    model, measured with `--wrt=rescaling`, or token ids) integer data is
    passed through unchanged.

    Args:
        input_dtype: the model input's dtype. Default None: a float input.

    Raises:
        ValueError: unknown source, data whose size does not fit the model, a
            missing, truncated or corrupt `.npz` (`io.UnreadableFileError`).
    """
    input_shape = tuple(input_shape)
    float_input = input_dtype is None or keras.backend.is_float_dtype(input_dtype)
    if data.endswith(".npz"):
        x = read_npz(data, ("x",), argument="data")["x"][:samples]
        if x.dtype == np.uint8 and float_input:
            x = x.astype(np.float32) / 255.0
    elif data == "gaussian":
        if any(d is None for d in input_shape):
            raise ValueError(f"--data=gaussian needs a fixed input shape, got {input_shape}")
        x = datasets.gaussian(samples, math.prod(input_shape), seed=seed)
    elif data in datasets.NAMES:
        x = datasets.load(data, data_path=data_path, seed=seed).x_test[:samples]
    else:
        raise ValueError(
            f"Expected `data` in {datasets.NAMES} or an .npz path. Received: data={data!r}"
        )
    x = np.asarray(x)
    if all(d is not None for d in input_shape) and x.shape[1:] != input_shape:
        if math.prod(x.shape[1:]) != math.prod(input_shape):
            raise ValueError(
                f"Data {data!r} has samples of shape {x.shape[1:]}, which does not fit "
                f"the model input {input_shape}."
            )
        x = x.reshape((len(x), *input_shape))
    return x


def demo_model(input_dim: int, num_classes: int, *, seed: int) -> keras.Model:
    """The demo MLP: input - 64 - 64 - 64 (ReLU) - logits."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((input_dim,))]
        + [keras.layers.Dense(64, activation="relu", name=f"hidden_{i + 1}") for i in range(3)]
        + [keras.layers.Dense(num_classes, name="logits")]
    )
    model.compile(
        keras.optimizers.AdamW(1e-3, weight_decay=0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _measure(model, x, config: Config) -> LocalRankResult:
    return local_rank(
        model,
        x,
        layers=config.layers,
        atol=config.atol,
        rtol=config.rtol,
        dtype=config.dtype,
        batch_size=config.batch_size,
        method=config.method,
        jit_compile=config.jit_compile,
        wrt=config.wrt,
        spectrum=config.spectrum,
    )


def format_table(result: LocalRankResult) -> str:
    frame = result.to_frame()[TABLE_COLUMNS]
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def run(config: Config, *, echo=print) -> pd.DataFrame:
    """Run the main job; returns the final table (also written to `output`).

    The output path is checked before any work.

    Raises:
        ValueError: a missing or unreadable model or data file
            (`io.UnreadableFileError`, naming the file), bad data, bad
            options, an output path that cannot be written.
    """
    if config.output:
        check_output(config.output)
    label = config.layers and f" layers {config.layers}" or ""
    tol = "exact" if config.atol is None and config.rtol is None else (
        f"atol={config.atol}, rtol={config.rtol}")
    if config.model is None:
        ds = datasets.gaussian_task(n_train=2000, n_test=config.samples, dim=20, k=2,
                                    seed=config.seed)
        model = demo_model(ds.input_shape[0], ds.num_classes, seed=config.seed)
        x = ds.x_test
        echo(f"Demo: MLP 20-64-64-64-4 on Gaussian data whose labels depend on k=2 of "
             f"20 directions; {len(x)} test samples, {tol} rank{label}.")
        before = _measure(model, x, config)
        echo("\nLocal rank before training:\n" + format_table(before))
        start = time.perf_counter()
        history = model.fit(ds.x_train, ds.y_train, epochs=config.epochs, batch_size=64,
                            verbose=0)
        acc = model.evaluate(ds.x_test, ds.y_test, verbose=0)[1]
        echo(f"\nTrained {config.epochs} epochs in {time.perf_counter() - start:.1f} s "
             f"(train loss {history.history['loss'][-1]:.3f}, test accuracy {acc:.3f}).")
        result = _measure(model, x, config)
        echo("\nLocal rank after training:\n" + format_table(result))
    else:
        model = read_keras_model(
            config.model, compile=False, safe_mode=config.safe_mode,
            imports=config.imports or (),
        )
        if len(model.inputs) != 1:
            raise ValueError(
                "Expected a model with one input on the command line. Received: "
                f"{config.model!r} with inputs {[t.name for t in model.inputs]}; measure "
                "it from Python with one array per input and the input to "
                "differentiate: keras_localrank.local_rank(model, [x1, x2], wrt=name)."
            )
        x = load_samples(config.data, model.input_shape[1:], samples=config.samples,
                         seed=config.seed, data_path=config.data_path,
                         input_dtype=model.inputs[0].dtype)
        echo(f"Model {config.model} on {len(x)} samples of {config.data}, {tol} rank{label}.")
        result = _measure(model, x, config)
        echo(format_table(result))
    if result.skipped:
        echo(f"Skipped layers: {result.skipped}")
    if config.output:
        result.save(config.output)
        echo(f"Wrote {config.output}")
    return result.to_frame()
