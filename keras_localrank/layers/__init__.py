"""Keras layers of keras_localrank.

All layers are imported here so that `keras.models.load_model` finds them
(they register as `keras_localrank>...`); `GaussianBottleneck` imports
TensorFlow Probability only when it builds its distributions.
"""

from keras_localrank.layers.gaussian_bottleneck import GaussianBottleneck, SampleAverage
from keras_localrank.layers.rank_probe import RankProbe

__all__ = ["GaussianBottleneck", "RankProbe", "SampleAverage"]
