"""Keras layers of keras_localrank."""

from keras_localrank.layers.gaussian_bottleneck import GaussianBottleneck, SampleAverage
from keras_localrank.layers.rank_probe import RankProbe

__all__ = ["GaussianBottleneck", "RankProbe", "SampleAverage"]
