"""Pieces shared by the experiment scripts (no flags defined here)."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable

import keras

from keras_localrank.executors import EXECUTORS, ExecutorError, make_executor
from keras_localrank.rundir import RunDirectoryError

#: Errors a user can cause with a flag or a file (a bad value, a wrong type, a
#: missing/unwritable/corrupt file, a busy or mismatched run directory, an
#: executor that is not installed): a script reports them in one line.
#: Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError, TypeError, OSError, zipfile.BadZipFile, RunDirectoryError, ExecutorError
)


def _exit_with_parent(parent: int) -> None:
    """Process-pool initializer: on Linux the kernel sends this worker SIGTERM
    when `parent` dies, killed or not (`prctl(PR_SET_PDEATHSIG)`); a worker
    whose parent is already gone stops at once. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def process_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """`jobs` worker processes (spawned: TensorFlow is not fork-safe) that
    stop with this process. Without that, killing a script left its workers
    training on, holding the run directory's lock, so that the rerun meant
    to resume it was refused; killed, a worker's sub-run resumes from its
    last checkpoint."""
    return concurrent.futures.ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


def define_executor_flags() -> None:
    """`--executor`, `--ray_address`, `--ray_num_cpus`, `--cpus_per_task`, `--gpus_per_task`."""
    from absl import flags

    flags.DEFINE_enum(
        "executor", "inprocess", list(EXECUTORS),
        "Who runs the independent sub-runs: this process, or one Ray task each.",
    )
    flags.DEFINE_string(
        "ray_address", None,
        "With --executor=ray: 'auto' or 'host:port' of a running cluster "
        "(default: start a local Ray for this run).",
    )
    flags.DEFINE_integer("ray_num_cpus", None, "CPUs of the local Ray (default: all).")
    flags.DEFINE_float("cpus_per_task", 1, "With --executor=ray: CPUs each task reserves.")
    flags.DEFINE_float("gpus_per_task", 0, "With --executor=ray: GPUs each task reserves.")


def executor_from_flags():
    """The executor the flags of `define_executor_flags` ask for.

    Raises:
        ExecutorUnavailable: `--executor=ray` without Ray installed.
        ValueError: Ray flags with `--executor=inprocess`.
    """
    from absl import flags

    FLAGS = flags.FLAGS
    if FLAGS.executor == "inprocess":
        if FLAGS.ray_address is not None:
            raise ValueError(
                "Expected --ray_address only with --executor=ray. "
                f"Received: --ray_address={FLAGS.ray_address}"
            )
        return make_executor("inprocess")
    return make_executor(
        "ray",
        address=FLAGS.ray_address,
        num_cpus=FLAGS.ray_num_cpus,
        cpus_per_task=FLAGS.cpus_per_task,
        gpus_per_task=FLAGS.gpus_per_task,
    )


def one_line_errors(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """Wrap an absl `main`: `USER_ERRORS` end the program with one line on
    stderr (`<script>: error: <message>`) and exit status 1, not a traceback."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            message = " ".join(str(e).split()) or type(e).__name__
            script = os.path.basename(sys.argv[0]) if sys.argv else "script"
            print(f"{script}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with `one_line_errors`: the entry point of every script."""
    from absl import app

    app.run(one_line_errors(main))


def numbers(name: str, values, kind) -> tuple:
    """The values of list flag `--name` as `kind` (int or float).

    Raises:
        ValueError: a value that is not a `kind` number, naming the flag.
    """
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ValueError(f"Expected numbers in --{name}. Received: {','.join(values)}") from None


def build_mlp(input_dim: int, widths: list[int], seed: int) -> keras.Model:
    """The reference ReLU MLP of the benchmarks: He-normal init, linear last layer."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_dim,))]
    for i, w in enumerate(widths):
        act = "relu" if i < len(widths) - 1 else None
        layers.append(keras.layers.Dense(w, activation=act, kernel_initializer="he_normal"))
    return keras.Sequential(layers)


class PeakRSS:
    """Largest resident-set growth (MiB) while the context is active."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
