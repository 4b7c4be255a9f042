"""The TF-MOT bridge on convnets and attention: graph conversion and magnitude pruning.

Runs in a subprocess that imports `tensorflow_model_optimization` first (it
sets `TF_USE_LEGACY_KERAS=1` for the process): Keras 3 must keep working.
References: the original Keras 3 model's outputs (the converted unpruned
model must compute the same function) and magnitude order (every kept
weight of a pruned kernel is at least as large as every zeroed one).
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}

_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import tensorflow_model_optimization  # first: sets TF_USE_LEGACY_KERAS=1
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    import keras, numpy as np
    assert keras.__version__.startswith("3."), keras.__version__
    from compress import count_params
    from compress.tfmot_bridge import (
        import_tfmot, kernel_sparsity, magnitude_prune, sparsity_for_budget, to_tf_keras,
    )

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)

    def residual_convnet():
        inp = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
        h = keras.layers.BatchNormalization(name="bn1")(h)
        h = keras.layers.ReLU(name="r1")(h)
        r = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
        r = keras.layers.BatchNormalization(name="bn2")(r)
        r = keras.layers.Conv2D(8, 1, strides=1, name="pw")(r)
        h = keras.layers.Add(name="add")([h, r])
        h = keras.layers.Conv2D(12, 3, strides=2, dilation_rate=1, name="c2")(h)
        h = keras.layers.MaxPooling2D(name="mp")(h)
        h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
        out = keras.layers.Dense(4, name="fc")(h)
        model = keras.Model(inp, out)
        for layer in model.layers:  # non-trivial BatchNorm statistics
            if isinstance(layer, keras.layers.BatchNormalization):
                g, b, m, v = layer.get_weights()
                layer.set_weights([rng.uniform(0.5, 1.5, g.shape).astype("float32"),
                                   rng.normal(size=b.shape).astype("float32"),
                                   rng.normal(size=m.shape).astype("float32"),
                                   rng.uniform(0.5, 1.5, v.shape).astype("float32")])
        return model

    def attention_model():
        inp = keras.Input((5, 8))
        a = keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp)
        h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([inp, a]))
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(inp, keras.layers.Dense(3, name="fc")(h))

    def patch_transformer():  # a ViT's patching: Reshape, Permute, EinsumDense embedding
        inp = keras.Input((4, 4, 1))
        h = keras.layers.Reshape((2, 2, 2, 2))(inp)
        h = keras.layers.Permute((1, 3, 2, 4), name="perm")(h)
        h = keras.layers.Reshape((4, 4))(h)
        h = keras.layers.EinsumDense("abc,cd->abd", (4, 8), bias_axes="bd", name="embed")(h)
        a = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
        h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([h, a]))
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(inp, keras.layers.Dense(3, name="fc")(h))

    tfmot, tk = import_tfmot()
    cases = [
        (residual_convnet(), rng.normal(size=(64, 8, 8, 3)), 4),
        (attention_model(), rng.normal(size=(64, 5, 8)), 3),
        (patch_transformer(), rng.normal(size=(64, 4, 4, 1)), 3),
    ]
    for model, x, classes in cases:
        x = x.astype("float32")
        y = rng.integers(0, classes, len(x))
        expected = model(x, training=False).numpy()
        converted = to_tf_keras(model, tk)
        assert isinstance(converted, tk.Model)
        err = np.abs(converted(x, training=False).numpy() - expected).max()
        assert err < 1e-5, err
        for budget in (0.45,):
            out = magnitude_prune(model, budget, x, y, from_logits=True)
            target = sparsity_for_budget(model, budget)
            assert abs(kernel_sparsity(out.model) - target) < 0.01, (out.sparsity, target)
            assert count_params(out.model, nonzero=True) <= budget * count_params(model) + 4
            assert type(out.model) is type(model)  # back in Keras 3
            assert np.isfinite(out.model.predict(x[:4], verbose=0)).all()
            for layer in model.layers:
                if not layer.weights:
                    continue
                new = out.model.get_layer(layer.name).get_weights()
                for w0, w1 in zip(layer.get_weights(), new):
                    kept = w1 != 0
                    # kept weights are unchanged (zero-learning-rate mask step) ...
                    np.testing.assert_array_equal(w1[kept], w0[kept])
                    # ... and are the largest in magnitude (per pruned tensor).
                    if (~kept).any() and kept.any():
                        assert np.abs(w0[kept]).min() >= np.abs(w0[~kept]).max()
            if model.name == cases[0][0].name:
                # Not pruned by TF-MOT: the depthwise kernel, BatchNorm (statistics too).
                for name in ("dw", "bn1", "bn2"):
                    for w0, w1 in zip(model.get_layer(name).get_weights(),
                                      out.model.get_layer(name).get_weights()):
                        np.testing.assert_array_equal(w0, w1)
            else:
                if "embed" in [lyr.name for lyr in model.layers]:
                    # TF-MOT has no EinsumDense pruning: the embedding stays dense.
                    np.testing.assert_array_equal(
                        out.model.get_layer("embed").kernel.numpy(),
                        model.get_layer("embed").kernel.numpy(),
                    )
                mha = out.model.get_layer("mha")
                zeros = np.mean(mha.query_dense.kernel.numpy() == 0)
                assert abs(zeros - target) < 0.05, (zeros, target)
        path = "/tmp/_tfmot_conv_%d.keras" % os.getpid()
        out.model.save(path)
        loaded = keras.models.load_model(path)
        os.remove(path)
        np.testing.assert_allclose(loaded.predict(x[:4], verbose=0),
                                   out.model.predict(x[:4], verbose=0), atol=1e-6)
    # fine-tuning under the masks keeps the sparsity
    model, x, _ = cases[0]
    out = magnitude_prune(model, 0.5, x.astype("float32"), rng.integers(0, 4, 64),
                          from_logits=True, finetune_epochs=1, batch_size=32)
    assert abs(out.sparsity - sparsity_for_budget(model, 0.5)) < 0.01

    # clear errors
    inp = keras.Input((6,))
    shared = keras.layers.Dense(6, name="shared")
    bad = keras.Model(inp, shared(shared(inp)))
    try:
        to_tf_keras(bad, tk)
        raise AssertionError("shared layer accepted")
    except ValueError as e:
        assert "'shared'" in str(e) and "called several times" in str(e), e
    bad = keras.Sequential([keras.Input((6,)), keras.layers.UnitNormalization(name="un"),
                            keras.layers.Dense(2)])
    try:
        to_tf_keras(bad, tk)
        raise AssertionError("unsupported layer accepted")
    except ValueError as e:
        assert "'un' of type UnitNormalization" in str(e), e
    try:
        sparsity_for_budget(cases[0][0], 0.01)
        raise AssertionError("impossible budget accepted")
    except ValueError as e:
        assert "never pruned" in str(e), e

    os.environ.pop("TF_USE_LEGACY_KERAS")
    import_tfmot()
    assert "TF_USE_LEGACY_KERAS" not in os.environ  # the bridge restores the environment
    print("OK")
    """
)


def test_tfmot_bridge_prunes_residual_convnets_and_attention():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK")
