"""The compression app end to end on a tiny convnet and a tiny transformer."""

import os

import keras
import numpy as np
import pytest

from compress import CompressionConfig, run
from compress.macs import count_macs
from keras_localrank import datasets

L = keras.layers


def _train(model, path, *, epochs=15):
    ds = datasets.load("digits", n_train=600)
    keras.utils.set_random_seed(0)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x = ds.x_train.reshape((-1, *model.inputs[0].shape[1:]))
    model.fit(x, ds.y_train, epochs=epochs, batch_size=64, verbose=0)
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.Conv2D(24, 3, activation="relu", name="c2"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(10, name="out"),
        ]
    )
    return _train(model, tmp_path_factory.mktemp("conv") / "conv.keras")


def test_macs_budget_on_a_convnet(convnet, tmp_path):
    report = run(
        CompressionConfig(
            model=convnet,
            dataset="digits",
            workdir=str(tmp_path / "w"),
            budgets=(0.5,),
            budget_kind="macs",
            methods=("local_rank", "tucker2", "tfmot"),
            n_train=600,
            n_test=200,
            calibration_samples=256,
            latency_runs=2,
        )
    )
    rows = {r["method"]: r for r in report["rows"]}
    lr = rows["local_rank"]
    assert lr["status"] == "ok", lr["status"]
    saved = keras.models.load_model(lr["model_path"])
    # The report's MACs are the saved model's, and meet the budget.
    assert lr["macs"] == count_macs(saved)
    assert lr["mac_fraction"] <= 0.5 + 1e-9
    assert report["original"]["macs"] == count_macs(keras.models.load_model(convnet))
    assert lr["accuracy"] > report["original"]["accuracy"] - 0.15
    # The data-free baseline meets the same MACs budget.
    tucker = rows["tucker2"]
    assert tucker["status"] == "ok", tucker["status"]
    assert tucker["mac_fraction"] <= 0.5 + 1e-9
    assert tucker["macs"] == count_macs(keras.models.load_model(tucker["model_path"]))
    # Unstructured sparsity leaves dense MACs unchanged: reported, not faked.
    assert rows["tfmot"]["status"].startswith("infeasible:")
    assert "MACs unchanged" in rows["tfmot"]["status"]
    assert os.path.isfile(tmp_path / "w" / "report_macs.png")


def test_parameter_budget_on_a_tiny_transformer(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8))  # 8 tokens of 8 pixels
    x = L.Dense(16, name="embed")(inputs)
    y = L.MultiHeadAttention(2, 8, name="mha")(x, x)
    x = L.Add()([x, y])
    x = L.Dense(32, activation="relu", name="ffn_a")(x)
    x = L.Dense(16, name="ffn_b")(x)
    x = L.GlobalAveragePooling1D()(x)
    outputs = L.Dense(10, name="out")(x)
    path = _train(keras.Model(inputs, outputs), tmp_path / "t.keras", epochs=10)
    report = run(
        CompressionConfig(
            model=path,
            dataset="digits",
            workdir=str(tmp_path / "w"),
            budgets=(0.6,),
            methods=("local_rank", "weight_svd"),
            n_train=600,
            n_test=200,
            calibration_samples=256,
            latency_runs=2,
        )
    )
    for row in report["rows"]:
        assert row["status"] == "ok", row["status"]
        assert row["param_fraction"] <= 0.6 + 1e-9
        assert any(name.startswith("mha/") for name in row["ranks"])
        loaded = keras.models.load_model(row["model_path"])
        x = np.zeros((2, 8, 8), "float32")
        assert loaded.predict(x, verbose=0).shape == (2, 10)
