"""Pieces shared by the benchmark scripts (no flags defined here)."""

from __future__ import annotations

import keras


def build_mlp(input_dim: int, widths: list[int], seed: int) -> keras.Model:
    """The reference ReLU MLP of DESIGN.md: He-normal init, linear last layer."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_dim,))]
    for i, w in enumerate(widths):
        act = "relu" if i < len(widths) - 1 else None
        layers.append(keras.layers.Dense(w, activation=act, kernel_initializer="he_normal"))
    return keras.Sequential(layers)
