"""One vocabulary for the two rank kinds, used by logs, traces, CSV columns and sweeps.

- `"exact"`: numerical rank by numpy's rule (`Tolerance()`), logged as
  `local_rank/<layer>`;
- `"robust"`: `#{s_i > atol}` (the paper's `rank_eps`), logged as
  `robust_local_rank/<layer>`, or `robust_local_rank@<atol>/<layer>` when
  several thresholds are tracked at once.

Study tables use the same names without the layer part (`local_rank`,
`robust_local_rank@0.01`) as column names, and `kind` / `atol` columns in
long-format traces.

Information estimates (see `information`) are logged as
`information/<estimator>@<parameter>=<value>/<layer>` for `I(X;T)` and
`label_information/<estimator>@<parameter>=<value>/<layer>` for `I(T;Y)`.

Unit activity (see `keras_localrank.active_units`) is logged as
`active_units/<layer>` (mean active units per input), `dead_units/<layer>`
(units inactive on every probe input), `rank_bound/<layer>` (mean active-unit
bound on the layer's rank) and, per rank kind, the rank deficit
`bound - rank` as `rank_deficit/<layer>` (exact) and
`robust_rank_deficit[@<atol>]/<layer>` (robust).
"""

from __future__ import annotations

__all__ = [
    "EXACT",
    "ROBUST",
    "RANK_KINDS",
    "ACTIVE_UNITS",
    "DEAD_UNITS",
    "RANK_BOUND",
    "UNIT_COLUMNS",
    "rank_column",
    "rank_key",
    "deficit_column",
    "deficit_key",
    "information_key",
]

EXACT = "exact"
ROBUST = "robust"
RANK_KINDS = (EXACT, ROBUST)


def rank_column(kind: str, atol: float | None = None, *, qualify: bool = True) -> str:
    """The column/prefix name of a rank kind: `local_rank`, `robust_local_rank[@atol]`.

    Args:
        kind: `"exact"` or `"robust"`.
        atol: the robust threshold (required for `"robust"`).
        qualify: append `@<atol>` to robust names. Default True; callers that
            track a single threshold may pass False.
    """
    if kind == EXACT:
        return "local_rank"
    if kind == ROBUST:
        if atol is None:
            raise ValueError("Expected `atol` for a robust rank name. Received: atol=None")
        return f"robust_local_rank@{atol:g}" if qualify else "robust_local_rank"
    raise ValueError(f"Expected `kind` in {RANK_KINDS}. Received: kind={kind!r}")


def rank_key(layer: str, kind: str, atol: float | None = None, *, qualify: bool = True) -> str:
    """The Keras `logs` key of one layer's rank: `<rank_column>/<layer>`."""
    return f"{rank_column(kind, atol, qualify=qualify)}/{layer}"


#: Column/prefix names of the unit activity of a layer (one value per layer,
#: whatever the rank kind).
ACTIVE_UNITS = "active_units"
DEAD_UNITS = "dead_units"
RANK_BOUND = "rank_bound"
UNIT_COLUMNS = (ACTIVE_UNITS, DEAD_UNITS, RANK_BOUND)


def deficit_column(kind: str, atol: float | None = None, *, qualify: bool = True) -> str:
    """The rank-deficit (`rank_bound - rank`) name of a rank kind:
    `rank_deficit` (exact) or `robust_rank_deficit[@atol]` (robust)."""
    return rank_column(kind, atol, qualify=qualify).replace("local_rank", "rank_deficit")


def deficit_key(layer: str, kind: str, atol: float | None = None, *, qualify: bool = True) -> str:
    """The Keras `logs` key of one layer's rank deficit: `<deficit_column>/<layer>`."""
    return f"{deficit_column(kind, atol, qualify=qualify)}/{layer}"


#: Key prefix of each information quantity.
INFORMATION_PREFIXES = {"I(X;T)": "information", "I(T;Y)": "label_information"}


def information_key(layer: str, quantity: str, label: str) -> str:
    """The Keras `logs` key of one layer's information estimate.

    Args:
        layer: the layer name.
        quantity: `"I(X;T)"` or `"I(T;Y)"`.
        label: `<estimator>@<parameter>=<value>` (`InformationEstimate.label`).

    Returns:
        e.g. `information/kl_upper@sigma=0.1/dense`.
    """
    if quantity not in INFORMATION_PREFIXES:
        raise ValueError(
            f"Expected `quantity` in {tuple(INFORMATION_PREFIXES)}. Received: quantity={quantity!r}"
        )
    return f"{INFORMATION_PREFIXES[quantity]}/{label}/{layer}"
