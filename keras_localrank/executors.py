"""Executors: who runs a study's independent sub-runs (this process, or Ray tasks).

A study (`keras_localrank.studies`) splits its work into independent units (a
seed of a dynamics study, a (beta, seed) model of a VIB sweep, an
architecture of the compression sweep). Each unit is a plain function call,
`fn(*args, **shared)`, that opens its own sub-run folder
(`keras_localrank.rundir.SubRun(path, config, lock=True)`), writes only
inside it, atomically, and marks it complete. The driver (the process that
called `train_and_evaluate`) holds the run directory's lock and alone writes
the manifest and the summaries. An executor only decides where the calls run:

- `InProcessExecutor` (the default; nothing to install or start): one call
  after the other in this process.
- `RayExecutor`: one Ray task per call, with its CPU/GPU needs declared.
  Without an address a local Ray instance is started for the run (loopback
  only, no dashboard) and shut down after it; `address="auto"` or
  `"host:port"` joins an existing cluster, whose workers must see the run
  directory at the same path (a shared filesystem) and have this package
  installed. A task whose worker process dies is retried (`max_retries`);
  the retry finds its sub-run as the dead attempt left it and resumes from it
  exactly as a rerun of the study would.

Both return the results in the order of the calls, so a study gives the same
results with either executor.

Example:
    >>> with make_executor("ray") as executor:
    ...     summary = dynamics.train_and_evaluate(config, workdir, executor=executor)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from keras_localrank.validation import check_choice, check_finite_float, check_int

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorError",
    "ExecutorUnavailable",
    "InProcessExecutor",
    "RayExecutor",
    "make_executor",
]

log = logging.getLogger(__name__)

#: Names accepted by `make_executor` (and the scripts' `--executor` flag).
EXECUTORS = ("inprocess", "ray")


class ExecutorError(Exception):
    """An executor cannot run the work (base class)."""


class ExecutorUnavailable(ExecutorError):
    """The executor's engine is not installed."""


class Executor:
    """Runs independent calls `fn(*args, **shared)`; see the module docstring.

    Use as a context manager (`with executor:`) or call `close()`; an
    executor that started an engine stops it there.
    """

    #: Whether calls run in this process (so they may receive live objects
    #: such as Keras callbacks).
    in_process = False

    def map(
        self,
        fn: Callable,
        calls: Sequence[tuple],
        *,
        shared: Mapping[str, Any] | None = None,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list:
        """Run `fn(*calls[i], **shared)` for every `i`; return the results in order.

        Args:
            fn: a module-level function (Ray ships it by reference).
            calls: the positional arguments of each call.
            shared: keyword arguments common to every call (e.g. the data set;
                Ray stores them once in its object store). Default None.
            on_result: called as `on_result(i, result)` as each call finishes
                (in completion order), e.g. to log progress. Default None.

        Returns:
            `[fn(*calls[0], **shared), fn(*calls[1], **shared), ...]`.

        Raises:
            Whatever a call raises (Ray: after the other calls have finished,
            so their work is kept); `ExecutorError` when a call's worker
            died more often than `max_retries`.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (nothing for in-process)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs the calls one after the other in this process (the default)."""

    in_process = True

    def map(self, fn, calls, *, shared=None, on_result=None) -> list:
        results = []
        for i, args in enumerate(calls):
            results.append(fn(*args, **dict(shared or {})))
            if on_result is not None:
                on_result(i, results[-1])
        return results

    def __repr__(self) -> str:
        return "InProcessExecutor()"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailable(
            "The Ray executor needs Ray, which is not installed: "
            "pip install -e '.[ray]' (or run with --executor=inprocess)."
        ) from None
    return ray


class RayExecutor(Executor):
    """Runs each call as a Ray task.

    Args:
        address: None (default): start a local Ray instance for this executor
            (loopback only, no dashboard; `num_cpus` CPUs) and shut it down in
            `close()`. `"auto"` or `"host:port"`: join that running cluster
            (left running). If Ray is already initialised in this process,
            that session is used and left running.
        num_cpus: CPUs of the local instance. Default None: all of this machine's.
        cpus_per_task: CPUs each task reserves (and the TensorFlow thread
            pools it gets). Default 1.
        gpus_per_task: GPUs each task reserves. Default 0.
        max_retries: how often a task whose worker process died is run
            again. Default 3. (A task that raises is not retried: an error
            in a call is reported, not repeated.)

    Raises:
        ExecutorUnavailable: Ray is not installed.
        TypeError, ValueError: a bad argument.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        cpus_per_task: float = 1,
        gpus_per_task: float = 0,
        max_retries: int = 3,
    ):
        self._ray = _import_ray()
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(
                f"Expected `address` 'auto' or 'host:port'. Received: address={address!r}"
            )
        self.address = address
        self.num_cpus = None if num_cpus is None else check_int("num_cpus", num_cpus, minimum=1)
        for name, value in (("cpus_per_task", cpus_per_task), ("gpus_per_task", gpus_per_task)):
            check_finite_float(name, value, low=0.0)
        self.cpus_per_task, self.gpus_per_task = cpus_per_task, gpus_per_task
        self.max_retries = check_int("max_retries", max_retries, minimum=0)
        self._started = False

    def start(self) -> None:
        """Start (or join) Ray now; `map` does it on first use.

        Raises:
            ExecutorError: Ray could not be started or the cluster not reached.
        """
        ray = self._ray
        if ray.is_initialized():
            return
        where = "start a local Ray instance" if self.address is None else (
            f"join the Ray cluster at {self.address!r}"
        )
        try:
            if self.address is None:
                ray.init(
                    address="local",
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    configure_logging=False,
                )
                self._started = True
            else:
                ray.init(address=self.address, configure_logging=False)
        except Exception as e:  # Ray raises bare Exception/ConnectionError here
            raise ExecutorError(f"Could not {where}: {e}") from e
        log.info("Ray: %s done", where)

    def _options(self) -> dict:
        threads = str(max(1, int(self.cpus_per_task)))
        env = {
            k: os.environ.get(k, threads)
            for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
        }
        return dict(
            num_cpus=self.cpus_per_task,
            num_gpus=self.gpus_per_task,
            max_retries=self.max_retries,
            retry_exceptions=False,
            runtime_env={"env_vars": env},
        )

    def map(self, fn, calls, *, shared=None, on_result=None) -> list:
        ray = self._ray
        self.start()
        remote = ray.remote(**self._options())(fn)
        refs = {k: ray.put(v) for k, v in dict(shared or {}).items()}
        pending = {remote.remote(*args, **refs): i for i, args in enumerate(calls)}
        results: list = [None] * len(pending)
        errors: list[tuple[int, BaseException]] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    errors.append((i, e.cause if isinstance(e.cause, BaseException) else e))
                    continue
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as e:
                    errors.append(
                        (i, ExecutorError(
                            f"Task {i} ({getattr(fn, '__name__', fn)}{calls[i]!r}) failed: "
                            f"{type(e).__name__} after {self.max_retries} retries; run the "
                            "study again to resume it."
                        ))
                    )
                    continue
                if on_result is not None:
                    on_result(i, results[i])
        if errors:
            raise errors[0][1]
        return results

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, cpus_per_task={self.cpus_per_task})"


def make_executor(name: str = "inprocess", *, address: str | None = None, **options) -> Executor:
    """The executor called `name` (`"inprocess"` or `"ray"`).

    Args:
        name: one of `EXECUTORS`. Default `"inprocess"`.
        address: Ray only: None (start a local instance), `"auto"` or
            `"host:port"`. Default None.
        **options: further `RayExecutor` arguments.

    Raises:
        ValueError: an unknown `name`, or `address`/options given to the
            in-process executor.
        ExecutorUnavailable: `name="ray"` and Ray is not installed.
    """
    check_choice("executor", name, EXECUTORS)
    if name == "inprocess":
        if address is not None or options:
            raise ValueError(
                "Expected no Ray address or options with executor='inprocess'. "
                f"Received: address={address!r}, options={options!r}"
            )
        return InProcessExecutor()
    return RayExecutor(address, **options)
