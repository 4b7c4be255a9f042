"""What `import keras_localrank` costs and where it stops (fresh interpreters)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

import keras_localrank as klr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, **env):
    """Run `code` in a fresh interpreter; `env` values of None unset a variable."""
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={k: v for k, v in full.items() if v is not None},
    )


def test_measuring_an_mlp_imports_no_tfp_and_study_modules_load_on_use(tmp_path):
    # A saved model with a GaussianBottleneck: loading it must still work after a
    # plain `import keras_localrank` (the layer is registered; TFP comes on use).
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    z = klr.GaussianBottleneck(3, beta=0.1, name="z")(keras.layers.Dense(8)(inp))
    vib_model = keras.Model(inp, keras.layers.Dense(2)(z))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype("float32")
    path = tmp_path / "vib.keras"
    vib_model.save(path)
    expected = klr.GaussianBottleneck.posterior_parameters(vib_model.get_layer("z"),
                                                           vib_model.layers[1](x))[0]
    np.save(tmp_path / "mean.npy", keras.ops.convert_to_numpy(expected))
    proc = python(f"""
        import json, sys
        import numpy as np, keras
        import keras_localrank as klr
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"),
                                  keras.layers.Dense(2)])
        result = klr.local_rank(model, np.ones((3, 5), "float32"))
        report = {{"tfp": "tensorflow_probability" in sys.modules,
                   "study": sorted(m for m in ("keras_localrank.vib", "keras_localrank.dynamics",
                                               "keras_localrank.plotting") if m in sys.modules),
                   "ranks": sorted(result.mean)}}
        loaded = keras.models.load_model({str(path)!r})
        report["tfp_after_load"] = "tensorflow_probability" in sys.modules
        x = np.random.default_rng(0).standard_normal((4, 6)).astype("float32")
        mean = loaded.get_layer("z").posterior_parameters(loaded.layers[1](x))[0]
        report["mean_ok"] = bool(np.allclose(mean, np.load({str(tmp_path / "mean.npy")!r})))
        loaded(x)  # the KL term needs TFP
        report["tfp_after_call"] = "tensorflow_probability" in sys.modules
        report["vib"] = klr.vib.__name__
        report["dir"] = "vib" in dir(klr)
        print(json.dumps(report))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "tfp": False, "study": [], "ranks": sorted(report["ranks"]), "tfp_after_load": False,
        "mean_ok": True, "tfp_after_call": True, "vib": "keras_localrank.vib", "dir": True,
    }
    assert len(report["ranks"]) == 2


def test_other_keras_backends_stop_at_import_with_one_sentence(tmp_path):
    proc = python("import keras_localrank", KERAS_BACKEND="jax")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        "ImportError: keras_localrank needs the TensorFlow backend of Keras; set "
        "KERAS_BACKEND=tensorflow (received backend 'jax') before importing keras."
    )
    assert sum(line.lstrip().startswith("File ") for line in lines) <= 2  # no deep traceback
    # The backend named in $KERAS_HOME/keras.json counts too, and nothing heavy is imported.
    home = tmp_path / "keras_home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "torch"}))
    probe = """
        import sys
        try:
            import keras_localrank
        except ImportError as e:
            print(repr(str(e)), "keras" in sys.modules, "tensorflow" in sys.modules)
    """
    proc = python(probe, KERAS_HOME=str(home), KERAS_BACKEND=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, keras_imported, tf_imported = proc.stdout.strip().rsplit(" ", 2)
    assert "received backend 'torch'" in message
    assert (keras_imported, tf_imported) == ("False", "False")
    # The same config file overridden by KERAS_BACKEND=tensorflow: imports.
    proc = python("import keras_localrank, keras; print(keras.backend.backend())",
                  KERAS_BACKEND="tensorflow", KERAS_HOME=str(home))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "tensorflow"


def test_study_modules_import_beside_the_measurement_cli():
    # Regression: experiment modules that tests and Ray workers import defined
    # absl flags at import, clashing with `keras_localrank.__main__` (--epochs,
    # --data_path) in one process (DuplicateFlagError).
    code = (
        "import keras_localrank.__main__, experiments.compress_mnist, "
        "experiments.information_mlp; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
