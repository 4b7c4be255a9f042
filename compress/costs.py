"""What a budget counts: parameters or multiply-accumulates (MACs).

A budget is a fraction of the original model's *cost*. A `CostModel` pairs
two functions that must agree with each other:

- `layer(shape)`: the cost of one weight layer described by a `LayerShape`
  (its kernel shape, how many output positions share the kernel, its bias
  size). Policies price every candidate rank with it, without building a
  model.
- `model(keras_model)`: the cost of a whole model. The layers nobody
  rewrites are priced as `model(original) - sum(layer(candidate))`.

`PARAMS` counts weights (kernel and bias); `MACS` counts
`positions * prod(kernel_shape)` multiply-accumulates per sample, the rule
of `compress.macs.count_macs`. Another counter (say one that also counts
pooling or normalization) plugs in as `CostModel("macs", layer=..., model=...)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

__all__ = ["MACS", "PARAMS", "CostModel", "LayerShape", "get_cost", "mac_cost", "param_cost"]


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One weight layer as a budget sees it.

    Attributes:
        kernel_shape: the kernel's shape (`(n_in, n_out)` for Dense,
            `(*kernel_size, c_in, c_out)` for a convolution).
        positions: output positions that share the kernel per sample (1 for
            a Dense layer on vectors, `H_out * W_out` for a Conv2D).
        bias: number of bias entries (0 without bias).
    """

    kernel_shape: tuple[int, ...]
    positions: int = 1
    bias: int = 0


def param_cost(shape: LayerShape) -> float:
    """Weights of the layer: kernel entries plus bias entries."""
    return float(math.prod(shape.kernel_shape) + shape.bias)


def mac_cost(shape: LayerShape) -> float:
    """Multiply-accumulates per sample: `positions * prod(kernel_shape)`."""
    return float(shape.positions * math.prod(shape.kernel_shape))


@dataclasses.dataclass(frozen=True)
class CostModel:
    """A budget unit: a per-layer price and the matching whole-model count.

    Attributes:
        name: short name used in reports (`"params"`, `"macs"`).
        layer: `LayerShape -> cost` of one weight layer.
        model: `keras.Model -> cost` of a whole model.
    """

    name: str
    layer: Callable[[LayerShape], float]
    model: Callable[[object], float]


def _count_params(model) -> float:
    from compress.registry import count_params

    return float(count_params(model))


def _count_macs(model) -> float:
    from compress.macs import count_macs

    return float(count_macs(model))


PARAMS = CostModel("params", param_cost, _count_params)
MACS = CostModel("macs", mac_cost, _count_macs)
_COSTS = {c.name: c for c in (PARAMS, MACS)}


def get_cost(identifier) -> CostModel:
    """A `CostModel` from itself or its name (`"params"` or `"macs"`).

    Raises:
        ValueError: an unknown name.
        TypeError: anything else.
    """
    if isinstance(identifier, CostModel):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _COSTS:
            raise ValueError(
                f"Expected `cost` in {tuple(_COSTS)}. Received: cost={identifier!r}"
            )
        return _COSTS[identifier]
    raise TypeError(
        f"Expected `cost` to be a CostModel or one of {tuple(_COSTS)}. "
        f"Received: cost={identifier!r}"
    )
