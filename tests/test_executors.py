"""Executors (keras_localrank.executors) on a real local Ray instance.

One module-scoped Ray session (2 CPUs, loopback, no dashboard) serves every
test; the studies run tiny configs. The in-process executor is the reference:
the same sweep run by Ray tasks must give the same numbers.
"""

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from keras_localrank import executors
from keras_localrank.rundir import SubRun
from keras_localrank.studies import dynamics, vib_sweep
from tests.run_files import snapshot

ray = pytest.importorskip("ray")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    n_train=96,
    n_test=48,
    dim=6,
    k=2,
    hidden=(8, 8),
    batch_size=32,
    epochs=4,
    checkpoint_every=2,
    num_measurements=5,
    rank_samples=16,
    weight_decay=0.5,
    learning_rate=1e-2,
)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def tiny(**overrides):
    return dynamics.get_preset("gaussian", **{**TINY, **overrides})


def test_ray_sweep_equals_in_process_and_resumes_a_partial_run(ray_session, tmp_path):
    reference = dynamics.train_and_evaluate(tiny(seeds=(0, 1)), tmp_path / "a", plots=False)
    # The other directory: seed 0 finished in process earlier, seed 1 is left to Ray.
    dynamics.train_and_evaluate(tiny(seeds=(0,)), tmp_path / "b", plots=False)
    seed0 = snapshot(str(tmp_path / "b" / "seed=0"))
    executor = executors.RayExecutor()
    with executor:
        summary = dynamics.train_and_evaluate(
            tiny(seeds=(0, 1)), tmp_path / "b", plots=False, executor=executor
        )
    assert ray.is_initialized()  # a session it did not start is left running
    assert snapshot(str(tmp_path / "b" / "seed=0")) == seed0  # not redone
    by_ray = pd.read_csv(tmp_path / "b" / "seed=1" / "measurements.csv")
    in_process = pd.read_csv(tmp_path / "a" / "seed=1" / "measurements.csv")
    pd.testing.assert_frame_equal(by_ray, in_process)
    assert pd.read_csv(tmp_path / "b" / "measurements.csv").equals(
        pd.read_csv(tmp_path / "a" / "measurements.csv")
    )
    for seed in ("0", "1"):  # equal but for the wall-clock training and measuring times
        for run_summary in (summary, reference):
            assert run_summary["per_seed"][seed]["run"].pop("train_seconds") > 0
            cost = run_summary["per_seed"][seed]["information"].pop("cost")
            assert cost["local_rank_seconds"] > 0 and cost["information_seconds"] > 0
    assert summary["per_seed"] == reference["per_seed"]
    for key in ("layers", "final"):
        assert summary["mean_std"][key] == reference["mean_std"][key]
    with open(tmp_path / "b" / "manifest.json", encoding="utf-8") as f:
        complete = json.load(f)["complete"]
    assert {"seed=0", "seed=1", "measurements.csv", "summary.json"} <= set(complete)
    # The worker took its own sub-run's lock and released it when it finished.
    with SubRun(tmp_path / "b" / "seed=1", lock=True) as sub:
        assert sub.is_complete()


def test_vib_sweep_on_ray_equals_in_process(ray_session, tmp_path):
    config = vib_sweep.SweepConfig(
        betas=(1e-4, 1.0),
        seeds=(0,),
        dataset="gaussian",
        n_train=100,
        n_test=50,
        rank_samples=20,
        overrides={"encoder_units": (8,), "bottleneck_units": 3, "epochs": 1, "batch_size": 50},
    )
    here = vib_sweep.train_and_evaluate(config, tmp_path / "a", plots=False)
    there = vib_sweep.train_and_evaluate(
        config, tmp_path / "b", plots=False, executor=executors.RayExecutor()
    )
    assert here["trained_this_call"] == there["trained_this_call"] == 2
    a, b = (
        pd.read_csv(tmp_path / d / "results.csv").drop(columns="train_seconds") for d in "ab"
    )
    pd.testing.assert_frame_equal(a, b)


def _fails(x):
    raise ValueError(f"Expected x != {x}. Received: x={x}")


def test_an_error_in_a_task_reaches_the_driver_as_itself(ray_session):
    with pytest.raises(ValueError, match="Received: x=3"):
        executors.RayExecutor().map(_fails, [(3,)])


def _dies_on_first_attempt(index, path, *, marker_dir):
    """A task that kills its own worker process the first time it runs."""
    with SubRun(path, {"index": index}, lock=True) as sub:
        with open(sub.join("attempts.txt"), "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        if sub.is_complete():
            return sub.read_json("result.json")
        sub.write_text("partial.txt", "half done")
        marker = os.path.join(marker_dir, f"died-{index}")
        if index == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-task, holding the sub-run lock
        sub.write_json("result.json", {"index": index, "square": index * index})
        sub.mark_complete()
        return sub.read_json("result.json")


def test_a_killed_worker_task_is_retried_and_the_result_is_complete(ray_session, tmp_path):
    paths = [str(tmp_path / f"unit={i}") for i in range(3)]
    done = []
    results = executors.RayExecutor(max_retries=2).map(
        _dies_on_first_attempt,
        [(i, p) for i, p in enumerate(paths)],
        shared={"marker_dir": str(tmp_path)},
        on_result=lambda i, r: done.append(i),
    )
    assert results == [{"index": i, "square": i * i} for i in range(3)]
    assert sorted(done) == [0, 1, 2]
    attempts = [open(os.path.join(p, "attempts.txt")).read().split() for p in paths]
    assert [len(a) for a in attempts] == [1, 2, 1]
    assert attempts[1][0] != attempts[1][1]  # retried in another worker process
    for p in paths:
        assert SubRun(p).is_complete()


def test_a_worker_that_keeps_dying_is_one_clear_error(ray_session, tmp_path):
    with pytest.raises(executors.ExecutorError, match="after 0 retries"):
        executors.RayExecutor(max_retries=0).map(
            _dies_on_first_attempt, [(1, str(tmp_path / "unit"))],
            shared={"marker_dir": str(tmp_path)},
        )


def test_extra_callbacks_cannot_go_to_other_processes(ray_session, tmp_path):
    import keras

    with pytest.raises(ValueError, match="callbacks"):
        dynamics.train_and_evaluate(
            tiny(seeds=(0,)), tmp_path, callbacks=[keras.callbacks.Callback()],
            executor=executors.RayExecutor(),
        )


def test_bad_executor_arguments():
    with pytest.raises(ValueError, match="executor"):
        executors.make_executor("dask")
    with pytest.raises(ValueError, match="address"):
        executors.make_executor("inprocess", address="auto")
    with pytest.raises(ValueError, match="max_retries"):
        executors.RayExecutor(max_retries=-1)
    with pytest.raises(TypeError, match="cpus_per_task"):
        executors.RayExecutor(cpus_per_task="2")


def test_without_ray_the_ray_executor_is_one_clear_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(executors.ExecutorUnavailable) as info:
        executors.make_executor("ray")
    assert str(info.value).count(". ") == 0 and "pip install" in str(info.value)


BLOCK_RAY = textwrap.dedent(
    """
    import runpy, sys

    class BlockRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, BlockRay())
    sys.argv = ["gaussian_mlp.py", *sys.argv[1:]]
    runpy.run_module("experiments.gaussian_mlp", run_name="__main__")
    """
)


def test_script_without_ray_fails_in_one_sentence_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, f"--workdir={workdir}", "--executor=ray"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        "gaussian_mlp.py: error: The Ray executor needs Ray, which is not installed: "
        "pip install -e '.[ray]' (or run with --executor=inprocess)."
    ), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_compression_sweep_runs_each_architecture_as_one_unit(tmp_path):
    # Regression: the sweep must hand the app a run folder it accepts (`workdir`).
    from experiments import compress_mnist

    config = compress_mnist.ExperimentConfig(
        dataset="digits", archs=("16x1",), budgets=(0.5,), methods=("weight_svd",),
        epochs=1, finetune_epochs=0, allocation="energy", calibration_samples=64,
        latency_runs=1, n_train=300, n_test=100,
    )
    summary = compress_mnist.train_and_evaluate(
        config, tmp_path, executor=executors.InProcessExecutor()
    )
    rows = summary["16x1"]["report"]["rows"]
    assert [(r["method"], r["budget"], r["status"]) for r in rows] == [("weight_svd", 0.5, "ok")]
    assert SubRun(tmp_path / "mlp_16x1").is_complete()
    assert (tmp_path / "summary.md").read_text().startswith("# MNIST compression sweep")
