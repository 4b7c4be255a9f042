"""Training-dynamics studies (keras_localrank.studies.dynamics, experiments/*_mlp.py).

Tiny configs (a few hundred optimizer steps on 8-unit MLPs) so the whole file
runs in well under a minute on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pandas as pd
import pytest

from experiments import common
from keras_localrank import curves, datasets, schedules
from keras_localrank.rundir import ConfigMismatch, RunDirectoryLocked
from keras_localrank.studies import checkpoints, dynamics, mlp
from keras_localrank.studies.step_metrics import StepMetrics
from tests.run_files import snapshot

TINY = dict(
    n_train=96,
    n_test=48,
    dim=6,
    k=2,
    hidden=(8, 8, 8),
    batch_size=32,
    epochs=6,
    checkpoint_every=2,
    num_measurements=8,
    rank_samples=16,
    weight_decay=0.5,
    learning_rate=1e-2,
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides) -> dynamics.DynamicsConfig:
    return dynamics.get_preset("gaussian", **{**TINY, **overrides})


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_seeds")
    config = tiny(seeds=(0, 1))
    return config, str(workdir), dynamics.train_and_evaluate(config, workdir)


def test_run_directory_contents(two_seeds):
    config, workdir, _ = two_seeds
    assert read_json(os.path.join(workdir, "config.json")) == config.to_dict()
    for name in ("measurements.csv", "summary.json", "dynamics.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    run = os.path.join(workdir, "seed=0")
    for name in (
        "config.json",
        "trace.csv",
        "metrics.csv",
        "measurements.csv",
        "measurements.json",
        "history.csv",
        "summary.json",
        "dynamics.png",
        "state.json",
    ):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    with open(os.path.join(run, "dynamics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for sub in ("local_rank", "train"):
        events = os.listdir(os.path.join(run, "tensorboard", sub))
        assert any(e.startswith("events.out.tfevents") for e in events), sub

    frame = pd.read_csv(os.path.join(run, "measurements.csv"))
    assert list(frame.columns) == [
        "step",
        "epoch",
        "layer",
        "local_rank",
        "robust_local_rank@0.01",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "active_units",
        "dead_units",
        "rank_bound",
        "rank_deficit",
        "robust_rank_deficit@0.01",
    ]
    assert frame.equals(pd.DataFrame(read_json(os.path.join(run, "measurements.json"))))
    # One row per (scheduled step, hidden layer): the step before training and
    # the log-spaced grid, each exactly once.
    expected = [0] + schedules.LogSchedule(8).steps_for(config.total_steps)
    assert sorted(frame["step"].unique()) == expected
    assert not frame.duplicated(["step", "layer"]).any()
    assert sorted(frame["layer"].unique()) == ["hidden_1", "hidden_2", "hidden_3"]
    assert frame[["local_rank", "robust_local_rank@0.01"]].notna().all().all()
    # A ReLU layer fed by a 6-dim input has rank <= 6; robust rank <= exact rank.
    assert frame["local_rank"].max() <= 6
    assert (frame["robust_local_rank@0.01"] <= frame["local_rank"] + 1e-9).all()
    assert frame["train_accuracy"].between(0, 1).all()
    trace = pd.read_csv(os.path.join(run, "trace.csv"))
    ranks = trace[trace["kind"].isin(["exact", "robust"])]
    assert len(ranks) == 2 * len(frame)  # exact and eps rows
    # and, with the default information=True, one Gaussian-channel row per sigma
    assert len(trace) - len(ranks) == len(config.information_sigmas) * len(frame)
    history = pd.read_csv(os.path.join(run, "history.csv"))
    assert history["epoch"].tolist() == list(range(config.epochs))


def test_summary_is_consistent_with_csv(two_seeds):
    config, workdir, summary = two_seeds
    top = read_json(os.path.join(workdir, "summary.json"))
    assert top["seeds"] == [0, 1] and top["task_dimension"] == config.k == 2
    for seed in (0, 1):
        run = os.path.join(workdir, f"seed={seed}")
        frame = pd.read_csv(os.path.join(run, "measurements.csv"))
        run_summary = read_json(os.path.join(run, "summary.json"))
        assert run_summary == summary["per_seed"][str(seed)]
        for layer, rows in frame.groupby("layer"):
            for column in ("local_rank", "robust_local_rank@0.01"):
                s = run_summary["layers"][layer][column]
                values = rows.sort_values("step")[column].to_numpy()
                assert s["peak"] == pytest.approx(values.max())
                assert s["final"] == pytest.approx(values[-1])
                assert s["relative_drop"] == pytest.approx(1 - values[-1] / values.max())
        last = frame[frame["step"] == frame["step"].max()].iloc[0]
        assert run_summary["final"]["test_accuracy"] == pytest.approx(last["test_accuracy"])
        assert run_summary["run"]["done"] and run_summary["run"]["epoch"] == config.epochs


def test_dead_unit_columns_and_verdicts(two_seeds):
    """Unit columns obey their definitions; each verdict's numbers come from
    the seed's measurements (reference: the peak of the rank curve)."""
    config, workdir, summary = two_seeds
    for seed in (0, 1):
        run = os.path.join(workdir, f"seed={seed}")
        with open(os.path.join(run, "dead_units.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        frame = pd.read_csv(os.path.join(run, "measurements.csv"))
        np.testing.assert_allclose(frame["rank_bound"] - frame["local_rank"],
                                   frame["rank_deficit"], atol=1e-9)
        assert (frame["rank_deficit"] >= 0).all()
        assert (frame["robust_rank_deficit@0.01"] >= frame["rank_deficit"] - 1e-9).all()
        # hidden_1 reads the input: its bound is min(width, n0) = 6 throughout.
        assert (frame.loc[frame["layer"] == "hidden_1", "rank_bound"] == 6).all()
        verdicts = summary["per_seed"][str(seed)]["dead_units"]
        for layer, rows in frame.groupby("layer"):
            rows = rows.sort_values("step")
            entry = verdicts[layer]["robust_local_rank@0.01"]
            peak = rows["robust_local_rank@0.01"].to_numpy().argmax()
            assert entry["rank_ref"] == pytest.approx(rows["robust_local_rank@0.01"].iloc[peak])
            assert entry["bound_ref"] == pytest.approx(rows["rank_bound"].iloc[peak])
            assert entry["bound_final"] == pytest.approx(rows["rank_bound"].iloc[-1])
            assert entry["drop"] == pytest.approx(entry["dead"] + entry["low_rank"])
            assert verdicts[layer]["verdict"] == entry["line"]
    assert set(summary["dead_units"]) == {"hidden_1", "hidden_2", "hidden_3"}
    assert "verdict_rule" in summary["dead_units_definitions"]
    assert os.path.getsize(os.path.join(workdir, "dead_units.png")) > 0


def test_multi_seed_aggregation(two_seeds):
    _, workdir, summary = two_seeds
    both = pd.read_csv(os.path.join(workdir, "measurements.csv"))
    assert sorted(both["seed"].unique()) == [0, 1]
    finals = [
        summary["per_seed"][s]["layers"]["hidden_3"]["robust_local_rank@0.01"]["final"]
        for s in ("0", "1")
    ]
    agg = summary["mean_std"]["layers"]["hidden_3"]["robust_local_rank@0.01"]["final"]
    assert agg == {
        "mean": pytest.approx(np.mean(finals)),
        "std": pytest.approx(np.std(finals, ddof=1)),
        "count": 2,
    }
    # Different seeds train different models.
    a, b = (both[both["seed"] == s]["train_loss"].to_numpy() for s in (0, 1))
    assert not np.allclose(a, b)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_step):
        super().__init__()
        self.at_step, self.step = at_step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


def _final_weights(run_dir):
    state = read_json(os.path.join(run_dir, "state.json"))
    model = keras.models.load_model(os.path.join(run_dir, "checkpoints", state["checkpoint"]))
    return model.get_weights(), [v.numpy() for v in model.optimizer.variables]


def test_resume_after_interruption(tmp_path):
    # Many measurements so some fall between the checkpoint and the interruption.
    config = tiny(num_measurements=40)
    dynamics.train_and_evaluate(config, tmp_path / "straight", plots=False)
    interrupted = tmp_path / "interrupted"
    # 3 steps per epoch, checkpoints after epochs 2 and 4: stop in epoch 4 (step 11).
    with pytest.raises(KeyboardInterrupt):
        dynamics.train_and_evaluate(config, interrupted, callbacks=[Interrupt(11)], plots=False)
    run = interrupted / "seed=0"
    assert read_json(run / "state.json")["epoch"] == 2
    trace = pd.read_csv(run / "trace.csv")
    assert trace["step"].max() > 6  # measurements after the checkpoint were taken...
    summary = dynamics.train_and_evaluate(config, interrupted, plots=False)  # ...and are redone
    assert summary["per_seed"]["0"]["run"]["done"]

    straight = pd.read_csv(tmp_path / "straight" / "seed=0" / "measurements.csv")
    resumed = pd.read_csv(run / "measurements.csv")
    assert not resumed.duplicated(["step", "layer"]).any()
    assert resumed[["step", "epoch", "layer"]].equals(straight[["step", "epoch", "layer"]])
    np.testing.assert_allclose(
        resumed.iloc[:, 3:].to_numpy(), straight.iloc[:, 3:].to_numpy(), rtol=1e-4, atol=1e-4
    )
    trace = pd.read_csv(run / "trace.csv")
    assert len(trace[trace["kind"].isin(["exact", "robust"])]) == 2 * len(resumed)
    # The information trace is resumed the same way: no duplicates, same values.
    keys = ["step", "layer", "quantity", "estimator", "value"]
    info_straight = pd.read_csv(tmp_path / "straight" / "seed=0" / "information.csv")
    info_resumed = pd.read_csv(run / "information.csv")
    assert not info_resumed.duplicated(keys).any()
    assert info_resumed[keys].equals(info_straight[keys])
    np.testing.assert_allclose(info_resumed["nats"], info_straight["nats"], rtol=1e-4, atol=1e-4)
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == list(range(config.epochs))
    (w1, o1), (w2, o2) = _final_weights(tmp_path / "straight" / "seed=0"), _final_weights(run)
    for a, b in zip(w1 + o1, w2 + o2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Started again once finished, nothing is retrained or appended.
    dynamics.train_and_evaluate(config, interrupted, plots=False)
    assert pd.read_csv(run / "measurements.csv").equals(resumed)


def test_kernels_only_weight_decay_survives_resume(tmp_path):
    # lr * weight_decay = 0.5: one step halves every decayed weight; lr is too
    # small for the gradient to move anything measurably.
    config = tiny(learning_rate=1e-9, weight_decay=5e8)
    x, y = np.ones((4, 6), np.float32), np.zeros(4, np.int64)

    def fresh():
        model = mlp.build_mlp(6, 4, (8, 8, 8))
        mlp.compile_mlp(model, config)
        return model

    model = fresh()
    for layer in model.layers[1:]:
        layer.bias.assign(np.ones(layer.bias.shape, np.float32))
    kernel = model.layers[1].kernel.numpy()
    model.train_on_batch(x, y)
    np.testing.assert_allclose(model.layers[1].kernel.numpy(), kernel / 2, rtol=1e-5)
    np.testing.assert_allclose(model.layers[1].bias.numpy(), 1.0, rtol=1e-5)
    model.save(tmp_path / "ckpt.keras")
    restored = fresh()
    checkpoints.restore(restored, str(tmp_path / "ckpt.keras"))
    assert int(restored.optimizer.iterations.numpy()) == 1
    restored.train_on_batch(x, y)
    np.testing.assert_allclose(restored.layers[1].kernel.numpy(), kernel / 4, rtol=1e-5)
    np.testing.assert_allclose(restored.layers[1].bias.numpy(), 1.0, rtol=1e-5)


def test_workdir_with_a_different_config_is_refused(tmp_path):
    config = tiny(epochs=2, checkpoint_every=1, num_measurements=2)
    dynamics.train_and_evaluate(
        config, tmp_path, plots=False, extra_files={"flags.txt": "--epochs=2\n"}
    )
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="learning_rate"):
        dynamics.train_and_evaluate(
            tiny(epochs=2, checkpoint_every=1, num_measurements=2, learning_rate=0.5),
            tmp_path,
            plots=False,
        )
    with pytest.raises(ConfigMismatch, match="epochs") as info:
        dynamics.train_and_evaluate(
            tiny(epochs=3, checkpoint_every=1, num_measurements=2),
            tmp_path,
            plots=False,
            extra_files={"flags.txt": "--epochs=3\n"},
        )
    assert info.value.keys == ["epochs"]
    # The finished run's config.json and flags.txt (and everything else) are untouched.
    assert snapshot(tmp_path) == before
    assert (tmp_path / "flags.txt").read_text() == "--epochs=2\n"
    # More seeds or other summary settings are a valid rerun: only seed 1 trains.
    more = tiny(epochs=2, checkpoint_every=1, num_measurements=2, seeds=(0, 1), drop_tolerance=0.2)
    summary = dynamics.train_and_evaluate(more, tmp_path, plots=False)
    assert sorted(summary["per_seed"]) == ["0", "1"]
    assert snapshot(tmp_path)["seed=0/trace.csv"] == before["seed=0/trace.csv"]  # not retrained
    assert read_json(tmp_path / "config.json")["seeds"] == [0, 1]


def test_second_process_on_the_workdir_is_refused(tmp_path):
    config = tiny(epochs=2, checkpoint_every=1, num_measurements=2)
    dynamics.train_and_evaluate(config, tmp_path, plots=False)
    before = snapshot(tmp_path)
    # The first process: holds the run directory open (the same config) until told.
    code = (
        "import json, sys, types; pkg = types.ModuleType('keras_localrank'); "
        f"pkg.__path__ = [{os.path.join(REPO, 'keras_localrank')!r}]; "
        "sys.modules['keras_localrank'] = pkg; "
        "from keras_localrank.rundir import RunDirectory; "
        "run = RunDirectory(sys.argv[1], json.loads(sys.argv[2]), mutable_keys=['seeds']).open(); "
        "print('holding', flush=True); sys.stdin.readline()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), json.dumps(config.to_dict())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunDirectoryLocked, match=f"pid {holder.pid}"):
            dynamics.train_and_evaluate(tiny(epochs=2, checkpoint_every=1, num_measurements=2,
                                             seeds=(0, 1)), tmp_path, plots=False)
        assert snapshot(tmp_path) == before  # nothing written, deleted or duplicated
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_step_metrics_follow_the_optimizer_step():
    # steps_per_execution=4: Keras calls the batch hook every 4 steps. A private
    # `+= 1` counter saw steps 1, 2 (epoch 0) and 9, 10 (epoch 1) and fired once;
    # the global step crosses 3, 6, 9 and 15 at checks 4, 8, 12 and 16.
    data = datasets.gaussian_task(64, 16, dim=6, k=2, seed=0)
    model = mlp.build_mlp(6, data.num_classes, (8,))
    mlp.compile_mlp(model, tiny())
    model.compile(
        optimizer=model.optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=4,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "metrics.csv")
        callback = StepMetrics(data, schedules.StepSchedule(3), path)
        model.fit(data.x_train, data.y_train, batch_size=8, epochs=2, verbose=0,
                  shuffle=False, callbacks=[callback])
        rows = pd.read_csv(path)
    assert rows["step"].tolist() == [4, 8, 12, 16]
    assert rows["epoch"].tolist() == [0, 0, 1, 1]
    # The last row is the final weights: independent float64 cross-entropy.
    logits = model.predict(data.x_train, verbose=0).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_p[np.arange(len(data.y_train)), data.y_train].mean()
    assert rows["train_loss"].iloc[-1] == pytest.approx(expected, rel=1e-4)
    accuracy = np.mean(np.argmax(log_p, axis=1) == data.y_train)
    assert rows["train_accuracy"].iloc[-1] == pytest.approx(accuracy)


def test_summarize_curve_by_hand():
    s = curves.summarize_curve([0, 1, 2, 3, 4, 5, 6], [10, 20, 20, 19.5, 12, 10, 10])
    assert s == dict(
        peak=20.0,
        peak_step=1,
        final=10.0,
        final_step=6,
        drop=10.0,
        relative_drop=0.5,
        drop_start_step=3,
    )
    flat = curves.summarize_curve([1, 2, 3], [20, 20, 19.5])
    assert flat["drop_start_step"] is None and flat["relative_drop"] == pytest.approx(0.025)
    assert curves.summarize_curve([1, 2], [np.nan, 4])["peak"] == 4
    with pytest.raises(ValueError, match="finite"):
        curves.summarize_curve([1], [np.nan])


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(seeds=(0, 0)), ValueError, "distinct seeds"),
        (dict(seeds=()), ValueError, "seeds"),
        (dict(seeds=("a",)), TypeError, r"seeds\[0\]"),
        (dict(seeds=0), TypeError, "seeds=0"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay=-1.0"),
        (dict(learning_rate=0.0), ValueError, "learning_rate=0.0"),
        (dict(atols=(0.0,)), ValueError, r"atols\[0\]"),
        (dict(atols=(float("nan"),)), ValueError, "atols"),
        (dict(hidden=()), ValueError, "hidden"),
        (dict(hidden=(8, 0)), ValueError, r"hidden\[1\]"),
        (dict(epochs=True), TypeError, "epochs=True"),
        (dict(batch_size=0), ValueError, "batch_size=0"),
        (dict(k=7), ValueError, "k=7"),
        (dict(dataset="cifar"), ValueError, "dataset='cifar'"),
        (dict(activation="nope"), ValueError, "nope"),
        (dict(drop_tolerance=2.0), ValueError, "drop_tolerance=2.0"),
        (dict(colour="red"), ValueError, "colour"),
        (dict(data_path="x.npz"), ValueError, "data_path='x.npz'"),
    ],
)
def test_config_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny(**overrides)


def test_unknown_preset_and_bad_config_type(tmp_path):
    with pytest.raises(ValueError, match="preset='cifar'"):
        dynamics.get_preset("cifar")
    with pytest.raises(TypeError, match="DynamicsConfig"):
        dynamics.train_and_evaluate({"epochs": 1}, tmp_path)


def test_plot_needs_the_measurement_columns(tmp_path):
    from keras_localrank.plotting import plot_dynamics

    frame = pd.DataFrame({"step": [0, 1], "layer": ["a", "a"], "local_rank": [2.0, 1.0]})
    with pytest.raises(ValueError, match="train_loss"):
        plot_dynamics(frame, tmp_path / "x.png", rank_columns=["local_rank"])
    assert not (tmp_path / "x.png").exists()


def test_presets_match_the_paper():
    paper = dynamics.get_preset("mnist_paper")
    assert (paper.n_train, paper.learning_rate, paper.weight_decay, paper.batch_size) == (
        1000,
        1e-4,
        0.01,
        64,
    )
    assert paper.total_steps == 1_000_000 and paper.num_measurements == 50
    assert paper.hidden == (200,) * 4 and not paper.decay_bias


def _script(module, *args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_mnist_script_with_data_path(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny_mnist.npz"
    np.savez(
        npz,
        x=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        y=np.arange(100, dtype=np.uint8) % 10,
    )
    out = tmp_path / "run"
    done = _script(
        "experiments.mnist_mlp",
        f"--data_path={npz}",
        f"--workdir={out}",
        "--n_train=64",
        "--n_test=16",
        "--hidden=8,8,8,8",
        "--epochs=2",
        "--checkpoint_every=1",
        "--num_measurements=3",
        "--rank_samples=8",
        "--atol=0.01,0.1",
        "--seeds=3",
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hidden_4" in done.stdout
    config = read_json(out / "config.json")
    assert config["hidden"] == [8, 8, 8, 8] and config["atols"] == [0.01, 0.1]
    assert config["learning_rate"] == 1e-3 and config["weight_decay"] == 1.0  # the preset
    assert "--data_path" in (out / "flags.txt").read_text()
    frame = pd.read_csv(out / "seed=3" / "measurements.csv")
    assert {"robust_local_rank@0.01", "robust_local_rank@0.1"} <= set(frame.columns)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--hidden=a,b", "Expected numbers in --hidden. Received: a,b"),
        ("--weight_decay=-2", "weight_decay=-2"),
        ("--seeds=1,1", "distinct seeds"),
        ("--k=30", "k=30"),
        ("--epochs=0", "Expected `epochs` >= 1. Received: epochs=0"),
        ("--workdir={file}", "Expected `workdir` to be a directory."),
    ],
)
def test_gaussian_script_flag_errors(tmp_path, flag, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    workdir = tmp_path / "run"
    done = _script(
        "experiments.gaussian_mlp", f"--workdir={workdir}", flag.format(file=a_file), cwd=REPO
    )
    assert done.returncode == 1
    # One line, no traceback; nothing written.
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gaussian_mlp.py: error: ") and message in last
    assert not workdir.exists() and a_file.read_text() == "not a folder"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Expected `epochs` >= 1.\nReceived: epochs=0"),
        TypeError("Expected `seeds` to be a sequence."),
        OSError(13, "Permission denied", "/x/flags.txt"),
        RunDirectoryLocked("/x", "pid 42 on host"),
    ],
)
def test_one_line_errors(capsys, error):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as info:
        common.one_line_errors(main)(["script"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err
    assert " ".join(str(error).split()) in err


def test_one_line_errors_keeps_the_traceback_of_bugs():
    def main(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        common.one_line_errors(main)(["script"])


def test_a_failed_dataset_download_names_the_offline_options(monkeypatch):
    # Keras raises a bare Exception ("URL fetch failure ...") when it cannot
    # download MNIST; the scripts printed that traceback. Now an OSError
    # (one line in the scripts) says how to run offline.
    import keras

    def offline():
        raise Exception("URL fetch failure on https://example/mnist.npz: None -- [Errno -2]")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(OSError, match=r"'mnist'.*URL fetch failure.*data_path.*KERAS_HOME"):
        datasets.load("mnist")


def test_aggregate_summaries_uses_the_sample_std():
    """The seeds' std is the sample std (n - 1), as in the docs' tables and
    the rest of `curves`; it was the population std (3 seeds 1, 2, 3 read
    0.816, not 1.0). One run: 0. Missing values are left out."""
    runs = {
        "0": {"final": 1.0, "drop": None, "name": "a"},
        "1": {"final": 2.0, "drop": 5.0, "name": "b"},
        "2": {"final": 3.0, "drop": None, "name": "c"},
    }
    out = curves.aggregate_summaries(runs)
    assert out["final"] == {"mean": 2.0, "std": pytest.approx(1.0), "count": 3}
    assert out["drop"] == {"mean": 5.0, "std": 0.0, "count": 1}
    assert "name" not in out
    one = curves.aggregate_summaries({"0": {"x": 4.0}})
    assert one["x"] == {"mean": 4.0, "std": 0.0, "count": 1}
