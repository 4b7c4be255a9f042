"""`LowRankDense`: a Dense layer whose kernel is a product of two thin factors."""

from __future__ import annotations

import keras

__all__ = ["LowRankDense"]


@keras.saving.register_keras_serializable(package="keras_localrank")
class LowRankDense(keras.layers.Layer):
    """`activation(x @ kernel_a @ kernel_b + bias)` with `kernel_a` of rank `rank`.

    Stands in for a `Dense(units)` layer whose kernel `W` (`n_in x units`) is
    replaced by `A @ B` with `A` (`n_in x rank`) and `B` (`rank x units`):
    `rank * (n_in + units)` weights instead of `n_in * units`, and as many
    multiply-accumulates per sample.

    Args:
        units: output width. Positive int.
        rank: inner width of the factorization. Positive int.
        activation: activation, as for `keras.layers.Dense`. Default None
            (linear).
        use_bias: whether to add a bias. Default True.
        kernel_initializer: initializer of both factors. Default
            `"glorot_uniform"`.
        bias_initializer: initializer of the bias. Default `"zeros"`.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Input shape:
        `(..., n_in)`.

    Output shape:
        `(..., units)`.

    Raises:
        ValueError: `units` or `rank` not a positive int.

    Example:
        >>> layer = LowRankDense(units=16, rank=2, activation="relu")
        >>> layer(keras.ops.ones((3, 8))).shape
        (3, 16)
    """

    def __init__(
        self,
        units: int,
        rank: int,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for arg, value in (("units", units), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Expected `{arg}` to be a positive int. Received: {arg}={value!r}"
                )
        self.units = units
        self.rank = rank
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        n_in = input_shape[-1]
        self.kernel_a = self.add_weight(
            name="kernel_a", shape=(n_in, self.rank), initializer=self.kernel_initializer
        )
        self.kernel_b = self.add_weight(
            name="kernel_b", shape=(self.rank, self.units), initializer=self.kernel_initializer
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: n_in})

    def call(self, inputs):
        x = keras.ops.matmul(keras.ops.matmul(inputs, self.kernel_a), self.kernel_b)
        if self.bias is not None:
            x = keras.ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "units": self.units,
            "rank": self.rank,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
        return {**base_config, **config}
