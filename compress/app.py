"""The compression app: load, measure, rewrite, fine-tune, re-evaluate, report.

`run(config)` is what `python -m compress` calls; tests and experiments call
it with small configurations. It never modifies or overwrites the input
model: compressed models are written under `workdir/models/`.

The work directory is a `keras_localrank.rundir.RunDirectory`: a second
process on it gets a clear lock error; a directory holding a run with a
different configuration (another model file, data set, fine-tuning, ...) is
refused before anything is written; a rerun with the same configuration
resumes, skipping every method and budget whose model is complete (budgets
and methods may be added). Each model file is written atomically, then the
manifest and the report are updated atomically, so the report only ever
describes models that exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np

from compress.baselines import select_layers
from compress.costs import MACS, PARAMS, CostModel
from compress.data_aware import local_rank_compress
from compress.graph import flatten_nested
from compress.evaluate import (
    FINETUNE_SCHEDULES,
    LATENCY_BATCHES,
    check_learning_rate,
    default_finetune_lr,
    ensure_compiled,
    finetune,
    measure,
    validation_score,
)
from compress.outcome import Compressed
from compress.outputs import OutputKind, output_kind
from compress.policies import GreedyParamFraction, InfeasibleBudgetError, ParamFraction
from compress.registry import count_params
from compress.report import write_report
from compress.surgery import recompile_like
from compress.transformer import UnsupportedLayerError
from compress.weight_only import weight_factorize
from keras_localrank import datasets
from keras_localrank.io import read_keras_model
from keras_localrank.rundir import RunDirectory
from keras_localrank.validation import (
    check_choice,
    check_finite_float,
    check_fraction,
    check_int,
    check_positive_int,
    check_sequence,
    check_writable_dir,
)

__all__ = [
    "ALL_METHODS",
    "BUDGET_KINDS",
    "METHODS",
    "CompressionConfig",
    "load_model",
    "run",
]

logger = logging.getLogger(__name__)

#: Methods run by `method="all"`.
ALL_METHODS = ("local_rank", "weight_svd", "tfmot")
#: Every method name: `local_rank_nofloor` is the local-rank method without
#: floors; `spatial` (k x 1 then 1 x k) and `tucker2` are data-free rewrites
#: of the convolutions (Dense layers get their weight SVD).
METHODS = ALL_METHODS + ("local_rank_nofloor", "spatial", "tucker2")
#: Data-free methods -> `compress.weight_only` scheme.
WEIGHT_SCHEMES = {"weight_svd": "channel", "spatial": "spatial", "tucker2": "tucker2"}
#: How the local-rank method shares a parameter budget between layers.
ALLOCATIONS = ("greedy", "energy")
#: What a budget is a fraction of: weights, or multiply-accumulates per sample.
BUDGET_KINDS = ("params", "macs")
#: Config fields a rerun on the same work directory may change.
MUTABLE_KEYS = ("budgets", "methods")


@dataclasses.dataclass
class CompressionConfig:
    """Configuration of one compression run.

    Attributes:
        model: path of the input `.keras` model (never modified).
        dataset: `"mnist"`, `"fashion_mnist"`, `"digits"` or `"gaussian"`.
        workdir: the run directory: report, manifest and compressed models.
        data_path: optional `.npz` with `x` and `y` read instead of
            downloading. Default None.
        budgets: target fractions of the original cost, each in (0, 1].
            Default (0.2,).
        budget_kind: what a budget is a fraction of, one of `BUDGET_KINDS`.
            Default `"params"`.
        methods: names from `METHODS`, or `("all",)`. Default all.
        finetune_epochs: epochs of fine-tuning after compression. Default 0.
        finetune_lr: learning rate of the fine-tune (a fresh optimizer of
            the model's compiled class), >= 0. Default None: a tenth of the
            model's compiled learning rate (1e-4 for Adam at 1e-3 or an
            uncompiled model).
        finetune_schedule: `"constant"` (default) or `"cosine"` (decayed
            from `finetune_lr` to 0 over the fine-tuning steps).
        distill: share in [0, 1] of knowledge distillation from the input
            model in the fine-tuning loss (`compress.distill`). Default 0.
            TF-MOT fine-tunes in its own loop, without distillation.
        distill_temperature: distillation temperature > 0. Default 2.0.
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
        latency_runs: timed inference runs per model and latency batch size
            (the median is reported). Default 15.
        seed: seed of data splits and fine-tuning. Default 0.
        safe_mode, imports: how `model` is loaded (not part of the run's
            configuration; see `keras_localrank.io.read_keras_model`):
            False loads `Lambda` layers; modules that register custom layers.
    """

    model: str
    dataset: str
    workdir: str
    data_path: str | None = None
    budgets: Sequence[float] = (0.2,)
    budget_kind: str = "params"
    methods: Sequence[str] = ("all",)
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    finetune_schedule: str = "constant"
    distill: float = 0.0
    distill_temperature: float = 2.0
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
    safe_mode: bool = True
    imports: Sequence[str] = ()

    @classmethod
    def from_mapping(cls, source, /, **overrides) -> CompressionConfig:
        """A config from the fields found in `source`, then `overrides`.

        The one way to build a config from a caller's settings: `source` is
        a mapping, a dataclass (an experiment's config) or absl `FlagValues`;
        every field of this class it holds is taken (a multi-valued flag may
        be named in the singular: `--budget`, `--method`); names it holds
        that are not fields are ignored. `overrides` are fields set
        explicitly (they must be fields).

        Raises:
            TypeError: an override that is not a field of the config.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"Expected fields of CompressionConfig. Received unknown: {unknown}"
            )
        values = {}
        for name in fields - set(overrides):
            for key in (name, _SINGULAR_FLAGS.get(name)):
                found, value = _lookup(source, key)
                if found:
                    values[name] = tuple(value) if isinstance(value, list) else value
                    break
        return cls(**values, **overrides)


#: Multi-valued flags named in the singular on the command line.
_SINGULAR_FLAGS = {"budgets": "budget", "methods": "method"}


def _lookup(source, key) -> tuple[bool, object]:
    """`(found, value)` of `key` in a mapping, a dataclass or absl FlagValues."""
    if key is None:
        return False, None
    if isinstance(source, Mapping):
        return (key in source), source.get(key)
    if dataclasses.is_dataclass(source):
        return hasattr(source, key), getattr(source, key, None)
    if hasattr(source, "flag_values_dict"):  # absl FlagValues
        return (key in source), (source[key].value if key in source else None)
    raise TypeError(
        "Expected a mapping, a dataclass or absl FlagValues. Received: "
        f"source of type {type(source).__name__}"
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(path: str, *, safe_mode: bool = True, imports=()) -> keras.Model:
    """Load a `.keras` model, with a clear error for a missing or bad file
    (`keras_localrank.io.read_keras_model`).

    Raises:
        ValueError: a missing, non-`.keras` or unreadable file.
    """
    return read_keras_model(path, safe_mode=safe_mode, imports=imports)


def _check_budgets(budgets) -> list[float]:
    budgets = check_sequence("budgets", budgets)
    if not budgets:
        raise ValueError("Expected at least one budget. Received: budgets=()")
    return [check_fraction("budget", b) for b in budgets]


def _check_methods(methods) -> list[str]:
    methods = list(check_sequence("methods", methods))
    if "all" in methods:
        return list(ALL_METHODS)
    if not methods:
        raise ValueError("Expected at least one method. Received: methods=()")
    for m in methods:
        check_choice("method", m, METHODS + ("all",))
    return methods


def _check_options(config) -> None:
    """Every option of `config` but the files, or a TypeError/ValueError naming it."""
    check_int("finetune_epochs", config.finetune_epochs, minimum=0)
    check_learning_rate(config.finetune_lr, "finetune_lr")
    check_choice("finetune_schedule", config.finetune_schedule, FINETUNE_SCHEDULES)
    check_fraction("distill", config.distill, allow_zero=True)
    check_finite_float(
        "distill_temperature", config.distill_temperature, low=0.0, low_open=True
    )
    check_fraction(
        "validation_fraction", config.validation_fraction, allow_zero=True, allow_one=False
    )
    check_choice("allocation", config.allocation, ALLOCATIONS)
    check_choice("budget_kind", config.budget_kind, BUDGET_KINDS)
    check_choice("subspace", config.subspace, ("covariance", "jacobian"))
    check_choice("dataset", config.dataset, datasets.NAMES)
    check_positive_int("batch_size", config.batch_size)
    check_positive_int("latency_runs", config.latency_runs)
    check_positive_int("calibration_samples", config.calibration_samples)
    for name in ("n_train", "n_test"):
        if getattr(config, name) is not None:
            check_positive_int(name, getattr(config, name))
    check_int("seed", config.seed, minimum=0)
    if config.allocation == "greedy" and config.validation_fraction == 0:
        raise ValueError(
            "The greedy allocation needs validation data. Received: allocation='greedy' "
            "with validation_fraction=0; use allocation='energy' or a positive fraction."
        )


def _load_data(config) -> datasets.Dataset:
    """The data set, with one clear error for an unreadable file."""
    try:
        return datasets.load(
            config.dataset,
            data_path=config.data_path,
            seed=config.seed,
            n_train=config.n_train,
            n_test=config.n_test,
        )
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        where = config.data_path or f"the {config.dataset} download"
        raise ValueError(
            f"Could not read the data file. Received: data_path={where!r} ({_one_line(e)})"
        ) from e


def _check_finite(ds) -> None:
    for name in ("x_train", "x_test"):
        x = getattr(ds, name)
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(
                f"Expected finite inputs. Received: {bad} NaN or infinite value(s) in "
                f"{name} of data set {ds.name!r}."
            )


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
    if units is not None and units > 1 and top >= units:
        raise ValueError(
            f"The data does not fit the model: labels go up to {top}, but the model "
            f"has {units} outputs."
        )
    return ds.x_train, ds.x_test


def _clone(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    recompile_like(copy, model)
    return copy


def _validation_loss(kind: OutputKind, x_val, y_val, batch_size):
    """`model -> mean cross-entropy on (x_val, y_val)` (the greedy allocation's loss)."""

    def score(candidate):
        total = 0.0
        for start in range(0, len(x_val), 4 * batch_size):
            sl = slice(start, start + 4 * batch_size)
            out = keras.ops.convert_to_numpy(candidate.predict_on_batch(x_val[sl]))
            total += kind.numpy_loss(y_val[sl], out) * len(x_val[sl])
        return total / len(x_val)

    return score




def _cost(config) -> CostModel:
    return MACS if config.budget_kind == "macs" else PARAMS


def _has_attention(model) -> bool:
    return any(isinstance(layer, keras.layers.MultiHeadAttention) for layer in model.layers)


def _compress_transformer(method, model, budget, data, config, kind) -> Compressed:
    """Attention and feed-forward projections at one parameter or MACs budget.

    The local-rank methods remove constant heads, then choose the ranks
    from the projections' output covariance spectra: greedily on the
    held-out loss (`allocation="greedy"`) or with one shared energy
    threshold; weight SVD uses one shared threshold on the kernels'
    squared singular values. `local_rank` keeps each plain Dense projection
    at or above its measured local rank (`projection_floors`); attention
    and EinsumDense projections have no floor (named in the notes).
    """
    from compress.baselines import projection_weight_svd
    from compress.transformer import projection_floors, transformer_compress

    cost = _cost(config)
    if method == "weight_svd":
        out = projection_weight_svd(model, ParamFraction(budget), cost=cost)
    elif method in ("local_rank", "local_rank_nofloor"):
        greedy = config.allocation == "greedy"
        floors, unmeasured = {}, {}
        if method == "local_rank":
            floors, unmeasured = projection_floors(
                model, data["x_cal"], rtol=config.floor_rtol
            )
        out = transformer_compress(
            model,
            data["x_cal"],
            GreedyParamFraction(budget) if greedy else ParamFraction(budget),
            evaluate=_validation_loss(kind, data["x_val"], data["y_val"], config.batch_size)
            if greedy
            else None,
            cost=cost,
            floors=floors,
        )
        out.notes = {**out.notes, **unmeasured}
    else:
        raise UnsupportedLayerError(
            f"Method {method!r} has no rewrite for attention layers; use local_rank, "
            "weight_svd or tfmot."
        )
    out.method = method
    recompile_like(out.model, model)
    return out


def _compress(method, model, budget, data, config, kind, epochs, learning_rate) -> Compressed:
    if method != "tfmot" and _has_attention(model):
        return _compress_transformer(method, model, budget, data, config, kind)
    if method in ("local_rank", "local_rank_nofloor"):
        greedy = config.allocation == "greedy"
        out = local_rank_compress(
            model,
            data["x_cal"],
            GreedyParamFraction(budget) if greedy else ParamFraction(budget),
            subspace=config.subspace,
            floor=method == "local_rank",
            floor_rtol=config.floor_rtol,
            evaluate=_validation_loss(kind, data["x_val"], data["y_val"], config.batch_size)
            if greedy
            else None,
            cost=_cost(config),
        )
        out.method = method
        return out
    if method in WEIGHT_SCHEMES:
        out = weight_factorize(
            model, ParamFraction(budget), scheme=WEIGHT_SCHEMES[method], cost=_cost(config)
        )
        recompile_like(out.model, model)
        return out
    if config.budget_kind == "macs":
        raise InfeasibleBudgetError(
            "Impossible budget: magnitude pruning zeroes weights of dense kernels, "
            "which still execute every multiply-accumulate (MACs unchanged)."
        )
    from compress.tfmot_bridge import magnitude_prune  # TF-MOT only when asked for

    return magnitude_prune(
        model,
        budget,
        data["x_fit"],
        data["y_fit"],
        from_logits=kind.from_logits,
        finetune_epochs=epochs,
        batch_size=config.batch_size,
        learning_rate=learning_rate,
        schedule=config.finetune_schedule,
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


def _finetuned(method, model, compressed, budget, data, validation, config, kind, lr):
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
            learning_rate=lr,
            validation_data=validation,
            schedule=config.finetune_schedule,
            teacher=model,
            distill=config.distill,
            temperature=config.distill_temperature,
        )
        return done.model, done.best_epoch
    # TF-MOT fine-tunes inside its own (tf_keras) training loop: keep the
    # better of the pruned and the pruned-then-fine-tuned model.
    tuned = _compress(method, model, budget, data, config, kind, epochs, lr).model
    if validation is None:
        return tuned, epochs
    before = validation_score(compressed, *validation, batch_size=config.batch_size)
    after = validation_score(tuned, *validation, batch_size=config.batch_size)
    return (tuned, epochs) if after > before else (compressed, 0)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_config(config: CompressionConfig) -> dict:
    """What the results depend on: the config (without the folder) and the model's bytes."""
    fields = dataclasses.asdict(config)
    for loading_only in ("workdir", "safe_mode", "imports"):
        fields.pop(loading_only)
    fields["budgets"] = [float(b) for b in fields["budgets"]]
    fields["methods"] = list(fields["methods"])
    fields["model"] = os.path.abspath(config.model)
    fields["model_sha256"] = _sha256(config.model) if os.path.isfile(config.model) else None
    fields["data_sha256"] = (
        _sha256(config.data_path)
        if config.data_path is not None and os.path.isfile(config.data_path)
        else None
    )
    return fields


def _key(method: str, budget: float) -> str:
    return f"{method}_b{budget:g}"


def _measure_row(model, x_test, y_test, config, kind, *, nonzero=False) -> dict:
    stats = measure(
        model,
        x_test,
        y_test,
        nonzero=nonzero,
        batch_size=config.batch_size,
        latency_runs=config.latency_runs,
        kind=kind,
    )
    return {
        "accuracy": stats["metrics"].get("accuracy"),
        **{k: v for k, v in stats.items()},
    }


def _report(name, config, learning_rate, kind, original, run_dir, order) -> dict:
    """The report built from the manifest: only models that are complete on disk."""
    complete = run_dir.manifest["complete"]
    rows = [complete[k]["row"] for k in order if k in complete and "row" in complete[k]]
    rows += [
        info["row"]
        for k, info in complete.items()
        if k not in order and k != "original" and isinstance(info, dict) and "row" in info
    ]
    return {
        "model": name,
        "config": {**dataclasses.asdict(config), "finetune_lr_used": learning_rate},
        "output": {"kind": kind.kind, "from_logits": kind.from_logits, "evidence": kind.evidence},
        "latency_batches": list(LATENCY_BATCHES),
        "original": original,
        "rows": rows,
    }


def run(config: CompressionConfig, *, progress: Callable[[str], None] | None = None) -> dict:
    """Compress `config.model` with every method at every budget and report.

    Args:
        config: a `CompressionConfig`.
        progress: called with one line of text per step. Default None: log.

    Returns:
        The report (also written as `report.json`, `report.md`, `report.png`
        in `config.workdir`).

    Raises:
        ValueError: a missing or unreadable model or data file, a model with
            no compressible layer, data that does not fit the model or holds
            NaN/Inf, a budget outside (0, 1], no method reaching any budget
            (`InfeasibleBudgetError`), bad option values, a `workdir` that
            is not a writable directory or holds a run with a different
            configuration (`keras_localrank.rundir.ConfigMismatch`).
        TypeError: an option of the wrong type.
        keras_localrank.rundir.RunDirectoryLocked: another process is using
            `workdir`.
    """
    say = progress or logger.info
    budgets = _check_budgets(config.budgets)
    methods = _check_methods(config.methods)
    _check_options(config)
    check_writable_dir("workdir", config.workdir)
    # Read and check every input before the run directory is opened (which
    # writes its config): a bad model or data file leaves the folder as it was.
    # Every method sees a flat model.
    model = flatten_nested(
        load_model(config.model, safe_mode=config.safe_mode, imports=config.imports)
    )
    select_layers(model)  # raises for a model with no compressible layer
    ds = _load_data(config)
    _check_finite(ds)
    x_train, x_test = _fit_data(model, ds)
    n_fit = split_validation(len(x_train), config.validation_fraction)
    data = {
        "x_fit": x_train[:n_fit],
        "y_fit": ds.y_train[:n_fit],
        "x_val": x_train[n_fit:],
        "y_val": ds.y_train[n_fit:],
        "x_cal": x_train[: min(n_fit, config.calibration_samples)],
        "x_test": x_test,
        "y_test": ds.y_test,
    }
    with RunDirectory(config.workdir, _run_config(config), mutable_keys=MUTABLE_KEYS) as run_dir:
        return _run(config, budgets, methods, run_dir, say, model, data)


def _run(config, budgets, methods, run_dir, say, model, data) -> dict:
    x_test, y_test = data["x_test"], data["y_test"]
    validation = (data["x_val"], data["y_val"]) if len(data["x_val"]) else None
    kind = output_kind(model)
    say(f"output taken as {kind.kind}: {kind.evidence}")
    ensure_compiled(model, kind=kind)
    learning_rate = (
        default_finetune_lr(model) if config.finetune_lr is None else float(config.finetune_lr)
    )
    name = os.path.splitext(os.path.basename(config.model))[0]

    if run_dir.is_complete("original"):
        original = run_dir.manifest["complete"]["original"]["row"]
        say("original model: measured by an earlier run (resumed)")
    else:
        say(f"evaluating the original model ({count_params(model):,} parameters)")
        original = _measure_row(model, x_test, y_test, config, kind)
        run_dir.mark_complete("original", row=original)

    order = [_key(m, b) for m in methods for b in budgets]
    for method in methods:
        for budget in budgets:
            key = _key(method, budget)
            relpath = os.path.join("models", f"{name}_{key}.keras")
            info = run_dir.manifest["complete"].get(key)
            done = info is not None and (
                info["row"]["status"] != "ok" or run_dir.exists(relpath)
            )
            if done:
                say(f"{method} at budget {budget:g}: complete in an earlier run (resumed)")
                continue
            run_dir.mark_incomplete(key)
            row = _one_model(
                method, model, budget, data, validation, config, kind, learning_rate,
                original, x_test, y_test, say,
            )
            if row["status"] == "ok":
                path = run_dir.join(relpath)
                if os.path.realpath(path) == os.path.realpath(config.model):
                    raise ValueError(
                        f"Refusing to overwrite the input model. Received: output path {path!r}."
                    )
                final = row.pop("_model")
                with run_dir.atomic_path(relpath) as tmp:
                    final.save(tmp)
                row["model_path"] = path
            run_dir.mark_complete(key, row=row)
            _write(run_dir, name, config, learning_rate, kind, original, order, plots=False)
    report = _write(run_dir, name, config, learning_rate, kind, original, order)
    if not any(r["status"] == "ok" for r in report["rows"]):
        raise InfeasibleBudgetError(
            "Impossible budget: no method reached any requested budget. "
            + " ".join(r["status"] for r in report["rows"])
        )
    say(f"report written: {report['paths']['markdown']}")
    return report


def _write(run_dir, name, config, learning_rate, kind, original, order, *, plots=True) -> dict:
    """Rewrite the report from the manifest (JSON and Markdown; plots when asked)."""
    report = _report(name, config, learning_rate, kind, original, run_dir, order)
    report["paths"] = write_report(report, run_dir.path, plots=plots)
    return report


def _one_model(
    method, model, budget, data, validation, config, kind, learning_rate,
    original, x_test, y_test, say,
) -> dict:
    """Compress, measure and fine-tune one method at one budget: the report row."""
    say(f"compressing: {method} at budget {budget:g}")
    start = time.perf_counter()
    row = {"method": method, "budget": budget, "budget_kind": config.budget_kind}
    try:
        out = _compress(method, model, budget, data, config, kind, 0, learning_rate)
    except InfeasibleBudgetError as e:
        say(f"  skipped: {e}")
        return {**row, "status": f"infeasible: {e}"}
    except UnsupportedLayerError as e:
        say(f"  skipped: {e}")
        return {**row, "status": f"unsupported: {e}"}
    except ValueError as e:
        if method != "tfmot":
            raise
        # The TF-MOT bridge rebuilds only some graphs in tf_keras: the
        # baseline is reported as unsupported, the other methods go on.
        say(f"  skipped: {e}")
        return {**row, "status": f"unsupported: {' '.join(str(e).split())}"}
    stats = _measure_row(out.model, x_test, y_test, config, kind, nonzero=out.nonzero_params)
    row.update(
        param_fraction=stats["params"] / original["params"],
        mac_fraction=stats["macs"] / original["macs"] if original["macs"] else None,
        **stats,
        **out.summary(),
        status="ok",
    )
    final = out.model
    if config.finetune_epochs:
        say(f"  fine-tuning {config.finetune_epochs} epoch(s), learning rate {learning_rate:g}")
        final, row["finetune_best_epoch"] = _finetuned(
            method, model, out.model, budget, data, validation, config, kind, learning_rate
        )
        tuned = final.evaluate(
            x_test, y_test, batch_size=config.batch_size, verbose=0, return_dict=True
        )
        row["accuracy_finetuned"] = float(tuned.get("accuracy", float("nan")))
        row["metrics_finetuned"] = {k: float(v) for k, v in tuned.items()}
    row["seconds"] = time.perf_counter() - start
    say(
        f"  params {row['param_fraction']:.3f} of original, accuracy {row['accuracy']:.4f}"
        + (
            f" -> {row['accuracy_finetuned']:.4f} fine-tuned"
            if "accuracy_finetuned" in row
            else ""
        )
    )
    row["_model"] = final
    return row
