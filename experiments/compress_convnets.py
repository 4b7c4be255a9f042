"""Compress Fashion-MNIST convnets and a small ViT; report accuracy vs MACs and latency.

Trains three classifiers on Fashion-MNIST (`keras.datasets.fashion_mnist`;
offline, put the IDX files in `$KERAS_HOME/datasets/fashion-mnist/`):

1. `cnn`: the keras.io MNIST convnet widened to 64/128 filters
   (Conv 3x3 64 - MaxPool - Conv 3x3 128 - MaxPool - Flatten - Dropout - Dense 10);
2. `resnet`: a small ResNet-20-style net (a 3x3 stem, three stages of
   `--blocks` residual blocks of two 3x3 conv + BatchNorm at 16/32/64
   filters, strided 1x1 shortcuts, global average pooling);
3. `vit`: a Vision Transformer on 7x7 patches (16 tokens, width 64, 4 layers
   of 4-head self-attention and a 128-unit feed-forward layer).

Each trained model goes through the compression app (`compress.app.run`)
with every method at its budget (`--conv_budget` of the MACs for the
convnets, `--vit_budget` of the parameters for the ViT), with fine-tuning.
The run directory is a `RunDirectory`: rerunning the same command resumes
(trained models and finished budgets are kept); a different configuration
is refused. Outputs: `<arch>.keras`, `compress_<arch>/` (the app's report,
plots of accuracy vs parameters / MACs / batch-64 latency), and
`summary.md`/`summary.json` with the targets checked, plus Pareto plots of
all models (`pareto_macs.png`, `pareto_latency.png`).

With `--scratch_control`, every model also gets the standard same-size
baseline of the pruning literature: the same architecture with every
channel count scaled by one width multiplier (`scratch_width`: the widest
one within the budget, in MACs for the convnets, in parameters for the
ViT), trained from scratch with exactly the original's recipe (`train`:
seed, data, epochs, schedule, learning rate, batch size), saved as
`scratch_<arch>_b<budget>.keras` and measured like the compressed models
(`compress.evaluate.measure`: test accuracy, parameters, MACs, batch-1 and
batch-64 latency). The rows go into `summary.json` (`<arch>.scratch`) and
`summary.md`. The flag may be added when resuming a finished run: only the
scratch models are trained.

    export KERAS_HOME=/tmp/kh  # holding datasets/fashion-mnist/ offline
    python -m experiments.compress_convnets --workdir=runs/compress_convnets
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the script's absl flags (only when run as a script: importing the
    module, as the tests do, must not claim flag names such as `data_path`
    that other entry points define in the same process)."""
    flags.DEFINE_string("workdir", None, "Run directory (resumable).")
    flags.DEFINE_multi_enum("arch", ["cnn", "resnet", "vit"], ["cnn", "resnet", "vit"], "Models.")
    flags.DEFINE_integer("epochs", 3, "Training epochs of the original models.")
    flags.DEFINE_float("train_lr", 1e-3, "Adam learning rate of the original models.")
    flags.DEFINE_enum(
        "train_schedule",
        "constant",
        ["constant", "cosine"],
        "Learning-rate schedule of the originals: constant, or cosine decay to 0 over `--epochs`.",
    )
    flags.DEFINE_integer("blocks", 3, "Residual blocks per ResNet stage (3: ResNet-20 style).")
    flags.DEFINE_integer("n_train", 20000, "Training samples (of 60,000).")
    flags.DEFINE_integer("n_test", 5000, "Test samples (of 10,000).")
    flags.DEFINE_multi_float("conv_budget", [0.3], "MACs fractions for the convnets.")
    flags.DEFINE_multi_float("vit_budget", [0.5], "Parameter fractions for the ViT.")
    flags.DEFINE_multi_string(
        "method",
        ["local_rank", "weight_svd", "tucker2", "tfmot"],
        "Compression methods (see compress.app.METHODS).",
    )
    flags.DEFINE_integer("finetune_epochs", 2, "Fine-tuning epochs after compression.")
    flags.DEFINE_float("finetune_lr", None, "Fine-tuning learning rate (default: the app's).")
    flags.DEFINE_enum(
        "finetune_schedule", "constant", ["constant", "cosine"], "Fine-tuning schedule."
    )
    flags.DEFINE_float("distill", 0.0, "Share of distillation from the original while fine-tuning.")
    flags.DEFINE_float("distill_temperature", 2.0, "Distillation temperature.")
    flags.DEFINE_enum("allocation", "greedy", ["greedy", "energy"], "local_rank budget allocation.")
    flags.DEFINE_float(
        "validation_fraction",
        0.05,
        "Training samples the app holds out (<= 0.1, unseen in training).",
    )
    flags.DEFINE_integer("calibration_samples", 512, "Calibration samples.")
    flags.DEFINE_integer("latency_runs", 10, "Timed inference runs per model and batch size.")
    flags.DEFINE_integer("seed", 0, "Seed.")
    flags.DEFINE_bool(
        "scratch_control",
        False,
        "Also train a narrower model of each architecture from scratch at each budget "
        "(the original's recipe) and report it beside the compressed models.",
    )
    flags.DEFINE_string(
        "data_path",
        None,
        "An .npz with `x` (28x28 images) and `y` read instead of the Keras data set.",
    )


ARCHS = ("cnn", "resnet", "vit")
#: BatchNorm momentum: Keras's 0.99 leaves the moving statistics far from the
#: data after a few hundred steps (the inference-mode accuracy of a 3-epoch
#: ResNet was at chance level), 0.9 tracks them.
BN_MOMENTUM = 0.9
#: Fraction of the training samples (the last ones) the originals never see.
TRAIN_HOLDOUT = 0.1
#: Channel counts of the original models; a width multiplier scales each one.
CNN_FILTERS = (64, 128)
RESNET_FILTERS = (16, 32, 64)
VIT_DIM, VIT_MLP, VIT_HEADS = 64, 128, 4
#: `scratch_width` searches the multipliers k / WIDTH_GRID, k = 1 ... WIDTH_GRID.
WIDTH_GRID = 1000
#: What a scratch-control budget is a fraction of.
BUDGET_KINDS = ("macs", "params")


@dataclasses.dataclass
class ExperimentConfig:
    """Configuration of `compress_convnets` (see the module docstring)."""

    archs: Sequence[str] = ARCHS
    epochs: int = 3
    train_lr: float = 1e-3
    train_schedule: str = "constant"
    blocks: int = 3
    n_train: int | None = 20000
    n_test: int | None = 5000
    conv_budgets: Sequence[float] = (0.3,)
    vit_budgets: Sequence[float] = (0.5,)
    methods: Sequence[str] = ("local_rank", "weight_svd", "tucker2", "tfmot")
    finetune_epochs: int = 2
    finetune_lr: float | None = None
    finetune_schedule: str = "constant"
    distill: float = 0.0
    distill_temperature: float = 2.0
    allocation: str = "greedy"
    validation_fraction: float = 0.05
    calibration_samples: int = 512
    latency_runs: int = 10
    seed: int = 0
    scratch_control: bool = False
    dataset: str = "fashion_mnist"
    data_path: str | None = None
    batch_size: int = 128


# --- models ------------------------------------------------------------------------------


def scaled_channels(channels: int, width: float, *, multiple: int = 1) -> int:
    """`channels` scaled by `width`, rounded to a multiple of `multiple` (at least one).

    `max(1, round(channels * width))` for `multiple=1`; otherwise
    `multiple * max(1, round(channels * width / multiple))`. Python's
    `round` (half to even) is used, so the result is deterministic.
    """
    return multiple * max(1, round(channels * width / multiple))


def _check_width(width) -> float:
    from keras_localrank.validation import check_finite_float

    return check_finite_float("width", width, low=0.0, low_open=True)


def channel_counts(arch: str, width: float = 1.0) -> dict[str, int]:
    """The channel counts of `arch` at width multiplier `width`.

    Args:
        arch: one of `ARCHS`.
        width: the multiplier, > 0. Default 1.0 (the original model).

    Returns:
        `cnn`: `{"conv1", "conv2"}` filters; `resnet`: `{"stage0", "stage1",
        "stage2"}` filters (the stem has stage 0's, each shortcut its
        stage's); `vit`: `{"width", "mlp"}` (the width a multiple of the
        `VIT_HEADS` heads, at least one per head).

    Raises:
        ValueError: an unknown `arch` or a `width` <= 0.
    """
    width = _check_width(width)
    if arch == "cnn":
        return {f"conv{i + 1}": scaled_channels(c, width) for i, c in enumerate(CNN_FILTERS)}
    if arch == "resnet":
        return {f"stage{i}": scaled_channels(c, width) for i, c in enumerate(RESNET_FILTERS)}
    if arch == "vit":
        return {
            "width": scaled_channels(VIT_DIM, width, multiple=VIT_HEADS),
            "mlp": scaled_channels(VIT_MLP, width),
        }
    raise ValueError(f"Expected `arch` in {ARCHS}. Received: arch={arch!r}")


def build_cnn(width: float = 1.0):
    """The keras.io MNIST convnet, widened to 64/128 filters (times `width`).

    Args:
        width: channel multiplier, > 0. Default 1.0: 64/128 filters.
    """
    import keras

    filters = channel_counts("cnn", width)
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(filters["conv1"], 3, activation="relu", name="conv1"),
            L.MaxPooling2D(2),
            L.Conv2D(filters["conv2"], 3, activation="relu", name="conv2"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dropout(0.5),
            L.Dense(10, name="logits"),
        ],
        name="cnn",
    )


def build_resnet(blocks: int = 3, width: float = 1.0):
    """A ResNet-20-style net: 3 stages of `blocks` residual blocks with BatchNorm.

    Args:
        blocks: residual blocks per stage. Default 3.
        width: channel multiplier of every convolution (stem, blocks,
            shortcuts), > 0. Default 1.0: 16/32/64 filters.
    """
    import keras

    stages = list(channel_counts("resnet", width).values())
    L = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = L.Conv2D(stages[0], 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU()(L.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x))
    for stage, filters in enumerate(stages):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage}b{block}"
            y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                         name=f"{name}_conv1")(x)
            y = L.ReLU()(L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y))
            y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            y = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
            if stride != 1 or x.shape[-1] != filters:
                x = L.Conv2D(filters, 1, strides=stride, use_bias=False,
                             name=f"{name}_short")(x)
                x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_short_bn")(x)
            x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet")


def build_vit(width: float = 1.0, *, depth: int = 4):
    """A ViT on 7x7 patches of 28x28 images (16 tokens), stock Keras layers only.

    `VIT_HEADS` heads; the model width (64) and the feed-forward width (128)
    are scaled by `width` (see `channel_counts`). The learned position
    embedding is the per-token bias of the patch embedding (an
    `EinsumDense` with bias over tokens and features).

    Args:
        width: width multiplier, > 0. Default 1.0: width 64, feed-forward 128.
        depth: transformer layers. Default 4.
    """
    import keras

    dims = channel_counts("vit", width)
    dim, mlp, heads = dims["width"], dims["mlp"], VIT_HEADS
    L = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = L.Reshape((4, 7, 4, 7))(inputs)
    x = L.Permute((1, 3, 2, 4))(x)
    x = L.Reshape((16, 49))(x)
    x = L.EinsumDense("abc,cd->abd", output_shape=(16, dim), bias_axes="bd", name="embed")(x)
    for i in range(depth):
        y = L.LayerNormalization(epsilon=1e-6, name=f"ln{i}a")(x)
        y = L.MultiHeadAttention(heads, dim // heads, name=f"mha{i}")(y, y)
        x = L.Add()([x, y])
        y = L.LayerNormalization(epsilon=1e-6, name=f"ln{i}b")(x)
        y = L.Dense(mlp, activation="gelu", name=f"ffn{i}a")(y)
        y = L.Dense(dim, name=f"ffn{i}b")(y)
        x = L.Add()([x, y])
    x = L.LayerNormalization(epsilon=1e-6, name="ln_out")(x)
    x = L.GlobalAveragePooling1D()(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="vit")


def build(arch: str, config: ExperimentConfig, width: float = 1.0):
    """The `arch` model of `config` at width multiplier `width` (1.0: the original)."""
    if arch == "cnn":
        return build_cnn(width)
    if arch == "resnet":
        return build_resnet(config.blocks, width)
    if arch == "vit":
        return build_vit(width)
    raise ValueError(f"Expected `arch` in {ARCHS}. Received: arch={arch!r}")


def budget_kind(arch: str) -> str:
    """What `arch`'s budgets are fractions of: MACs for the convnets, parameters for the ViT."""
    return "params" if arch == "vit" else "macs"


def model_cost(model, kind: str) -> int:
    """MACs per sample (`compress.macs.count_macs`) or parameters of `model`."""
    from compress.macs import count_macs

    return count_macs(model) if kind == "macs" else int(model.count_params())


def scratch_width(arch: str, config: ExperimentConfig, budget: float, kind: str) -> float:
    """The widest multiplier whose `arch` model costs at most `budget` x the original's.

    The multipliers searched are `k / WIDTH_GRID`, `k = 1 ... WIDTH_GRID`;
    the cost (MACs or parameters) never decreases with the multiplier, so a
    bisection over `k` finds the largest affordable one (deterministic; the
    next grid step is over budget unless `k = WIDTH_GRID`).

    Args:
        arch: one of `ARCHS`.
        config: the experiment configuration (`blocks` for the ResNet).
        budget: fraction of the original's cost, in (0, 1].
        kind: `"macs"` (counted by `compress.macs.count_macs`) or
            `"params"` (`model.count_params()`).

    Returns:
        The multiplier, in `(0, 1]`.

    Raises:
        ValueError: an unknown `arch` or `kind`, a `budget` outside (0, 1],
            or a budget even the narrowest model (multiplier
            `1 / WIDTH_GRID`) exceeds.
    """
    from keras_localrank.validation import check_choice, check_fraction

    check_choice("arch", arch, ARCHS)
    budget = check_fraction("budget", budget)
    check_choice("kind", kind, BUDGET_KINDS)
    costs: dict[tuple, int] = {}

    def cost(k: int) -> int:
        key = tuple(channel_counts(arch, k / WIDTH_GRID).values())
        if key not in costs:
            costs[key] = model_cost(build(arch, config, k / WIDTH_GRID), kind)
        return costs[key]

    limit = budget * cost(WIDTH_GRID)
    if cost(1) > limit:
        raise ValueError(
            f"Expected a `budget` the narrowest {arch} (width {1 / WIDTH_GRID:g}, channels "
            f"{channel_counts(arch, 1 / WIDTH_GRID)}) meets: its {kind} are "
            f"{cost(1) / cost(WIDTH_GRID):.4g} of the original's. Received: budget={budget!r}"
        )
    low, high = 1, WIDTH_GRID  # cost(low) <= limit; the answer is in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if cost(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    return low / WIDTH_GRID


def train_learning_rate(config: ExperimentConfig, steps_per_epoch: int):
    """The originals' learning rate: `config.train_lr`, constant or cosine-decayed to 0.

    Args:
        config: the experiment configuration (`train_lr`, `train_schedule`,
            `epochs`).
        steps_per_epoch: optimizer steps per training epoch, >= 1.

    Returns:
        A float, or a `keras.optimizers.schedules.CosineDecay` over
        `epochs * steps_per_epoch` steps.
    """
    import keras

    if config.train_schedule == "constant":
        return config.train_lr
    return keras.optimizers.schedules.CosineDecay(
        config.train_lr, decay_steps=config.epochs * steps_per_epoch
    )


def train(arch: str, config: ExperimentConfig, ds, *, width: float = 1.0):
    """A freshly trained `arch` model (Adam, logits, `config.epochs` epochs).

    `width` scales the channel counts (`build`); 1.0 trains the original,
    a smaller multiplier the scratch control, with the same recipe.

    The originals fit the first 90% of the training samples. The last 10%
    are never fitted: the app's validation split is the last
    `validation_fraction` of them, and the samples between (the monitor
    split) score every training epoch (printed as `val_accuracy`), so the
    epoch count can be read off a validation curve the app never uses.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    model = build(arch, config, width)
    x = ds.x_train.reshape(-1, 28, 28, 1)
    n_fit = len(x) - int(round(TRAIN_HOLDOUT * len(x)))  # the app's validation stays unseen
    n_app = int(round(config.validation_fraction * len(x)))
    monitor = slice(n_fit, len(x) - n_app)
    steps = -(-n_fit // config.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(train_learning_rate(config, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    validation = (x[monitor], ds.y_train[monitor]) if monitor.stop > monitor.start else None
    model.fit(x[:n_fit], ds.y_train[:n_fit], epochs=config.epochs,
              batch_size=config.batch_size, validation_data=validation, verbose=2)
    return model


# --- summary -----------------------------------------------------------------------------


def _target(arch: str, report: dict) -> dict:
    """The issue's targets for this model, checked on the report."""
    orig = report["original"]
    out = {}
    for row in report["rows"]:
        if row.get("status") != "ok":
            continue
        acc = row.get("accuracy_finetuned", row.get("accuracy"))
        key = f"{row['method']}@{row['budget']:g}"
        drop = orig["accuracy"] - acc
        if arch == "vit":
            out[key] = {"points_lost": 100 * drop, "target_met": bool(100 * drop <= 1.0)}
        else:
            speedup = orig["latency_ms_b64"] / row["latency_ms_b64"]
            out[key] = {
                "points_lost": 100 * drop,
                "speedup_b64": speedup,
                "target_met": bool(100 * drop <= 0.5 and speedup >= 1.5),
            }
    return out


def _scratch_table(rows: list[dict], target: dict) -> list[str]:
    """Markdown lines: the scratch controls beside the compressed models' points lost."""
    lines = [
        "### Scratch control (same budget, narrower model trained from scratch)",
        "",
        "| budget | width | channels | params | MACs | accuracy | points lost "
        "| compressed, points lost | batch 1 (ms) | batch 64 (ms) | speed-up b64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        compressed = ", ".join(
            f"{key.split('@')[0]} {value['points_lost']:.2f}"
            for key, value in target.items()
            if key.endswith(f"@{row['budget']:g}")
        )
        channels = "/".join(str(c) for c in row["channels"].values())
        lines.append(
            f"| {row['budget']:g} {row['budget_kind']} | {row['width']:g} | {channels} "
            f"| {row['params']:,} ({row['param_fraction']:.3f}) "
            f"| {row['macs']:,} ({row['mac_fraction']:.3f}) | {row['accuracy']:.4f} "
            f"| {row['points_lost']:.2f} | {compressed or '-'} "
            f"| {row['latency_ms_b1']:.2f} | {row['latency_ms_b64']:.2f} "
            f"| {row['speedup_b64']:.2f} |"
        )
    lines += [
        "",
        "Points lost: original minus model test accuracy, in points (compressed "
        "models after fine-tuning). Latencies as in the report above (same "
        "function, not interleaved with the original's).",
        "",
    ]
    return lines


def pareto_plot(reports: dict, path: str, *, x: str, scratch: dict | None = None) -> None:
    """Test accuracy (fine-tuned where available) against MACs or latency, all models.

    `scratch` (`{arch: scratch rows}`) adds the scratch controls (grey markers).
    """
    from keras_localrank.plotting import new_figure, save_figure

    key, label = {
        "macs": ("macs", "MACs per sample"),
        "latency": ("latency_ms_b64", "CPU latency, batch 64 (ms)"),
    }[x]
    fig, ax = new_figure(figsize=(7, 4.5), dpi=90)
    markers = dict(zip(ARCHS, "os^"))
    for arch, report in reports.items():
        orig = report["original"]
        ax.plot(orig[key], orig["accuracy"], "k" + markers[arch], ms=9, label=f"{arch} original")
        for row in report["rows"]:
            if row.get("status") != "ok":
                continue
            acc = row.get("accuracy_finetuned", row.get("accuracy"))
            ax.plot(row[key], acc, markers[arch], label=f"{arch} {row['method']}", alpha=0.8)
        for row in (scratch or {}).get(arch, []):
            ax.plot(row[key], row["accuracy"], markers[arch], color="0.6", mfc="none", ms=8,
                    label=f"{arch} scratch {row['width']:g}")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (after fine-tuning)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


# --- the scratch control -----------------------------------------------------------------


def scratch_file(arch: str, budget: float) -> str:
    """The run directory's file name of the scratch control of `arch` at `budget`."""
    return f"scratch_{arch}_b{budget:g}.keras"


def run_scratch_control(
    arch: str, budget: float, width: float, config: ExperimentConfig, ds, run_dir,
    original: dict,
) -> dict:
    """Train (or reuse) and measure the scratch control of `arch` at `budget`.

    The model is `build(arch, config, width)`, trained by `train` (the
    original's recipe), saved atomically as
    `scratch_file(arch, budget)` and marked complete in the manifest with its
    row, so a rerun neither retrains nor re-measures it.

    Args:
        arch: one of `ARCHS`.
        budget: fraction of the original's cost, in (0, 1].
        width: the width multiplier, `scratch_width(arch, config, budget,
            budget_kind(arch))`.
        config: the experiment configuration.
        ds: the data set (`keras_localrank.datasets.Dataset`).
        run_dir: the open `RunDirectory`.
        original: the compression report's row of the original (its
            accuracy, parameters, MACs and latencies are the reference).

    Returns:
        The row: `budget`, `budget_kind`, `width`, `channels`, `params`,
        `macs`, `param_fraction`, `mac_fraction`, `accuracy`, `points_lost`
        (original minus scratch test accuracy, in points), `latency_ms_b1`,
        `latency_ms_b64`, `speedup_b64` (original / scratch), `metrics`,
        `file_bytes`, `load_average`, `train_seconds`, `model_path`.
    """
    from compress.app import load_model
    from compress.evaluate import measure

    model_file = scratch_file(arch, budget)
    info = run_dir.manifest["complete"].get(model_file)
    if info is not None and run_dir.exists(model_file) and "row" in info:
        print(f"{arch} scratch control at {budget:g}: complete in an earlier run (resumed)",
              flush=True)
        return info["row"]
    kind = budget_kind(arch)
    if info is not None and run_dir.exists(model_file):  # trained, not yet measured
        width, seconds = info["width"], info["train_seconds"]
        model = load_model(run_dir.join(model_file))
    else:
        print(f"training {arch} scratch control: width {width:g} "
              f"{channel_counts(arch, width)} at {budget:g} of the {kind}", flush=True)
        start = time.perf_counter()
        model = train(arch, config, ds, width=width)
        seconds = time.perf_counter() - start
        with run_dir.atomic_path(model_file) as tmp:
            model.save(tmp)
        run_dir.mark_complete(model_file, width=width, train_seconds=seconds)
    stats = measure(
        model,
        ds.x_test.reshape(-1, 28, 28, 1),
        ds.y_test,
        batch_size=config.batch_size,
        latency_runs=config.latency_runs,
    )
    accuracy = stats["metrics"]["accuracy"]
    row = {
        "budget": budget,
        "budget_kind": kind,
        "width": width,
        "channels": channel_counts(arch, width),
        "params": stats["params"],
        "macs": stats["macs"],
        "param_fraction": stats["params"] / original["params"],
        "mac_fraction": stats["macs"] / original["macs"],
        "accuracy": accuracy,
        "points_lost": 100 * (original["accuracy"] - accuracy),
        **{k: v for k, v in stats.items() if k.startswith("latency_ms_")},
        "speedup_b64": original["latency_ms_b64"] / stats["latency_ms_b64"],
        "metrics": stats["metrics"],
        "file_bytes": stats["file_bytes"],
        "load_average": stats["load_average"],
        "train_seconds": seconds,
        "model_path": run_dir.join(model_file),
    }
    run_dir.mark_complete(model_file, width=width, train_seconds=seconds, row=row)
    return row


def _run_dir_config(config: ExperimentConfig) -> dict:
    """The config the run directory checks (`data_path` only when set, so that
    run directories written before it existed still resume)."""
    out = dataclasses.asdict(config)
    if out["data_path"] is None:
        del out["data_path"]
    return out


# --- the study ---------------------------------------------------------------------------


def train_and_evaluate(config: ExperimentConfig, workdir: str) -> dict:
    """Train (or reuse) each model, compress it with every method, summarise.

    With `config.scratch_control`, each model's scratch controls
    (`run_scratch_control`, one per budget) are trained after its compression.

    Returns:
        `{arch: {"report": ..., "target": ..., "scratch": [...]}}` (`scratch`
        only with `config.scratch_control`), also in `workdir/summary.json`;
        `summary.md` and Pareto plots beside it.
    """
    import keras

    from compress.app import CompressionConfig, run
    from keras_localrank import datasets
    from keras_localrank.rundir import RunDirectory

    from keras_localrank.validation import (
        check_choice,
        check_finite_float,
        check_fraction,
        check_int,
        check_positive_int,
    )

    for name in ("epochs", "blocks", "calibration_samples", "latency_runs", "batch_size"):
        check_positive_int(name, getattr(config, name))
    for name in ("n_train", "n_test"):
        if getattr(config, name) is not None:
            check_positive_int(name, getattr(config, name))
    check_int("finetune_epochs", config.finetune_epochs, minimum=0)
    for budget in (*config.conv_budgets, *config.vit_budgets):
        check_fraction("budget", budget)
    check_choice("allocation", config.allocation, ("greedy", "energy"))
    check_choice("train_schedule", config.train_schedule, ("constant", "cosine"))
    check_finite_float("train_lr", config.train_lr, low=0, low_open=True)
    if not isinstance(config.scratch_control, bool):
        raise TypeError(
            "Expected `scratch_control` to be a bool. "
            f"Received: scratch_control={config.scratch_control!r}"
        )
    if not 0 < config.validation_fraction <= TRAIN_HOLDOUT:
        raise ValueError(
            f"Expected `validation_fraction` in (0, {TRAIN_HOLDOUT}] (samples the original "
            f"models never saw). Received: validation_fraction={config.validation_fraction!r}"
        )
    for arch in config.archs:
        if arch not in ARCHS:
            raise ValueError(f"Expected `arch` in {ARCHS}. Received: arch={arch!r}")
    # Scratch-control widths first: a budget no narrower model meets fails
    # before anything is trained.
    widths = {
        (arch, budget): scratch_width(arch, config, budget, budget_kind(arch))
        for arch in (config.archs if config.scratch_control else ())
        for budget in (config.vit_budgets if arch == "vit" else config.conv_budgets)
    }
    # Methods, budgets and the scratch control may be added on a rerun:
    # trained models are kept.
    mutable = ("methods", "conv_budgets", "vit_budgets", "archs", "scratch_control")
    with RunDirectory(workdir, _run_dir_config(config), mutable_keys=mutable) as run_dir:
        ds = datasets.load(
            config.dataset,
            data_path=config.data_path,
            seed=config.seed,
            n_train=config.n_train,
            n_test=config.n_test,
        )
        summary, reports, scratch = {}, {}, {}
        lines = ["# Fashion-MNIST: compressing convnets and a ViT", ""]
        for arch in config.archs:
            model_file = f"{arch}.keras"
            if not (run_dir.is_complete(model_file) and run_dir.exists(model_file)):
                print(f"training {arch}", flush=True)
                start = time.perf_counter()
                model = train(arch, config, ds)
                with run_dir.atomic_path(model_file) as tmp:
                    model.save(tmp)
                run_dir.mark_complete(model_file, train_seconds=time.perf_counter() - start)
            else:
                print(f"{arch}: trained in an earlier run (resumed)", flush=True)
            convnet = arch != "vit"
            report = run(
                CompressionConfig.from_mapping(
                    config,
                    model=run_dir.join(model_file),
                    workdir=run_dir.join(f"compress_{arch}"),
                    budgets=tuple(config.conv_budgets if convnet else config.vit_budgets),
                    budget_kind=budget_kind(arch),
                ),
                progress=lambda line: print(line, flush=True),
            )
            reports[arch] = report
            target = _target(arch, report)
            summary[arch] = {"report": report, "target": target}
            with open(report["paths"]["markdown"], encoding="utf-8") as f:
                lines += [f"## {arch}", "", f.read(), "", f"Targets: `{target}`", ""]
            keras.backend.clear_session()
            if config.scratch_control:
                budgets = config.conv_budgets if convnet else config.vit_budgets
                scratch[arch] = [
                    run_scratch_control(
                        arch, b, widths[arch, b], config, ds, run_dir, report["original"]
                    )
                    for b in budgets
                ]
                summary[arch]["scratch"] = scratch[arch]
                lines += _scratch_table(scratch[arch], target)
                keras.backend.clear_session()
        run_dir.write_json("summary.json", summary)
        run_dir.write_text("summary.md", "\n".join(lines))
        pareto_plot(reports, run_dir.join("pareto_macs.png"), x="macs", scratch=scratch)
        pareto_plot(reports, run_dir.join("pareto_latency.png"), x="latency", scratch=scratch)
    return summary


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise ValueError("Expected `--workdir`. Received: workdir=None")
    config = ExperimentConfig(
        archs=tuple(FLAGS.arch),
        epochs=FLAGS.epochs,
        train_lr=FLAGS.train_lr,
        train_schedule=FLAGS.train_schedule,
        blocks=FLAGS.blocks,
        n_train=FLAGS.n_train,
        n_test=FLAGS.n_test,
        conv_budgets=tuple(FLAGS.conv_budget),
        vit_budgets=tuple(FLAGS.vit_budget),
        methods=tuple(FLAGS.method),
        finetune_epochs=FLAGS.finetune_epochs,
        finetune_lr=FLAGS.finetune_lr,
        finetune_schedule=FLAGS.finetune_schedule,
        distill=FLAGS.distill,
        distill_temperature=FLAGS.distill_temperature,
        allocation=FLAGS.allocation,
        validation_fraction=FLAGS.validation_fraction,
        calibration_samples=FLAGS.calibration_samples,
        latency_runs=FLAGS.latency_runs,
        seed=FLAGS.seed,
        scratch_control=FLAGS.scratch_control,
        data_path=FLAGS.data_path,
    )
    train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    common.run(main)
