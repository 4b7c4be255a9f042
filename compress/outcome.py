"""`Compressed`: a compressed model and what was done to it."""

from __future__ import annotations

import dataclasses

import keras

__all__ = ["Compressed"]


@dataclasses.dataclass
class Compressed:
    """The result of one compression method at one budget.

    Attributes:
        model: the compressed Keras 3 model (a new object).
        method: `"local_rank"`, `"weight_svd"` or `"tfmot"`.
        budget: the target parameter fraction (None for other policies).
        ranks: `{layer: rank}` of the factorized layers.
        floors: `{layer: local-rank floor}` (local-rank method only).
        removed_units: `{layer: number of output units removed}`.
        sparsity: fraction of zeroed kernel weights (TF-MOT only).
        nonzero_params: True when parameters are counted as non-zero weights.
    """

    model: keras.Model
    method: str
    budget: float | None = None
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    floors: dict[str, int] = dataclasses.field(default_factory=dict)
    removed_units: dict[str, int] = dataclasses.field(default_factory=dict)
    sparsity: float | None = None
    nonzero_params: bool = False

    def summary(self) -> dict:
        """JSON-able description (without the model)."""
        return {
            "method": self.method,
            "budget": self.budget,
            "ranks": dict(self.ranks),
            "floors": dict(self.floors),
            "removed_units": dict(self.removed_units),
            "sparsity": self.sparsity,
        }
