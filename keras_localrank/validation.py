"""One place to check arguments: wrong type -> `TypeError`, wrong value -> `ValueError`.

Every config, layer, callback and CLI of the project validates through these
functions, so messages read the same everywhere: they name the argument and
quote the value received ("Expected `atol` >= 0. Received: atol=-1").
Booleans are never accepted as numbers. Control flow never reads message
text: callers that need to tell failures apart get their own exception
classes (see `InfeasibleBudgetError` in `compress`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np

__all__ = [
    "check_choice",
    "check_finite_float",
    "check_fraction",
    "check_int",
    "check_positive_int",
    "check_sequence",
    "check_threshold",
    "check_betas",
    "check_writable_dir",
]


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """`value` as an `int`, after checking it is an integer `>= minimum`.

    Raises:
        TypeError: a non-integer (floats such as 2.0 and 2.5, strings and
            booleans included).
        ValueError: an integer below `minimum`.
    """
    if _is_bool(value) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Expected `{name}` to be an int. Received: {name}={value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected `{name}` >= {minimum}. Received: {name}={value!r}")
    return int(value)


def check_positive_int(name: str, value) -> int:
    """`value` as an `int`, after checking it is an integer >= 1.

    Raises:
        TypeError: a non-integer (booleans included), naming `name` and the value.
        ValueError: an integer below 1, naming `name` and the value.
    """
    if _is_bool(value) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Expected `{name}` to be an int. Received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int. Received: {name}={value!r}")
    return int(value)


def check_finite_float(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a `float`, after checking it is a finite real in the bounds.

    Args:
        name: the argument's name, quoted in messages.
        value: the value received.
        low, high: optional bounds. Default None (unbounded).
        low_open, high_open: exclude the bound itself. Default False.

    Raises:
        TypeError: not a real number (strings and booleans included).
        ValueError: NaN, infinite or out of bounds.
    """
    if _is_bool(value) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"Expected `{name}` to be a number. Received: {name}={value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        bounds = (" " + " and ".join(parts)) if parts else ""
        raise ValueError(f"Expected finite `{name}`{bounds}. Received: {name}={value!r}")
    return value


def check_fraction(name: str, value, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """A fraction in `(0, 1]` (or `[0, 1]`, `(0, 1)` with the flags)."""
    return check_finite_float(
        name, value, low=0.0, high=1.0, low_open=not allow_zero, high_open=not allow_one
    )


def check_threshold(name: str, value) -> float | None:
    """A singular-value threshold (`atol`/`rtol`): None, or a finite float >= 0."""
    if value is None:
        return None
    return check_finite_float(name, value, low=0.0)


def check_choice(name: str, value, choices: Sequence) -> object:
    """`value` if it is one of `choices`; ValueError otherwise."""
    if value not in tuple(choices):
        raise ValueError(
            f"Expected `{name}` in {tuple(choices)}. Received: {name}={value!r}"
        )
    return value


def check_sequence(name: str, value) -> tuple:
    """`value` as a tuple, after checking it is a sequence (not a string)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"Expected `{name}` to be a sequence. Received: {name}={value!r}")
    return tuple(value)


def check_betas(name: str, betas, *, minimum_count: int = 1) -> tuple[float, ...]:
    """Information-bottleneck weights: finite, >= 0, distinct; returned sorted.

    Raises:
        TypeError: not a sequence of real numbers.
        ValueError: fewer than `minimum_count` values, a negative/NaN/infinite
            value, duplicates.
    """
    values = [
        check_finite_float(f"{name}[{i}]", b, low=0.0)
        for i, b in enumerate(check_sequence(name, betas))
    ]
    if len(values) < minimum_count:
        raise ValueError(
            f"Expected at least {minimum_count} value(s) in `{name}`. "
            f"Received: {name}={list(betas)!r}"
        )
    if len(set(values)) != len(values):
        raise ValueError(f"Expected distinct values in `{name}`. Received: {name}={list(betas)!r}")
    return tuple(sorted(values))


def check_writable_dir(name: str, path) -> str:
    """A directory path that exists and is writable, or can be created.

    Checked before any work starts, so a run never fails at its last step.

    Raises:
        TypeError: `path` is not a string or path-like.
        ValueError: `path` is a file, or cannot be created or written.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"Expected `{name}` to be a directory path. Received: {name}={path!r}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"Expected `{name}` to be a directory. Received: {name}={path!r} (a file)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"Cannot create `{name}`. Received: {name}={path!r} ({e.strerror or e})"
        ) from None
    # Try a real write: `os.access` says yes to root on read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"Expected a writable `{name}`. Received: {name}={path!r} ({e.strerror or e})"
        ) from None
    return path
