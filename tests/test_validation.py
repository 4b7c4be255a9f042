"""The one validation module: TypeError for wrong types, ValueError for wrong values."""

import math
import os
import stat

import numpy as np
import pytest

from keras_localrank import validation as v


@pytest.mark.parametrize("bad", [2.5, 2.0, "3", True, None, np.float32(3)])
def test_int_checks_reject_non_integers(bad):
    with pytest.raises(TypeError, match="`n`"):
        v.check_positive_int("n", bad)
    with pytest.raises(TypeError, match="`n`"):
        v.check_int("n", bad, minimum=0)


def test_int_checks_bounds_and_values():
    assert v.check_positive_int("n", np.int64(3)) == 3
    assert v.check_int("n", 0, minimum=0) == 0
    with pytest.raises(ValueError, match="Received: n=0"):
        v.check_positive_int("n", 0)
    with pytest.raises(ValueError, match=">= 2"):
        v.check_int("n", 1, minimum=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_float_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="finite `x`"):
        v.check_finite_float("x", bad)


def test_float_bounds_open_and_closed():
    assert v.check_finite_float("x", 0, low=0.0) == 0.0
    with pytest.raises(ValueError, match="> 0"):
        v.check_finite_float("x", 0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match="< 1"):
        v.check_fraction("f", 1.0, allow_one=False)
    assert v.check_fraction("f", 1.0) == 1.0
    with pytest.raises(TypeError):
        v.check_finite_float("x", "1.0")
    with pytest.raises(TypeError):
        v.check_finite_float("x", False)


def test_threshold_choice_sequence_betas():
    assert v.check_threshold("atol", None) is None
    with pytest.raises(ValueError, match="atol"):
        v.check_threshold("atol", -1)
    with pytest.raises(ValueError, match="mode"):
        v.check_choice("mode", "x", ("a", "b"))
    with pytest.raises(TypeError, match="seq"):
        v.check_sequence("seq", "abc")
    assert v.check_betas("betas", [1e-2, 0, 1.0]) == (0.0, 1e-2, 1.0)
    with pytest.raises(ValueError, match="distinct"):
        v.check_betas("betas", [1.0, 1.0])
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        v.check_betas("betas", [1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        v.check_betas("betas", [1.0], minimum_count=2)


def test_writable_dir(tmp_path):
    assert v.check_writable_dir("workdir", tmp_path / "new") == str(tmp_path / "new")
    assert os.path.isdir(tmp_path / "new")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="a file"):
        v.check_writable_dir("workdir", a_file)
    with pytest.raises(TypeError):
        v.check_writable_dir("workdir", 3)


def test_writable_dir_read_only_mount(tmp_path):
    # Root ignores permission bits, so a chmod test cannot fail for root;
    # /proc is read-only for everyone.
    target = "/proc/keras_localrank_check" if os.geteuid() == 0 else None
    if target is None:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = str(ro)
    with pytest.raises(ValueError, match="workdir"):
        v.check_writable_dir("workdir", target)
