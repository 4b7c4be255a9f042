"""Data and model of the training-dynamics study: the data set, the MLP, AdamW
with kernels-only weight decay, and a resumable data order."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_localrank import datasets
from keras_localrank.studies.dynamics_config import DynamicsConfig

__all__ = ["build_mlp", "compile_mlp", "epoch_batches", "load_data"]


def load_data(config: DynamicsConfig) -> datasets.Dataset:
    """The config's train/test data (float32 vectors, int64 labels)."""
    if config.dataset == "gaussian":
        return datasets.gaussian_task(
            config.n_train, config.n_test, dim=config.dim, k=config.k, seed=config.data_seed
        )
    return datasets.load(
        config.dataset,
        data_path=config.data_path,
        seed=config.data_seed,
        n_train=config.n_train,
        n_test=config.n_test,
    )


def build_mlp(
    input_dim: int,
    num_classes: int,
    hidden: Sequence[int],
    *,
    activation: str = "relu",
    seed: int = 0,
) -> keras.Model:
    """A Dense MLP with layers `hidden_1..hidden_L` and a linear `output` (logits).

    Args:
        input_dim: input features.
        num_classes: output logits.
        hidden: widths of the hidden layers.
        activation: hidden activation. Default "relu".
        seed: seed of the Glorot-uniform kernels. Default 0.

    Returns:
        A functional `keras.Model` (not compiled) returning logits.
    """
    inputs = keras.Input((input_dim,), name="x")
    h = inputs
    for i, width in enumerate(hidden):
        h = keras.layers.Dense(
            width,
            activation=activation,
            name=f"hidden_{i + 1}",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 1000 + i),
        )(h)
    outputs = keras.layers.Dense(
        num_classes,
        name="output",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 1000 + len(hidden)),
    )(h)
    return keras.Model(inputs, outputs, name="mlp")


def compile_mlp(model: keras.Model, config: DynamicsConfig) -> None:
    """Compile with AdamW (decoupled weight decay on kernels only unless
    `config.decay_bias`) and build the optimizer, so its state can be restored."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
    if not config.decay_bias:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    optimizer.build(model.trainable_variables)


def epoch_batches(x, y, *, batch_size: int, seed: int, first_epoch: int, epochs: int):
    """Batches of epochs `first_epoch..epochs-1`; each epoch's order depends only
    on `(seed, epoch)`, so a resumed run sees the same batches."""
    x, y = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    epochs_ds = tf.data.Dataset.range(first_epoch, epochs)
    return (
        epochs_ds.flat_map(one_epoch)
        .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
        .prefetch(2)
    )
