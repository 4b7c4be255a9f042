"""Baseline: TensorFlow Model Optimization magnitude pruning, through `tf_keras`.

TF-MOT only accepts Keras 2 (`tf_keras`) models, and importing it sets
`TF_USE_LEGACY_KERAS=1`, which turns `tf.keras` into Keras 2 for the whole
process. So it is imported here only, lazily, with the environment variable
restored afterwards; the Keras 3 model is rebuilt layer by layer in
`tf_keras` (a registry of supported layer types), pruned with
`prune_low_magnitude` under a `ConstantSparsity` schedule, stripped with
`strip_pruning`, and its weights are copied back into a Keras 3 clone. Its
size is the number of non-zero weights.
"""

from __future__ import annotations

import contextlib
import os

import keras
import numpy as np

from compress.outcome import Compressed
from compress.policies import InfeasibleBudgetError
from compress.registry import count_params
from compress.surgery import recompile_like

__all__ = [
    "BRIDGED_LAYERS",
    "import_tfmot",
    "kernel_sparsity",
    "magnitude_prune",
    "sparsity_for_budget",
    "to_tf_keras",
]


@contextlib.contextmanager
def _legacy_keras_env():
    saved = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = saved


def import_tfmot():
    """`(tensorflow_model_optimization, tf_keras)`, imported lazily.

    The process environment (`TF_USE_LEGACY_KERAS`) is left as it was.
    """
    with _legacy_keras_env():
        import tensorflow_model_optimization as tfmot
        import tf_keras

    return tfmot, tf_keras


def _activation_name(layer) -> str:
    name = keras.activations.serialize(layer.activation)
    if not isinstance(name, str):
        raise TypeError(
            f"Layer {layer.name!r} has a custom activation {name!r} the tf_keras "
            "bridge cannot rebuild."
        )
    return name


#: Keras 3 layer type -> builder of the equivalent `tf_keras` layer.
BRIDGED_LAYERS = (
    (
        keras.layers.Dense,
        lambda layer, tk: tk.layers.Dense(
            layer.units,
            activation=_activation_name(layer),
            use_bias=layer.use_bias,
            name=layer.name,
        ),
    ),
    (keras.layers.Flatten, lambda layer, tk: tk.layers.Flatten(name=layer.name)),
    (
        keras.layers.Reshape,
        lambda layer, tk: tk.layers.Reshape(layer.target_shape, name=layer.name),
    ),
    (
        keras.layers.Dropout,
        lambda layer, tk: tk.layers.Dropout(layer.rate, name=layer.name),
    ),
    (
        keras.layers.Activation,
        lambda layer, tk: tk.layers.Activation(_activation_name(layer), name=layer.name),
    ),
    (keras.layers.ReLU, lambda layer, tk: tk.layers.ReLU(name=layer.name)),
)


def _chain(model) -> list:
    """The model's layers in order, if they form one chain (else ValueError)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):
        from keras_localrank.taps import model_graph

        graph = model_graph(model)
        tensor = graph.inputs[0]
        for layer in layers:
            nodes = layer._inbound_nodes
            if (
                len(nodes) != 1
                or len(nodes[0].input_tensors) != 1
                or (nodes[0].input_tensors[0] is not tensor)
            ):
                raise ValueError(
                    "The TF-MOT bridge supports chains of layers only. Received: "
                    f"model {model.name!r} whose layer {layer.name!r} is not fed by "
                    "the previous layer."
                )
            tensor = nodes[0].output_tensors[0]
    return layers


def to_tf_keras(model, tf_keras):
    """Rebuild a chain-shaped Keras 3 model as a `tf_keras.Sequential`.

    Raises:
        ValueError: a layer type missing from `BRIDGED_LAYERS`, or a model
            that is not a chain.
    """
    layers = _chain(model)
    rebuilt = [tf_keras.Input(shape=tuple(model.inputs[0].shape[1:]))]
    for layer in layers:
        for cls, build in BRIDGED_LAYERS:
            if type(layer) is cls:
                rebuilt.append(build(layer, tf_keras))
                break
        else:
            raise ValueError(
                f"The TF-MOT bridge cannot rebuild layer {layer.name!r} of type "
                f"{type(layer).__name__}; supported: "
                f"{[cls.__name__ for cls, _ in BRIDGED_LAYERS]}."
            )
    tk_model = tf_keras.Sequential(rebuilt, name=model.name)
    for layer in layers:
        if layer.weights:
            tk_model.get_layer(layer.name).set_weights(layer.get_weights())
    return tk_model


def sparsity_for_budget(model, budget: float) -> float:
    """Kernel sparsity that leaves `budget * params` non-zero weights.

    TF-MOT prunes Dense kernels only; biases and other weights are kept.

    Raises:
        ValueError: a budget below the weights that are never pruned.
    """
    total = count_params(model)
    kernels = sum(
        int(np.prod(layer.kernel.shape))
        for layer in _chain(model)
        if isinstance(layer, keras.layers.Dense)
    )
    kept = total - kernels
    target = budget * total
    if kernels == 0 or target <= kept:
        raise InfeasibleBudgetError(
            f"Impossible budget for TF-MOT pruning: budget={budget!r} allows "
            f"{int(target):,} parameters, but {kept:,} weights (biases and "
            "non-Dense layers) are never pruned."
        )
    return float(min(1.0, max(0.0, 1.0 - (target - kept) / kernels)))


def kernel_sparsity(model) -> float:
    """Fraction of zero entries over all Dense kernels of `model`."""
    kernels = [
        keras.ops.convert_to_numpy(layer.kernel)
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
    ]
    zeros = sum(int(np.sum(k == 0)) for k in kernels)
    return zeros / max(1, sum(k.size for k in kernels))


def magnitude_prune(
    model,
    budget: float,
    x,
    y,
    *,
    from_logits: bool,
    finetune_epochs: int = 0,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
) -> Compressed:
    """Magnitude-prune the Dense kernels of `model` to a parameter budget.

    One-shot masks at the target sparsity are applied by one training step
    with a zero learning rate (the weights do not move); with
    `finetune_epochs > 0` the pruned model is then trained with Adam under
    the same masks.

    Args:
        model: a chain-shaped Keras 3 classifier (not modified).
        budget: target fraction of non-zero parameters, in (0, 1].
        x: training inputs (the first batch sets the masks).
        y: integer labels.
        from_logits: whether the model outputs logits.
        finetune_epochs: epochs of masked training. Default 0.
        batch_size: batch size. Default 128.
        learning_rate: Adam learning rate of the fine-tune. Default 1e-3.

    Returns:
        A `Compressed` holding a Keras 3 model with zeroed weights.
    """
    sparsity = sparsity_for_budget(model, budget)
    tfmot, tk = import_tfmot()
    sparse = tfmot.sparsity.keras
    tk_model = to_tf_keras(model, tk)
    schedule = sparse.ConstantSparsity(sparsity, begin_step=0, frequency=1)
    pruned = sparse.prune_low_magnitude(tk_model, pruning_schedule=schedule)
    loss = tk.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    callbacks = [sparse.UpdatePruningStep()]
    pruned.compile(optimizer=tk.optimizers.SGD(learning_rate=0.0), loss=loss)
    pruned.fit(
        x[:batch_size],
        y[:batch_size],
        epochs=1,
        batch_size=batch_size,
        verbose=0,
        callbacks=callbacks,
    )
    if finetune_epochs:
        pruned.compile(optimizer=tk.optimizers.Adam(learning_rate=learning_rate), loss=loss)
        pruned.fit(
            x, y, epochs=finetune_epochs, batch_size=batch_size, verbose=0, callbacks=callbacks
        )
    stripped = sparse.strip_pruning(pruned)
    result = keras.models.clone_model(model)
    for layer in _chain(model):
        if layer.weights:
            result.get_layer(layer.name).set_weights(stripped.get_layer(layer.name).get_weights())
    recompile_like(result, model)
    return Compressed(
        model=result,
        method="tfmot",
        budget=budget,
        sparsity=kernel_sparsity(result),
        nonzero_params=True,
    )
