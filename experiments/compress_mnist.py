"""Compress MNIST MLPs with every method over a range of budgets.

Trains a 784-1024-1024-10 ReLU MLP and the paper's 784-200x4-10 MLP on MNIST
(offline: `--data_path=mnist10k.npz`), then runs the compression app
(`compress.app.run`) on each with local rank, weight SVD and TF-MOT magnitude
pruning at every budget, and writes one sub-run per model plus
`summary.md`/`summary.json` (the target check) in `--workdir`. The app holds
out the last `--validation_fraction` of the training samples (which the
original models were trained on) for its choices: the greedy rank allocation
and the best fine-tuning epoch; the test split decides nothing.

    python -m experiments.compress_mnist --data_path=mnist10k.npz \
        --workdir=runs/compress_mnist

`--workdir` is a `keras_localrank.rundir.RunDirectory`:

    config.json, manifest.json, flags.txt
    mlp_<arch>/model.keras          the trained original (reused on resume)
    mlp_<arch>/compression/         the compression app's own run directory
    mlp_<arch>/result.json          report and target check; complete.json
    summary.json, summary.md

Run it again with the same `--workdir` to resume: finished architectures are
not redone, a trained original is not retrained, and the app resumes its own
finished budgets.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402
from keras_localrank.executors import Executor, InProcessExecutor  # noqa: E402
from keras_localrank.rundir import RunDirectory, SubRun  # noqa: E402
from keras_localrank.validation import (  # noqa: E402
    check_choice,
    check_finite_float,
    check_fraction,
    check_int,
    check_positive_int,
    check_sequence,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags; defined only when run as a script, so importing the
    sweep (tests, Ray workers) does not claim flag names in the process."""
    flags.DEFINE_string("data_path", None, "Offline .npz with x and y (else keras.datasets).")
    flags.DEFINE_string("workdir", "runs/compress_mnist", "Run directory (reuse it to resume).")
    flags.DEFINE_multi_float("budget", [0.5, 0.3, 0.2, 0.1, 0.05, 0.02], "Parameter fractions.")
    flags.DEFINE_multi_string("arch", ["1024x2", "200x4"], "Hidden layers: WIDTHxDEPTH.")
    flags.DEFINE_integer("epochs", 8, "Training epochs of the original models.")
    flags.DEFINE_integer("finetune_epochs", 2, "Fine-tuning epochs after compression.")
    flags.DEFINE_float(
        "finetune_lr", None, "Fine-tuning learning rate (default: compiled LR / 10)."
    )
    flags.DEFINE_float("validation_fraction", 0.1, "Training samples held out for choices.")
    flags.DEFINE_enum("allocation", "greedy", ["greedy", "energy"], "local_rank budget allocation.")
    flags.DEFINE_integer("calibration_samples", 1024, "Calibration samples.")
    flags.DEFINE_integer("latency_runs", 10, "Timed inference runs per model.")
    flags.DEFINE_integer("seed", 0, "Seed.")
    common.define_executor_flags()


def parse_arch(arch: str) -> tuple[int, int]:
    """`"1024x2"` -> `(1024, 2)`: width and depth of the hidden layers.

    Raises:
        ValueError: not `WIDTHxDEPTH` with positive integers.
    """
    try:
        width, depth = (int(v) for v in str(arch).lower().split("x"))
    except ValueError:
        raise ValueError(f"Expected `arch` like '1024x2'. Received: arch={arch!r}") from None
    if width < 1 or depth < 1:
        raise ValueError(f"Expected positive width and depth. Received: arch={arch!r}")
    return width, depth


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Configuration of `compress_mnist` (see the module docstring).

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range.
    """

    data_path: str | None = None
    budgets: Sequence[float] = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
    archs: Sequence[str] = ("1024x2", "200x4")
    methods: Sequence[str] = ("local_rank", "local_rank_nofloor", "weight_svd", "tfmot")
    epochs: int = 8
    finetune_epochs: int = 2
    finetune_lr: float | None = None
    validation_fraction: float = 0.1
    allocation: str = "greedy"
    n_train: int | None = None
    n_test: int | None = None
    calibration_samples: int = 1024
    latency_runs: int = 10
    seed: int = 0
    dataset: str = "mnist"

    def __post_init__(self):
        budgets = check_sequence("budgets", self.budgets)
        if not budgets:
            raise ValueError(f"Expected at least one budget. Received: budgets={self.budgets!r}")
        budgets = tuple(check_fraction(f"budgets[{i}]", b) for i, b in enumerate(budgets))
        object.__setattr__(self, "budgets", budgets)
        archs = check_sequence("archs", self.archs)
        if not archs:
            raise ValueError(f"Expected at least one arch. Received: archs={self.archs!r}")
        for arch in archs:
            parse_arch(arch)
        object.__setattr__(self, "archs", tuple(archs))
        object.__setattr__(self, "methods", check_sequence("methods", self.methods))
        check_positive_int("epochs", self.epochs)
        check_int("finetune_epochs", self.finetune_epochs, minimum=0)
        if self.finetune_lr is not None:
            check_finite_float("finetune_lr", self.finetune_lr, low=0.0, low_open=True)
        check_fraction("validation_fraction", self.validation_fraction, allow_zero=True,
                       allow_one=False)
        check_choice("allocation", self.allocation, ("greedy", "energy"))
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_positive_int("calibration_samples", self.calibration_samples)
        check_positive_int("latency_runs", self.latency_runs)
        check_int("seed", self.seed, minimum=0)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("budgets", "archs", "methods"):
            out[key] = list(out[key])
        return out


def train_mlp(arch: str, ds, *, epochs: int, seed: int):
    """A ReLU MLP `n0-(width x depth)-classes`, trained with Adam."""
    import keras

    width, depth = parse_arch(arch)
    keras.utils.set_random_seed(seed)
    layers = [keras.Input(ds.input_shape)]
    layers += [
        keras.layers.Dense(width, activation="relu", name=f"dense_{i + 1}") for i in range(depth)
    ]
    layers.append(keras.layers.Dense(ds.num_classes, activation="softmax", name="output"))
    model = keras.Sequential(layers, name=f"mlp_{arch}")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=128, verbose=0)
    return model


def _target_check(report: dict, budget: float = 0.2) -> dict:
    rows = [r for r in report["rows"] if r.get("status") == "ok"]
    base = report["original"]["accuracy"]
    lr = next((r for r in rows if r["method"] == "local_rank" and r["budget"] == budget), None)
    beats = []
    for r in rows:
        if r["method"] != "local_rank":
            continue
        others = [
            o for o in rows if o["budget"] == r["budget"] and o["method"] in ("weight_svd", "tfmot")
        ]
        beats.append(
            {
                "budget": r["budget"],
                "local_rank": r["accuracy"],
                **{o["method"]: o["accuracy"] for o in others},
                "beats_all": all(r["accuracy"] > o["accuracy"] for o in others),
            }
        )
    return {
        "original_accuracy": base,
        "drop_at_budget_points": None
        if lr is None
        else 100 * (base - lr.get("accuracy_finetuned", lr["accuracy"])),
        "budget": budget,
        "before_finetune": beats,
    }


def _arch_task(arch: str, path: str, sub_config: dict, *, config: ExperimentConfig, ds) -> dict:
    """One architecture: train it (unless saved), compress it, write `result.json`.

    Runs in its own locked sub-run: the unit of work an executor hands out.
    """
    import keras

    from compress.app import CompressionConfig, run

    with SubRun(path, sub_config, lock=True) as sub:
        if not sub.is_complete():
            if not sub.exists("model.keras"):
                print(f"training {arch}", flush=True)
                model = train_mlp(arch, ds, epochs=config.epochs, seed=config.seed)
                with sub.atomic_path("model.keras") as tmp:
                    model.save(tmp)
                keras.backend.clear_session()
            report = run(
                CompressionConfig.from_mapping(
                    config, model=sub.join("model.keras"), workdir=sub.join("compression")
                ),
                progress=lambda line: print(f"{arch}: {line}", flush=True),
            )
            sub.write_json("result.json", {"report": report, "target": _target_check(report)})
            sub.mark_complete()
        return sub.read_json("result.json")


def train_and_evaluate(
    config: ExperimentConfig,
    workdir: str | os.PathLike,
    *,
    extra_files: dict[str, str] | None = None,
    executor: Executor | None = None,
) -> dict:
    """Train each architecture, compress it with every method, summarise.

    Args:
        config: the sweep.
        workdir: the run directory (see the module docstring); reuse it to resume.
        extra_files: `{relative path: text}` written once the config is
            accepted (e.g. `flags.txt`). Default None.
        executor: runs the architectures (`keras_localrank.executors`; one
            task per architecture). Default None: one after the other here.

    Returns:
        `{arch: {"report": ..., "target": ...}}`; also written to
        `workdir/summary.json` and `workdir/summary.md`.

    Raises:
        keras_localrank.rundir.ConfigMismatch: `workdir` holds a different sweep.
        keras_localrank.rundir.RunDirectoryLocked: another process uses `workdir`.
    """
    from keras_localrank import datasets

    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"Expected `config` to be an ExperimentConfig. Received: {config!r}")
    with RunDirectory(workdir, config.to_dict()) as run_dir:
        for relpath, text in (extra_files or {}).items():
            run_dir.write_text(relpath, text)
        run_dir.mark_incomplete("summary.json", "summary.md")
        ds = datasets.load(
            config.dataset,
            data_path=config.data_path,
            seed=config.seed,
            n_train=config.n_train,
            n_test=config.n_test,
        )
        subs = [run_dir.subrun(f"mlp_{arch}", {"arch": arch}) for arch in config.archs]
        results = (executor or InProcessExecutor()).map(
            _arch_task,
            [(arch, sub.path, sub.config) for arch, sub in zip(config.archs, subs)],
            shared=dict(config=config, ds=ds),
            on_result=lambda i, _: run_dir.mark_complete(subs[i].name),
        )
        summary, lines = {}, ["# MNIST compression sweep", ""]
        for arch, sub, result in zip(config.archs, subs, results):
            summary[arch] = result
            markdown = os.path.basename(result["report"]["paths"]["markdown"])
            with open(sub.join("compression", markdown), encoding="utf-8") as f:
                lines += [f"## {arch}", "", f.read(), "", f"Target check: `{result['target']}`", ""]
        run_dir.write_json("summary.json", summary)
        run_dir.write_text("summary.md", "\n".join(lines))
        run_dir.mark_complete("summary.json")
        run_dir.mark_complete("summary.md")
    return summary


def main(argv):
    del argv
    config = ExperimentConfig(
        data_path=FLAGS.data_path,
        budgets=tuple(FLAGS.budget),
        archs=tuple(FLAGS.arch),
        epochs=FLAGS.epochs,
        finetune_epochs=FLAGS.finetune_epochs,
        finetune_lr=FLAGS.finetune_lr,
        validation_fraction=FLAGS.validation_fraction,
        allocation=FLAGS.allocation,
        calibration_samples=FLAGS.calibration_samples,
        latency_runs=FLAGS.latency_runs,
        seed=FLAGS.seed,
    )
    with common.executor_from_flags() as executor:
        train_and_evaluate(
            config,
            FLAGS.workdir,
            extra_files={"flags.txt": FLAGS.flags_into_string()},
            executor=executor,
        )


if __name__ == "__main__":
    define_flags()
    common.run(main)
