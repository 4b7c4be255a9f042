r"""Data-aware low rank vs weight SVD on a small transformer, before fine-tuning.

Trains a 2-block transformer (width 32, 4 heads, feed-forward 64) on
`sklearn` digits, the 8 rows of each 8x8 image as tokens, then compresses it
at each parameter budget with `compress.transformer.transformer_compress`
(constant heads removed, then data-aware low rank of every projection) and
with `compress.baselines.projection_weight_svd` (data-free), and prints the
test accuracy of each without fine-tuning. With `--per_layer`, it also
prints the accuracy when only one projection is truncated, at the rank the
weight-SVD allocation gave it, by each method.

    python -m experiments.compress_transformer_digits --budgets=0.7,0.5
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from compress.baselines import projection_weight_svd  # noqa: E402
from compress.registry import count_params  # noqa: E402
from compress.transformer import (  # noqa: E402
    compress_attention,
    transformer_compress,
    weight_svd_projections,
)

FLAGS = flags.FLAGS
flags.DEFINE_list("budgets", ["0.7", "0.5"], "Parameter fractions.")
flags.DEFINE_integer("epochs", 40, "Training epochs.")
flags.DEFINE_integer("width", 32, "Model width.")
flags.DEFINE_integer("calibration", 512, "Calibration samples (from the training split).")
flags.DEFINE_integer("seed", 0, "Seed of the split and of the weights.")
flags.DEFINE_bool("per_layer", False, "Also truncate one projection at a time.")


def build(width: int) -> keras.Model:
    inp = keras.Input((8, 8))
    h = keras.layers.Dense(width, name="embed")(inp)
    for i in range(2):
        a = keras.layers.MultiHeadAttention(4, width // 4, name=f"mha{i}")(h, h)
        h = keras.layers.LayerNormalization(name=f"ln{i}a")(keras.layers.Add()([h, a]))
        f = keras.layers.Dense(2 * width, activation="gelu", name=f"ffn{i}a")(h)
        f = keras.layers.Dense(width, name=f"ffn{i}b")(f)
        h = keras.layers.LayerNormalization(name=f"ln{i}b")(keras.layers.Add()([h, f]))
    out = keras.layers.Dense(10, name="cls")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inp, out)


def main(argv):
    del argv
    digits = load_digits()
    x, y = (digits.images / 16.0).astype("float32"), digits.target
    idx = np.random.default_rng(FLAGS.seed).permutation(len(x))
    x, y = x[idx], y[idx]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    keras.utils.set_random_seed(FLAGS.seed)
    model = build(FLAGS.width)
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    model.fit(x_train, y_train, epochs=FLAGS.epochs, batch_size=64, verbose=0)

    def accuracy(m):
        return float(np.mean(np.argmax(m.predict(x_test, verbose=0), -1) == y_test))

    total = count_params(model)
    x_cal = x_train[: FLAGS.calibration]
    print(f"original: accuracy={accuracy(model):.4f} params={total:,}")
    for budget in (float(b) for b in FLAGS.budgets):
        ours = transformer_compress(model, x_cal, budget)
        svd = projection_weight_svd(model, budget)
        print(
            f"budget={budget:g}: data-aware accuracy={accuracy(ours.model):.4f} "
            f"(params {count_params(ours.model) / total:.3f}, heads removed "
            f"{ours.removed_units or 0}) | weight SVD accuracy={accuracy(svd.model):.4f} "
            f"(params {count_params(svd.model) / total:.3f})"
        )
        if FLAGS.per_layer:
            for target, rank in svd.ranks.items():
                one_svd, _ = weight_svd_projections(model, {target: rank})
                one_ours, _ = compress_attention(model, x_cal, {target: rank})
                print(
                    f"  {target} rank {rank}: weight SVD {accuracy(one_svd):.3f}, "
                    f"data-aware {accuracy(one_ours):.3f}"
                )


if __name__ == "__main__":
    app.run(main)
