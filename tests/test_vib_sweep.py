"""The VIB beta sweep: grids, transitions, outputs, and resuming after an interruption."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from experiments import vib_sweep_lib as lib


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
        lib.check_betas(betas)
    with pytest.raises(error, match=match):
        lib.SweepConfig(betas=betas)


def test_explicit_betas_are_sorted_and_zero_is_allowed():
    assert lib.check_betas([1.0, 0.0, 1e-3]) == (0.0, 1e-3, 1.0)


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
    found = lib.find_transitions(pd.DataFrame(rows), ["lr"], top=2)["lr"]
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


def test_sweep_resumes_after_interruption(tmp_path, monkeypatch):
    calls = []
    real = lib._train_one

    def interrupted(config, data, beta, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(beta)
        return real(config, data, beta, seed)

    monkeypatch.setattr(lib, "_train_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lib.run_sweep(_tiny(), tmp_path, plots=False)
    finished = sorted(os.listdir(tmp_path / "runs"))
    assert finished == ["beta=0.0001_seed=0.json", "beta=1_seed=0.json"]
    assert not (tmp_path / "summary.json").exists()

    calls.clear()
    monkeypatch.setattr(lib, "_train_one", lambda *a: calls.append(a[2]) or real(*a))
    summary = lib.run_sweep(_tiny(), tmp_path)
    assert calls == [100.0]  # only the unfinished beta was trained
    assert summary["num_runs"] == 3 and summary["trained_this_call"] == 1

    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame["beta"]) == [1e-4, 1.0, 100.0]
    for column in ("accuracy", "rate", "izy_lower_bound", "active_dimensions",
                   "lr_exact/encoder_1", "lr_exact/bottleneck_mean",
                   "lr_robust/encoder_1", "lr_robust/bottleneck_mean"):
        assert column in frame and frame[column].notna().all()
    assert (frame["lr_exact/bottleneck_mean"] <= 3).all()
    for name in summary["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["local_rank_transitions"]) == {
        f"lr_{kind}/{layer}" for kind in ("exact", "robust")
        for layer in ("encoder_1", "bottleneck_mean")
    }
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3

    # Nothing left to do: a third call trains nothing.
    calls.clear()
    assert lib.run_sweep(_tiny(), tmp_path, plots=False)["trained_this_call"] == 0
    assert calls == []


def test_sweep_refuses_a_directory_with_other_settings(tmp_path):
    (tmp_path / "runs").mkdir()
    lib._check_workdir_config(_tiny(), str(tmp_path))
    with pytest.raises(ValueError, match="different settings"):
        lib._check_workdir_config(_tiny(robust_atol=0.5), str(tmp_path))
