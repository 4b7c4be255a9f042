"""Atomic writes give ordinary 0644 files; `.npz` reads fail with one clear error."""

import os
import stat

import numpy as np
import pytest

from keras_localrank.io import UnreadableFileError, atomic_write_json, atomic_write_text, read_npz


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_are_0644_and_leave_no_temporary_files(tmp_path):
    old = os.umask(0o077)  # even under a strict umask: results are ordinary files
    try:
        atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
        atomic_write_json(tmp_path / "b.json", {"x": np.arange(3)})
    finally:
        os.umask(old)
    assert mode(tmp_path / "sub" / "a.txt") == 0o644
    assert mode(tmp_path / "b.json") == 0o644
    assert (tmp_path / "b.json").read_text() == '{\n  "x": [\n    0,\n    1,\n    2\n  ]\n}\n'
    atomic_write_text(tmp_path / "sub" / "a.txt", "again")  # replaces
    assert (tmp_path / "sub" / "a.txt").read_text() == "again"
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.txt"]


def test_read_npz(tmp_path):
    x = np.arange(12.0).reshape(3, 4)
    np.savez_compressed(tmp_path / "ok.npz", x=x, y=np.arange(3))
    arrays = read_npz(tmp_path / "ok.npz", ("x", "y"))
    np.testing.assert_array_equal(arrays["x"], x)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    for name in ("cut.npz", "junk.npz", "objects.npz"):
        with pytest.raises(UnreadableFileError, match=rf"{name}.*Received: data=") as info:
            read_npz(tmp_path / name, ("x",), argument="data")
        assert "\n" not in str(info.value)
    with pytest.raises(UnreadableFileError, match=r"\['x', 'z'\].*Found: \['x', 'y'\]"):
        read_npz(tmp_path / "ok.npz", ("x", "z"))
    with pytest.raises(ValueError, match="existing .npz file"):
        read_npz(tmp_path / "missing.npz", ("x",))
