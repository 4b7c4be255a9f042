"""The `mnist_authors` protocol (loss, input scaling, init, where rank is
measured, subsets, grid) and the fast loop, against independent references."""

from __future__ import annotations

import math

import keras
import numpy as np
import pandas as pd
import pytest

from keras_localrank.studies import dynamics, mlp
from keras_localrank.studies.dynamics_config import MNIST_MEAN, MNIST_STD, measurement_steps
from keras_localrank.studies.fast_loop import FastLoop

TINY = dict(
    n_train=100,
    n_test=40,
    dim=6,
    k=2,
    hidden=(8, 8),
    batch_size=32,
    epochs=2,
    checkpoint_every=1,
    num_measurements=4,
    rank_samples=16,
    weight_decay=0.5,
    learning_rate=1e-2,
)


def tiny(**overrides) -> dynamics.DynamicsConfig:
    return dynamics.get_preset("gaussian", **{**TINY, **overrides})


# -- the loss -----------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 10])
def test_double_softmax_of_a_saturated_model_is_log_1_plus_c_minus_1_over_e(classes):
    logits = np.full((3, classes), -500.0, np.float32)
    labels = np.array([0, 1, classes - 1])
    logits[np.arange(3), labels] = 500.0  # softmax is exactly one-hot
    loss = keras.ops.convert_to_numpy(mlp.double_softmax_crossentropy(labels, logits))
    np.testing.assert_allclose(loss, math.log(1 + (classes - 1) / math.e), rtol=1e-6)
    assert classes != 10 or abs(loss[0] - 1.4612) < 1e-4  # the authors' logged final loss


def test_double_softmax_matches_float64_softmax_twice():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, 4))
    labels = rng.integers(0, 4, 5)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = -np.log(softmax(softmax(logits))[np.arange(5), labels])
    got = keras.ops.convert_to_numpy(
        mlp.double_softmax_crossentropy(labels, logits.astype(np.float32))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = keras.ops.convert_to_numpy(
        mlp.loss_function(tiny())(labels, logits.astype(np.float32))
    )
    np.testing.assert_allclose(plain, -np.log(softmax(logits)[np.arange(5), labels]), rtol=1e-5)


# -- the data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=rng.integers(0, 256, (200, 4, 4), dtype=np.uint8), y=np.arange(200) % 10)
    return str(path)


def test_standardisation_uses_the_authors_constants(npz):
    unit = mlp.load_data(dynamics.get_preset("mnist", data_path=npz, n_train=50, n_test=20))
    std = mlp.load_data(
        dynamics.get_preset(
            "mnist", data_path=npz, n_train=50, n_test=20, input_scaling="standardize"
        )
    )
    raw = np.load(npz)["x"].reshape(200, -1).astype(np.float64)
    assert set(np.round(unit.x_train.ravel() * 255).astype(int)) <= set(raw.ravel().astype(int))
    np.testing.assert_allclose(std.x_train, (unit.x_train - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std.x_test, (unit.x_test - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)


def test_random_subsets_are_drawn_from_each_split(npz):
    full = mlp.load_data(dynamics.get_preset("mnist", data_path=npz, n_train=None, n_test=None))
    first = mlp.load_data(dynamics.get_preset("mnist", data_path=npz, n_train=30, n_test=10))
    rand = mlp.load_data(
        dynamics.get_preset("mnist", data_path=npz, n_train=30, n_test=10, subset="random")
    )
    np.testing.assert_array_equal(first.x_train, full.x_train[:30])
    assert rand.x_train.shape == (30, 16) and rand.x_test.shape == (10, 16)
    rows = {r.tobytes(): i for i, r in enumerate(full.x_train)}
    picked = [rows[r.tobytes()] for r in rand.x_train]  # KeyError: not a training row
    assert len(set(picked)) == 30 and picked != list(range(30))
    test_rows = {r.tobytes() for r in full.x_test}
    assert all(r.tobytes() in test_rows for r in rand.x_test)
    np.testing.assert_array_equal(rand.y_train, full.y_train[picked])


# -- the init -----------------------------------------------------------------------


def test_normal_fan_in_init_has_variance_one_over_fan_in():
    model = mlp.build_mlp(400, 10, (300, 300), seed=3, init="normal_fan_in")
    for name, fan_in in (("hidden_1", 400), ("hidden_2", 300), ("output", 300)):
        kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer(name).get_weights())
        z = kernel.ravel() * math.sqrt(fan_in)  # should be N(0, 1)
        n = z.size
        assert abs(z.mean()) < 5 / math.sqrt(n)
        assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / n)
        kurtosis = np.mean(z**4) / z.var() ** 2
        assert abs(kurtosis - 3.0) < 5 * math.sqrt(24 / n)  # normal, not uniform (1.8)
        np.testing.assert_array_equal(bias, 0.0)
    glorot = mlp.build_mlp(400, 10, (300, 300), seed=3).get_layer("hidden_1").get_weights()[0]
    assert abs(glorot.var() * 700 / 2 - 1.0) < 0.05  # Glorot: 2 / (fan_in + fan_out)


# -- the preset and grid ------------------------------------------------------------


def test_authors_preset_and_grid():
    c = dynamics.get_preset("mnist_authors")
    assert (c.loss, c.input_scaling, c.init, c.rank_on, c.rank_samples) == (
        "double_softmax",
        "standardize",
        "normal_fan_in",
        "test",
        128,
    )
    assert (c.n_train, c.n_test, c.subset, c.atols, c.total_steps) == (
        1000, 1000, "random", (0.01,), 1_000_000
    )
    assert (c.learning_rate, c.weight_decay, c.batch_size, c.hidden) == (
        1e-4, 0.01, 64, (200,) * 4
    )
    # PyTorch's AdamW epsilon (Keras' default is 1e-7), in the compiled optimizer.
    assert (c.adam_epsilon, dynamics.get_preset("mnist_paper").adam_epsilon) == (1e-8, 1e-7)
    model = mlp.build_mlp(6, 4, (8,))
    mlp.compile_mlp(model, c)
    assert model.optimizer.epsilon == 1e-8
    assert measurement_steps(c) == np.unique(np.logspace(0, 6, 50).astype(int)).tolist()
    paper = dynamics.get_preset("mnist_paper")
    assert measurement_steps(paper) == sorted(
        {int(s) for s in np.round(np.logspace(0, 6, 50))}
    )  # the default grid is unchanged


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(loss="softmax"), ValueError, "loss='softmax'"),
        (dict(input_scaling="standardize"), ValueError, "input_scaling='standardize'"),
        (dict(init="he"), ValueError, "init='he'"),
        (dict(rank_on="val"), ValueError, "rank_on='val'"),
        (dict(grid="ceil"), ValueError, "grid='ceil'"),
        (dict(loop="eager"), ValueError, "loop='eager'"),
        (dict(steps_per_execution=0), ValueError, "steps_per_execution=0"),
        (dict(subset=1), ValueError, "subset=1"),
        (dict(adam_epsilon=0.0), ValueError, "adam_epsilon=0"),
    ],
)
def test_protocol_field_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny(**overrides)


# -- where the rank is measured ------------------------------------------------------


def _reference_robust_rank(model, x, atol):
    """Mean rank of float64 pre-activation Jacobians, `sigma > atol` (rtol 0)."""
    hidden = [layer for layer in model.layers if layer.name.startswith("hidden_")]
    weights = [[np.asarray(w, np.float64) for w in layer.get_weights()] for layer in hidden]
    ranks = {f"hidden_{i + 1}": [] for i in range(len(weights))}
    for sample in np.asarray(x, np.float64):
        jac, h = np.eye(len(sample)), sample
        for i, (kernel, bias) in enumerate(weights):
            pre = h @ kernel + bias
            jac = kernel.T @ jac
            sigma = np.linalg.svd(jac, compute_uv=False)
            ranks[f"hidden_{i + 1}"].append(int(np.sum(sigma > atol)))
            active = (pre > 0).astype(np.float64)
            jac, h = active[:, None] * jac, np.maximum(pre, 0.0)
    return {layer: float(np.mean(r)) for layer, r in ranks.items()}


def test_rank_is_measured_on_the_test_subset_when_asked(tmp_path):
    config = tiny(rank_on="test", epochs=1, seeds=(2,))
    dynamics.train_and_evaluate(config, tmp_path / "run", plots=False)
    frame = pd.read_csv(tmp_path / "run" / "measurements.csv")
    at_init = frame[frame.step == 0].set_index("layer")["robust_local_rank@0.01"]
    data = mlp.load_data(config)
    model = mlp.build_mlp(6, 4, config.hidden, seed=2, init=config.init)
    on_test = _reference_robust_rank(model, data.x_test[:16], 0.01)
    on_train = _reference_robust_rank(model, data.x_train[:16], 0.01)
    assert on_test != on_train  # the two choices are distinguishable here
    for layer, value in on_test.items():
        assert at_init[layer] == pytest.approx(value, abs=1e-9)


# -- the fast loop --------------------------------------------------------------------


def test_fast_loop_follows_the_fit_trajectory(tmp_path):
    """Same seed, same data order (last batch of every epoch smaller): the same
    measurements at the same steps, and the same final weights."""
    frames, weights = {}, {}
    for loop in ("fit", "fast"):
        config = tiny(loop=loop, epochs=50, num_measurements=5, steps_per_execution=64,
                      checkpoint_every=50)  # 200 steps
        workdir = tmp_path / loop
        dynamics.train_and_evaluate(config, workdir, plots=False)
        frames[loop] = pd.read_csv(workdir / "measurements.csv")
        ckpt = workdir / "seed=0" / "checkpoints" / "epoch=0000050.keras"
        weights[loop] = keras.models.load_model(ckpt).get_weights()
    a, b = frames["fit"], frames["fast"]
    assert a["step"].tolist() == b["step"].tolist() and a["step"].max() == 200
    assert a["epoch"].tolist() == b["epoch"].tolist()
    for column in ("train_loss", "test_loss", "local_rank", "robust_local_rank@0.01"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-4, atol=1e-5, err_msg=column)
    for wa, wb in zip(weights["fit"], weights["fast"]):
        np.testing.assert_allclose(wa, wb, rtol=1e-3, atol=1e-5)
    assert np.abs(weights["fit"][0] - mlp.build_mlp(6, 4, (8, 8)).get_weights()[0]).max() > 0.1


def test_fast_loop_steps_and_errors():
    data = mlp.load_data(tiny())
    config = tiny()
    model = mlp.build_mlp(6, 4, (8, 8))
    with pytest.raises(ValueError, match="compiled"):
        FastLoop(model, data.x_train, data.y_train, loss_fn=mlp.loss_function(config),
                 batch_size=32, seed=0)
    mlp.compile_mlp(model, config)
    loop = FastLoop(model, data.x_train, data.y_train, loss_fn=mlp.loss_function(config),
                    batch_size=32, seed=0, steps_per_execution=5)
    assert loop.steps_per_epoch == 4
    loop.run_steps(7)
    assert int(model.optimizer.iterations) == 7
    with pytest.raises(ValueError, match="initial_epoch=0"):
        loop.fit(epochs=3, initial_epoch=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        FastLoop(model, data.x_train, data.y_train, loss_fn=mlp.loss_function(config),
                 batch_size=0, seed=0)
