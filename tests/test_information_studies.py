"""Information next to local rank: `LocalRankCallback(information=)`, the
compression comparison of `curves`, and the information hooks of the studies."""

import glob
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy.stats import spearmanr

from keras_localrank import curves, names
from keras_localrank import information as info
from keras_localrank.callbacks import INFORMATION_KIND, LocalRankCallback
from keras_localrank.estimate import LocalRankEstimator
from keras_localrank.information_callback import InformationCallback
from keras_localrank.studies import dynamics, information_study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(log_dir):
    tags = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


# -- LocalRankCallback(information=) ---------------------------------------------------


def test_callback_information_equals_closed_form_on_a_linear_layer(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 6))  # T = A x: rank 4 in a 6-dim input
    model = keras.Sequential(
        [keras.Input((6,), dtype="float64"),
         keras.layers.Dense(4, use_bias=False, dtype="float64", name="linear")]
    )
    model.layers[0].set_weights([a.T])
    model.compile(keras.optimizers.SGD(0.0), "mse")  # the weights stay A
    x = rng.normal(size=(12, 6))
    sigmas = [0.1, 1.0, 3.0]
    cb = LocalRankCallback(
        x, information=sigmas, dtype="float64", trace_path=tmp_path / "trace.csv",
        log_dir=tmp_path / "tb",
    )
    history = model.fit(x, np.zeros((12, 4)), epochs=2, batch_size=6, verbose=0, callbacks=[cb])
    keys = [f"information/gaussian_channel@sigma={s:g}/linear" for s in sigmas]
    assert cb.keys == ["local_rank/linear", *keys]
    for s, key in zip(sigmas, keys):
        exact = info.gaussian_channel_closed_form(a, s)  # 1/2 log det(I + A A^T / s^2)
        assert history.history[key] == pytest.approx([exact, exact], rel=1e-12)
    assert history.history["local_rank/linear"] == [4.0, 4.0]
    trace = pd.read_csv(tmp_path / "trace.csv")
    assert list(trace.columns[-2:]) == ["estimator", "sigma"]
    rows = trace[trace["kind"] == INFORMATION_KIND]
    assert len(rows) == 2 * len(sigmas)
    assert set(rows["estimator"]) == {"gaussian_channel"}
    assert sorted(set(rows["sigma"])) == sigmas
    np.testing.assert_allclose(rows["std"], 0.0, atol=1e-12)  # J = A at every x
    assert trace[trace["kind"] == names.EXACT]["sigma"].isna().all()
    tags = _events(tmp_path / "tb")
    assert all(len(tags[key]) == 2 for key in keys)


def test_callback_information_matches_information_callback_with_one_jacobian_pass(
    monkeypatch,
):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype(int)

    def model():
        keras.utils.set_random_seed(1)
        m = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(12, activation="relu", name="h"),
             keras.layers.Dense(2, name="out")]
        )
        m.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    calls = []
    real = LocalRankEstimator.measure

    def counting(self, samples, **kwargs):  # the real measurement, counted
        calls.append(self)
        return real(self, samples, **kwargs)

    monkeypatch.setattr(LocalRankEstimator, "measure", counting)
    sigmas = [0.05, 0.5]
    rank_cb = LocalRankCallback(x[:32], atol=0.01, information=sigmas)
    model().fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[rank_cb])
    # One rank measurement per epoch, and nothing else computes Jacobians:
    # the information comes out of the same traced measurement.
    assert len(calls) == 3 and set(calls) == {rank_cb._estimator}
    assert rank_cb._estimator.trace_count == 1
    calls.clear()
    plain = LocalRankCallback(x[:32], atol=0.01)
    model().fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[plain])
    assert len(calls) == 3 and plain._estimator.trace_count == 1
    # The rank values do not change with the option.
    ranks = rank_cb.trace_frame()
    ranks = ranks[ranks["kind"] != INFORMATION_KIND].reset_index(drop=True)
    columns = ["step", "layer", "kind", "mean"]
    pd.testing.assert_frame_equal(ranks[columns], plain.trace_frame()[columns])
    # Same model, same inputs: InformationCallback's Gaussian channel agrees.
    info_cb = InformationCallback(x[:32], sigma=sigmas, bounds=False, gaussian_channel=True)
    both = LocalRankCallback(x[:32], atol=0.01, information=sigmas)
    model().fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[both, info_cb])
    ours = both.trace_frame()
    ours = ours[ours["kind"] == INFORMATION_KIND]
    theirs = info_cb.trace_frame()
    assert len(ours) == len(theirs) == 2 * 2 * len(sigmas)
    merged = ours.merge(theirs, left_on=["step", "layer", "sigma"],
                        right_on=["step", "layer", "value"])
    assert len(merged) == len(ours)
    np.testing.assert_allclose(merged["mean"], merged["nats"], rtol=1e-6)
    assert (merged["mean"] > 0).all()


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf, []])
def test_callback_information_bad_sigma(sigma):
    x = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError, match="sigma"):
        LocalRankCallback(x, information=sigma)
    with pytest.raises(TypeError, match="sigma"):
        LocalRankCallback(x, information="0.1")


# -- curves.compare_compression ---------------------------------------------------------


def test_spearman_against_scipy():
    rng = np.random.default_rng(2)
    for _ in range(5):
        a, b = rng.normal(size=12), rng.normal(size=12)
        b[3] = b[7]  # a tie
        assert curves.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    a[4] = math.nan
    keep = ~np.isnan(a)
    assert curves.spearman(a, b) == pytest.approx(spearmanr(a[keep], b[keep]).statistic)
    assert math.isnan(curves.spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(curves.spearman([1, 2], [1, 2]))
    with pytest.raises(ValueError, match="same length"):
        curves.spearman([1, 2, 3], [1, 2])


def test_compare_compression_on_a_constructed_curve_pair():
    steps = np.array([0, 1, 2, 5, 10, 20, 50, 100, 200, 500])
    # Information peaks at step 5 and falls from step 10 on; rank is flat until
    # step 50, then falls.
    information = np.array([4.0, 4.5, 5.0, 5.5, 5.45, 5.0, 4.0, 3.0, 2.5, 2.0])
    rank = np.array([20, 20, 20, 20, 20, 20, 20, 16, 12, 10], float)
    out = curves.compare_compression(steps, rank, information)
    # Drop starts by hand: the last step within 10% of the drop from the peak.
    # information: peak 5.5, final 2.0, threshold 5.5 - 0.35 = 5.15 -> step 10.
    # rank: peak 20, final 10, threshold 19 -> step 50.
    assert out["information_drop_start_step"] == 10
    assert out["rank_drop_start_step"] == 50
    assert out["lead_steps"] == 40 and out["order"] == "information_first"
    assert out["information_relative_drop"] == pytest.approx(3.5 / 5.5)
    assert out["rank_relative_drop"] == pytest.approx(0.5)
    assert out["information_drop"] == pytest.approx(3.5)
    assert out["phase_start_step"] == 10 and out["phase_points"] == 6
    phase = steps >= 10
    expected = spearmanr(rank[phase], information[phase]).statistic
    assert out["spearman"] == pytest.approx(expected, abs=1e-12)
    assert out["spearman"] > 0.8  # they fall together over the phase
    # Swapped roles: rank first; a flat information curve: only the rank drops.
    assert curves.compare_compression(steps, information * 4, rank / 4)["order"] == "rank_first"
    flat = curves.compare_compression(steps, rank, np.full(10, 5.0))
    assert flat["order"] == "only_rank" and flat["information_drop_start_step"] is None
    assert flat["phase_start_step"] == 50 and flat["spearman"] is None  # constant curve
    assert flat["lead_steps"] is None
    neither = curves.compare_compression(steps, np.full(10, 3.0), np.full(10, 5.0))
    assert neither["order"] == "neither" and neither["phase_points"] == 0
    assert neither["spearman"] is None
    with pytest.raises(ValueError, match="same length"):
        curves.compare_compression(steps, rank[:-1], information)


# -- the studies -----------------------------------------------------------------------

TINY = dict(
    n_train=128, n_test=64, dim=6, k=2, hidden=(8, 8), batch_size=32, epochs=4,
    checkpoint_every=2, num_measurements=6, rank_samples=24, weight_decay=0.5,
    learning_rate=1e-2,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("info_study"))
    config = dynamics.get_preset(
        "gaussian", **TINY, seeds=(0, 1), information_sigmas=(0.5, 2.0)
    )
    return config, workdir, dynamics.train_and_evaluate(config, workdir)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_study_records_information_at_the_rank_steps(study):
    config, workdir, _ = study
    seed = os.path.join(workdir, "seed=0")
    trace = pd.read_csv(os.path.join(seed, "information.csv"))
    ranks = pd.read_csv(os.path.join(seed, "trace.csv"))
    assert sorted(set(trace["step"])) == sorted(set(ranks["step"]))
    assert set(trace["layer"]) == {"hidden_1", "hidden_2"}
    labels = information_study.information_labels(config)
    frame = information_study.information_frame(seed, config)
    for label in labels[info.IXT] + labels["gaussian_channel"]:
        assert frame[f"information/{label}"].notna().all(), label
    for label in labels[info.ITY]:
        assert frame[f"label_information/{label}"].notna().all(), label
    log_n = math.log(config.rank_samples)
    for s in config.information_sigmas:
        upper, lower = frame[f"information/kl_upper@sigma={s:g}"], frame[
            f"information/bd_lower@sigma={s:g}"]
        assert (lower <= upper + 1e-12).all() and (upper <= log_n + 1e-9).all()
    # measurements.csv keeps its rank columns only (the information has its own file).
    measurements = pd.read_csv(os.path.join(seed, "measurements.csv"))
    assert not any(c.startswith("information") for c in measurements.columns)
    for name in ("information_plane_sigma=0.5.png", "information_plane_sigma=2.png"):
        assert os.path.getsize(os.path.join(seed, name)) > 1000
        assert os.path.getsize(os.path.join(workdir, name)) > 1000


def test_study_report_equals_a_direct_computation(study):
    config, workdir, result = study
    report = _read_json(os.path.join(workdir, "information_report.json"))
    assert report["seeds"] == [0, 1] and report["sigmas"] == [0.5, 2.0]
    name = "robust_local_rank@0.01 vs information/kl_upper@sigma=0.5"
    starts = []
    for seed in (0, 1):
        frame = information_study.information_frame(
            os.path.join(workdir, f"seed={seed}"), config
        )
        rows = frame[frame["layer"] == "hidden_1"].sort_values("step")
        direct = curves.compare_compression(
            rows["step"], rows["robust_local_rank@0.01"], rows["information/kl_upper@sigma=0.5"]
        )
        entry = report["per_seed"][str(seed)]["layers"]["hidden_1"][name]
        assert entry == pytest.approx(direct, nan_ok=True)
        assert result["per_seed"][str(seed)]["information"]["layers"]["hidden_1"][name] == entry
        starts.append(direct["information_drop_start_step"])
        for key in ("rank_drop_start_step", "information_drop_start_step", "lead_steps",
                    "order", "spearman", "phase_points", "information_relative_drop"):
            assert key in entry
    mean = report["mean_std"]["layers"]["hidden_1"][name]
    present = [s for s in starts if s is not None]
    if present:
        assert mean["information_drop_start_step"]["mean"] == pytest.approx(np.mean(present))
        assert mean["information_drop_start_step"]["count"] == len(present)
    assert sum(report["orders"]["hidden_1"][name].values()) == 2
    cost = report["per_seed"]["0"]["cost"]
    seed0 = os.path.join(workdir, "seed=0")
    assert cost["local_rank_seconds"] == pytest.approx(
        pd.read_csv(os.path.join(seed0, "trace.csv")).drop_duplicates("step")["seconds"].sum()
    )
    assert cost["information_seconds"] > 0 and cost["measurements"] == len(
        pd.read_csv(os.path.join(seed0, "information.csv"))["step"].unique()
    )
    assert cost["information_over_local_rank"] == pytest.approx(
        cost["information_seconds"] / cost["local_rank_seconds"]
    )
    text = open(os.path.join(workdir, "information_report.txt"), encoding="utf-8").read()
    assert "measuring cost" in text
    assert "kl_upper@sigma=0.5" in text and "hidden_2" in text


def test_information_config_checks():
    with pytest.raises(ValueError, match="information_sigmas"):
        dynamics.get_preset("gaussian", information_sigmas=(0.0,))
    with pytest.raises(ValueError, match="at least one sigma"):
        dynamics.get_preset("gaussian", information_sigmas=())
    with pytest.raises(TypeError, match="information"):
        dynamics.get_preset("gaussian", information="yes")
    off = dynamics.get_preset("gaussian", information=False, information_sigmas=())
    assert off.information is False


def _script(module, *args):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )


def test_gaussian_script_information_flags(tmp_path):
    common = ["--n_train=64", "--n_test=32", "--dim=4", "--hidden=6,6", "--epochs=2",
              "--num_measurements=3", "--rank_samples=16", "--checkpoint_every=1"]
    on = _script("experiments.gaussian_mlp", f"--workdir={tmp_path / 'on'}", *common,
                 "--information_sigma=0.5,1")
    assert on.returncode == 0, on.stderr[-3000:]
    assert "kl_upper@sigma=0.5" in on.stdout
    config = _read_json(tmp_path / "on" / "config.json")
    assert config["information"] is True and config["information_sigmas"] == [0.5, 1.0]
    assert (tmp_path / "on" / "seed=0" / "information.csv").exists()
    # Off: nothing about information is written (in-process: cheaper than a script).
    off = dynamics.get_preset("gaussian", **{**TINY, "epochs": 1}, information=False)
    dynamics.train_and_evaluate(off, tmp_path / "off", plots=False)
    assert not (tmp_path / "off" / "seed=0" / "information.csv").exists()
    assert not (tmp_path / "off" / "information_report.json").exists()
    summary = _read_json(tmp_path / "off" / "seed=0" / "summary.json")
    assert "information" not in summary
    trace = pd.read_csv(tmp_path / "off" / "seed=0" / "trace.csv")
    assert set(trace["kind"]) <= set(names.RANK_KINDS)
    assert "sigma" not in trace.columns
