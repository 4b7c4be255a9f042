"""Serializable layers of the transformer rewrites.

`LowRankEinsumDense` is a projection of a tensor's trailing axes through two
thin factors; `LowRankMultiHeadAttention` is a stock `MultiHeadAttention`
whose chosen projections are `LowRankEinsumDense` layers. Both save and load
with `.keras` files.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from keras_localrank.validation import check_positive_int

__all__ = ["PROJECTIONS", "LowRankEinsumDense", "LowRankMultiHeadAttention"]

#: The projections of a `MultiHeadAttention` layer, in weight order.
PROJECTIONS = ("query", "key", "value", "attention_output")
#: The attribute holding each projection inside `MultiHeadAttention`.
SUBLAYERS = {
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "attention_output": "_output_dense",
}


@keras.saving.register_keras_serializable(package="compress")
class LowRankEinsumDense(keras.layers.Layer):
    """A projection of the trailing axes through two thin factors.

    Computes `activation(tensordot(tensordot(x, kernel_a, contract_dims),
    kernel_b, 1) + bias)`: the last `contract_dims` axes of the input
    (`in_dims`) are contracted with `kernel_a` (`[*in_dims, rank]`), and
    `kernel_b` (`[rank, *output_dims]`) expands the result. It stands in for
    an `EinsumDense` projection (or a `MultiHeadAttention` projection) whose
    kernel, unfolded to `prod(in_dims) x prod(output_dims)`, has rank
    `rank`.

    Args:
        output_dims: the trailing output axes, a tuple of positive ints.
        rank: inner width. Positive int.
        contract_dims: number of trailing input axes contracted. Default 1.
        activation: activation. Default None (linear).
        use_bias: add a bias of shape `output_dims`. Default True.
        kernel_initializer: initializer of both factors. Default
            `"glorot_uniform"`.
        bias_initializer: initializer of the bias. Default `"zeros"`.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Input shape:
        `(batch, ..., *in_dims)` with `len(in_dims) == contract_dims`.

    Output shape:
        `(batch, ..., *output_dims)`.

    Raises:
        TypeError, ValueError: a bad `rank`, `contract_dims` or `output_dims`.

    Example:
        >>> layer = LowRankEinsumDense(output_dims=(4, 8), rank=3)
        >>> layer(keras.ops.ones((2, 5, 16))).shape
        (2, 5, 4, 8)
    """

    def __init__(
        self,
        output_dims,
        rank: int,
        contract_dims: int = 1,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(output_dims, int):
            output_dims = (output_dims,)
        if not isinstance(output_dims, (list, tuple)) or not output_dims:
            raise TypeError(
                "Expected `output_dims` to be a non-empty tuple of ints. "
                f"Received: output_dims={output_dims!r}"
            )
        self.output_dims = tuple(check_positive_int("output_dims", d) for d in output_dims)
        self.rank = check_positive_int("rank", rank)
        self.contract_dims = check_positive_int("contract_dims", contract_dims)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        in_dims = tuple(input_shape[-self.contract_dims :])
        if len(input_shape) <= self.contract_dims or any(d is None for d in in_dims):
            raise ValueError(
                f"Layer {self.name!r} contracts the last {self.contract_dims} axes "
                f"of its input, which must be known. Received: input_shape={input_shape}"
            )
        self.kernel_a = self.add_weight(
            name="kernel_a", shape=in_dims + (self.rank,), initializer=self.kernel_initializer
        )
        self.kernel_b = self.add_weight(
            name="kernel_b",
            shape=(self.rank,) + self.output_dims,
            initializer=self.kernel_initializer,
        )
        self.bias = (
            self.add_weight(name="bias", shape=self.output_dims, initializer=self.bias_initializer)
            if self.use_bias
            else None
        )

    def call(self, inputs):
        h = keras.ops.tensordot(inputs, self.kernel_a, axes=self.contract_dims)
        x = keras.ops.tensordot(h, self.kernel_b, axes=1)
        if self.bias is not None:
            x = keras.ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[: -self.contract_dims]) + self.output_dims

    def get_config(self):
        base_config = super().get_config()
        config = {
            "output_dims": list(self.output_dims),
            "rank": self.rank,
            "contract_dims": self.contract_dims,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
        return {**base_config, **config}


@keras.saving.register_keras_serializable(package="compress")
class LowRankMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`MultiHeadAttention` with some projections factorized.

    Each projection named in `projection_ranks` (`"query"`, `"key"`,
    `"value"`, `"attention_output"`) is a `LowRankEinsumDense` of that rank
    instead of an `EinsumDense`; the attention computation is the stock one.
    The factors use the layer's initializers; its kernel and bias
    regularizers and constraints apply to the stock projections only.

    Args:
        projection_ranks: `{projection: rank}`. Default None (no projection
            factorized: a plain `MultiHeadAttention`).
        **kwargs: the arguments of `keras.layers.MultiHeadAttention`.

    Raises:
        ValueError: an unknown projection name; `use_gate=True` (the gate
            projection is not supported).
        TypeError: a rank that is not a positive int.
    """

    def __init__(self, *args, projection_ranks: Mapping[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        ranks = dict(projection_ranks or {})
        for key, rank in ranks.items():
            if key not in PROJECTIONS:
                raise ValueError(
                    f"Expected `projection_ranks` keys in {PROJECTIONS}. "
                    f"Received: projection_ranks={ranks!r}"
                )
            check_positive_int(f"projection_ranks[{key!r}]", rank)
        if self._use_gate:
            raise ValueError(
                "LowRankMultiHeadAttention does not support gated attention. "
                "Received: use_gate=True"
            )
        self.projection_ranks = {k: int(ranks[k]) for k in PROJECTIONS if k in ranks}

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        for key, rank in self.projection_ranks.items():
            old = getattr(self, SUBLAYERS[key])
            contract = 2 if key == "attention_output" else 1  # heads x value_dim
            shape = tuple(int(d) for d in old.kernel.shape)
            in_dims, out_dims = shape[:contract], shape[contract:]
            new = LowRankEinsumDense(
                output_dims=out_dims,
                rank=rank,
                contract_dims=contract,
                use_bias=old.bias is not None,
                kernel_initializer=self._kernel_initializer.__class__.from_config(
                    self._kernel_initializer.get_config()
                ),
                bias_initializer=self._bias_initializer.__class__.from_config(
                    self._bias_initializer.get_config()
                ),
                name=old.name,
                dtype=self.dtype_policy,
            )
            new.build((None,) + in_dims)
            # Keep the sublayer order (and so the weight order) of the stock layer.
            self._tracker.replace_tracked_value("layers", old, new)
            setattr(self, SUBLAYERS[key], new)

    def get_config(self):
        return {**super().get_config(), "projection_ranks": dict(self.projection_ranks)}
