"""`experiments.compress_convnets`: width-scaled builders and the scratch control.

References: MAC and parameter counts written out by hand from the layer
shapes (the conventions of `compress.macs`: a convolution costs output
positions x kernel weights, a pooling one per window element per output,
a Dense its kernel), the original models' documented counts, and a digest of
the original builders' weights taken before the width multiplier existed.
"""

import dataclasses
import hashlib
import json
import os

import keras
import numpy as np
import pytest

from experiments import compress_convnets as cc

#: Parameters and MACs of the original models (as reported for them, e.g.
#: 106,506 / 9.40M for the CNN), and a sha256 prefix of their weights'
#: `[path, shape]` list, taken from the builders before the width multiplier
#: existed.
ORIGINALS = {
    "cnn": (106_506, 9_398_528, "eed6450531b76d92"),
    "resnet": (273_754, 31_178_752, "4f3e7a78ac2594bc"),
    "vit": (138_826, 2_289_280, "520e9879ab880f52"),
}


def _digest(model) -> str:
    weights = [[w.path, list(w.shape)] for w in model.weights]
    return hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16]


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_width_one_builds_the_original_models(arch):
    from compress.macs import count_macs

    params, macs, digest = ORIGINALS[arch]
    model = cc.build(arch, cc.ExperimentConfig(blocks=3), 1.0)
    assert model.count_params() == params
    assert count_macs(model) == macs
    assert _digest(model) == digest  # same layer names, weight names and shapes


def test_width_scales_every_channel_count():
    cnn = cc.build_cnn(0.5)
    assert [cnn.get_layer(n).filters for n in ("conv1", "conv2")] == [32, 64]
    resnet = cc.build_resnet(1, 0.5)
    convs = {layer.name: layer.filters for layer in resnet.layers
             if isinstance(layer, keras.layers.Conv2D)}
    # The stem, the blocks and the strided shortcuts all scale: 16/32/64 -> 8/16/32.
    assert convs == {
        "stem": 8, "s0b0_conv1": 8, "s0b0_conv2": 8,
        "s1b0_conv1": 16, "s1b0_conv2": 16, "s1b0_short": 16,
        "s2b0_conv1": 32, "s2b0_conv2": 32, "s2b0_short": 32,
    }
    # The ViT's width stays a multiple of its 4 heads: 64 * 0.3 = 19.2 -> 20.
    vit = cc.build_vit(0.3)
    assert vit.get_layer("embed").kernel.shape == (49, 20)
    assert vit.get_layer("mha0")._key_dim == 5
    assert vit.get_layer("ffn0a").units == round(128 * 0.3)
    # The narrowest models: one channel per layer, one unit per head.
    tiny = cc.build_vit(1e-3)
    assert tiny.get_layer("embed").kernel.shape == (49, 4)
    assert tiny.get_layer("ffn0a").units == 1
    assert [cc.build_cnn(1e-3).get_layer(n).filters for n in ("conv1", "conv2")] == [1, 1]


def _cnn_macs_by_hand(c1: int, c2: int) -> int:
    conv1 = 26 * 26 * (3 * 3 * 1 * c1)  # 28x28, valid 3x3
    pool1 = 13 * 13 * 4 * c1
    conv2 = 11 * 11 * (3 * 3 * c1 * c2)
    pool2 = 5 * 5 * 4 * c2
    dense = 5 * 5 * c2 * 10
    return conv1 + pool1 + conv2 + pool2 + dense


def _cnn_channels(width: float) -> tuple[int, int]:
    return max(1, round(64 * width)), max(1, round(128 * width))


@pytest.mark.parametrize("budget", [0.3, 0.05])
def test_scratch_width_cnn_macs_by_hand(budget):
    config = cc.ExperimentConfig()
    width = cc.scratch_width("cnn", config, budget, "macs")
    limit = budget * _cnn_macs_by_hand(64, 128)
    assert _cnn_macs_by_hand(*_cnn_channels(width)) <= limit
    # The next grid step is over budget.
    assert _cnn_macs_by_hand(*_cnn_channels(width + 1 / cc.WIDTH_GRID)) > limit
    model = cc.build_cnn(width)
    assert (model.get_layer("conv1").filters, model.get_layer("conv2").filters) == (
        _cnn_channels(width)
    )


def _vit_params_by_hand(dim: int, mlp: int, depth: int = 4) -> int:
    embed = 49 * dim + 16 * dim  # kernel, bias over tokens x features
    attention = 4 * (dim * dim + dim)  # query, key, value, output (+ biases)
    layer = 2 * dim + attention + 2 * dim + (dim * mlp + mlp) + (mlp * dim + dim)
    return embed + depth * layer + 2 * dim + (dim * 10 + 10)


def _vit_dims(width: float) -> tuple[int, int]:
    return 4 * max(1, round(64 * width / 4)), max(1, round(128 * width))


def test_scratch_width_vit_params_by_hand():
    width = cc.scratch_width("vit", cc.ExperimentConfig(), 0.5, "params")
    limit = 0.5 * _vit_params_by_hand(64, 128)
    assert _vit_params_by_hand(*_vit_dims(width)) <= limit
    assert _vit_params_by_hand(*_vit_dims(width + 1 / cc.WIDTH_GRID)) > limit
    assert cc.build_vit(width).count_params() == _vit_params_by_hand(*_vit_dims(width))


def test_scratch_width_full_budget_is_the_original():
    assert cc.scratch_width("cnn", cc.ExperimentConfig(), 1.0, "params") == 1.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"arch": "mlp"}, "arch"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"kind": "flops"}, "kind"),
        ({"budget": 1e-6}, "budget"),  # even the narrowest CNN costs more
    ],
)
def test_scratch_width_bad_inputs(kwargs, name):
    args = {"arch": "cnn", "config": cc.ExperimentConfig(), "budget": 0.3, "kind": "macs"}
    with pytest.raises(ValueError, match=f"`{name}`.*{name}="):
        cc.scratch_width(**{**args, **kwargs})


def test_builders_reject_a_bad_width():
    with pytest.raises(ValueError, match="`width`.*width=0"):
        cc.build_cnn(0)
    with pytest.raises(ValueError, match="`width`"):
        cc.build_resnet(1, -0.5)


def _images_npz(path) -> str:
    """An `.npz` of 28x28 images: the 8x8 digits, each pixel 3x3, padded by 2."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.kron(bunch.images / 16.0, np.ones((1, 3, 3)))
    x = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
    np.savez(path, x=x, y=bunch.target.astype(np.int64))
    return str(path)


def test_scratch_control_end_to_end_and_resume(tmp_path):
    from compress.macs import count_macs

    config = cc.ExperimentConfig(
        archs=("cnn",),
        epochs=1,
        n_train=200,
        n_test=100,
        conv_budgets=(0.3, 1.0),
        methods=("weight_svd",),
        finetune_epochs=0,
        calibration_samples=32,
        latency_runs=1,
        dataset="mnist",
        data_path=_images_npz(tmp_path / "digits28.npz"),
        batch_size=64,
    )
    workdir = str(tmp_path / "run")
    first = cc.train_and_evaluate(config, workdir)
    assert "scratch" not in first["cnn"]
    original_file = os.path.join(workdir, "cnn.keras")
    original_mtime = os.stat(original_file).st_mtime_ns

    # A run directory written before the flag existed has no such key.
    config_file = os.path.join(workdir, "config.json")
    with open(config_file, encoding="utf-8") as f:
        saved = json.load(f)
    del saved["scratch_control"]
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(saved, f)

    # The flag added to a finished run: only the scratch models are trained.
    config = dataclasses.replace(config, scratch_control=True)
    second = cc.train_and_evaluate(config, workdir)
    assert os.stat(original_file).st_mtime_ns == original_mtime
    rows = {row["budget"]: row for row in second["cnn"]["scratch"]}
    assert sorted(rows) == [0.3, 1.0]
    row = rows[0.3]
    scratch = keras.models.load_model(row["model_path"])
    assert row["model_path"] == os.path.join(workdir, "scratch_cnn_b0.3.keras")
    c1, c2 = scratch.get_layer("conv1").filters, scratch.get_layer("conv2").filters
    assert row["channels"] == {"conv1": c1, "conv2": c2}
    assert row["macs"] == count_macs(scratch) == _cnn_macs_by_hand(c1, c2)
    assert row["mac_fraction"] == row["macs"] / _cnn_macs_by_hand(64, 128) <= 0.3
    # Accuracy on the same test set as the original's, checked from predictions.
    from keras_localrank import datasets

    ds = datasets.load("mnist", data_path=config.data_path, n_train=200, n_test=100)
    predicted = np.argmax(scratch.predict(ds.x_test.reshape(-1, 28, 28, 1), verbose=0), axis=1)
    assert row["accuracy"] == pytest.approx(np.mean(predicted == ds.y_test), abs=1e-6)
    original = second["cnn"]["report"]["original"]
    assert row["points_lost"] == pytest.approx(100 * (original["accuracy"] - row["accuracy"]))
    assert row["latency_ms_b1"] > 0 and row["latency_ms_b64"] > 0
    # At the full budget the scratch model is the original, trained by the
    # same recipe (seed, data, epochs, schedule): the same weights.
    full = keras.models.load_model(rows[1.0]["model_path"])
    assert rows[1.0]["width"] == 1.0
    for a, b in zip(full.weights, keras.models.load_model(original_file).weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    with open(os.path.join(workdir, "summary.md"), encoding="utf-8") as f:
        assert "Scratch control" in f.read()
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["cnn"]["scratch"][0]["width"] == row["width"]

    # A rerun resumes: no scratch model is trained or measured again.
    with open(os.path.join(workdir, "manifest.json"), encoding="utf-8") as f:
        marker = json.load(f)["complete"]["scratch_cnn_b0.3.keras"]
    mtime = os.stat(row["model_path"]).st_mtime_ns
    third = cc.train_and_evaluate(config, workdir)
    assert os.stat(row["model_path"]).st_mtime_ns == mtime
    with open(os.path.join(workdir, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["complete"]["scratch_cnn_b0.3.keras"] == marker
    assert third["cnn"]["scratch"] == second["cnn"]["scratch"]


def test_scratch_control_must_be_a_bool(tmp_path):
    config = cc.ExperimentConfig(scratch_control="yes")
    with pytest.raises(TypeError, match="scratch_control='yes'"):
        cc.train_and_evaluate(config, str(tmp_path))


def test_scratch_budget_no_narrower_model_meets_fails_before_training(tmp_path):
    config = cc.ExperimentConfig(archs=("cnn",), conv_budgets=(1e-6,), scratch_control=True)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="narrowest cnn.*budget=1e-06"):
        cc.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()  # nothing trained, nothing written


def test_importing_the_module_defines_no_flags():
    # Its `--data_path` collided with `python -m keras_localrank`'s when the
    # test suite imported both in one process (DuplicateFlagError).
    from absl import flags

    from keras_localrank import __main__ as entry  # noqa: F401  (defines data_path)

    assert "scratch_control" not in flags.FLAGS
    assert flags.FLAGS["data_path"].help.startswith("An .npz (x, y)")
