"""Test helper: the files of a run directory, to show a call changed nothing."""

import os


def snapshot(folder) -> dict:
    """`{relative path: (bytes, mtime_ns)}` of every file below `folder` but
    the lock file (which records its holder)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == ".lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out
