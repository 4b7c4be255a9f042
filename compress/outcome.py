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
        budget_kind: what the budget counts, `"params"` or `"macs"`.
        skipped: `{layer: reason}` for weight layers left as they are.
        folded: `{BatchNormalization: layer it was folded into}`.
        notes: `{layer: note}`, e.g. why constant channels were kept or a
            floor was not measured.
        layer_loss: `{layer: rise of the held-out loss when only this layer
            is rewritten at its chosen rank}` (measured by the greedy
            allocation; empty otherwise): where the loss comes from.
    """

    model: keras.Model
    method: str
    budget: float | None = None
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    floors: dict[str, int] = dataclasses.field(default_factory=dict)
    removed_units: dict[str, int] = dataclasses.field(default_factory=dict)
    sparsity: float | None = None
    nonzero_params: bool = False
    budget_kind: str = "params"
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    layer_loss: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able description (without the model)."""
        return {
            "method": self.method,
            "budget": self.budget,
            "ranks": dict(self.ranks),
            "floors": dict(self.floors),
            "removed_units": dict(self.removed_units),
            "sparsity": self.sparsity,
            "budget_kind": self.budget_kind,
            "skipped": dict(self.skipped),
            "folded": dict(self.folded),
            "notes": dict(self.notes),
            "layer_loss": dict(self.layer_loss),
        }
