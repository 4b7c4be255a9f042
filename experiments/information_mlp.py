r"""Information next to local rank on one quick run: a ReLU MLP on the Gaussian task.

Trains a 20-100x3-4 ReLU MLP with AdamW (decoupled weight decay, as in the
local-rank dynamics study) on Gaussian inputs whose labels depend on `k`
directions. `LocalRankCallback` and `InformationCallback` measure at the same
log-spaced optimizer steps on the same probe set. The run writes:

- `rank.csv`, `information.csv`: the two traces (one row per step, layer and
  rank kind or estimate);
- `information_plane_sigma=<sigma>.png`, one per noise level: the
  information plane (the KL bound on I(X;T) against the KL estimate of
  I(T;Y), coloured by step, one curve per layer), I(X;T) over steps, and the
  robust local rank over steps;
- `summary.json`: per layer, the first, smallest and last value of the
  robust local rank and of each I(X;T) estimate, and the Spearman rank
  correlation of each I(X;T) curve with the robust-rank curve over the run.

Takes about 6 minutes on 2 busy CPU cores. There is no resume: it is a
demonstration run.

    python -m experiments.information_mlp --workdir=runs/information_mlp
"""

from __future__ import annotations

import dataclasses
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pandas as pd  # noqa: E402
from absl import app, flags  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import keras_localrank as klr  # noqa: E402
from keras_localrank.io import atomic_write_json, atomic_write_text  # noqa: E402
from keras_localrank.validation import check_writable_dir  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 20
    k: int = 2
    widths: tuple[int, ...] = (100, 100, 100)
    n_train: int = 1024
    epochs: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.5
    atol: float = 1e-2
    probe_samples: int = 256
    sigmas: tuple[float, ...] = (0.1, 1.0)
    num_bins: int = 30
    measurements: int = 30
    seed: int = 0


def _summary(ranks: pd.DataFrame, information: pd.DataFrame, config: Config) -> dict:
    robust = ranks[ranks["kind"] == "robust"]
    ixt = information[information["quantity"] == klr.information.IXT].copy()
    ixt["label"] = (ixt["estimator"] + "@" + ixt["parameter"] + "="
                    + ixt["value"].map(lambda v: f"{float(v):g}"))
    out = {"config": dataclasses.asdict(config), "layers": {}}
    for layer, rank_rows in robust.groupby("layer"):
        rank_curve = rank_rows.set_index("step")["mean"]
        entry = {f"robust_local_rank@{config.atol:g}": {"first": float(rank_curve.iloc[0]),
                                "min": float(rank_curve.min()),
                                "last": float(rank_curve.iloc[-1])}}
        for label, rows in ixt[ixt["layer"] == layer].groupby("label"):
            curve = rows.set_index("step")["nats"]
            common = curve.index.intersection(rank_curve.index)
            with warnings.catch_warnings():  # a constant curve: rho is NaN
                warnings.simplefilter("ignore")
                rho = spearmanr(curve.loc[common], rank_curve.loc[common]).statistic
            entry[label] = {"first": float(curve.iloc[0]), "min": float(curve.min()),
                            "last": float(curve.iloc[-1]),
                            "spearman_with_local_rank": float(rho)}
        out["layers"][layer] = entry
    return out


def train_and_evaluate(config: Config, workdir: str) -> dict:
    """Train once with both callbacks; write traces, plot and summary into `workdir`."""
    workdir = check_writable_dir("workdir", workdir)
    data = klr.datasets.gaussian_task(n_train=config.n_train, n_test=config.probe_samples,
                                      dim=config.dim, k=config.k, seed=config.seed)
    keras.utils.set_random_seed(config.seed)
    model = keras.Sequential(
        [keras.Input((config.dim,))]
        + [keras.layers.Dense(w, activation="relu", name=f"hidden{i}")
           for i, w in enumerate(config.widths)]
        + [keras.layers.Dense(2**config.k, name="logits")]
    )
    model.compile(keras.optimizers.AdamW(config.learning_rate,
                                         weight_decay=config.weight_decay),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    schedule = klr.schedules.LogSchedule(config.measurements)
    rank_cb = klr.LocalRankCallback(data.x_test, atol=config.atol, schedule=schedule,
                                    measure_on_train_begin=True)
    info_cb = klr.InformationCallback(
        data.x_test, data.y_test, sigma=list(config.sigmas), num_bins=config.num_bins,
        gaussian_channel=True, schedule=klr.schedules.LogSchedule(config.measurements),
        measure_on_train_begin=True,
    )
    model.fit(data.x_train, data.y_train, epochs=config.epochs, batch_size=config.batch_size,
              verbose=0, callbacks=[rank_cb, info_cb])
    ranks, information = rank_cb.trace_frame(), info_cb.trace_frame()
    atomic_write_text(os.path.join(workdir, "rank.csv"), ranks.to_csv(index=False))
    atomic_write_text(os.path.join(workdir, "information.csv"),
                      information.to_csv(index=False))
    for sigma in config.sigmas:
        klr.plotting.plot_information_plane(
            information, os.path.join(workdir, f"information_plane_sigma={sigma:g}.png"),
            ixt=f"kl_upper@sigma={sigma:g}", ity=f"kl@sigma={sigma:g}", ranks=ranks,
            rank_kind="robust",
            title=f"Gaussian task (d={config.dim}, k={config.k}), "
                  f"{'-'.join(map(str, config.widths))} ReLU MLP, AdamW "
                  f"wd={config.weight_decay:g}, seed {config.seed}",
        )
    summary = _summary(ranks, information, config)
    summary["test_accuracy"] = float(model.evaluate(data.x_test, data.y_test, verbose=0)[1])
    summary["seconds_measuring"] = {
        "local_rank": float(ranks.drop_duplicates("step")["seconds"].sum()),
        "information": float(information.drop_duplicates("step")["seconds"].sum()),
    }
    atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags; defined only when run as a script, so importing the
    study (tests, other scripts) does not claim flag names in the process."""
    flags.DEFINE_string("workdir", "runs/information_mlp", "Output directory.")
    flags.DEFINE_integer("epochs", Config.epochs, "Training epochs.")
    flags.DEFINE_integer("seed", Config.seed, "Seed of data, initialisation and training.")
    flags.DEFINE_list("sigmas", [str(s) for s in Config.sigmas], "Noise levels.")


def main(argv):
    del argv
    config = Config(epochs=FLAGS.epochs, seed=FLAGS.seed,
                    sigmas=tuple(float(s) for s in FLAGS.sigmas))
    summary = train_and_evaluate(config, FLAGS.workdir)
    print(f"test accuracy {summary['test_accuracy']:.3f}; wrote {FLAGS.workdir}")
    for layer, entry in summary["layers"].items():
        rank = next(v for k, v in entry.items() if k.startswith("robust_local_rank"))
        parts = [f"robust rank {rank['first']:.1f}->{rank['last']:.1f}"]
        for label, v in entry.items():
            if label.startswith(("kl_upper", "gaussian")):
                parts.append(f"{label} {v['first']:.2f}->{v['last']:.2f} "
                             f"(rho {v['spearman_with_local_rank']:+.2f})")
        print(f"  {layer}: " + "; ".join(parts))


if __name__ == "__main__":
    define_flags()
    app.run(main)
