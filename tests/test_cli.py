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
    with pytest.raises(ValueError, match="Could not load the model file"):
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


def truncated(path, out):
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def test_truncated_or_corrupt_files_name_the_file(saved_model, tmp_path):
    _, path = saved_model
    np.savez(tmp_path / "x.npz", x=np.ones((10, 8, 8), np.float32), y=np.zeros(10))
    bad_npz = truncated(tmp_path / "x.npz", tmp_path / "cut.npz")
    with pytest.raises(ValueError, match=r"cut\.npz.*data="):
        run(Config(model=str(path), data=str(bad_npz)), echo=lambda s: None)
    with pytest.raises(ValueError, match=r"cut\.npz.*data_path="):
        run(Config(model=str(path), data="mnist", data_path=str(bad_npz)), echo=lambda s: None)
    bad_model = truncated(path, tmp_path / "cut.keras")
    with pytest.raises(ValueError, match=r"Could not load the model file .*cut\.keras") as info:
        run(Config(model=str(bad_model)), echo=lambda s: None)
    assert "\n" not in str(info.value)


def test_lambda_models_load_with_safe_mode_off(tmp_path):
    # Keras refuses Lambda layers by default; the one-line error said to pass
    # `safe_mode=False` "to the loading function", which the CLI had no way to do.
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8))
    h = keras.layers.Lambda(lambda t: 2.0 * t)(keras.layers.Flatten()(inp))
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match="Lambda layer.*--nosafe_mode"):
        run(Config(model=str(path), data="digits", samples=4), echo=lambda s: None)
    frame = run(Config(model=str(path), data="digits", samples=4, safe_mode=False),
                echo=lambda s: None)
    assert list(frame["layer"]) == ["out"] and list(frame["mean"]) == [3]


CUSTOM_LAYER_MODULE = """
import keras

@keras.saving.register_keras_serializable(package="klr_test")
class Triple(keras.layers.Layer):
    def call(self, x):
        return 3.0 * x
"""


def test_custom_layers_load_with_imports(tmp_path):
    (tmp_path / "klr_test_layers.py").write_text(CUSTOM_LAYER_MODULE)
    script = (
        "import sys, keras; sys.path.insert(0, sys.argv[1]); import klr_test_layers\n"
        "i = keras.Input((8, 8)); h = klr_test_layers.Triple()(keras.layers.Flatten()(i))\n"
        "keras.Model(i, keras.layers.Dense(3, name='out')(h)).save(sys.argv[2])\n"
    )
    path = tmp_path / "custom.keras"
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(path)], check=True,
                   capture_output=True, timeout=300)
    command = [sys.executable, "-m", "keras_localrank", f"--model={path}", "--data=digits",
               "--samples=4"]
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--imports=<module>" in errors[0]
    proc = subprocess.run(command + ["--imports=klr_test_layers"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "out" in proc.stdout


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for output in (blocker / "t.csv", tmp_path / "folder.csv"):
        (tmp_path / "folder.csv").mkdir(exist_ok=True)
        lines = []
        with pytest.raises(ValueError, match=f"output='{output}'"):
            run(Config(epochs=1, samples=8, output=str(output)), echo=lines.append)
        assert lines == []  # nothing trained or measured


def test_command_line_error_is_one_line_and_exit_status_2(saved_model, tmp_path):
    _, path = saved_model
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_localrank", f"--model={path}",
         f"--data={tmp_path / 'cut.npz'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cut.npz" in errors[0]


@pytest.fixture()
def main_with_flags():
    """`__main__.main` in this process with the given flags (absl FLAGS restored after)."""
    from keras_localrank import __main__ as entry

    def call(*args):
        entry.FLAGS(["keras_localrank", *args])
        return entry.main(["keras_localrank"])

    yield call
    entry.FLAGS.unparse_flags()


@pytest.mark.parametrize("which", ["missing_model", "output_under_a_file", "output_is_a_dir"])
def test_main_prints_one_line_before_any_work(main_with_flags, tmp_path, capsys, which):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    (tmp_path / "folder.csv").mkdir()
    args, name = {
        "missing_model": (["--model=/nonexistent/m.keras"], "m.keras"),
        "output_under_a_file": ([f"--output={blocker / 't.csv'}"], "a_file"),
        "output_is_a_dir": ([f"--output={tmp_path / 'folder.csv'}"], "folder.csv"),
    }[which]
    assert main_with_flags(*args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any work
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0]


def test_measures_a_saved_convnet_with_counted_ranks(tmp_path):
    # `--nospectrum`: the exact layers' ranks counted without singular
    # values, equal to the default run's; no effective rank in the table.
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
         keras.layers.Conv2D(2, 3, activation="relu", name="c2"), keras.layers.Flatten(),
         keras.layers.Dense(3, name="out")]
    )
    path = tmp_path / "conv.keras"
    model.save(path)
    x = klr.datasets.digits().x_test[:40].reshape(40, 8, 8, 1)
    np.savez(tmp_path / "x.npz", x=x)
    counted = run(Config(model=str(path), data=str(tmp_path / "x.npz"), atol=0.05,
                         spectrum=False), echo=lambda s: None)
    whole = run(Config(model=str(path), data=str(tmp_path / "x.npz"), atol=0.05),
                echo=lambda s: None)
    np.testing.assert_array_equal(counted["mean"], whole["mean"])
    assert counted["effective_rank"].isna().all() and whole["effective_rank"].notna().all()
    assert 0 < counted["mean"].iloc[1] < whole["bound"].iloc[1]


@pytest.fixture()
def uint8_npz(tmp_path):
    x8 = np.random.default_rng(0).integers(0, 256, size=(6, 6, 6, 1)).astype(np.uint8)
    np.savez(tmp_path / "u8.npz", x=x8)
    return x8, tmp_path / "u8.npz"


def test_uint8_npz_for_a_uint8_model_input_is_passed_unchanged(
    main_with_flags, uint8_npz, tmp_path, capsys
):
    # uint8 images rescaled inside the model (--wrt=rescaling): the CLI divided
    # every uint8 .npz by 255 and stopped with "Expected integer x[...] for the
    # uint8 model input. Received: dtype float32".
    x8, npz = uint8_npz
    keras.utils.set_random_seed(0)
    images = keras.Input((6, 6, 1), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255.0, name="rescaling")(images)
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(h)
    model = keras.Model(images, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))
    model.save(tmp_path / "u8.keras")
    out = tmp_path / "u8.csv"
    status = main_with_flags(f"--model={tmp_path / 'u8.keras'}", f"--data={npz}",
                             "--wrt=rescaling", f"--output={out}")
    assert status == 0, capsys.readouterr().err
    expected = klr.local_rank(model, x8, wrt="rescaling")
    table = pd.read_csv(out)
    assert dict(zip(table["layer"], table["mean"])) == pytest.approx(expected.mean)
    assert table["samples"].eq(6).all()


def test_uint8_npz_for_a_float_model_input_is_scaled(main_with_flags, uint8_npz, tmp_path):
    # The biases make the ReLU pattern, hence the rank, depend on the scale.
    x8, npz = uint8_npz
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6, 6, 1)), keras.layers.Flatten(),
         keras.layers.Dense(12, activation="relu", name="h"), keras.layers.Dense(40, name="out")]
    )
    rng = np.random.default_rng(1)
    model.get_layer("h").set_weights([rng.uniform(0, 1, (36, 12)).astype(np.float32),
                                      -rng.uniform(0, 18, 12).astype(np.float32)])
    model.save(tmp_path / "float.keras")
    out = tmp_path / "float.csv"
    assert main_with_flags(f"--model={tmp_path / 'float.keras'}", f"--data={npz}",
                           f"--output={out}") == 0
    scaled = klr.local_rank(model, x8.astype(np.float32) / 255.0).mean
    unscaled = klr.local_rank(model, x8.astype(np.float32)).mean
    assert scaled["out"] != unscaled["out"]  # the check tells the two apart
    table = pd.read_csv(out)
    assert dict(zip(table["layer"], table["mean"])) == pytest.approx(scaled)
