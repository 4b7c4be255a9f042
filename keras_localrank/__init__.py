"""keras_localrank: local rank of neural-network layers for Keras 3.

Local rank is the expected numerical rank of a layer's pre-activation
Jacobian with respect to the input (Patel & Shwartz-Ziv,
https://arxiv.org/abs/2410.07687).
"""

from keras_localrank import (
    datasets,
    dynamics,
    information,
    layers,
    metrics,
    plotting,
    schedules,
    vib,
)
from keras_localrank.callbacks import LocalRankCallback
from keras_localrank.estimate import LocalRankEstimator, local_rank
from keras_localrank.information_callback import InformationCallback
from keras_localrank.layers import GaussianBottleneck, RankProbe, SampleAverage
from keras_localrank.result import LayerInfo, LocalRankResult
from keras_localrank.spectra import (
    Tolerance,
    effective_rank,
    rank_from_singular_values,
    stable_rank,
)
from keras_localrank.taps import MEASURABLE_LAYERS

__version__ = "0.1.0"

__all__ = [
    "GaussianBottleneck",
    "InformationCallback",
    "LayerInfo",
    "LocalRankCallback",
    "LocalRankEstimator",
    "LocalRankResult",
    "MEASURABLE_LAYERS",
    "RankProbe",
    "SampleAverage",
    "Tolerance",
    "effective_rank",
    "datasets",
    "dynamics",
    "information",
    "layers",
    "local_rank",
    "metrics",
    "plotting",
    "schedules",
    "rank_from_singular_values",
    "stable_rank",
    "vib",
]
