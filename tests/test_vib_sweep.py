"""The VIB beta sweep: grids, transitions, outputs, and resuming after an interruption."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from keras_localrank import curves, validation
from keras_localrank.rundir import ConfigMismatch, RunDirectory
from keras_localrank.studies import vib_sweep as lib
from tests.run_files import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_beta_grid_is_log_spaced_and_inclusive():
    grid = lib.beta_grid(1e-6, 10.0, 15)
    assert len(grid) == 15 and grid[0] == 1e-6 and grid[-1] == 10.0
    np.testing.assert_allclose(np.diff(np.log10(grid)), 0.5, rtol=1e-5)
    assert len(lib.SweepConfig().betas) >= 13  # the default grid


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0.0, 1.0, 5), ValueError, "beta_min=0.0"),
        ((1.0, 1e-3, 5), ValueError, "beta_max=0.001"),
        ((1e-3, 1.0, 1), ValueError, "num=1"),
        ((1e-3, 1.0, 2.5), TypeError, "num=2.5"),
        ((float("nan"), 1.0, 5), ValueError, "beta_min=nan"),
        (("1e-3", 1.0, 5), TypeError, "beta_min='1e-3'"),
    ],
)
def test_bad_grids(args, error, match):
    with pytest.raises(error, match=match):
        lib.beta_grid(*args)


@pytest.mark.parametrize(
    "betas,error,match",
    [
        ([1e-3, -1.0], ValueError, r"betas\[1\]"),
        ([1e-3, float("nan")], ValueError, r"betas\[1\]=nan"),
        ([1e-3, "x"], TypeError, r"betas\[1\]='x'"),
        ([0.1], ValueError, "at least 2"),
        ([0.1, 0.1], ValueError, "distinct"),
        ("0.1,1", TypeError, "sequence"),
        (None, TypeError, "sequence"),
    ],
)
def test_bad_explicit_betas(betas, error, match):
    with pytest.raises(error, match=match):
        validation.check_betas("betas", betas, minimum_count=2)
    with pytest.raises(error, match=match):
        lib.SweepConfig(betas=betas)


def test_explicit_betas_are_sorted_and_zero_is_allowed():
    assert validation.check_betas("betas", [1.0, 0.0, 1e-3], minimum_count=2) == (0.0, 1e-3, 1.0)
    assert lib.SweepConfig(betas=[1.0, 0.0, 1e-3]).betas == (0.0, 1e-3, 1.0)


def test_bad_sweep_settings():
    with pytest.raises(ValueError, match="dataset='cifar'"):
        lib.SweepConfig(dataset="cifar")
    with pytest.raises(ValueError, match="seeds"):
        lib.SweepConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="robust_atol"):
        lib.SweepConfig(robust_atol=0.0)


def test_find_transitions_locates_a_step():
    betas = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    rows = []
    for seed, jitter in enumerate((0.0, 0.2)):
        for b, v in zip(betas, (30, 29, 28, 8, 7)):
            rows.append({"beta": b, "seed": seed, "lr": v + jitter})
    found = curves.find_transitions(pd.DataFrame(rows), ["lr"], top=2)["lr"]
    assert (found[0]["beta_low"], found[0]["beta_high"]) == (1e-2, 1e-1)
    assert found[0]["beta_mid"] == pytest.approx(math.sqrt(1e-3))
    assert found[0]["delta"] == pytest.approx(-20.0)
    assert found[0]["relative"] == pytest.approx(20.0 / 23.0)
    assert found[0]["noise"] == pytest.approx(np.std([0.0, 0.2], ddof=1))
    assert abs(found[1]["delta"]) == pytest.approx(1.0)


def _tiny(**kwargs):
    return lib.SweepConfig(
        betas=(1e-4, 1.0, 100.0),
        seeds=(0,),
        dataset="gaussian",
        n_train=200,
        n_test=100,
        rank_samples=40,
        overrides={"encoder_units": (12,), "bottleneck_units": 3, "epochs": 2,
                   "batch_size": 50},
        **kwargs,
    )


def _completed(folder):
    runs = folder / "runs"
    return sorted(p.name for p in runs.iterdir() if (p / "complete.json").exists())


def test_sweep_resumes_after_interruption(tmp_path, monkeypatch):
    calls = []
    real = lib.train_one

    def interrupted(config, data, beta, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(beta)
        return real(config, data, beta, seed)

    monkeypatch.setattr(lib, "train_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lib.train_and_evaluate(_tiny(), tmp_path, plots=False)
    assert _completed(tmp_path) == ["beta=0.0001_seed=0", "beta=1_seed=0"]
    assert not (tmp_path / "runs" / "beta=100_seed=0" / "record.json").exists()
    assert not (tmp_path / "summary.json").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())["complete"]
    assert sorted(manifest) == ["runs/beta=0.0001_seed=0", "runs/beta=1_seed=0"]

    calls.clear()
    monkeypatch.setattr(lib, "train_one", lambda *a: calls.append(a[2]) or real(*a))
    summary = lib.train_and_evaluate(_tiny(), tmp_path, extra_files={"flags.txt": "--x\n"})
    assert calls == [100.0]  # only the unfinished beta was trained
    assert summary["num_runs"] == 3 and summary["trained_this_call"] == 1
    assert (tmp_path / "flags.txt").read_text() == "--x\n"

    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame["beta"]) == [1e-4, 1.0, 100.0]
    assert not frame.duplicated(["beta", "seed"]).any()
    for column in ("accuracy", "rate", "izy_lower_bound", "active_dimensions",
                   "local_rank/encoder_1", "local_rank/bottleneck_mean",
                   "robust_local_rank@0.1/encoder_1", "robust_local_rank@0.1/bottleneck_mean",
                   "local_rank_std/encoder_1", "robust_local_rank@0.1_std/bottleneck_mean"):
        assert column in frame and frame[column].notna().all()
    assert (frame["local_rank/bottleneck_mean"] <= 3).all()
    assert (frame["robust_local_rank@0.1/encoder_1"] <= frame["local_rank/encoder_1"]).all()
    for name in summary["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["local_rank_transitions"]) == {
        f"{kind}/{layer}"
        for kind in ("local_rank", "robust_local_rank@0.01", "robust_local_rank@0.1",
                     "robust_local_rank@1")
        for layer in ("encoder_1", "bottleneck_mean")
    }
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())["complete"]
    assert {"results.csv", "summary.json", "runs/beta=100_seed=0", *summary["plots"]} <= set(
        manifest
    )

    # Nothing left to do: a third call trains nothing.
    calls.clear()
    assert lib.train_and_evaluate(_tiny(), tmp_path, plots=False)["trained_this_call"] == 0
    assert calls == []

    # A different model setting is refused before anything is written.
    before = snapshot(tmp_path)
    with pytest.raises(ConfigMismatch, match="robust_atol"):
        lib.train_and_evaluate(_tiny(robust_atol=0.5), tmp_path, extra_files={"flags.txt": "y"})
    assert snapshot(tmp_path) == before and calls == []


def test_sweep_refuses_a_directory_with_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(lib, "train_one", lambda *a: pytest.fail("must not train"))
    with RunDirectory(tmp_path, _tiny().to_dict(), mutable_keys=lib.MUTABLE_KEYS) as run:
        run.write_text("flags.txt", "--epochs=2\n")
    before = snapshot(tmp_path)
    changed = _tiny()
    changed = lib.SweepConfig(
        **{**changed.__dict__, "overrides": {**changed.overrides, "epochs": 3}}
    )
    with pytest.raises(ConfigMismatch, match="model.epochs") as info:
        lib.train_and_evaluate(changed, tmp_path, extra_files={"flags.txt": "--epochs=3\n"})
    assert info.value.keys == ["model.epochs"]
    with pytest.raises(ValueError, match="robust_atol"):  # ConfigMismatch is a ValueError
        lib.train_and_evaluate(_tiny(robust_atol=0.5), tmp_path)
    assert snapshot(tmp_path) == before


def test_script_bad_betas_end_in_one_line(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.vib_beta_sweep", "--betas=abc",
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "vib_beta_sweep.py: error: Expected numbers in --betas. Received: abc"
    assert not (tmp_path / "run").exists()


# -- refined grids, transitions with confidence, active units, convergence files --------


def _seed_frame(grid, curve, seeds, noise, column="local_rank/encoder_2", rng=None):
    rng = rng or np.random.default_rng(0)
    return pd.DataFrame(
        [
            {"beta": b, "seed": s, column: curve(math.log10(b)) + noise * rng.standard_normal()}
            for s in range(seeds)
            for b in grid
        ]
    )


def test_refine_betas_puts_eight_points_per_decade_around_a_planted_step():
    coarse = lib.beta_grid(1e-4, 10.0, 11)  # half-decade steps
    frame = _seed_frame(coarse, lambda lb: 100.0 - 60.0 * (lb > -1.2), seeds=2, noise=0.5)
    grid = lib.refine_betas(frame, ["local_rank/encoder_2"], per_decade=8)
    assert set(coarse) <= set(grid)
    logs = np.log10(grid)
    # The step (10**-1.5, 0.1) and one coarse step each side: -2.0 .. -0.5.
    inside = logs[(logs >= -2.0 - 1e-6) & (logs <= -0.5 + 1e-6)]
    assert inside[0] == pytest.approx(-2.0) and inside[-1] == pytest.approx(-0.5)
    assert np.max(np.diff(inside)) <= 1 / 8 + 1e-5
    assert len(inside) >= 8 * 1.5 + 1  # >= 8 points per decade over 1.5 decades
    # ... and exactly 8: the 6-digit rounding of the coarse grid adds no extra step.
    assert len(inside) == 13
    # Far from the step the coarse grid is kept as it was.
    assert np.min(np.diff(logs[logs >= 0.0])) == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(ValueError, match="columns"):
        lib.refine_betas(frame, ["nope"])
    with pytest.raises(ValueError, match="per_decade=0"):
        lib.refine_betas(frame, ["local_rank/encoder_2"], per_decade=0)


def test_detector_finds_a_planted_step_and_its_interval_covers_it():
    grid = 10.0 ** np.arange(-3.0, 0.0 + 1e-9, 1 / 8)
    truth, jump, slope = -1.3, 20.0, 4.0  # step inside the step (-1.375, -1.25)
    frame = _seed_frame(
        grid, lambda lb: 100.0 - slope * lb - jump * (lb > truth), seeds=5, noise=1.0
    )
    found = curves.detect_transitions(frame, "local_rank/encoder_2", top=2)
    t = found["transitions"][0]
    assert math.log10(t["beta_low"]) < truth < math.log10(t["beta_high"])
    lo, hi = t["log10_interval"]
    assert lo <= truth <= hi
    expected_jump = jump + slope / 8  # the step's drop includes one step of the slope
    assert t["jump_interval"][0] <= expected_jump <= t["jump_interval"][1]
    assert t["jump"] == pytest.approx(expected_jump, abs=2.0)
    assert t["sharp"] and t["jump_over_noise"] > 3 and t["concentration"] > 0.5
    # The seed spread per beta is the std over seeds (ddof=1) of the data.
    per_beta = frame.groupby("beta")["local_rank/encoder_2"].std(ddof=1).to_numpy()
    np.testing.assert_allclose(found["std"], per_beta)

    # The same fall spread evenly over the decade is not sharp.
    ramp = _seed_frame(grid, lambda lb: 100.0 - jump * np.clip(lb + 1.8, 0, 1), 5, 0.2)
    t = curves.detect_transitions(ramp, "local_rank/encoder_2")["transitions"][0]
    assert not t["sharp"] and t["concentration"] < 0.3

    # A step between coarse points half a decade apart is not sharp either.
    coarse = _seed_frame(grid[::4], lambda lb: 100.0 - jump * (lb > truth), 5, 0.2)
    t = curves.detect_transitions(coarse, "local_rank/encoder_2")["transitions"][0]
    assert t["step_decades"] == pytest.approx(0.5) and not t["sharp"]

    with pytest.raises(ValueError, match="direction='sideways'"):
        curves.detect_transitions(frame, "local_rank/encoder_2", direction="sideways")
    with pytest.raises(ValueError, match=r"0\.0"):
        curves.detect_transitions(frame.assign(beta=0.0), "local_rank/encoder_2")


def test_active_units_equal_a_numpy_forward_pass():
    import keras

    from keras_localrank import vib

    model = vib.build_vib_classifier((6,), 3, encoder_units=(9, 7), bottleneck_units=2, seed=1)
    rng = np.random.default_rng(3)
    for layer in ("encoder_1", "encoder_2"):
        kernel, bias = model.get_layer(layer).get_weights()
        model.get_layer(layer).set_weights([kernel, rng.normal(0, 0.5, bias.shape)])
    x = rng.normal(size=(50, 6)).astype("float32")
    counts = lib.active_unit_counts(model, x, ["encoder_1", "encoder_2"])

    w1, b1 = (v.astype(np.float64) for v in model.get_layer("encoder_1").get_weights())
    w2, b2 = (v.astype(np.float64) for v in model.get_layer("encoder_2").get_weights())
    pre1 = x.astype(np.float64) @ w1 + b1
    pre2 = np.maximum(pre1, 0) @ w2 + b2
    np.testing.assert_array_equal(counts["encoder_1"], (pre1 > 0).sum(axis=1))
    np.testing.assert_array_equal(counts["encoder_2"], (pre2 > 0).sum(axis=1))
    assert 0 < counts["encoder_1"].min() and counts["encoder_1"].max() < 9  # both kinds occur
    fraction, per_input = lib.active_fraction(pre1)
    assert fraction == pytest.approx(np.mean(pre1 > 0))
    np.testing.assert_array_equal(per_input, counts["encoder_1"])
    with pytest.raises(ValueError, match="shape"):
        lib.active_fraction(np.zeros(4))
    keras.backend.clear_session()


def test_plateau_stop_follows_its_stated_criterion():
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    stop = lib.PlateauStop(patience=2, min_delta=0.01)
    stop.set_model(model)
    model.stop_training = False
    # 0.995 is not 1% below 1.0; 0.98 is; then two epochs without a 1% gain.
    for epoch, loss in enumerate([1.0, 0.995, 0.98, 0.975, 0.974]):
        stop.on_epoch_end(epoch, {"loss": loss})
        assert model.stop_training == (epoch == 4)


def test_sweep_writes_loss_per_epoch_and_new_columns(tmp_path):
    config = _tiny(atols=(0.01, 1.0))
    summary = lib.train_and_evaluate(config, tmp_path)
    frame = pd.read_csv(tmp_path / "results.csv")
    for beta in config.betas:
        run = tmp_path / "runs" / f"beta={beta:.6g}_seed=0"
        history = pd.read_csv(run / "history.csv")
        record = json.loads((run / "record.json").read_text())
        assert list(history["epoch"]) == [1, 2] and record["epochs_trained"] == 2
        assert history["loss"].iloc[-1] == pytest.approx(record["train_loss"])
        assert {"rate", "accuracy"} <= set(history)
    for atol in (0.01, 0.1, 1.0):
        assert f"robust_local_rank@{atol:g}/encoder_1" in frame
    # More robust thresholds never give a higher rank.
    loose, strict = "robust_local_rank@0.01/encoder_1", "robust_local_rank@1/encoder_1"
    assert (frame[strict] <= frame[loose]).all()
    assert frame["active_fraction/encoder_1"].between(0, 1).all()
    np.testing.assert_allclose(
        frame["active_units/encoder_1"], 12 * frame["active_fraction/encoder_1"]
    )
    assert frame["rank_equals_active_below/bottleneck_mean"].between(0, 1).all()
    assert {"convergence.png", "transitions.png"} <= set(summary["plots"])
    for name in ("convergence.png", "transitions.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "sharp" in summary["sharp_criterion"]
    # Unit activity: the first encoder layer reads the 20-dim input directly.
    assert (frame["rank_bound/encoder_1"] == 12).all()
    for layer in ("encoder_1", "bottleneck_mean"):
        np.testing.assert_allclose(
            frame[f"rank_deficit/{layer}"],
            frame[f"rank_bound/{layer}"] - frame[f"local_rank/{layer}"], atol=1e-12,
        )
        strict = frame[f"robust_rank_deficit@1/{layer}"]
        assert (strict >= frame[f"rank_deficit/{layer}"] - 1e-12).all()
        assert frame[f"dead_units/{layer}"].between(0, 12).all()
        assert summary["dead_units"][layer]["verdict"].startswith(f"{layer} ")
    # The bottleneck mean (3 units) is capped by 3 and the active encoder units.
    assert (frame["rank_bound/bottleneck_mean"] <= 3).all()
    assert (frame["rank_bound/bottleneck_mean"] <= frame["active_units/encoder_1"] + 1e-9).all()
    assert "dead_units.png" in summary["plots"]
    assert (tmp_path / "dead_units.png").stat().st_size > 1000


def test_bad_atols():
    with pytest.raises(ValueError, match=r"atols\[1\]=-1"):
        lib.SweepConfig(atols=(0.1, -1))
    with pytest.raises(TypeError, match="atols"):
        lib.SweepConfig(atols="0.1")
    with pytest.raises(ValueError, match="distinct"):
        lib.SweepConfig(atols=(0.1, 0.1))


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--atols=abc", "Expected numbers in --atols. Received: abc"),
        ("--atols=0.1,-1", "Expected finite `atols[1]` > 0.0. Received: atols[1]=-1.0"),
    ],
)
def test_script_bad_atols_end_in_one_line(tmp_path, flag, message):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.vib_beta_sweep", flag,
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"vib_beta_sweep.py: error: {message}"
    assert not (tmp_path / "run").exists()


def test_detector_on_a_partly_refined_grid_prefers_the_steepest_step():
    coarse = np.arange(-3.0, 0.0 + 1e-9, 0.5)
    fine = np.arange(-1.5, -1.0 + 1e-9, 1 / 8)
    grid = 10.0 ** np.union1d(coarse, fine)
    # 20 per decade everywhere (10 per coarse step) plus a step of 6 at -1.3.
    frame = _seed_frame(grid, lambda lb: 100.0 - 20.0 * lb - 6.0 * (lb > -1.3), 3, 0.1)
    t = curves.detect_transitions(frame, "local_rank/encoder_2")["transitions"][0]
    assert math.log10(t["beta_low"]) < -1.3 < math.log10(t["beta_high"])
    assert t["jump"] == pytest.approx(6.0 + 20.0 / 8, abs=0.5)
