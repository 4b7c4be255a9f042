"""Data and model of the training-dynamics study: the data set (subset and
input scaling), the MLP (and its init), the loss, AdamW with kernels-only
weight decay, and a resumable data order."""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_localrank import datasets
from keras_localrank.studies.dynamics_config import INITS, MNIST_MEAN, MNIST_STD, DynamicsConfig
from keras_localrank.validation import check_choice

__all__ = [
    "build_mlp",
    "compile_mlp",
    "double_softmax_crossentropy",
    "epoch_batches",
    "epoch_order",
    "load_data",
    "loss_function",
    "rank_inputs",
]


def load_data(config: DynamicsConfig) -> datasets.Dataset:
    """The config's train/test data (float32 vectors, int64 labels).

    `subset="random"` draws `n_train` training and `n_test` test examples
    without replacement with `data_seed` (the authors' `random.shuffle` then
    the first 1,000); `"first"` keeps the first ones. `input_scaling=
    "standardize"` then maps every input to `(x - MNIST_MEAN) / MNIST_STD`.
    """
    if config.dataset == "gaussian":
        return datasets.gaussian_task(
            config.n_train, config.n_test, dim=config.dim, k=config.k, seed=config.data_seed
        )
    first = config.subset == "first"
    data = datasets.load(
        config.dataset,
        data_path=config.data_path,
        seed=config.data_seed,
        n_train=config.n_train if first else None,
        n_test=config.n_test if first else None,
    )
    if not first:
        rng = np.random.default_rng(config.data_seed)
        train = rng.permutation(len(data.x_train))[: config.n_train]
        test = rng.permutation(len(data.x_test))[: config.n_test]
        data = dataclasses.replace(
            data,
            x_train=data.x_train[train],
            y_train=data.y_train[train],
            x_test=data.x_test[test],
            y_test=data.y_test[test],
        )
    if config.input_scaling == "standardize":
        data = dataclasses.replace(
            data,
            x_train=standardize(data.x_train),
            x_test=standardize(data.x_test),
        )
    return data


def standardize(x: np.ndarray) -> np.ndarray:
    """`(x - MNIST_MEAN) / MNIST_STD` in float32 (`transforms.Normalize((0.1307,),
    (0.3081,))` on pixels in [0, 1])."""
    return ((np.asarray(x, np.float32) - MNIST_MEAN) / MNIST_STD).astype(np.float32)


def rank_inputs(data: datasets.Dataset, config: DynamicsConfig) -> np.ndarray:
    """The inputs the local rank averages over: the first `rank_samples` of the
    training or test split (`rank_on`); random ones when `subset="random"`."""
    x = data.x_train if config.rank_on == "train" else data.x_test
    if len(x) < config.rank_samples:
        raise ValueError(
            f"Expected at least rank_samples={config.rank_samples} {config.rank_on} inputs. "
            f"Received: {len(x)}"
        )
    return x[: config.rank_samples]


@keras.saving.register_keras_serializable(package="keras_localrank")
def double_softmax_crossentropy(y_true, logits):
    """Cross-entropy of `softmax(logits)` treated as logits: softmax applied twice.

    This is what the authors' PyTorch code computes (a model ending in
    `nn.Softmax()` trained with `CrossEntropyLoss`, which applies log-softmax
    again). A saturated model (one probability 1, the rest 0) reaches
    `log(1 + (C - 1) / e)`, not 0, and its gradients vanish.

    Args:
        y_true: integer labels, shape `(batch,)`.
        logits: the model's logits, shape `(batch, C)`.

    Returns:
        The per-example loss, shape `(batch,)`.
    """
    log_q = keras.ops.log_softmax(keras.ops.softmax(logits, axis=-1), axis=-1)
    labels = keras.ops.expand_dims(keras.ops.cast(y_true, "int32"), -1)
    return -keras.ops.squeeze(keras.ops.take_along_axis(log_q, labels, axis=-1), -1)


def loss_function(config: DynamicsConfig):
    """The per-example loss `f(labels, logits)` of `config.loss`."""
    if config.loss == "double_softmax":
        return double_softmax_crossentropy
    return _logits_crossentropy


@keras.saving.register_keras_serializable(package="keras_localrank")
def _logits_crossentropy(y_true, logits):
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


def build_mlp(
    input_dim: int,
    num_classes: int,
    hidden: Sequence[int],
    *,
    activation: str = "relu",
    seed: int = 0,
    init: str = "glorot_uniform",
) -> keras.Model:
    """A Dense MLP with layers `hidden_1..hidden_L` and a linear `output` (logits).

    Args:
        input_dim: input features.
        num_classes: output logits.
        hidden: widths of the hidden layers.
        activation: hidden activation. Default "relu".
        seed: seed of the kernels. Default 0.
        init: kernels Glorot-uniform ("glorot_uniform") or N(0, 1 / fan_in)
            ("normal_fan_in", the authors' init). Biases are zero. Default
            "glorot_uniform".

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
            kernel_initializer=_kernel_init(init, seed * 1000 + i),
        )(h)
    outputs = keras.layers.Dense(
        num_classes,
        name="output",
        kernel_initializer=_kernel_init(init, seed * 1000 + len(hidden)),
    )(h)
    return keras.Model(inputs, outputs, name="mlp")


def _kernel_init(init: str, seed: int):
    check_choice("init", init, INITS)
    if init == "normal_fan_in":
        return keras.initializers.VarianceScaling(
            1.0, mode="fan_in", distribution="untruncated_normal", seed=seed
        )
    return keras.initializers.GlorotUniform(seed=seed)


def compile_mlp(model: keras.Model, config: DynamicsConfig) -> None:
    """Compile with `config.loss` and AdamW (decoupled weight decay on kernels
    only unless `config.decay_bias`) and build the optimizer, so its state can
    be restored."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        epsilon=config.adam_epsilon,
    )
    if not config.decay_bias:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(
        optimizer=optimizer,
        loss=loss_function(config),
        metrics=["accuracy"],
    )
    optimizer.build(model.trainable_variables)


def epoch_order(n: int, seed: int, epoch) -> tf.Tensor:
    """The example order of one epoch: a stateless function of `(seed, epoch)`."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    )


def epoch_batches(x, y, *, batch_size: int, seed: int, first_epoch: int, epochs: int):
    """Batches of epochs `first_epoch..epochs-1`; each epoch's order depends only
    on `(seed, epoch)`, so a resumed run sees the same batches."""
    x, y = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def one_epoch(epoch):
        return tf.data.Dataset.from_tensor_slices(epoch_order(n, seed, epoch)).batch(batch_size)

    epochs_ds = tf.data.Dataset.range(first_epoch, epochs)
    return (
        epochs_ds.flat_map(one_epoch)
        .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
        .prefetch(2)
    )
