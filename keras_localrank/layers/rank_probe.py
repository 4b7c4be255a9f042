"""`RankProbe`: an identity layer that marks a tensor for local-rank measurement."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="keras_localrank")
class RankProbe(keras.layers.Layer):
    """Identity layer marking a point whose local rank should be measured.

    Place it after any tensor of a functional model (after
    BatchNormalization, a residual add, a custom op). `local_rank`, the
    estimator and the training callback measure the rank of the Jacobian of
    the probe's input with respect to the model input, like any Dense layer's
    pre-activation. It does nothing to the forward pass.

    Args:
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Input shape:
        Any.

    Output shape:
        Same as the input.

    Example:
        >>> x = keras.Input((8,))
        >>> h = keras.layers.Dense(4)(x)
        >>> h = RankProbe(name="after_norm")(keras.layers.LayerNormalization()(h))
        >>> model = keras.Model(x, keras.layers.Dense(2)(h))
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape
