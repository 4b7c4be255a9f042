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
        f"{kind}/{layer}" for kind in ("local_rank", "robust_local_rank@0.1")
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
