r"""Ablation: the authors' MNIST protocol against ours, one factor at a time.

Starts from the `mnist_authors` preset (a replication of the authors'
`MNIST_Full_Analysis.py`: double softmax, PyTorch's AdamW epsilon,
standardised inputs, N(0, 1/fan_in) kernels, local rank on 128 test images)
and switches one of the five protocol factors
(`dynamics_config.PROTOCOL_FACTORS`) to ours; and from `ours` (the same run
with all five factors ours) switches one factor to theirs. Every
variant is otherwise identical (data subsets, optimiser, steps, measurement
grid), trained with the same seeds.

    python -m experiments.authors_ablation --data_path=/path/to/mnist10k.npz \
        --workdir=runs/authors_ablation --seeds=0,1,2 --jobs=3

Outputs, in one run directory (`keras_localrank.rundir.RunDirectory`):

    workdir/variants/<name>/     one dynamics study per variant (resumable)
    workdir/table.csv, table.md  final robust local rank per hidden layer and
                                 drop start step, mean +- std across seeds
    workdir/ablation.png         robust local rank of every hidden layer
                                 against step, a panel per variant, seed bands
    workdir/summary.json         the table as JSON, plus the variants' settings

`--report_rank_sets` measures the variants' last checkpoints on both rank
sets instead (`workdir/rank_sets.json`). Rerunning with the same --workdir
resumes every variant; --variants and
--seeds may change between runs (variants already trained are reused).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses

import numpy as np
import pandas as pd
from absl import flags

from experiments import common
from keras_localrank import names
from keras_localrank.rundir import RunDirectory
from keras_localrank.studies import dynamics
from keras_localrank.studies.dynamics_config import PROTOCOL_FACTORS
from keras_localrank.validation import check_choice, check_positive_int

_AUTHORS, _OURS = 1, 0


def _factor(name: str, side: int) -> dict:
    value = PROTOCOL_FACTORS[name][side]
    if name == "rank_on":
        return dict(rank_on=value[0], rank_samples=value[1])
    return {name: value}


def _all(side: int) -> dict:
    out = {}
    for name in PROTOCOL_FACTORS:
        out.update(_factor(name, side))
    return out


#: `{variant: overrides of the mnist_authors preset}`.
VARIANTS: dict[str, dict] = {
    "authors": {},
    **{f"authors w/ our {f}": _factor(f, _OURS) for f in PROTOCOL_FACTORS},
    "ours": _all(_OURS),
    **{
        f"ours w/ their {f}": {**_all(_OURS), **_factor(f, _AUTHORS)}
        for f in PROTOCOL_FACTORS
    },
}

flags.DEFINE_string("workdir", "runs/authors_ablation", "Run directory; reuse it to resume.")
flags.DEFINE_string("data_path", None, "An .npz with x and y read instead of downloading.")
flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, from {list(VARIANTS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Model seeds (init and data order).")
flags.DEFINE_integer("epochs", None, "Epochs (16 steps each); default the preset's 62,500.")
flags.DEFINE_integer("num_measurements", None, "Log-spaced measurements (default 50).")
flags.DEFINE_enum("loop", "fit", ["fit", "fast"], "Training loop (`DynamicsConfig.loop`).")
flags.DEFINE_integer("jobs", 1, "Variants trained in parallel processes.")
flags.DEFINE_bool(
    "report_partial", False,
    "Do not train: report the variants' runs as far as all of them got (runs stopped "
    "early), into workdir/partial/.",
)
flags.DEFINE_bool(
    "report_rank_sets", False,
    "Do not train: measure the latest checkpoint of every listed variant and seed on both "
    "rank sets (ours: 256 training images; theirs: 128 test images), into "
    "workdir/rank_sets.json (the rank_on factor on one trained model).",
)
FLAGS = flags.FLAGS


def variant_config(name: str, **overrides) -> dynamics.DynamicsConfig:
    """The `DynamicsConfig` of a variant (`mnist_authors` + the variant + `overrides`)."""
    check_choice("variant", name, list(VARIANTS))
    return dynamics.get_preset("mnist_authors", **{**VARIANTS[name], **overrides})


def _folder(name: str) -> str:
    return "variants/" + name.replace("w/ ", "").replace(" ", "_")


def _run_variant(config: dynamics.DynamicsConfig, workdir: str, title: str) -> str:
    dynamics.train_and_evaluate(config, workdir, title=title)
    return workdir


def rank_column(config: dynamics.DynamicsConfig) -> str:
    """The column the ablation reports: the robust rank at the preset's eps."""
    return names.rank_column(names.ROBUST, config.atols[0])


def summary_table(summaries: dict, column: str) -> pd.DataFrame:
    """One row per (variant, layer): final rank and drop start, mean and std across seeds."""
    rows = []
    for variant, summary in summaries.items():
        for layer, kinds in summary["mean_std"]["layers"].items():
            s = kinds[column]
            rows.append(
                dict(
                    variant=variant,
                    layer=layer,
                    seeds=len(summary["seeds"]),
                    peak_mean=s["peak"]["mean"],
                    final_mean=s["final"]["mean"],
                    final_std=s["final"]["std"],
                    relative_drop_mean=s["relative_drop"]["mean"],
                    drop_start_mean=s["drop_start_step"]["mean"],
                    drop_start_std=s["drop_start_step"]["std"],
                    drop_start_count=s["drop_start_step"]["count"],
                    final_train_loss=summary["mean_std"]["final"]["train_loss"]["mean"],
                    final_test_accuracy=summary["mean_std"]["final"]["test_accuracy"]["mean"],
                )
            )
    return pd.DataFrame(rows)


def table_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: final rank `mean +- std` per layer, drop start."""

    def pm(mean, std):
        return "n/a" if mean is None or pd.isna(mean) else f"{mean:.1f} ± {std:.1f}"

    layers = list(dict.fromkeys(table["layer"]))
    head = ["variant", *[f"final {layer}" for layer in layers]]
    head += [f"drop start {layer}" for layer in layers]
    head += ["train loss", "test acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, rows in table.groupby("variant", sort=False):
        rows = rows.set_index("layer").loc[layers]
        cells = [variant]
        cells += [pm(r.final_mean, r.final_std) for r in rows.itertuples()]
        cells += [
            "none" if not r.drop_start_count else pm(r.drop_start_mean, r.drop_start_std)
            for r in rows.itertuples()
        ]
        first = rows.iloc[0]
        cells += [f"{first.final_train_loss:.3f}", f"{first.final_test_accuracy:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_variants(frames: dict, column: str, path: str, title: str) -> None:
    """A panel per variant: `column` of every hidden layer against step, seed bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frames)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True,
                             squeeze=False)
    for ax, (variant, frame) in zip(axes.flat, frames.items()):
        for layer, group in frame.groupby("layer", sort=False):
            stats = group.groupby("step")[column].agg(["mean", "std"]).fillna(0.0)
            steps = stats.index.to_numpy()
            ax.plot(steps, stats["mean"], label=layer, lw=1.2)
            ax.fill_between(steps, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                            alpha=0.25)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(variant, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel(column, fontsize=8)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, path)
    os.chmod(path, 0o644)


def partial_report(run, configs: dict, base) -> str:
    """Table, figure and summary of unfinished runs, cut at the last
    measurement step every variant and seed reached; returns the Markdown table."""
    frames = {}
    for v, config in configs.items():
        per_seed = [
            dynamics.read_measurements(run.join(_folder(v), f"seed={s}"), config).assign(seed=s)
            for s in config.seeds
        ]
        frames[v] = pd.concat(per_seed, ignore_index=True)
    reached = min(int(f.groupby("seed")["step"].max().min()) for f in frames.values())
    summaries = {}
    for v, frame in frames.items():
        frame = frames[v] = frame[frame["step"] <= reached]
        per_seed = {
            s: dynamics.summarize_run(rows.drop(columns="seed"), configs[v])
            for s, rows in frame.groupby("seed")
        }
        summaries[v] = dict(
            mean_std=dynamics.aggregate_summaries(per_seed), seeds=list(configs[v].seeds)
        )
    column = rank_column(base)
    table = summary_table(summaries, column)
    markdown = table_markdown(table)
    run.write_text("partial/table.csv", table.to_csv(index=False))
    run.write_text("partial/table.md", markdown)
    os.makedirs(run.join("partial"), exist_ok=True)
    plot_variants(
        frames,
        column,
        run.join("partial", "ablation.png"),
        f"MNIST 4x200, AdamW lr 1e-4 wd 0.01: first {reached} of {base.total_steps} "
        f"steps, seeds {list(base.seeds)}",
    )
    run.write_json(
        "partial/summary.json",
        dict(
            column=column,
            steps_reached=reached,
            planned_steps=base.total_steps,
            seeds=list(base.seeds),
            variants={v: VARIANTS[v] for v in configs},
            table=table.replace({np.nan: None}).to_dict("records"),
        ),
    )
    extra = ""
    if "authors" in configs:
        sets = rank_sets_at_checkpoint(run, "authors", configs["authors"], base.seeds[0])
        run.write_json("partial/rank_sets_at_checkpoint.json", sets)
        extra = f"\nauthors' checkpoint, robust rank on each rank set: {sets}"
    return f"First {reached} steps (planned {base.total_steps}):\n{markdown}{extra}"


def rank_sets_at_checkpoint(run, variant: str, config, seed: int) -> dict | None:
    """The robust local rank of a variant's latest checkpoint on both rank sets
    (ours: the first 256 training inputs; theirs: 128 test inputs). Only the
    measurement differs between `rank_on` variants, so this compares them on
    one trained model."""
    import keras

    from keras_localrank import local_rank
    from keras_localrank.studies import mlp

    folder = f"{_folder(variant)}/seed={seed}"
    state = run.read_json(f"{folder}/state.json", {})
    if not state:
        return None
    model = keras.models.load_model(run.join(folder, "checkpoints", state["checkpoint"]))
    data = mlp.load_data(config)
    out = {"step": state["step"]}
    for side in (_OURS, _AUTHORS):
        rank_on, samples = PROTOCOL_FACTORS["rank_on"][side]
        x = mlp.rank_inputs(data, dataclasses.replace(config, rank_on=rank_on,
                                                      rank_samples=samples))
        result = local_rank(model, x, atol=config.atols[0],
                            layers=[f"hidden_{i + 1}" for i in range(len(config.hidden))])
        out[f"{rank_on} ({samples})"] = {
            layer: float(np.mean(r)) for layer, r in result.per_sample.items()
        }
    return out


def main(argv):
    del argv
    variants = [check_choice("variants", v, list(VARIANTS)) for v in FLAGS.variants]
    seeds = common.numbers("seeds", FLAGS.seeds, int)
    overrides = dict(data_path=FLAGS.data_path, seeds=seeds, loop=FLAGS.loop)
    for name in ("epochs", "num_measurements"):
        if getattr(FLAGS, name) is not None:
            overrides[name] = getattr(FLAGS, name)
    configs = {v: variant_config(v, **overrides) for v in variants}
    base = variant_config("authors", **overrides)
    top = dict(
        base=base.to_dict(),
        variants={v: VARIANTS[v] for v in variants},
    )
    with RunDirectory(
        FLAGS.workdir, top, mutable_keys=("variants", "base.seeds", "base.loop")
    ) as run:
        if FLAGS.report_partial:
            print(partial_report(run, configs, base))
            return
        if FLAGS.report_rank_sets:
            sets = {
                v: {str(s): rank_sets_at_checkpoint(run, v, configs[v], s) for s in seeds}
                for v in variants
            }
            run.write_json("rank_sets.json", sets)
            print(sets)
            return
        run.write_text("flags.txt", FLAGS.flags_into_string())
        run.mark_incomplete("table.csv", "table.md", "ablation.png", "summary.json")
        steps = base.total_steps
        jobs = min(check_positive_int("jobs", FLAGS.jobs), len(variants))
        with common.process_pool(jobs) as pool:
            futures = {
                v: pool.submit(_run_variant, configs[v], run.join(_folder(v)),
                               f"{v} ({steps} steps)")
                for v in variants
            }
            for v, future in futures.items():
                future.result()
                print(f"done: {v}", flush=True)
        column = rank_column(base)
        summaries, frames = {}, {}
        for v in variants:
            summaries[v] = run.read_json(f"{_folder(v)}/summary.json")
            frames[v] = pd.read_csv(run.join(_folder(v), "measurements.csv"))
        table = summary_table(summaries, column)
        run.write_text("table.csv", table.to_csv(index=False))
        run.write_text("table.md", table_markdown(table))
        plot_variants(
            frames,
            column,
            run.join("ablation.png"),
            f"MNIST 4x200, AdamW lr 1e-4 wd 0.01, {steps} steps, seeds {list(base.seeds)}",
        )
        run.write_json(
            "summary.json",
            dict(
                column=column,
                steps=steps,
                seeds=list(base.seeds),
                variants={v: VARIANTS[v] for v in variants},
                table=table.replace({np.nan: None}).to_dict("records"),
            ),
        )
        for name in ("table.csv", "table.md", "ablation.png", "summary.json"):
            run.mark_complete(name)
    print(table_markdown(table))


if __name__ == "__main__":
    common.run(main)
