"""One run directory for every study: lock, config check, atomic outputs, manifest, resume.

A study (a training-dynamics run, a beta sweep, a compression sweep) writes
everything into one folder, its *run directory*. `RunDirectory` is the one
piece that owns that folder:

- **An exclusive lock.** `open()` takes an `fcntl.flock` lock on
  `<path>/.lock` and writes its pid there. A second process on the same folder
  gets `RunDirectoryLocked`, naming the holder's pid, before it writes
  anything. The operating system releases the lock when the holder exits, even
  when it is killed, so a stale lock never blocks a resume. The lock file
  itself is never deleted (deleting it would let two processes hold "the"
  lock on two different files).
- **The config check first.** The study's config is compared with the
  `config.json` already in the folder *before* anything is written: a
  different config raises `ConfigMismatch` naming the differing keys, and the
  finished run's files stay byte-identical. Keys listed in `mutable_keys`
  (e.g. the list of seeds, which a rerun may extend) may change.
- **Atomic outputs, 0644.** `write_text`, `write_json` and `atomic_path` (for
  files written by other libraries, such as `model.save`) write to a
  temporary file in the same folder and rename it into place.
- **A manifest.** `manifest.json` records which outputs are complete
  (`mark_complete`, `mark_incomplete`, `is_complete`).
- **Resume through sub-runs.** `subrun(name)` is a folder of its own (one per
  seed, per beta, per budget) with its own config check and its own
  completion marker (`complete.json`). A sub-run writes only inside its own
  folder, so a sweep can later hand independent sub-runs to separate workers:
  a worker opens `SubRun(path, config, lock=True)` itself, which takes the
  sub-run's own lock, while the driver alone holds the run directory's
  lock and writes the manifest and the summaries.

Nothing here deletes a file it did not name: `SubRun.remove` only removes
files a caller names inside its own sub-run folder (leftovers of its own
interrupted attempt), and only while the caller holds a lock on the folder.

Example:
    >>> with RunDirectory("runs/sweep", config, mutable_keys=["seeds"]) as run:
    ...     for seed in seeds:
    ...         sub = run.subrun(f"seed={seed}", config={"seed": seed})
    ...         if not sub.is_complete():
    ...             sub.write_json("result.json", train(seed))
    ...             sub.mark_complete()
    ...         run.mark_complete(sub.name)
    ...     run.write_json("summary.json", summarize(run))
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from keras_localrank.io import _jsonable, atomic_write_json, atomic_write_text
from keras_localrank.validation import check_writable_dir

__all__ = [
    "ConfigMismatch",
    "RunDirectory",
    "RunDirectoryError",
    "RunDirectoryLocked",
    "SubRun",
    "config_differences",
]

CONFIG = "config.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
COMPLETE = "complete.json"


class RunDirectoryError(Exception):
    """A run directory cannot be used (base class of the errors below).

    The errors cross process boundaries (a sub-run in a worker process, a
    Ray task): each subclass records its constructor's arguments in
    `_init_args` so that it pickles back to itself, not to a `TypeError`
    (Python pickles an exception by its message alone).
    """

    _init_args: tuple = ()

    def __reduce__(self):
        if not self._init_args:
            return super().__reduce__()
        return type(self), self._init_args


class RunDirectoryLocked(RunDirectoryError):
    """Another process holds the run directory's lock.

    Attributes:
        path: the locked folder.
        holder: what the holder wrote into the lock file ("pid 123 on host"),
            or None if it has not written it yet.
    """

    def __init__(self, path: str, holder: str | None):
        self._init_args = (path, holder)
        self.path, self.holder = path, holder
        who = f"process {holder}" if holder else "another process"
        super().__init__(
            f"The run directory {path!r} is in use by {who}; wait for it to finish "
            "or use another directory."
        )


class ConfigMismatch(RunDirectoryError, ValueError):
    """The folder holds a run with a different config; nothing was written.

    Attributes:
        path: the folder.
        keys: the differing keys (dotted for nested dicts), sorted.
    """

    def __init__(self, path: str, keys: list[str], saved: Mapping, config: Mapping):
        self._init_args = (path, keys, saved, config)
        self.path, self.keys = path, keys
        shown = ", ".join(
            f"{key}: {_lookup(saved, key)!r} -> {_lookup(config, key)!r}" for key in keys[:6]
        )
        more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
        super().__init__(
            f"The run directory {path!r} holds a run with a different config "
            f"({shown}{more}); use a new directory to change them."
        )


def _normalise(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(obj, default=_jsonable))


_MISSING = "<missing>"


def _lookup(mapping: Mapping, dotted: str):
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def config_differences(
    saved: Mapping, config: Mapping, *, ignore: Iterable[str] = ()
) -> list[str]:
    """Keys whose values differ between two configs (dotted paths into nested dicts).

    Both configs are compared as they read back from JSON, so a tuple equals
    the list it was saved as.

    Args:
        saved: the config found in the folder.
        config: the config of this call.
        ignore: top-level or dotted keys that may differ.

    Returns:
        The sorted differing keys; empty when the configs agree.
    """
    ignore = set(ignore)
    saved, config = _normalise(dict(saved)), _normalise(dict(config))

    def walk(a, b, prefix):
        out = []
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}{key}"
            if path in ignore:
                continue
            x, y = a.get(key, _MISSING), b.get(key, _MISSING)
            if isinstance(x, dict) and isinstance(y, dict):
                out += walk(x, y, path + ".")
            elif x != y:
                out.append(path)
        return out

    return walk(saved, config, "")


class _Lock:
    """An exclusive, non-blocking `flock` on a file, with the holder's pid in it."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, folder: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirectoryLocked(folder, self._holder()) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock

    def _holder(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None


class _Folder:
    """Atomic file writes confined to one folder."""

    path: str

    def join(self, *parts: str) -> str:
        """An absolute path inside the folder; refuses paths that leave it."""
        path = os.path.normpath(os.path.join(self.path, *parts))
        if os.path.commonpath([path, self.path]) != self.path:
            raise ValueError(
                f"Expected a path inside {self.path!r}. Received: {os.path.join(*parts)!r}"
            )
        return path

    def exists(self, relpath: str) -> bool:
        return os.path.exists(self.join(relpath))

    def write_text(self, relpath: str, text: str) -> str:
        """Write `text` to `relpath` atomically (mode 0644); returns the path."""
        path = self.join(relpath)
        atomic_write_text(path, text)
        return path

    def write_json(self, relpath: str, obj: Any) -> str:
        """Write `obj` as JSON to `relpath` atomically (mode 0644); returns the path."""
        path = self.join(relpath)
        atomic_write_json(path, obj)
        return path

    def read_json(self, relpath: str, default: Any = None) -> Any:
        """The JSON in `relpath`, or `default` if there is no such file.

        Raises:
            RunDirectoryError: the file exists but is not valid JSON.
        """
        return _read_json(self.join(relpath), default)

    @contextlib.contextmanager
    def atomic_path(self, relpath: str) -> Iterator[str]:
        """A temporary path to write `relpath` to; renamed into place (0644) on success.

        For writers that want a file name, such as `model.save`: the temporary
        name ends like `relpath` (e.g. `.keras`). On an exception the
        temporary file is removed and `relpath` is left as it was.

        Example:
            >>> with run.atomic_path("model.keras") as tmp:
            ...     model.save(tmp)
        """
        path = self.join(relpath)
        folder, base = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-", suffix=base)
        os.close(fd)
        os.remove(tmp)  # writers such as h5py/zipfile want to create the file
        try:
            yield tmp
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirectoryError(f"Cannot read {path!r}: not valid JSON ({e}).") from None


def _check_config(folder: str, config: Mapping | None, ignore: Iterable[str]) -> bool:
    """Compare `config` with `folder/config.json`; True when it must be (re)written."""
    if config is None:
        return False
    saved = _read_json(os.path.join(folder, CONFIG))
    if saved is None:
        return True
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"Cannot read {os.path.join(folder, CONFIG)!r}: not a dict.")
    differing = config_differences(saved, config, ignore=ignore)
    if differing:
        raise ConfigMismatch(folder, differing, saved, _normalise(dict(config)))
    return saved != _normalise(dict(config))  # only mutable keys changed


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class SubRun(_Folder):
    """One independent piece of a study (a seed, a beta, a budget) in its own folder.

    Built by `RunDirectory.subrun` (the driver, which holds the run
    directory's lock), or directly by a worker that was handed the folder:
    `with SubRun(path, config, lock=True) as sub:` takes the sub-run's own
    lock before its config is checked. A sub-run writes only inside its
    folder; it is complete once `complete.json` is there.

    Args:
        path: the sub-run folder (created).
        config: what this sub-run's results depend on; checked against (and
            then written to) `path/config.json`. Default None: no check.
        mutable_keys: config keys that may change between calls. Default ().
        lock: take this sub-run's own lock first (released by `close()` or at
            the end of a `with` block). Default False.
        name: how the manifest names it. Default: the folder's name.

    Raises:
        RunDirectoryLocked: with `lock=True`, another process holds the lock.
        ConfigMismatch: `path/config.json` holds a different config (nothing
            was written).
        RunDirectoryError: an unreadable `config.json`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping | None = None,
        *,
        mutable_keys: Iterable[str] = (),
        lock: bool = False,
        name: str | None = None,
        _guarded: bool = False,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.name = name or os.path.basename(self.path)
        self.config = None if config is None else dict(config)
        os.makedirs(self.path, exist_ok=True)
        self._lock = _Lock(os.path.join(self.path, LOCK))
        if lock:
            self._lock.acquire(self.path)
        self._guarded = _guarded or lock
        try:
            if _check_config(self.path, self.config, mutable_keys):
                self.write_json(CONFIG, self.config)
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        """Release this sub-run's own lock, if held."""
        self._lock.release()

    def __enter__(self) -> SubRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_complete(self) -> bool:
        """Whether `mark_complete` has been called (this or an earlier process)."""
        return os.path.exists(self.join(COMPLETE))

    def completion(self) -> dict | None:
        """The info given to `mark_complete`, or None if not complete."""
        return self.read_json(COMPLETE)

    def mark_complete(self, **info) -> None:
        """Record that every output of this sub-run is written (atomically)."""
        self.write_json(COMPLETE, {"completed_at": _now(), **info})

    def mark_incomplete(self) -> None:
        """Withdraw the completion marker (its outputs are about to be rewritten)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.join(COMPLETE))

    def remove(self, *relpaths: str) -> None:
        """Remove the named files of this sub-run (leftovers of its own earlier attempt).

        Missing files are fine. Only files inside this folder can be named,
        and only by a caller that holds a lock on it (the run directory's or
        the sub-run's own), so no other process's files are ever removed.

        Raises:
            RunDirectoryError: no lock is held on this sub-run.
        """
        if not (self._guarded or self._lock.held):
            raise RunDirectoryError(
                f"Refusing to remove files in {self.path!r} without holding its lock."
            )
        for relpath in relpaths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.join(relpath))


class RunDirectory(_Folder):
    """The run directory of one study: lock, config check, outputs, manifest, resume.

    Args:
        path: the folder (created if missing).
        config: the study's resolved config (JSON-serialisable mapping),
            written to `config.json`.
        mutable_keys: config keys a rerun may change (e.g. "seeds" to add
            seeds); the other keys must equal the saved config. Default ().
        name: how error messages name the folder argument. Default "workdir".

    `open()` (or `with RunDirectory(...) as run:`) validates the path, takes the
    lock, checks the config and only then writes `config.json`; `close()`
    releases the lock.

    Raises (from `open`):
        TypeError: `path` is not a path.
        ValueError: `path` is a file or cannot be created or written.
        RunDirectoryLocked: another process holds the lock.
        ConfigMismatch: the folder holds a run with a different config (no
            file was written).
        RunDirectoryError: an unreadable `config.json` or `manifest.json`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Mapping,
        *,
        mutable_keys: Iterable[str] = (),
        name: str = "workdir",
    ):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"Expected `{name}` to be a directory path. Received: {name}={path!r}")
        if not isinstance(config, Mapping):
            raise TypeError(f"Expected `config` to be a mapping. Received: config={config!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.config = dict(config)
        self.mutable_keys = tuple(mutable_keys)
        self._name = name
        self._lock = _Lock(os.path.join(self.path, LOCK))

    # -- opening ---------------------------------------------------------------

    def open(self) -> RunDirectory:
        """Take the lock, check the config, write it; see the class docstring."""
        if self._lock.held:
            return self
        check_writable_dir(self._name, self.path)
        self._lock.acquire(self.path)
        try:
            if _check_config(self.path, self.config, self.mutable_keys):
                self.write_json(CONFIG, self.config)
            self._manifest = self._read_manifest()
        except BaseException:
            self._lock.release()
            raise
        return self

    def close(self) -> None:
        """Release the lock (files stay)."""
        self._lock.release()

    def __enter__(self) -> RunDirectory:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._lock.held

    def _require_open(self):
        if not self._lock.held:
            raise RunDirectoryError(
                f"The run directory {self.path!r} is not open; use `with RunDirectory(...)`."
            )

    # -- outputs (the driver's) ---------------------------------------------------

    def write_text(self, relpath: str, text: str) -> str:
        self._require_open()
        return super().write_text(relpath, text)

    def write_json(self, relpath: str, obj: Any) -> str:
        self._require_open()
        return super().write_json(relpath, obj)

    @contextlib.contextmanager
    def atomic_path(self, relpath: str) -> Iterator[str]:
        self._require_open()
        with super().atomic_path(relpath) as tmp:
            yield tmp

    # -- manifest --------------------------------------------------------------------

    def _read_manifest(self) -> dict:
        manifest = self.read_json(MANIFEST, {"complete": {}})
        if not isinstance(manifest, dict) or not isinstance(manifest.get("complete"), dict):
            raise RunDirectoryError(f"Cannot read {self.join(MANIFEST)!r}: unexpected content.")
        return manifest

    @property
    def manifest(self) -> dict:
        """`{"complete": {output name: info}}` as last written."""
        self._require_open()
        return json.loads(json.dumps(self._manifest))

    def is_complete(self, name: str) -> bool:
        """Whether the manifest lists `name` as complete."""
        self._require_open()
        return name in self._manifest["complete"]

    def mark_complete(self, name: str, **info) -> None:
        """List output `name` (a file, or a sub-run's name) as complete in the manifest.

        Marking an output that is already complete with the same `info` leaves
        the manifest as it is.
        """
        self._require_open()
        previous = self._manifest["complete"].get(name)
        if previous is not None and _normalise(info) == {
            k: v for k, v in previous.items() if k != "completed_at"
        }:
            return
        self._manifest["complete"][name] = {"completed_at": _now(), **info}
        self.write_json(MANIFEST, self._manifest)

    def mark_incomplete(self, *names: str) -> None:
        """Drop `names` from the manifest (their files are about to be rewritten)."""
        self._require_open()
        if any(n in self._manifest["complete"] for n in names):
            for n in names:
                self._manifest["complete"].pop(n, None)
            self.write_json(MANIFEST, self._manifest)

    # -- sub-runs -------------------------------------------------------------------------

    def subrun(
        self, name: str, config: Mapping | None = None, *, mutable_keys: Iterable[str] = ()
    ) -> SubRun:
        """The sub-run folder `name` (created), its config checked; see `SubRun`.

        `name` is a folder inside the run directory, possibly nested
        (`"runs/beta=0.1_seed=0"`); the manifest lists it under that name.

        The manifest lists the sub-run as complete only when its own marker
        says so: a sub-run marked in the manifest but whose `complete.json` is
        missing (e.g. removed by hand) is dropped from the manifest here.
        """
        self._require_open()
        if not isinstance(name, str) or not name or os.path.isabs(name):
            raise ValueError(f"Expected a folder name inside the run directory. Received: {name!r}")
        if self.join(name) == self.path:
            raise ValueError(f"Expected a folder name inside the run directory. Received: {name!r}")
        path = self.join(name)
        name = os.path.relpath(path, self.path)
        sub = SubRun(path, config, mutable_keys=mutable_keys, name=name, _guarded=True)
        if not sub.is_complete():
            self.mark_incomplete(name)
        return sub
