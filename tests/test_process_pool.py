"""Worker processes of the experiment scripts stop with the script."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("pool", ["script", "plain"])
def test_workers_stop_when_the_script_is_killed(tmp_path, pool):
    """`common.process_pool`'s workers die with a SIGKILLed parent; a plain
    spawn pool's worker (what `authors_ablation --jobs` used) outlives it,
    which is the failure: it kept training and holding the run's lock."""
    make = (
        "common.process_pool(1)"
        if pool == "script"
        else "concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn)"
    )
    code = textwrap.dedent(
        f"""
        import concurrent.futures, multiprocessing, os, sys, time
        from experiments import common
        if __name__ == "__main__":
            spawn = multiprocessing.get_context("spawn")
            pool = {make}
            print(pool.submit(os.getpid).result(), flush=True)
            pool.submit(time.sleep, 300)
            time.sleep(300)
        """
    )
    script = tmp_path / "parent.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    parent = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    worker = int(parent.stdout.readline())
    try:
        assert _alive(worker)
        time.sleep(1)  # the sleep is running in the worker
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.time() + (5 if pool == "plain" else 30)
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive(worker) == (pool == "plain")
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
