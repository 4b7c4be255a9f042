"""`GaussianBottleneck`: the stochastic layer of a deep Variational Information Bottleneck.

The layer turns encoder outputs into a diagonal Gaussian posterior
`q(z|x) = N(mu(x), diag(sigma(x)^2))` (a `tfp.distributions.MultivariateNormalDiag`),
draws reparameterised samples `z = mu + sigma * eps` and adds
`beta * E_x KL(q(z|x) || r(z))` to the model's losses with `add_loss`. The
decoder reads the samples; `SampleAverage` averages its probabilities over the
samples, as the VIB paper does at test time.

References:
    Alemi, Fischer, Dillon & Murphy, "Deep Variational Information
    Bottleneck", ICLR 2017, https://arxiv.org/abs/1612.00410
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from keras_localrank.inputs import check_positive_int

if TYPE_CHECKING:
    import tensorflow_probability as tfp


def _tfd():
    """`tfp.distributions`, imported on first use (only the VIB needs TFP)."""
    import tensorflow_probability as tfp

    return tfp.distributions

__all__ = ["GaussianBottleneck", "SampleAverage", "check_beta"]

#: `softplus(_INVERSE_SOFTPLUS_ONE) == 1`: the raw value of a unit scale.
_INVERSE_SOFTPLUS_ONE = math.log(math.e - 1.0)


def check_beta(beta, name: str = "beta") -> float:
    """Validate an information-bottleneck trade-off `beta` and return it as a float.

    Args:
        beta: a finite real number >= 0.
        name: the argument name used in error messages. Default `"beta"`.

    Returns:
        `float(beta)`.

    Raises:
        TypeError: `beta` is not a real number (a bool, a string, None, an array).
        ValueError: `beta` is negative, NaN or infinite.
    """
    if isinstance(beta, (bool, np.bool_)) or not isinstance(
        beta, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"Expected `{name}` to be a real number. Received: {name}={beta!r} "
            f"of type {type(beta).__name__}"
        )
    value = float(beta)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected `{name}` >= 0 and finite. Received: {name}={beta!r}")
    return value


def _check_finite(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"Expected `{name}` to be a real number. Received: {name}={value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"Expected a finite `{name}`. Received: {name}={value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="keras_localrank")
class GaussianBottleneck(keras.layers.Layer):
    """Diagonal-Gaussian stochastic bottleneck with a `beta`-weighted KL loss.

    The posterior is `q(z|x) = MultivariateNormalDiag(mu, sigma)` with
    `sigma = softplus(s + scale_shift) + scale_floor`. The layer accepts
    either

    - one tensor of encoder features: it then owns two `Dense(units)` heads
      (`layer.mean_dense`, `layer.scale_dense`) that produce `mu` and `s`; or
    - a pair `[mu, s]` computed by layers of the model. Use this form (as
      `keras_localrank.vib.build_vib_classifier` does) when the mean head
      should be a top-level `Dense` layer whose local rank can be measured.

    In `call` it adds `beta * mean_batch(KL(q(z|x) || r(z)))` with `add_loss`,
    updates the metric `rate` (the mean per-example KL, in nats) and returns
    `z = mu + sigma * eps`, `eps ~ N(0, I)` (reparameterised: gradients flow
    to `mu` and `s`), with a sample axis: `train_samples` samples in training,
    `eval_samples` otherwise. `r(z)` is `N(0, I)` or, with
    `learnable_prior=True`, a diagonal Gaussian with trainable mean and scale.

    Args:
        units: `K`, the bottleneck dimension.
        beta: the trade-off weight of the KL term, a finite float >= 0.
            Default 1e-3. Read it as `layer.beta`.
        train_samples: samples of `z` per example in training. Default 1.
        eval_samples: samples of `z` per example at inference; average the
            decoder's probabilities over them with `SampleAverage`. Default 12
            (the VIB paper's test-time setting).
        scale_shift: added to the raw scale before the softplus. Default -5.0
            (the VIB paper's `softplus(s - 5)`: small initial noise).
        scale_floor: added after the softplus so `sigma > 0`. Default 1e-4.
        learnable_prior: learn the prior's mean and scale. Default False.
        kernel_initializer: initializer of the owned heads (single-input
            form). Default `"glorot_uniform"`.
        seed: seed of the sampling noise. Default None.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Input shape:
        `(batch, features)` or a pair of `(batch, units)` tensors `[mu, s]`.

    Output shape:
        `(batch, samples, units)`, samples = `train_samples` in training and
        `eval_samples` otherwise (statically `None`).

    Raises:
        TypeError, ValueError: bad `beta` (negative, NaN, infinite, not a
            number), non-positive `units`/sample counts, negative
            `scale_floor`, or inputs whose last dimension is not `units`.

    Example:
        >>> x = keras.Input((784,))
        >>> h = keras.layers.Dense(256, activation="relu")(x)
        >>> z = GaussianBottleneck(32, beta=1e-3)(h)
        >>> probs = keras.layers.Dense(10, activation="softmax")(z)
        >>> model = keras.Model(x, SampleAverage()(probs))

    References:
        Alemi et al., "Deep Variational Information Bottleneck",
        https://arxiv.org/abs/1612.00410
    """

    def __init__(
        self,
        units: int,
        beta: float = 1e-3,
        *,
        train_samples: int = 1,
        eval_samples: int = 12,
        scale_shift: float = -5.0,
        scale_floor: float = 1e-4,
        learnable_prior: bool = False,
        kernel_initializer="glorot_uniform",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self._beta = check_beta(beta)
        self.train_samples = check_positive_int("train_samples", train_samples)
        self.eval_samples = check_positive_int("eval_samples", eval_samples)
        self.scale_shift = _check_finite("scale_shift", scale_shift)
        self.scale_floor = check_beta(scale_floor, "scale_floor")
        self.learnable_prior = bool(learnable_prior)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.rate_tracker = keras.metrics.Mean(name="rate")
        self.mean_dense = None
        self.scale_dense = None
        self._paired = None

    @property
    def beta(self) -> float:
        """The weight of the KL term (read-only; build a new layer to change it)."""
        return self._beta

    # -- building ------------------------------------------------------------

    def _is_pair(self, input_shape) -> bool:
        return isinstance(input_shape, (list, tuple)) and bool(input_shape) and isinstance(
            input_shape[0], (list, tuple)
        )

    def build(self, input_shape):
        self._paired = self._is_pair(input_shape)
        if self._paired:
            if len(input_shape) != 2:
                raise ValueError(
                    "Expected a pair [mean, raw_scale] or one feature tensor. "
                    f"Received: {len(input_shape)} inputs with shapes {input_shape}."
                )
            for what, shape in zip(("mean", "raw_scale"), input_shape):
                if shape[-1] != self.units:
                    raise ValueError(
                        f"Expected the `{what}` input to have last dimension "
                        f"units={self.units}. Received: shape {tuple(shape)}."
                    )
        else:
            self.mean_dense = keras.layers.Dense(
                self.units,
                kernel_initializer=self.kernel_initializer,
                name="mean",
                dtype=self.dtype_policy,
            )
            self.scale_dense = keras.layers.Dense(
                self.units,
                kernel_initializer=self.kernel_initializer,
                name="scale",
                dtype=self.dtype_policy,
            )
            self.mean_dense.build(input_shape)
            self.scale_dense.build(input_shape)
        if self.learnable_prior:
            self.prior_loc = self.add_weight(
                shape=(self.units,), initializer="zeros", name="prior_loc"
            )
            self.prior_raw_scale = self.add_weight(
                shape=(self.units,),
                initializer=keras.initializers.Constant(_INVERSE_SOFTPLUS_ONE),
                name="prior_raw_scale",
            )

    # -- the distributions -----------------------------------------------------

    def posterior_parameters(self, inputs):
        """`(mu, sigma)` of `q(z|x)` for the layer's inputs (features or a pair)."""
        if self._paired is None:
            raise ValueError(
                f"Layer {self.name!r} is not built; call it on data or build it first."
            )
        if self._paired:
            mean, raw = inputs
        else:
            mean, raw = self.mean_dense(inputs), self.scale_dense(inputs)
        mean = keras.ops.convert_to_tensor(mean, self.compute_dtype)
        raw = keras.ops.convert_to_tensor(raw, self.compute_dtype)
        scale = keras.ops.softplus(raw + self.scale_shift) + self.scale_floor
        return mean, scale

    def posterior(self, inputs) -> tfp.distributions.MultivariateNormalDiag:
        """`q(z|x)` as a `tfp.distributions.MultivariateNormalDiag`."""
        mean, scale = self.posterior_parameters(inputs)
        return _tfd().MultivariateNormalDiag(loc=mean, scale_diag=scale)

    def prior(self) -> tfp.distributions.MultivariateNormalDiag:
        """`r(z)`: `N(0, I)`, or the learned diagonal Gaussian."""
        if self.learnable_prior:
            loc = keras.ops.convert_to_tensor(self.prior_loc)
            scale = keras.ops.softplus(self.prior_raw_scale) + self.scale_floor
        else:
            loc = tf.zeros((self.units,), self.compute_dtype)
            scale = tf.ones((self.units,), self.compute_dtype)
        return _tfd().MultivariateNormalDiag(loc=loc, scale_diag=scale)

    def kl_per_dimension(self, inputs):
        """`KL(q(z_j|x) || r(z_j))` per example and dimension, `(batch, units)`, nats."""
        mean, scale = self.posterior_parameters(inputs)
        prior = self.prior()
        return _tfd().kl_divergence(
            _tfd().Normal(mean, scale),
            _tfd().Normal(prior.mean(), prior.stddev()),
        )

    # -- the forward pass ------------------------------------------------------

    def call(self, inputs, training=None):
        posterior = self.posterior(inputs)
        kl = _tfd().kl_divergence(posterior, self.prior())  # (batch,) nats
        self.add_loss(self._beta * keras.ops.mean(kl))
        self.rate_tracker.update_state(kl)
        mean, scale = posterior.loc, posterior.stddev()
        samples = self.train_samples if training else self.eval_samples
        batch = keras.ops.shape(mean)[0]
        eps = keras.random.normal(
            (batch, samples, self.units), dtype=self.compute_dtype, seed=self.seed_generator
        )
        return mean[:, None, :] + scale[:, None, :] * eps

    def compute_output_shape(self, input_shape):
        shape = input_shape[0] if self._is_pair(input_shape) else input_shape
        return (shape[0], None, self.units)

    def get_config(self):
        config = {
            "units": self.units,
            "beta": self._beta,
            "train_samples": self.train_samples,
            "eval_samples": self.eval_samples,
            "scale_shift": self.scale_shift,
            "scale_floor": self.scale_floor,
            "learnable_prior": self.learnable_prior,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="keras_localrank")
class SampleAverage(keras.layers.Layer):
    """Average over the sample axis (axis 1) of `(batch, samples, ...)` tensors.

    Put it after the decoder of a `GaussianBottleneck`: averaging the
    decoder's *probabilities* over the samples of `z` gives the VIB paper's
    test-time prediction (with one training sample it is the identity).

    Input shape:
        `(batch, samples, ...)`.

    Output shape:
        `(batch, ...)`.
    """

    def call(self, inputs):
        return keras.ops.mean(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *input_shape[2:])
