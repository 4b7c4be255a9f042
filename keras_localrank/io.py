"""Files: atomic writes (results are never left half-written) and safe `.npz` reads.

Writes go to a temporary file in the destination folder, are synced, given
mode 0644 (an ordinary result file, not `mkstemp`'s 0600) and renamed over
the destination. Reads of user-supplied `.npz` files turn every way a file
can be missing, truncated or corrupt into one `UnreadableFileError` that
names the file.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "UnreadableFileError",
    "atomic_write_json",
    "atomic_write_text",
    "read_keras_model",
    "read_npz",
    "read_rows",
    "write_rows",
]


class UnreadableFileError(ValueError):
    """A user-supplied file is missing, truncated, corrupt or lacks expected content."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def read_npz(
    path: str | os.PathLike, keys: Sequence[str], *, argument: str = "data_path"
) -> dict[str, np.ndarray]:
    """The arrays `keys` of the `.npz` file `path`, fully read into memory.

    Args:
        path: the `.npz` file.
        keys: names of the arrays that must be present.
        argument: the argument/flag name quoted in messages. Default "data_path".

    Returns:
        `{key: array}` for every key.

    Raises:
        UnreadableFileError (a `ValueError`): a missing file, a file that is
            not a valid `.npz` (truncated, corrupt, pickled objects) or lacks
            one of `keys`; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnreadableFileError(
            f"Expected an existing .npz file. Received: {argument}={path!r}"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            files = list(data.files)
            missing = [k for k in keys if k not in files]
            arrays = {} if missing else {k: np.asarray(data[k]) for k in keys}
    except Exception as e:  # truncated/corrupt archives raise many types
        raise UnreadableFileError(
            f"Could not read {path!r} as an .npz file ({_one_line(e)}). "
            f"Received: {argument}={path!r}"
        ) from None
    if missing:
        raise UnreadableFileError(
            f"Expected arrays {list(keys)} in {path!r}. Found: {sorted(files)}"
        )
    return arrays


MODEL_SUFFIXES = (".keras", ".h5")


def read_keras_model(
    path: str | os.PathLike,
    *,
    compile: bool = True,
    safe_mode: bool = True,
    imports: Sequence[str] = (),
    argument: str = "model",
):
    """A saved Keras model (`.keras`, or a legacy `.h5`), or one clear error.

    Args:
        path: the model file.
        compile: restore the compile configuration. Default True.
        safe_mode: Keras' `safe_mode`: False also loads `Lambda` layers
            holding Python code (only for files one trusts). Default True.
        imports: modules imported first, so that custom layers they define
            and register (`keras.saving.register_keras_serializable`) load.
        argument: the argument/flag name quoted in messages. Default "model".

    Raises:
        UnreadableFileError (a `ValueError`): a missing, truncated or corrupt
            file, a module of `imports` that cannot be imported; the message
            names the file and, for a `Lambda` layer or an unknown custom
            class, the option that loads it.
    """
    for module in imports:
        try:
            importlib.import_module(module)
        except Exception as e:
            raise UnreadableFileError(
                f"Could not import module {module!r} ({_one_line(e)}). Received: "
                f"imports={list(imports)!r}"
            ) from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnreadableFileError(
            f"Expected an existing .keras model file. Received: {argument}={path!r}"
        )
    if not path.endswith(MODEL_SUFFIXES):
        raise UnreadableFileError(
            f"Expected a model file ending in .keras (or a legacy .h5). Received: "
            f"{argument}={path!r}"
        )
    import keras

    try:
        return keras.models.load_model(path, compile=compile, safe_mode=safe_mode)
    except Exception as e:  # Keras raises many types for unreadable files
        text = str(e)
        if "safe_mode" in text:
            advice = " It holds a Lambda layer; if you trust the file, pass --nosafe_mode."
        elif "deserializ" in text or "Could not locate" in text or "Unknown layer" in text:
            advice = (
                " If it uses custom layers, pass --imports=<module> naming the module "
                "that defines and registers them."
            )
        else:
            advice = ""
        raise UnreadableFileError(
            f"Could not load the model file {path!r} ({_one_line(e)}).{advice}"
        ) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, then rename).

    Args:
        path: destination file; its folder is created if needed.
        text: the content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_rows(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write a trace (a list of row dicts) atomically: CSV for `.csv`, else JSON."""
    if os.fspath(path).endswith(".csv"):
        import pandas as pd

        atomic_write_text(path, pd.DataFrame(list(rows), columns=list(columns)).to_csv(index=False))
    else:
        atomic_write_json(path, list(rows))


def read_rows(path: str | os.PathLike) -> list[dict] | None:
    """A trace written by `write_rows`, or None when `path` does not exist.

    Missing CSV cells come back as None (as they were written), not NaN.
    """
    if not os.path.exists(path):
        return None
    if os.fspath(path).endswith(".csv"):
        import pandas as pd

        frame = pd.read_csv(path)
        return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
