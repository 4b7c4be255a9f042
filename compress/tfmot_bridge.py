"""Baseline: TensorFlow Model Optimization magnitude pruning, through `tf_keras`.

TF-MOT only accepts Keras 2 (`tf_keras`) models, and importing it sets
`TF_USE_LEGACY_KERAS=1`, which turns `tf.keras` into Keras 2 for the whole
process. So it is imported here only, lazily, with the environment variable
restored afterwards; the Keras 3 model's functional graph is replayed in
`tf_keras` (a registry of supported layer types: Dense, EinsumDense,
Conv1D/2D/3D, DepthwiseConv2D, BatchNormalization, LayerNormalization,
MultiHeadAttention, merges such as residual `Add`s, pooling, reshaping,
`Permute`), every layer TF-MOT's registry supports is wrapped by
`prune_low_magnitude` under a `ConstantSparsity` schedule, stripped with
`strip_pruning`, and its weights are copied back into a Keras 3 clone. Its
size is the number of non-zero weights. TF-MOT prunes the kernels of Dense,
Conv and MultiHeadAttention layers; EinsumDense (not in its registry),
depthwise kernels, normalization weights and biases stay dense.
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
    "pruned_kernels",
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


def _conv_args(layer) -> dict:
    return dict(
        kernel_size=layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
        activation=_activation_name(layer),
        use_bias=layer.use_bias,
        name=layer.name,
    )


def _conv(layer, tk):
    cls = {1: tk.layers.Conv1D, 2: tk.layers.Conv2D, 3: tk.layers.Conv3D}[layer.rank]
    return cls(layer.filters, groups=layer.groups, **_conv_args(layer))


def _depthwise(layer, tk):
    return tk.layers.DepthwiseConv2D(depth_multiplier=layer.depth_multiplier, **_conv_args(layer))


def _refuse(layer, options: str):
    """The bridge's one refusal: `layer` uses options `tf_keras` cannot rebuild."""
    return ValueError(
        f"The TF-MOT bridge cannot rebuild {type(layer).__name__} {layer.name!r} with "
        f"{options}."
    )


def _batch_norm(layer, tk):
    if getattr(layer, "renorm", False) or getattr(layer, "synchronized", False):
        raise _refuse(layer, "renorm or synchronized=True")
    return tk.layers.BatchNormalization(
        axis=layer.axis,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        center=layer.center,
        scale=layer.scale,
        name=layer.name,
    )


def _layer_norm(layer, tk):
    if getattr(layer, "rms_scaling", False):
        raise _refuse(layer, "rms_scaling=True")
    return tk.layers.LayerNormalization(
        axis=layer.axis,
        epsilon=layer.epsilon,
        center=layer.center,
        scale=layer.scale,
        name=layer.name,
    )


def _pool(cls_name):
    def build(layer, tk):
        return getattr(tk.layers, cls_name)(
            pool_size=layer.pool_size,
            strides=layer.strides,
            padding=layer.padding,
            data_format=layer.data_format,
            name=layer.name,
        )

    return build


def _global_pool(cls_name):
    def build(layer, tk):
        return getattr(tk.layers, cls_name)(
            data_format=layer.data_format, keepdims=layer.keepdims, name=layer.name
        )

    return build


def _attention(layer, tk):
    if layer._use_gate or getattr(layer, "_sliding_window", None) is not None:
        raise _refuse(layer, "use_gate=True or a sliding_window")
    return tk.layers.MultiHeadAttention(
        num_heads=layer.num_heads,
        key_dim=layer.key_dim,
        value_dim=layer.value_dim,
        dropout=layer.dropout,
        use_bias=layer.use_bias,
        output_shape=layer._output_shape,
        attention_axes=layer._attention_axes,
        name=layer.name,
    )


def _einsum_dense(layer, tk):
    return tk.layers.EinsumDense(
        layer.equation,
        output_shape=layer.partial_output_shape,
        activation=_activation_name(layer),
        bias_axes=layer.bias_axes,
        name=layer.name,
    )


def _merge(cls_name):
    return lambda layer, tk: getattr(tk.layers, cls_name)(name=layer.name)


#: Keras 3 layer type -> builder of the equivalent `tf_keras` layer (exact
#: type match: a subclass may compute something else).
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
    (keras.layers.Conv1D, _conv),
    (keras.layers.Conv2D, _conv),
    (keras.layers.Conv3D, _conv),
    (keras.layers.DepthwiseConv2D, _depthwise),
    (keras.layers.EinsumDense, _einsum_dense),
    (keras.layers.BatchNormalization, _batch_norm),
    (keras.layers.LayerNormalization, _layer_norm),
    (keras.layers.MultiHeadAttention, _attention),
    (keras.layers.Add, _merge("Add")),
    (keras.layers.Subtract, _merge("Subtract")),
    (keras.layers.Multiply, _merge("Multiply")),
    (keras.layers.Average, _merge("Average")),
    (
        keras.layers.Concatenate,
        lambda layer, tk: tk.layers.Concatenate(axis=layer.axis, name=layer.name),
    ),
    (keras.layers.MaxPooling1D, _pool("MaxPooling1D")),
    (keras.layers.MaxPooling2D, _pool("MaxPooling2D")),
    (keras.layers.AveragePooling1D, _pool("AveragePooling1D")),
    (keras.layers.AveragePooling2D, _pool("AveragePooling2D")),
    (keras.layers.GlobalAveragePooling1D, _global_pool("GlobalAveragePooling1D")),
    (keras.layers.GlobalAveragePooling2D, _global_pool("GlobalAveragePooling2D")),
    (keras.layers.GlobalMaxPooling1D, _global_pool("GlobalMaxPooling1D")),
    (keras.layers.GlobalMaxPooling2D, _global_pool("GlobalMaxPooling2D")),
    (
        keras.layers.ZeroPadding2D,
        lambda layer, tk: tk.layers.ZeroPadding2D(
            padding=layer.padding, data_format=layer.data_format, name=layer.name
        ),
    ),
    (
        keras.layers.Flatten,
        lambda layer, tk: tk.layers.Flatten(data_format=layer.data_format, name=layer.name),
    ),
    (
        keras.layers.Reshape,
        lambda layer, tk: tk.layers.Reshape(layer.target_shape, name=layer.name),
    ),
    (keras.layers.Permute, lambda layer, tk: tk.layers.Permute(layer.dims, name=layer.name)),
    (
        keras.layers.Dropout,
        lambda layer, tk: tk.layers.Dropout(layer.rate, name=layer.name),
    ),
    (
        keras.layers.Activation,
        lambda layer, tk: tk.layers.Activation(_activation_name(layer), name=layer.name),
    ),
    (
        keras.layers.ReLU,
        lambda layer, tk: tk.layers.ReLU(
            max_value=layer.max_value,
            negative_slope=layer.negative_slope,
            threshold=layer.threshold,
            name=layer.name,
        ),
    ),
    (
        keras.layers.Rescaling,
        lambda layer, tk: tk.layers.Rescaling(layer.scale, layer.offset, name=layer.name),
    ),
)

#: Kernels TF-MOT prunes, by Keras 3 layer type (its `prune_registry`);
#: other bridged layers (DepthwiseConv2D, normalization, biases) stay dense.
_PRUNED_KERNELS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (keras.layers.Dense, ("kernel",)),
    (keras.layers.Conv1D, ("kernel",)),
    (keras.layers.Conv2D, ("kernel",)),
    (keras.layers.Conv3D, ("kernel",)),
    (
        keras.layers.MultiHeadAttention,
        tuple(
            f"{a}.kernel" for a in ("_query_dense", "_key_dense", "_value_dense", "_output_dense")
        ),
    ),
)


def pruned_kernels(model) -> list[np.ndarray]:
    """The kernels of `model` that TF-MOT magnitude pruning sparsifies."""
    kernels = []
    for layer in model.layers:
        for cls, attrs in _PRUNED_KERNELS:
            if type(layer) is cls:
                for attr in attrs:
                    obj = layer
                    for part in attr.split("."):
                        obj = getattr(obj, part)
                    kernels.append(keras.ops.convert_to_numpy(obj))
    return kernels


def _builder_for(layer):
    for cls, build in BRIDGED_LAYERS:
        if type(layer) is cls:
            return build
    raise ValueError(
        f"The TF-MOT bridge cannot rebuild layer {layer.name!r} of type "
        f"{type(layer).__name__}; supported: "
        f"{[cls.__name__ for cls, _ in BRIDGED_LAYERS]}."
    )


_MHA_NAMES = ("query", "value", "key")


def to_tf_keras(model, tf_keras):
    """Rebuild a functional or Sequential Keras 3 model as a `tf_keras.Model`.

    The graph is replayed node by node (residual `Add`s, concatenations and
    attention included); each layer is rebuilt by its `BRIDGED_LAYERS`
    builder under the same name and gets the same weights.

    Args:
        model: a built functional or Sequential Keras 3 model with one input.
        tf_keras: the `tf_keras` module (from `import_tfmot`).

    Returns:
        A functional `tf_keras.Model` computing the same function.

    Raises:
        ValueError: a layer type missing from `BRIDGED_LAYERS`, a layer used
            more than once, or a model that is not functional.
    """
    from keras_localrank.taps import model_graph

    graph = model_graph(model)
    layers = [lyr for lyr in graph.layers if not isinstance(lyr, keras.layers.InputLayer)]
    builders = {lyr.name: _builder_for(lyr) for lyr in layers}  # fail before building
    nodes = {n for group in graph._nodes_by_depth.values() for n in group}
    for lyr in layers:
        if len([n for n in lyr._inbound_nodes if n in nodes]) != 1:
            raise ValueError(
                f"The TF-MOT bridge supports layers called once. Received: layer "
                f"{lyr.name!r} of model {model.name!r}, called several times."
            )
    source = graph.inputs[0]
    input_names = [lyr.name for lyr in graph.layers if isinstance(lyr, keras.layers.InputLayer)]
    table = {
        id(source): tf_keras.Input(
            shape=tuple(source.shape[1:]), name=input_names[0] if input_names else None
        )
    }
    rebuilt = {}
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer) or node.is_input:
                continue
            args, kwargs = node.arguments.convert(
                lambda t: table[id(t)] if isinstance(t, keras.KerasTensor) else t
            )
            tk_layer = rebuilt[layer.name] = builders[layer.name](layer, tf_keras)
            if isinstance(layer, keras.layers.MultiHeadAttention):
                # Keyword tensors: TF-MOT's wrapper passes only `inputs` positionally.
                named = dict(zip(_MHA_NAMES, args))
                args, kwargs = (named.pop("query"),), {**named, **kwargs}
            outputs = tk_layer(*args, **kwargs)
            flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            for kt, tt in zip(node.outputs, flat):
                table[id(kt)] = tt
    outputs = [table[id(t)] for t in graph.outputs]
    tk_model = tf_keras.Model(
        table[id(source)], outputs[0] if len(outputs) == 1 else outputs, name=model.name
    )
    for lyr in layers:
        if lyr.weights:
            rebuilt[lyr.name].set_weights(lyr.get_weights())
    return tk_model


def sparsity_for_budget(model, budget: float) -> float:
    """Kernel sparsity that leaves `budget * params` non-zero weights.

    TF-MOT prunes the kernels of Dense, Conv and MultiHeadAttention layers
    only; biases, normalization and depthwise kernels are kept.

    Raises:
        ValueError: a budget below the weights that are never pruned.
    """
    total = count_params(model)
    kernels = sum(k.size for k in pruned_kernels(model))
    kept = total - kernels
    target = budget * total
    if kernels == 0 or target <= kept:
        raise InfeasibleBudgetError(
            f"Impossible budget for TF-MOT pruning: budget={budget!r} allows "
            f"{int(target):,} parameters, but {kept:,} weights (biases, normalization, "
            "depthwise kernels) are never pruned."
        )
    return float(min(1.0, max(0.0, 1.0 - (target - kept) / kernels)))


def kernel_sparsity(model) -> float:
    """Fraction of zero entries over the kernels TF-MOT prunes (see `pruned_kernels`)."""
    kernels = pruned_kernels(model)
    zeros = sum(int(np.sum(k == 0)) for k in kernels)
    return zeros / max(1, sum(k.size for k in kernels))


def _prune_supported(tk_model, tk, sparse, schedule):
    """`tk_model` with every layer TF-MOT can prune wrapped for pruning.

    Layers its registry does not know (an `EinsumDense`, say) stay as they
    are, dense, instead of failing the whole model; `pruned_kernels` and
    the budget count them as never pruned.
    """
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    def wrap(layer):  # TF-MOT's own whole-model wrapping, minus the refusal
        if prune_registry.PruneRegistry.supports(layer):
            return sparse.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    return tk.models.clone_model(tk_model, clone_function=wrap)


def _set_batch_norm_trainable(tk_model, tf_keras, trainable: bool) -> None:
    """Frozen (inference-mode) BatchNorm: a mask-setting step must not move statistics."""
    for layer in tk_model.layers:
        inner = getattr(layer, "layer", layer)  # TF-MOT wrappers hold the layer
        if isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = trainable


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
    schedule: str = "constant",
) -> Compressed:
    """Magnitude-prune the kernels of `model` to a parameter budget.

    One-shot masks at the target sparsity are applied by one training step
    with a zero learning rate (the weights do not move); with
    `finetune_epochs > 0` the pruned model is then trained with Adam under
    the same masks.

    Args:
        model: a functional or Sequential Keras 3 classifier made of
            `BRIDGED_LAYERS` (not modified).
        budget: target fraction of non-zero parameters, in (0, 1].
        x: training inputs (the first batch sets the masks).
        y: integer labels.
        from_logits: whether the model outputs logits.
        finetune_epochs: epochs of masked training. Default 0.
        batch_size: batch size. Default 128.
        learning_rate: Adam learning rate of the fine-tune. Default 1e-3.
        schedule: `"constant"` (default) or `"cosine"` (decayed to 0 over
            the fine-tuning steps).

    Returns:
        A `Compressed` holding a Keras 3 model with zeroed weights.
    """
    sparsity = sparsity_for_budget(model, budget)
    tfmot, tk = import_tfmot()
    sparse = tfmot.sparsity.keras
    tk_model = to_tf_keras(model, tk)
    constant = sparse.ConstantSparsity(sparsity, begin_step=0, frequency=1)
    pruned = _prune_supported(tk_model, tk, sparse, constant)
    loss = tk.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    callbacks = [sparse.UpdatePruningStep()]
    _set_batch_norm_trainable(pruned, tk, False)
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
        _set_batch_norm_trainable(pruned, tk, True)
        rate = learning_rate
        if schedule == "cosine":
            steps = finetune_epochs * int(np.ceil(len(x) / batch_size))
            rate = tk.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
        pruned.compile(optimizer=tk.optimizers.Adam(learning_rate=rate), loss=loss)
        pruned.fit(
            x, y, epochs=finetune_epochs, batch_size=batch_size, verbose=0, callbacks=callbacks
        )
    stripped = sparse.strip_pruning(pruned)
    result = keras.models.clone_model(model)
    for layer in model.layers:
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
