"""Deep Variational Information Bottleneck: the classifier, its information terms,
and its local rank.

`build_vib_classifier` builds the VIB paper's classifier as a functional Keras
3 model: an MLP encoder, a `Dense` mean head (`bottleneck_mean`) and raw-scale
head (`bottleneck_scale`) feeding a `GaussianBottleneck`, a softmax decoder
applied to every sample of `z`, and a `SampleAverage` of the probabilities.
Because the mean head is a top-level `Dense` layer, the local-rank engine
measures its pre-activation (the bottleneck mean) like any encoder layer.

Information terms (all in nats), for a model and data `(x, y)`:

    rate      R = E_x KL(q(z|x) || r(z))          >= I(X;Z)   (upper bound)
    I(Z;Y) >= H(Y) + E_{x,y} E_{q(z|x)} log q(y|z) = H(Y) - cross-entropy

with `H(Y)` the entropy of the empirical label distribution and the inner
expectation estimated with the layer's `eval_samples` samples.

References:
    Alemi, Fischer, Dillon & Murphy, "Deep Variational Information
    Bottleneck", ICLR 2017, https://arxiv.org/abs/1612.00410
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np

from keras_localrank.estimate import LocalRankEstimator
from keras_localrank.layers.gaussian_bottleneck import (
    GaussianBottleneck,
    SampleAverage,
    check_beta,
)
from keras_localrank.result import LocalRankResult
from keras_localrank.spectra import Tolerance
from keras_localrank.taps import is_measurable, model_graph

__all__ = [
    "PRESETS",
    "InformationQuantities",
    "VIBConfig",
    "build_vib_classifier",
    "compile_vib_classifier",
    "encoder_layer_names",
    "find_bottleneck",
    "get_preset",
    "information_quantities",
    "mean_head_name",
    "vib_local_rank",
    "vib_local_rank_estimator",
]


@dataclasses.dataclass(frozen=True)
class VIBConfig:
    """Architecture and optimisation of a VIB classifier.

    Attributes:
        encoder_units: widths of the encoder's hidden Dense layers.
        bottleneck_units: `K`, the bottleneck dimension.
        activation: encoder activation.
        learning_rate: initial Adam learning rate.
        beta_1, beta_2: Adam moments.
        decay_rate: learning-rate factor applied every `decay_epochs` epochs
            (1.0: constant).
        decay_epochs: epochs between decays.
        batch_size: training batch size.
        epochs: training epochs.
        train_samples, eval_samples: samples of `z` in training / at inference.
        learnable_prior: learn the prior `r(z)`.
        scale_shift: `sigma = softplus(s + scale_shift) + floor` (see
            `GaussianBottleneck`).
    """

    encoder_units: tuple[int, ...] = (256, 256)
    bottleneck_units: int = 32
    activation: str = "relu"
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.999
    decay_rate: float = 1.0
    decay_epochs: int = 2
    batch_size: int = 100
    epochs: int = 10
    train_samples: int = 1
    eval_samples: int = 12
    learnable_prior: bool = False
    scale_shift: float = -5.0

    def __post_init__(self):
        units = tuple(self.encoder_units)
        if not units or any(
            isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1 for u in units
        ):
            raise ValueError(
                "Expected `encoder_units` to be positive ints. "
                f"Received: encoder_units={self.encoder_units!r}"
            )
        object.__setattr__(self, "encoder_units", tuple(int(u) for u in units))
        for name in ("bottleneck_units", "decay_epochs", "batch_size", "epochs",
                     "train_samples", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Expected `{name}` >= 1. Received: {name}={value!r}")
        for name in ("learning_rate", "decay_rate"):
            value = getattr(self, name)
            if check_beta(value, name) <= 0:
                raise ValueError(f"Expected `{name}` > 0. Received: {name}={value!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "encoder_units": list(self.encoder_units)}


#: Named settings. `"paper_mnist"` is the VIB paper's MNIST setting
#: (784-1024-1024, K=256, Adam 1e-4 with beta_1=0.5 decayed by 0.97 every 2
#: epochs, batch 100, 200 epochs, 12 test samples; Polyak averaging not
#: included). `"small"` (784-256-256, K=32, Adam 1e-3, 15 epochs) trains in
#: seconds per model on 2 CPU cores; its `scale_shift=0` starts the posterior
#: scale near 0.7 so that it can open or collapse within those few epochs.
PRESETS: dict[str, VIBConfig] = {
    "small": VIBConfig(epochs=15, scale_shift=0.0),
    "paper_mnist": VIBConfig(
        encoder_units=(1024, 1024),
        bottleneck_units=256,
        learning_rate=1e-4,
        beta_1=0.5,
        beta_2=0.999,
        decay_rate=0.97,
        decay_epochs=2,
        batch_size=100,
        epochs=200,
    ),
}


def get_preset(name: str, **overrides) -> VIBConfig:
    """The named `VIBConfig` with some fields replaced.

    Raises:
        ValueError: an unknown preset or field name.
    """
    if name not in PRESETS:
        raise ValueError(f"Expected a preset in {sorted(PRESETS)}. Received: preset={name!r}")
    fields = {f.name for f in dataclasses.fields(VIBConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"Unknown VIBConfig fields {unknown}. Known: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build_vib_classifier(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    beta: float = 1e-3,
    encoder_units: Sequence[int] = (256, 256),
    bottleneck_units: int = 32,
    activation: str = "relu",
    train_samples: int = 1,
    eval_samples: int = 12,
    learnable_prior: bool = False,
    scale_shift: float = -5.0,
    seed: int | None = None,
    name: str = "vib_classifier",
) -> keras.Model:
    """The VIB classifier: MLP encoder, Gaussian bottleneck, softmax decoder.

    Layers (by name): `encoder_1` ... `encoder_n` (Dense, `activation`),
    `bottleneck_mean` and `bottleneck_scale` (Dense, linear, width `K`),
    `bottleneck` (`GaussianBottleneck`), `decoder` (Dense softmax on each
    sample of `z`) and `sample_average` (`SampleAverage`). The output is the
    class probabilities; compile it with `sparse_categorical_crossentropy`
    (see `compile_vib_classifier`), the KL term is already added.

    Args:
        input_shape: per-sample input shape; inputs are flattened.
        num_classes: number of classes (>= 2).
        beta: the KL weight, finite and >= 0. Default 1e-3.
        encoder_units: encoder widths. Default (256, 256).
        bottleneck_units: `K`. Default 32.
        activation: encoder activation. Default `"relu"`.
        train_samples: samples of `z` per example in training. Default 1.
        eval_samples: samples averaged at inference. Default 12.
        learnable_prior: learn `r(z)`. Default False (`N(0, I)`).
        scale_shift: shift of the raw scale before the softplus. Default
            -5.0 (the VIB paper).
        seed: seed of the sampling noise. Default None.
        name: model name. Default `"vib_classifier"`.

    Returns:
        An uncompiled functional `keras.Model`.

    Raises:
        TypeError, ValueError: a bad `beta`, sizes or `num_classes`.

    Example:
        >>> model = build_vib_classifier((784,), 10, beta=1e-3)
        >>> compile_vib_classifier(model, get_preset("small"), steps_per_epoch=50)
    """
    config = VIBConfig(
        encoder_units=tuple(encoder_units),
        bottleneck_units=bottleneck_units,
        train_samples=train_samples,
        eval_samples=eval_samples,
    )
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
        num_classes < 2
    ):
        raise ValueError(f"Expected `num_classes` >= 2. Received: num_classes={num_classes!r}")
    beta = check_beta(beta)
    inputs = keras.Input(tuple(input_shape), name="input")
    h = keras.layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
    for i, units in enumerate(config.encoder_units, start=1):
        h = keras.layers.Dense(units, activation=activation, name=f"encoder_{i}")(h)
    k = config.bottleneck_units
    mean = keras.layers.Dense(k, name="bottleneck_mean")(h)
    raw_scale = keras.layers.Dense(k, name="bottleneck_scale")(h)
    z = GaussianBottleneck(
        k,
        beta=beta,
        train_samples=config.train_samples,
        eval_samples=config.eval_samples,
        learnable_prior=learnable_prior,
        scale_shift=scale_shift,
        seed=seed,
        name="bottleneck",
    )([mean, raw_scale])
    probs = keras.layers.Dense(num_classes, activation="softmax", name="decoder")(z)
    outputs = SampleAverage(name="sample_average")(probs)
    return keras.Model(inputs, outputs, name=name)


def compile_vib_classifier(model: keras.Model, config: VIBConfig, *, steps_per_epoch: int):
    """Compile with Adam (exponential step decay), cross-entropy and accuracy.

    The learning rate is multiplied by `config.decay_rate` every
    `config.decay_epochs` epochs (staircase), as in the VIB paper.
    """
    if isinstance(steps_per_epoch, bool) or steps_per_epoch < 1:
        raise ValueError(
            f"Expected `steps_per_epoch` >= 1. Received: steps_per_epoch={steps_per_epoch!r}"
        )
    lr = config.learning_rate
    if config.decay_rate != 1.0:
        lr = keras.optimizers.schedules.ExponentialDecay(
            lr,
            decay_steps=steps_per_epoch * config.decay_epochs,
            decay_rate=config.decay_rate,
            staircase=True,
        )
    model.compile(
        optimizer=keras.optimizers.Adam(lr, beta_1=config.beta_1, beta_2=config.beta_2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


# -- structure ---------------------------------------------------------------------


def find_bottleneck(model: keras.Model) -> GaussianBottleneck:
    """The model's only `GaussianBottleneck` layer.

    Raises:
        ValueError: no or several bottleneck layers.
    """
    graph = model_graph(model)
    found = [layer for layer in graph.layers if isinstance(layer, GaussianBottleneck)]
    if len(found) != 1:
        raise ValueError(
            "Expected a model with exactly one GaussianBottleneck layer. Received: "
            f"model={model.name!r} with {len(found)}."
        )
    return found[0]


def _input_tensors(layer):
    nodes = layer._inbound_nodes
    if len(nodes) != 1:
        raise ValueError(
            f"Expected layer {layer.name!r} to be called once. Received: {len(nodes)} calls."
        )
    return list(nodes[0].input_tensors)


def _producer(tensor):
    return tensor._keras_history.operation


def mean_head_name(model: keras.Model) -> str | None:
    """Name of the top-level layer producing the bottleneck mean, if any.

    None when the bottleneck owns its heads (single-input form).
    """
    bottleneck = find_bottleneck(model)
    tensors = _input_tensors(bottleneck)
    return _producer(tensors[0]).name if len(tensors) == 2 else None


def encoder_layer_names(model: keras.Model) -> list[str]:
    """Measurable layers upstream of the bottleneck (excluding its heads), in order."""
    bottleneck = find_bottleneck(model)
    heads = {_producer(t).name for t in _input_tensors(bottleneck)}
    seen, stack = set(), list(_input_tensors(bottleneck))
    while stack:
        op = _producer(stack.pop())
        if op.name in seen:
            continue
        seen.add(op.name)
        for node in op._inbound_nodes:
            stack.extend(node.input_tensors)
    graph = model_graph(model)
    bottleneck_paired = len(_input_tensors(bottleneck)) == 2
    return [
        layer.name
        for layer in graph.layers
        if layer.name in seen
        and is_measurable(layer)
        and not (bottleneck_paired and layer.name in heads)
    ]


def _measured_model(model: keras.Model) -> tuple[keras.Model, list[str]]:
    """The model to measure and the layer names: encoder layers, then the mean head."""
    names = encoder_layer_names(model)
    head = mean_head_name(model)
    if head is not None:
        return model, [*names, head]
    # The bottleneck owns its mean head: expose it in a sub-model sharing weights.
    bottleneck = find_bottleneck(model)
    graph = model_graph(model)
    (features,) = _input_tensors(bottleneck)
    mean = bottleneck.mean_dense(features)
    sub = keras.Model(graph.inputs[0], mean, name=f"{model.name}_encoder")
    return sub, [*names, bottleneck.mean_dense.name]


# -- information terms ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InformationQuantities:
    """Information terms of a VIB model on data (nats unless noted).

    Attributes:
        rate: `E_x KL(q(z|x)||r(z))`, an upper bound on `I(X;Z)`.
        rate_per_dimension: `E_x KL_j`, per bottleneck dimension.
        active_dimensions: dimensions with `rate_per_dimension > threshold`.
        active_threshold: the threshold used (nats).
        label_entropy: `H(Y)` of the empirical labels.
        cross_entropy: `-E_{x,y} E_{q(z|x)} log q(y|z)` (Monte Carlo).
        izy_lower_bound: `H(Y) - cross_entropy`, a lower bound on `I(Z;Y)`.
        accuracy: accuracy of the sample-averaged prediction.
        num_samples: Monte Carlo samples of `z` per example.
    """

    rate: float
    rate_per_dimension: np.ndarray
    active_dimensions: int
    active_threshold: float
    label_entropy: float
    cross_entropy: float
    izy_lower_bound: float
    accuracy: float
    num_samples: int

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["rate_per_dimension"] = [float(v) for v in self.rate_per_dimension]
        return out


def _label_entropy(y: np.ndarray) -> float:
    counts = np.bincount(y)
    p = counts[counts > 0] / len(y)
    return float(-(p * np.log(p)).sum())


def information_quantities(
    model: keras.Model,
    x,
    y,
    *,
    active_threshold: float = 1e-2,
    batch_size: int = 500,
) -> InformationQuantities:
    """Rate, the `I(Z;Y)` lower bound, active dimensions and accuracy of a VIB model.

    Args:
        model: a functional model with one `GaussianBottleneck`; its output
            is class probabilities, preferably through a `SampleAverage`
            whose input holds per-sample probabilities (as built by
            `build_vib_classifier`).
        x: inputs, `[N, *input_shape]`.
        y: integer labels, `[N]`.
        active_threshold: a dimension is active when its mean KL exceeds this
            many nats. Default 1e-2.
        batch_size: examples per forward pass. Default 500.

    Returns:
        `InformationQuantities`.

    Raises:
        ValueError: mismatched or empty `x`/`y`, labels outside the model's
            classes, a negative `active_threshold`, no bottleneck.
    """
    active_threshold = check_beta(active_threshold, "active_threshold")
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(
            "Expected non-empty `x` and 1-D integer `y` of the same length. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    if y.dtype.kind not in "iu":
        raise TypeError(f"Expected integer labels `y`. Received: y.dtype={y.dtype}")
    graph = model_graph(model)
    bottleneck = find_bottleneck(model)
    params_model = keras.Model(graph.inputs[0], _input_tensors(bottleneck))
    averages = [layer for layer in graph.layers if isinstance(layer, SampleAverage)]
    per_sample_out = _input_tensors(averages[-1])[0] if averages else graph.outputs[0]
    probs_model = keras.Model(graph.inputs[0], per_sample_out)

    kl_sum = np.zeros(bottleneck.units, np.float64)
    log_lik = correct = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        params = params_model(xb, training=False)
        kl = np.asarray(bottleneck.kl_per_dimension(params), np.float64)
        kl_sum += kl.sum(axis=0)
        probs = np.asarray(probs_model(xb, training=False), np.float64)
        if probs.ndim == 2:
            probs = probs[:, None, :]
        if yb.max() >= probs.shape[-1] or yb.min() < 0:
            raise ValueError(
                f"Expected labels in [0, {probs.shape[-1]}). Received: labels "
                f"from {yb.min()} to {yb.max()}."
            )
        picked = probs[np.arange(len(yb)), :, yb]  # (batch, samples)
        log_lik += np.log(np.maximum(picked, np.finfo(np.float64).tiny)).mean(axis=1).sum()
        correct += (probs.mean(axis=1).argmax(axis=1) == yb).sum()
    n = len(y)
    per_dim = kl_sum / n
    h_y = _label_entropy(y)
    ce = -log_lik / n
    return InformationQuantities(
        rate=float(per_dim.sum()),
        rate_per_dimension=per_dim,
        active_dimensions=int((per_dim > active_threshold).sum()),
        active_threshold=active_threshold,
        label_entropy=h_y,
        cross_entropy=float(ce),
        izy_lower_bound=float(h_y - ce),
        accuracy=float(correct / n),
        num_samples=int(probs.shape[1]),
    )


# -- local rank ----------------------------------------------------------------------


def vib_local_rank_estimator(
    model: keras.Model,
    *,
    tolerances: Sequence[Tolerance] = (Tolerance(), Tolerance(atol=1e-2)),
    batch_size: int | None = None,
) -> LocalRankEstimator:
    """A `LocalRankEstimator` for every encoder layer and the bottleneck mean.

    The bottleneck mean is the pre-activation of the mean head
    (`bottleneck_mean` in models from `build_vib_classifier`; for a
    bottleneck that owns its heads, its `mean_dense` sublayer, measured in a
    sub-model sharing the weights).

    Args:
        model: a functional model with one `GaussianBottleneck`.
        tolerances: rank rules, evaluated on the same singular values.
            Default: exact (numpy rule) and robust (`atol=1e-2`).
        batch_size: samples per chunk. Default None: automatic.
    """
    measured, names = _measured_model(model)
    return LocalRankEstimator(
        measured, names, tolerances=tuple(tolerances), batch_size=batch_size
    )


def vib_local_rank(
    model: keras.Model,
    x,
    *,
    tolerances: Sequence[Tolerance] = (Tolerance(), Tolerance(atol=1e-2)),
    max_samples: int | None = None,
) -> list[LocalRankResult]:
    """Local rank of the encoder layers and the bottleneck mean, one result per tolerance.

    Example:
        >>> exact, robust = vib_local_rank(model, x_test[:500])
        >>> exact.mean["bottleneck_mean"]
    """
    return vib_local_rank_estimator(model, tolerances=tolerances)(x, max_samples=max_samples)
