"""The compression app: load, measure, rewrite, fine-tune, re-evaluate, report.

`run(config)` is what `python -m compress` calls; tests and experiments call
it with small configurations. It never modifies or overwrites the input
model: compressed models are written under `output_dir/models/`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import keras

from compress.baselines import select_layers, weight_svd
from compress.data_aware import local_rank_compress
from compress.evaluate import (
    check_learning_rate,
    default_finetune_lr,
    ensure_compiled,
    finetune,
    measure,
    outputs_logits,
    validation_score,
)
from compress.policies import GreedyParamFraction, ParamFraction
from compress.outcome import Compressed
from compress.registry import count_params
from compress.surgery import recompile_like
from compress.report import write_report
from keras_localrank import datasets

__all__ = ["ALL_METHODS", "METHODS", "CompressionConfig", "load_model", "run"]

logger = logging.getLogger(__name__)

#: Methods run by `method="all"`.
ALL_METHODS = ("local_rank", "weight_svd", "tfmot")
#: Every method name (`local_rank_nofloor`: the local-rank method without floors).
METHODS = ALL_METHODS + ("local_rank_nofloor",)
#: How the local-rank method shares a parameter budget between layers.
ALLOCATIONS = ("greedy", "energy")


@dataclasses.dataclass
class CompressionConfig:
    """Configuration of one compression run.

    Attributes:
        model: path of the input `.keras` model (never modified).
        dataset: `"mnist"`, `"fashion_mnist"`, `"digits"` or `"gaussian"`.
        output_dir: folder for the report and the compressed models.
        data_path: optional `.npz` with `x` and `y` read instead of
            downloading. Default None.
        budgets: target parameter fractions, each in (0, 1]. Default (0.2,).
        methods: names from `METHODS`, or `("all",)`. Default all.
        finetune_epochs: epochs of fine-tuning after compression. Default 0.
        finetune_lr: learning rate of the fine-tune (a fresh optimizer of
            the model's compiled class), >= 0. Default None: a tenth of the
            model's compiled learning rate (1e-4 for Adam at 1e-3 or an
            uncompiled model).
        validation_fraction: fraction in [0, 1) of the training samples (the
            last ones) held out of calibration and fine-tuning. It scores
            every fine-tuning epoch, keeping the best one (epoch 0 included,
            so fine-tuning never lowers the validation accuracy), and drives
            the greedy allocation. Default 0.1.
        allocation: how the local-rank method shares the budget between
            layers: `"greedy"` (lower the rank where the validation loss
            rises least per weight saved; needs `validation_fraction` > 0)
            or `"energy"` (one energy threshold for every layer). Default
            `"greedy"`.
        calibration_samples: training samples used to measure. Default 1024.
        n_train: training samples used for fine-tuning (None: all).
        n_test: test samples for evaluation (None: all).
        subspace: `"covariance"` or `"jacobian"` (local-rank method).
        floor_rtol: relative tolerance of the local-rank floor. Default 0.1.
        batch_size: batch size for evaluation and fine-tuning. Default 128.
        latency_runs: timed inference runs per model. Default 15.
        seed: seed of data splits and fine-tuning. Default 0.
    """

    model: str
    dataset: str
    output_dir: str
    data_path: str | None = None
    budgets: Sequence[float] = (0.2,)
    methods: Sequence[str] = ("all",)
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    validation_fraction: float = 0.1
    allocation: str = "greedy"
    calibration_samples: int = 1024
    n_train: int | None = None
    n_test: int | None = None
    subspace: str = "covariance"
    floor_rtol: float = 0.1
    batch_size: int = 128
    latency_runs: int = 15
    seed: int = 0


def load_model(path: str) -> keras.Model:
    """Load a `.keras` model, with a clear error for a missing or bad file.

    Raises:
        ValueError: a missing, non-`.keras` or unreadable file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Expected an existing .keras model file. Received: model={path!r}")
    if not path.endswith(".keras"):
        raise ValueError(f"Expected a model file ending in .keras. Received: model={path!r}")
    try:
        return keras.models.load_model(path)
    except Exception as e:
        raise ValueError(
            f"Could not read the model file. Received: model={path!r} ({type(e).__name__}: {e})"
        ) from e


def _check_budgets(budgets) -> list[float]:
    budgets = list(budgets)
    if not budgets:
        raise ValueError("Expected at least one budget. Received: budget=[]")
    out = []
    for b in budgets:
        try:
            value = float(b)
        except (TypeError, ValueError):
            raise TypeError(f"Expected a number for `budget`. Received: budget={b!r}") from None
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                "Impossible budget: expected a parameter fraction in (0, 1]. "
                f"Received: budget={b!r}"
            )
        out.append(value)
    return out


def _check_methods(methods) -> list[str]:
    methods = list(methods)
    if "all" in methods:
        return list(ALL_METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"Expected `method` in {METHODS + ('all',)}. Received: method={m!r}")
    return methods


def _fit_data(model, ds):
    """Reshape the data to the model input, or raise a clear ValueError."""
    shape = tuple(model.inputs[0].shape[1:])
    got = ds.x_train.shape[1:]
    if any(d is None for d in shape) or got != shape:
        if None not in shape and math.prod(shape) == math.prod(got):
            return (
                ds.x_train.reshape((-1, *shape)),
                ds.x_test.reshape((-1, *shape)),
            )
        raise ValueError(
            f"The data does not fit the model: model input shape {shape}, data "
            f"{ds.name!r} samples of shape {got}."
        )
    units = model.outputs[0].shape[-1]
    top = int(max(ds.y_train.max(), ds.y_test.max()))
    if units is not None and top >= units:
        raise ValueError(
            f"The data does not fit the model: labels go up to {top}, but the model "
            f"has {units} outputs."
        )
    return ds.x_train, ds.x_test


def _save_atomically(model, path: str, forbidden: str) -> None:
    if os.path.realpath(path) == os.path.realpath(forbidden):
        raise ValueError(f"Refusing to overwrite the input model. Received: output path {path!r}.")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _clone(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    recompile_like(copy, model)
    return copy


def _validation_loss(model, x_val, y_val, batch_size):
    """`model -> mean cross-entropy on (x_val, y_val)` (the greedy allocation's loss)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=outputs_logits(model))

    def score(candidate):
        total = 0.0
        for start in range(0, len(x_val), 4 * batch_size):
            sl = slice(start, start + 4 * batch_size)
            out = candidate.predict_on_batch(x_val[sl])
            total += float(loss(y_val[sl], out)) * len(x_val[sl])
        return total / len(x_val)

    return score


def _compress(method, model, budget, data, config, epochs, learning_rate) -> Compressed:
    if method in ("local_rank", "local_rank_nofloor"):
        greedy = config.allocation == "greedy"
        out = local_rank_compress(
            model,
            data["x_cal"],
            GreedyParamFraction(budget) if greedy else ParamFraction(budget),
            subspace=config.subspace,
            floor=method == "local_rank",
            floor_rtol=config.floor_rtol,
            evaluate=_validation_loss(model, data["x_val"], data["y_val"], config.batch_size)
            if greedy
            else None,
        )
        out.method = method
        return out
    if method == "weight_svd":
        return weight_svd(model, budget)
    from compress.tfmot_bridge import magnitude_prune  # TF-MOT only when asked for

    return magnitude_prune(
        model,
        budget,
        data["x_fit"],
        data["y_fit"],
        from_logits=outputs_logits(model),
        finetune_epochs=epochs,
        batch_size=config.batch_size,
        learning_rate=learning_rate,
    )


def _check_options(config) -> None:
    if isinstance(config.finetune_epochs, bool) or int(config.finetune_epochs) < 0:
        raise ValueError(
            f"Expected `finetune_epochs` >= 0. Received: finetune_epochs={config.finetune_epochs!r}"
        )
    check_learning_rate(config.finetune_lr, "finetune_lr")
    v = config.validation_fraction
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(
            f"Expected `validation_fraction` to be a number. Received: validation_fraction={v!r}"
        )
    if not math.isfinite(v) or not 0.0 <= v < 1.0:
        raise ValueError(
            f"Expected `validation_fraction` in [0, 1). Received: validation_fraction={v!r}"
        )
    if config.allocation not in ALLOCATIONS:
        raise ValueError(
            f"Expected `allocation` in {ALLOCATIONS}. Received: allocation={config.allocation!r}"
        )
    if config.allocation == "greedy" and v == 0:
        raise ValueError(
            "The greedy allocation needs validation data. Received: allocation='greedy' "
            "with validation_fraction=0; use allocation='energy' or a positive fraction."
        )


def split_validation(n: int, fraction: float) -> int:
    """Number of training samples (the first ones) left after holding out `fraction`."""
    held = int(round(n * fraction))
    if fraction > 0 and (held < 1 or held >= n):
        raise ValueError(
            f"Expected `validation_fraction` to leave samples on both sides. Received: "
            f"validation_fraction={fraction!r} of {n} training samples."
        )
    return n - held


def _finetuned(method, model, compressed, budget, data, validation, config, learning_rate):
    """`(fine-tuned model, epoch kept)`; never worse than `compressed` on `validation`."""
    epochs = config.finetune_epochs
    if method != "tfmot":
        done = finetune(
            _clone(compressed),
            data["x_fit"],
            data["y_fit"],
            epochs=epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            learning_rate=learning_rate,
            validation_data=validation,
        )
        return done.model, done.best_epoch
    # TF-MOT fine-tunes inside its own (tf_keras) training loop: keep the
    # better of the pruned and the pruned-then-fine-tuned model.
    tuned = _compress(method, model, budget, data, config, epochs, learning_rate).model
    if validation is None:
        return tuned, epochs
    before = validation_score(compressed, *validation, batch_size=config.batch_size)
    after = validation_score(tuned, *validation, batch_size=config.batch_size)
    return (tuned, epochs) if after > before else (compressed, 0)


def run(config: CompressionConfig, *, progress: Callable[[str], None] | None = None) -> dict:
    """Compress `config.model` with every method at every budget and report.

    Args:
        config: a `CompressionConfig`.
        progress: called with one line of text per step. Default None: log.

    Returns:
        The report (also written as `report.json`, `report.md`, `report.png`
        in `config.output_dir`).

    Raises:
        ValueError: a missing or unreadable model file, a model with no
            compressible layer, data that does not fit the model, an
            impossible budget (outside (0, 1], or below what every method
            can reach), bad method names, negative `finetune_epochs` or
            `finetune_lr`, `validation_fraction` outside [0, 1), an unknown
            `allocation`, or the greedy allocation without validation data.
        TypeError: a `finetune_lr` or `validation_fraction` that is not a
            number.
    """
    say = progress or logger.info
    budgets = _check_budgets(config.budgets)
    methods = _check_methods(config.methods)
    _check_options(config)
    model = load_model(config.model)
    select_layers(model)  # raises for a model with no compressible layer
    ds = datasets.load(
        config.dataset,
        data_path=config.data_path,
        seed=config.seed,
        n_train=config.n_train,
        n_test=config.n_test,
    )
    x_train, x_test = _fit_data(model, ds)
    y_train, y_test = ds.y_train, ds.y_test
    n_fit = split_validation(len(x_train), config.validation_fraction)
    data = {
        "x_fit": x_train[:n_fit],
        "y_fit": y_train[:n_fit],
        "x_val": x_train[n_fit:],
        "y_val": y_train[n_fit:],
        "x_cal": x_train[: min(n_fit, config.calibration_samples)],
    }
    validation = (data["x_val"], data["y_val"]) if len(data["x_val"]) else None
    ensure_compiled(model)
    learning_rate = (
        default_finetune_lr(model) if config.finetune_lr is None else float(config.finetune_lr)
    )

    say(f"evaluating the original model ({count_params(model):,} parameters)")
    original = measure(
        model, x_test, y_test, batch_size=config.batch_size, latency_runs=config.latency_runs
    )
    original["accuracy"] = original["metrics"].get("accuracy")
    name = os.path.splitext(os.path.basename(config.model))[0]
    rows = []
    for method in methods:
        for budget in budgets:
            label = f"{method} at budget {budget:g}"
            say(f"compressing: {label}")
            start = time.perf_counter()
            row = {"method": method, "budget": budget}
            try:
                out = _compress(method, model, budget, data, config, 0, learning_rate)
            except ValueError as e:
                if "Impossible budget" not in str(e):
                    raise
                say(f"  skipped: {e}")
                rows.append({**row, "status": f"infeasible: {e}"})
                continue
            stats = measure(
                out.model,
                x_test,
                y_test,
                nonzero=out.nonzero_params,
                batch_size=config.batch_size,
                latency_runs=config.latency_runs,
            )
            row.update(
                param_fraction=stats["params"] / original["params"],
                accuracy=stats["metrics"].get("accuracy"),
                metrics=stats["metrics"],
                params=stats["params"],
                macs=stats["macs"],
                file_bytes=stats["file_bytes"],
                latency_ms=stats["latency_ms"],
                **out.summary(),
                status="ok",
            )
            final = out.model
            if config.finetune_epochs:
                say(
                    f"  fine-tuning {config.finetune_epochs} epoch(s), "
                    f"learning rate {learning_rate:g}"
                )
                final, row["finetune_best_epoch"] = _finetuned(
                    method, model, out.model, budget, data, validation, config, learning_rate
                )
                tuned = final.evaluate(
                    x_test, y_test, batch_size=config.batch_size, verbose=0, return_dict=True
                )
                row["accuracy_finetuned"] = float(tuned.get("accuracy", float("nan")))
                row["metrics_finetuned"] = {k: float(v) for k, v in tuned.items()}
            path = os.path.join(config.output_dir, "models", f"{name}_{method}_b{budget:g}.keras")
            _save_atomically(final, path, config.model)
            row["model_path"] = path
            row["seconds"] = time.perf_counter() - start
            say(
                f"  params {row['param_fraction']:.3f} of original, accuracy {row['accuracy']:.4f}"
                + (
                    f" -> {row['accuracy_finetuned']:.4f} fine-tuned"
                    if "accuracy_finetuned" in row
                    else ""
                )
            )
            rows.append(row)
    if not any(r["status"] == "ok" for r in rows):
        raise ValueError(
            "Impossible budget: no method reached any requested budget. "
            + " ".join(r["status"] for r in rows)
        )
    report = {
        "model": name,
        "config": {**dataclasses.asdict(config), "finetune_lr_used": learning_rate},
        "original": {k: v for k, v in original.items()},
        "rows": rows,
    }
    paths = write_report(report, config.output_dir)
    say(f"report written: {paths['markdown']}")
    report["paths"] = paths
    return report
