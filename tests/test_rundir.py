"""RunDirectory: lock across processes, config check before any write, manifest, resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from keras_localrank.rundir import (
    ConfigMismatch,
    RunDirectory,
    RunDirectoryError,
    RunDirectoryLocked,
    SubRun,
    config_differences,
)
from tests.run_files import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"epochs": 3, "lr": 0.1, "seeds": [0, 1], "model": {"units": 8, "depth": 2}}


# The child processes import `keras_localrank.rundir` without the package's
# `__init__` (which imports TensorFlow): the module under test is the real one.
_PRELUDE = f"""
import sys, types
_pkg = types.ModuleType("keras_localrank")
_pkg.__path__ = [{os.path.join(REPO, "keras_localrank")!r}]
sys.modules["keras_localrank"] = _pkg
"""


def _python(code, *args, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        text=True,
        **kwargs,
    )


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_open_writes_config_and_manifest_0644(tmp_path):
    with RunDirectory(tmp_path / "run", CONFIG) as run:
        assert run.is_open
        run.write_text("flags.txt", "--epochs=3\n")
        run.mark_complete("flags.txt", rows=1)
        assert run.is_complete("flags.txt") and not run.is_complete("summary.json")
    assert not run.is_open
    root = tmp_path / "run"
    assert json.loads((root / "config.json").read_text()) == CONFIG
    for name in ("config.json", "flags.txt", "manifest.json"):
        assert _mode(root / name) == 0o644, name
    with RunDirectory(root, CONFIG) as again:  # a later process sees the manifest
        assert again.is_complete("flags.txt")
        assert again.manifest["complete"]["flags.txt"]["rows"] == 1
        manifest = (root / "manifest.json").read_bytes()
        again.mark_complete("flags.txt", rows=1)  # already complete: not rewritten
        assert (root / "manifest.json").read_bytes() == manifest
        again.mark_complete("flags.txt", rows=2)
        assert again.manifest["complete"]["flags.txt"]["rows"] == 2
        again.mark_incomplete("flags.txt")
        assert not again.is_complete("flags.txt")
    with pytest.raises(RunDirectoryError, match="not open"):
        again.write_text("x.txt", "")


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = _python(
        """
        import sys
        from keras_localrank.rundir import RunDirectory
        run = RunDirectory(sys.argv[1], {"epochs": 3}).open()
        sub = run.subrun("seed=0", {"seed": 0})
        sub.write_text("rows.csv", "step\\n1\\n")
        print("holding", flush=True)
        sys.stdin.readline()
        sub.write_text("rows.csv", "step\\n1\\n2\\n")
        run.mark_complete("seed=0")
        """,
        str(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(tmp_path)
        # Same config, a different config: the lock is checked first either way.
        for config in ({"epochs": 3}, {"epochs": 5}):
            with pytest.raises(RunDirectoryLocked, match=f"pid {holder.pid}") as info:
                RunDirectory(tmp_path, config).open()
            assert info.value.path == str(tmp_path)
        # A worker on the same sub-run folder is refused too (a second process
        # really runs into the first one's lock here).
        worker = _python(
            """
            import sys
            from keras_localrank.rundir import RunDirectory, RunDirectoryLocked
            try:
                RunDirectory(sys.argv[1], {"epochs": 3}).open()
            except RunDirectoryLocked as e:
                print(e)
                sys.exit(3)
            """,
            str(tmp_path),
            stdout=subprocess.PIPE,
        )
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 3 and f"pid {holder.pid}" in out
        assert snapshot(tmp_path) == before  # nothing written, nothing deleted
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(timeout=120) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (tmp_path / "seed=0" / "rows.csv").read_text() == "step\n1\n2\n"
    with RunDirectory(tmp_path, {"epochs": 3}) as run:  # released at exit
        assert run.is_complete("seed=0")


def test_refused_rerun_leaves_files_byte_identical(tmp_path):
    with RunDirectory(tmp_path, CONFIG) as run:
        run.write_text("flags.txt", "--epochs=3 --lr=0.1\n")
        run.mark_complete("summary.json")
        run.subrun("seed=0", {"seed": 0, "epochs": 3}).mark_complete()
    before = snapshot(tmp_path)
    changed = {**CONFIG, "epochs": 4, "model": {"units": 16, "depth": 2}}
    with pytest.raises(ConfigMismatch, match="epochs") as info:
        with RunDirectory(tmp_path, changed) as run:
            run.write_text("flags.txt", "--epochs=4\n")  # never reached
    assert info.value.keys == ["epochs", "model.units"]
    assert isinstance(info.value, ValueError)
    assert "3 -> 4" in str(info.value)
    assert snapshot(tmp_path) == before
    # The refusal released the lock: the original config opens again.
    with RunDirectory(tmp_path, CONFIG) as run:
        assert run.is_complete("summary.json")
        with pytest.raises(ConfigMismatch, match="seed"):
            run.subrun("seed=0", {"seed": 1, "epochs": 3})
    assert snapshot(tmp_path) == before


def test_mutable_keys_may_change_and_are_saved(tmp_path):
    RunDirectory(tmp_path, CONFIG, mutable_keys=["seeds"]).open().close()
    stamp = os.stat(tmp_path / "config.json").st_mtime_ns
    RunDirectory(tmp_path, CONFIG, mutable_keys=["seeds"]).open().close()  # same: not rewritten
    assert os.stat(tmp_path / "config.json").st_mtime_ns == stamp
    more = {**CONFIG, "seeds": (0, 1, 2)}
    RunDirectory(tmp_path, more, mutable_keys=["seeds"]).open().close()
    assert json.loads((tmp_path / "config.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(ConfigMismatch):
        RunDirectory(tmp_path, CONFIG).open()  # seeds are not mutable here


def test_config_differences():
    assert config_differences({"a": (1, 2)}, {"a": [1, 2]}) == []
    assert config_differences({"a": 1, "b": {"c": 1}}, {"b": {"c": 2, "d": 0}}) == [
        "a",
        "b.c",
        "b.d",
    ]
    assert config_differences({"a": 1, "b": 2}, {"a": 1, "b": 3}, ignore=["b"]) == []


# A driver that records one row per item; killed (SIGKILL) in the middle of item
# 2, after writing part of it, it is started again on the same folder.
_DRIVER = """
import os, signal, sys
from keras_localrank.rundir import RunDirectory
kill_at = int(sys.argv[2])
with RunDirectory(sys.argv[1], {"items": 5}) as run:
    rows = []
    for item in range(5):
        sub = run.subrun(f"item={item}", {"item": item})
        if not sub.is_complete():
            sub.remove("rows.csv")  # leftovers of an interrupted attempt
            with open(sub.join("rows.csv"), "a") as f:
                f.write(f"{item},first\\n")
                f.flush()
                if item == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                f.write(f"{item},second\\n")
            sub.mark_complete(rows=2)
        run.mark_complete(sub.name)
        with open(sub.join("rows.csv")) as f:
            rows += f.read().splitlines()
    run.write_text("results.csv", "\\n".join(rows) + "\\n")
    run.mark_complete("results.csv")
"""


def test_killed_then_resumed_run_has_no_duplicate_rows(tmp_path):
    killed = _python(_DRIVER, str(tmp_path), "2")
    assert killed.wait(timeout=120) == -signal.SIGKILL
    assert not (tmp_path / "results.csv").exists()
    with RunDirectory(tmp_path, {"items": 5}) as run:  # the kill released the lock
        assert [run.is_complete(f"item={i}") for i in range(5)] == [True, True, False] + [False] * 2
        assert not run.subrun("item=2").is_complete()
    assert (tmp_path / "item=2" / "rows.csv").read_text() == "2,first\n"
    done_before = snapshot(tmp_path / "item=0")

    resumed = _python(_DRIVER, str(tmp_path), "-1")
    assert resumed.wait(timeout=120) == 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows == [f"{i},{half}" for i in range(5) for half in ("first", "second")]
    assert snapshot(tmp_path / "item=0") == done_before  # finished items untouched
    with RunDirectory(tmp_path, {"items": 5}) as run:
        assert all(run.is_complete(f"item={i}") for i in range(5))
        assert run.is_complete("results.csv")


def test_subrun_worker_lock_and_remove_guard(tmp_path):
    with SubRun(tmp_path / "beta=1", {"beta": 1.0}, lock=True) as sub:
        with pytest.raises(RunDirectoryLocked, match=str(os.getpid())):
            SubRun(tmp_path / "beta=1", lock=True)
        sub.write_text("partial.csv", "x\n")
        sub.remove("partial.csv", "missing.csv")
        assert not (tmp_path / "beta=1" / "partial.csv").exists()
    unguarded = SubRun(tmp_path / "beta=1", {"beta": 1.0})
    with pytest.raises(RunDirectoryError, match="without holding its lock"):
        unguarded.remove("config.json")
    assert (tmp_path / "beta=1" / "config.json").exists()
    with pytest.raises(ConfigMismatch, match="beta"):
        SubRun(tmp_path / "beta=1", {"beta": 2.0})


def test_atomic_path_renames_on_success_only(tmp_path):
    with RunDirectory(tmp_path, {}) as run:
        with run.atomic_path("models/m.bin") as tmp:
            assert tmp.endswith("m.bin") and os.path.dirname(tmp) == str(tmp_path / "models")
            with open(tmp, "w") as f:
                f.write("one")
        assert _mode(tmp_path / "models" / "m.bin") == 0o644
        with pytest.raises(RuntimeError):
            with run.atomic_path("models/m.bin") as tmp:
                with open(tmp, "w") as f:
                    f.write("half")
                raise RuntimeError("writer failed")
        assert (tmp_path / "models" / "m.bin").read_text() == "one"
        assert os.listdir(tmp_path / "models") == ["m.bin"]
        with pytest.raises(ValueError, match="inside"):
            run.join("..", "elsewhere.txt")
        for bad in ("../x", ".", "/abs"):
            with pytest.raises(ValueError, match="inside"):
                run.subrun(bad)
        nested = run.subrun("runs/a=1")
        assert (nested.path, nested.name) == (str(tmp_path / "runs" / "a=1"), "runs/a=1")


def test_bad_paths_and_corrupt_files(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="a file"):
        RunDirectory(a_file, {}).open()
    with pytest.raises(TypeError, match="workdir=3"):
        RunDirectory(3, {})
    with pytest.raises(TypeError, match="config"):
        RunDirectory(tmp_path, [1])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{truncated")
    with pytest.raises(RunDirectoryError, match="config.json"):
        RunDirectory(tmp_path / "run", {}).open()
    assert (tmp_path / "run" / "config.json").read_text() == "{truncated"
    RunDirectory(tmp_path / "ok", {}).open().close()  # the failed open released nothing else


def _open_run(path, config):
    """Opens a run directory in a worker process (module level: spawn pickles it)."""
    with RunDirectory(path, config):
        return "opened"


def test_errors_cross_process_boundaries(tmp_path):
    """A worker process (the authors' ablation runs variants in a spawn pool;
    Ray tasks run sub-runs) that meets a locked or mismatched run directory
    raises the same error in the parent. Python pickles exceptions by their
    message alone, so these errors came back as a `TypeError` inside
    `BrokenProcessPool`, hiding the one-line reason."""
    import concurrent.futures
    import multiprocessing
    import pickle

    locked = RunDirectoryLocked(str(tmp_path), "pid 42 on host")
    back = pickle.loads(pickle.dumps(locked))
    assert type(back) is RunDirectoryLocked
    assert (back.path, back.holder, str(back)) == (locked.path, locked.holder, str(locked))

    RunDirectory(tmp_path / "done", CONFIG).open().close()
    with pytest.raises(ConfigMismatch) as info:
        RunDirectory(tmp_path / "done", {**CONFIG, "lr": 0.5}).open()
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is ConfigMismatch and back.keys == ["lr"] and str(back) == str(info.value)

    context = multiprocessing.get_context("spawn")
    with RunDirectory(tmp_path / "held", CONFIG):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            future = pool.submit(_open_run, str(tmp_path / "held"), CONFIG)
            with pytest.raises(RunDirectoryLocked, match=f"pid {os.getpid()}") as info:
                future.result(timeout=120)
    assert info.value.path == str(tmp_path / "held")
