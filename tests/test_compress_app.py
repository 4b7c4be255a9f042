"""Tests of the compression app, the CLI and the TF-MOT bridge.

The TF-MOT tests run in a subprocess: importing tensorflow_model_optimization
sets TF_USE_LEGACY_KERAS=1, which must not leak into this test session.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

from compress import CompressionConfig, run
from compress.policies import InfeasibleBudgetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}


def _digits_model(path, *, train=True):
    from keras_localrank import datasets

    ds = datasets.load("digits", n_train=400)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(48, activation="relu", name="h1"),
            keras.layers.Dense(48, activation="relu", name="h2"),
            keras.layers.Dense(10, activation="softmax", name="out"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if train:
        model.fit(ds.x_train, ds.y_train, epochs=30, batch_size=64, verbose=0)
    model.save(path)
    return model


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_cli_end_to_end_on_a_tiny_model(tmp_path):
    model_path = str(tmp_path / "tiny.keras")
    _digits_model(model_path)
    before = _sha(model_path)
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress",
            f"--model={model_path}",
            "--dataset=digits",
            "--budget=0.6",
            "--budget=0.3",
            "--method=all",
            "--finetune_epochs=1",
            "--finetune_lr=0.002",
            f"--workdir={out_dir}",
            "--n_train=400",
            "--calibration_samples=256",
            "--latency_runs=2",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compressing: local_rank at budget 0.6" in proc.stdout
    assert _sha(model_path) == before  # the input model is never touched
    report = json.loads((out_dir / "report.json").read_text())
    assert (out_dir / "report.md").read_text().count("| local_rank |") == 2
    assert (out_dir / "report.png").stat().st_size > 1000
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {(m, b) for m in ("local_rank", "weight_svd", "tfmot") for b in (0.6, 0.3)}
    for (method, budget), row in rows.items():
        if row["status"] != "ok":
            assert method == "local_rank" and "Impossible budget" in row["status"]
            continue
        assert row["param_fraction"] <= budget + 1e-9
        assert 0.0 <= row["accuracy_finetuned"] <= 1.0
        assert row["macs"] > 0 and row["file_bytes"] > 0
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b64"] > 0
        assert row["load_average"] >= 0  # the machine's load when the latency was timed
        loaded = keras.models.load_model(row["model_path"])
        assert loaded.count_params() > 0
    assert report["config"]["finetune_lr_used"] == 0.002
    assert "learning rate 0.002" in proc.stdout
    assert all(r.get("finetune_best_epoch") in (0, 1) for r in rows.values() if r["status"] == "ok")
    lr = rows[("local_rank", 0.6)]
    assert lr["status"] == "ok" and lr["accuracy"] > report["original"]["accuracy"] - 0.05


def test_cli_reports_a_missing_model(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress",
            f"--model={tmp_path / 'none.keras'}",
            "--dataset=digits",
            f"--workdir={tmp_path / 'o'}",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "Expected an existing .keras model file" in proc.stderr
    assert "none.keras" in proc.stderr


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "small.keras")
    _digits_model(path, train=False)
    return path


def _config(model, tmp_path, **kw):
    base = dict(
        model=model,
        dataset="digits",
        workdir=str(tmp_path / "out"),
        methods=("weight_svd",),
        n_train=200,
        n_test=100,
        latency_runs=1,
    )
    return CompressionConfig(**{**base, **kw})


def test_error_unreadable_model_file(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="Could not load the model file.*bad.keras"):
        run(_config(str(bad), tmp_path))
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="ending in .keras"):
        run(_config(str(txt), tmp_path))


def test_error_no_compressible_layer(tmp_path):
    path = str(tmp_path / "conv.keras")
    keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()]
    ).save(path)
    with pytest.raises(ValueError, match="no compressible layer"):
        run(_config(path, tmp_path))


def test_error_data_does_not_fit(tmp_path):
    path = str(tmp_path / "wide.keras")
    keras.Sequential([keras.Input((10,)), keras.layers.Dense(4), keras.layers.Dense(3)]).save(path)
    with pytest.raises(ValueError, match=r"does not fit the model.*\(10,\).*\(64,\)"):
        run(_config(path, tmp_path))
    path = str(tmp_path / "few.keras")
    keras.Sequential([keras.Input((64,)), keras.layers.Dense(4), keras.layers.Dense(3)]).save(path)
    with pytest.raises(ValueError, match="labels go up to 9.*3 outputs"):
        run(_config(path, tmp_path))


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan")])
def test_error_budget_outside_range(tmp_path, small_model, budget):
    with pytest.raises(ValueError, match="budget="):
        run(_config(small_model, tmp_path, budgets=(budget,)))


def test_error_budget_below_what_methods_reach(tmp_path, small_model):
    # 0.001 of ~7.4k parameters is 7: less than the output biases alone.
    with pytest.raises(InfeasibleBudgetError, match="Impossible budget: no method reached"):
        run(_config(small_model, tmp_path, budgets=(0.001,), methods=("weight_svd", "local_rank")))


def test_error_bad_method_and_epochs(tmp_path, small_model):
    with pytest.raises(ValueError, match="method='prune'"):
        run(_config(small_model, tmp_path, methods=("prune",)))
    with pytest.raises(ValueError, match="finetune_epochs"):
        run(_config(small_model, tmp_path, finetune_epochs=-1))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"finetune_lr": -0.1}, ValueError, "finetune_lr=-0.1"),
        ({"finetune_lr": "small"}, TypeError, "finetune_lr='small'"),
        ({"validation_fraction": 1.0}, ValueError, "validation_fraction=1.0"),
        ({"validation_fraction": -0.1}, ValueError, "validation_fraction=-0.1"),
        ({"allocation": "even"}, ValueError, "allocation='even'"),
        ({"validation_fraction": 0.0}, ValueError, "allocation='greedy'.*validation_fraction=0"),
    ],
)
def test_error_bad_finetune_and_validation_options(tmp_path, small_model, options, error, message):
    with pytest.raises(error, match=message):
        run(_config(small_model, tmp_path, **options))


def test_never_overwrites_the_input_model(tmp_path):
    # The compressed model's path is a symlink to the input model.
    path = str(tmp_path / "m.keras")
    _digits_model(path, train=False)
    before = _sha(path)
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    os.symlink(path, out / "models" / "m_weight_svd_b0.5.keras")
    with pytest.raises(ValueError, match="Refusing to overwrite the input model"):
        run(_config(path, tmp_path, budgets=(0.5,), workdir=str(out)))
    assert _sha(path) == before


_TFMOT_SCRIPT = textwrap.dedent(
    """
    import os
    import tensorflow_model_optimization  # first: sets TF_USE_LEGACY_KERAS=1
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    import keras, numpy as np
    assert keras.__version__.startswith("3."), keras.__version__
    from compress import count_params, local_rank_compress
    from compress.tfmot_bridge import import_tfmot, magnitude_prune, sparsity_for_budget

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dropout(0.1), keras.layers.Dense(4)])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=3, verbose=0)  # a Keras 3 model trains and saves after TF-MOT
    model.save("/tmp/_tfmot_k3_%d.keras" % os.getpid())
    assert isinstance(keras.models.load_model("/tmp/_tfmot_k3_%d.keras" % os.getpid()), keras.Model)
    local_rank_compress(model, x, 0.5, floor=False)  # the compress library still works

    for budget in (0.5, 0.2):
        out = magnitude_prune(model, budget, x, y, from_logits=True, finetune_epochs=1)
        kernels = [l.kernel.numpy() for l in out.model.layers if hasattr(l, "kernel")]
        zeros = sum(int((k == 0).sum()) for k in kernels)
        sizes = sum(k.size for k in kernels)
        target = sparsity_for_budget(model, budget)
        assert abs(zeros / sizes - target) < 0.01, (zeros / sizes, target)
        assert count_params(out.model, nonzero=True) <= budget * count_params(model) + 2
        assert type(out.model) is keras.Sequential  # back in Keras 3
        out.model.predict(x[:4], verbose=0)
    prev = os.environ.pop("TF_USE_LEGACY_KERAS")
    import_tfmot()
    assert "TF_USE_LEGACY_KERAS" not in os.environ  # the bridge restores the environment
    print("OK")
    """
)


def test_tfmot_bridge_sparsity_and_keras3_after_tfmot_import():
    proc = subprocess.run(
        [sys.executable, "-c", _TFMOT_SCRIPT],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_tfmot_bridge_rejects_unsupported_layers():
    code = textwrap.dedent(
        """
        import keras
        from compress.tfmot_bridge import magnitude_prune
        m = keras.Sequential(
            [keras.Input((4,)), keras.layers.UnitNormalization(), keras.layers.Dense(2)]
        )
        try:
            magnitude_prune(m, 0.9, None, None, from_logits=True)
        except ValueError as e:
            assert "UnitNormalization" in str(e), e
            print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=200, cwd=ROOT
    )
    assert proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
