"""`python -m keras_localrank` and the `cli.run` function behind it."""

import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

import keras_localrank as klr
from keras_localrank.cli import Config, run


def test_demo_prints_tables_before_and_after_training(tmp_path):
    lines = []
    frame = run(Config(epochs=1, samples=64, output=str(tmp_path / "t.csv")), echo=lines.append)
    text = "\n".join(lines)
    assert "before training" in text and "after training" in text
    assert list(frame["layer"]) == ["hidden_1", "hidden_2", "hidden_3", "logits"]
    saved = pd.read_csv(tmp_path / "t.csv")
    np.testing.assert_allclose(saved["mean"], frame["mean"])


@pytest.fixture()
def saved_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8)), keras.layers.Flatten(),
         keras.layers.Dense(16, activation="relu", name="h"), klr.RankProbe(name="probe"),
         keras.layers.Dense(3, name="out")]
    )
    path = tmp_path / "m.keras"
    model.save(path)
    return model, path


def test_measures_a_saved_model_on_digits_and_npz(saved_model, tmp_path):
    model, path = saved_model
    frame = run(Config(model=str(path), data="digits", samples=50, atol=1e-3,
                       output=str(tmp_path / "t.json")), echo=lambda s: None)
    x = klr.datasets.digits().x_test[:50].reshape(50, 8, 8)
    expected = klr.local_rank(model, x, atol=1e-3)
    assert dict(zip(frame["layer"], frame["mean"])) == pytest.approx(expected.mean)
    assert json.loads((tmp_path / "t.json").read_text())["num_samples"] == 50
    np.savez(tmp_path / "x.npz", x=x[:10])
    frame = run(Config(model=str(path), data=str(tmp_path / "x.npz"), layers=["h"]),
                echo=lambda s: None)
    assert list(frame["layer"]) == ["h"] and frame["samples"][0] == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"model": "/nonexistent/m.keras"}, "m.keras"),
        ({"data": "cifar"}, "data='cifar'"),
        ({"data": "/nonexistent/x.npz"}, "x.npz"),
    ],
)
def test_errors(saved_model, kwargs, match):
    _, path = saved_model
    kwargs = {"model": str(path), **kwargs}
    with pytest.raises(ValueError, match=match):
        run(Config(**kwargs), echo=lambda s: None)


def test_data_that_does_not_fit_the_model(saved_model, tmp_path):
    _, path = saved_model
    np.savez(tmp_path / "x.npz", x=np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        run(Config(model=str(path), data=str(tmp_path / "x.npz")), echo=lambda s: None)


def test_unreadable_model_file(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="Could not load model"):
        run(Config(model=str(bad)), echo=lambda s: None)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"samples": 0}, "samples=0"), ({"epochs": -1}, "epochs=-1"), ({"output": "t.txt"}, "t.txt")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config(**kwargs)


def test_command_line_end_to_end(saved_model, tmp_path):
    _, path = saved_model
    out = tmp_path / "table.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_localrank", f"--model={path}", "--data=gaussian",
         "--samples=20", f"--output={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "probe" in proc.stdout and out.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "keras_localrank", "--model=/nonexistent.keras"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr
