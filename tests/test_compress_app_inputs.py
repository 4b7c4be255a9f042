"""The compression app on bad input and in its run directory.

Each test here is a regression test for a fault of the app: wrong numbers on
NaN data or on probability outputs, tracebacks instead of one-line errors,
late failures on an unwritable folder, 0600 model files, orphaned models
and reports describing models that are gone.
"""

import json
import os
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest

from compress import CompressionConfig, run
from compress.app import _validation_loss
from compress.outputs import output_kind
from compress.policies import Candidate, InfeasibleBudgetError, ParamFraction
from keras_localrank.rundir import ConfigMismatch, RunDirectory, RunDirectoryLocked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
L = keras.layers


def _digits_npz(path, *, nan=False):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)[:300]
    if nan:
        x[3, 5] = np.nan
        x[7, 1] = np.inf
    np.savez(path, x=x, y=d.target[:300])
    return str(path)


def _model(path, head):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), L.Dense(24, activation="relu", name="h"), *head]
    )
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {
        "model": _model(root / "m.keras", [L.Dense(10, activation="softmax", name="out")]),
        "data": _digits_npz(root / "digits.npz"),
        "nan": _digits_npz(root / "nan.npz", nan=True),
        "root": root,
    }


def _config(files, workdir, **kw):
    base = dict(
        model=files["model"],
        dataset="digits",
        data_path=files["data"],
        workdir=str(workdir),
        budgets=(0.5,),
        methods=("weight_svd",),
        latency_runs=1,
        batch_size=64,
    )
    return CompressionConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["weight_svd", "local_rank", "tfmot"])
def test_nan_data_is_refused_for_every_method(files, tmp_path, method):
    with pytest.raises(ValueError, match=r"Expected finite inputs.*2 NaN or infinite"):
        run(_config(files, tmp_path / "w", data_path=files["nan"], methods=(method,)))
    assert not os.path.exists(tmp_path / "w" / "report.json")


@pytest.mark.parametrize(
    "head, compile_loss, kind",
    [
        ([L.Dense(10, name="out"), L.Softmax()], None, "probabilities"),
        ([L.Dense(10, activation="softmax", name="out")], None, "probabilities"),
        ([L.Dense(10, name="out"), L.Activation("softmax"), L.Dropout(0.1)], None, "probabilities"),
        ([L.Dense(10, activation="sigmoid", name="out")], None, "sigmoid"),
        (
            [L.Dense(10, name="out")],
            keras.losses.SparseCategoricalCrossentropy(from_logits=False),
            "probabilities",
        ),
        (
            [L.Dense(10, name="out")],
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "logits",
        ),
        ([L.Dense(10, name="out")], None, "logits"),
        (
            [L.Dense(1, name="out")],
            keras.losses.BinaryCrossentropy(from_logits=True),
            "binary_logits",
        ),
    ],
)
def test_output_kind_from_graph_and_loss(tmp_path, head, compile_loss, kind):
    path = _model(tmp_path / "k.keras", head)
    model = keras.models.load_model(path)
    if compile_loss is not None:
        model.compile(optimizer="adam", loss=compile_loss)
        model.save(path)
        model = keras.models.load_model(path)  # the compiled loss survives a round trip
    assert output_kind(model).kind == kind


def _reference_loss(kind, y, out):
    """Cross-entropy written out per sample in float64 (independent of compress)."""
    out = np.asarray(out, np.float64)
    if kind == "probabilities":
        return -np.mean(np.log(out[np.arange(len(y)), y]))
    if kind == "logits":
        z = out - out.max(1, keepdims=True)
        return -np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
    target = np.eye(out.shape[1])[y]  # sigmoid: one-vs-rest
    return -np.mean(np.mean(target * np.log(out) + (1 - target) * np.log(1 - out), axis=1))


@pytest.mark.parametrize(
    "head",
    [
        [L.Dense(10, name="out"), L.Softmax()],
        [L.Dense(10, activation="sigmoid", name="out")],
        [L.Dense(10, name="out")],
    ],
)
def test_allocation_loss_matches_the_output_kind(tmp_path, head):
    path = _model(tmp_path / "k.keras", head)
    model = keras.models.load_model(path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 64)).astype("float32")
    y = rng.integers(0, 10, size=50)
    kind = output_kind(model)
    got = _validation_loss(kind, x, y, 16)(model)
    expected = _reference_loss(kind.kind, y, model.predict(x, verbose=0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The Keras loss the app compiles with agrees too.
    np.testing.assert_allclose(
        float(kind.loss()(y, model.predict(x, verbose=0))), expected, rtol=1e-4
    )


def test_report_says_which_output_kind_was_assumed(files, tmp_path):
    path = _model(tmp_path / "sm.keras", [L.Dense(10, name="out"), L.Softmax(name="sm")])
    report = run(_config(files, tmp_path / "w", model=path))
    assert report["output"]["kind"] == "probabilities"
    assert "'sm' applies softmax" in report["output"]["evidence"]
    text = (tmp_path / "w" / "report.md").read_text()
    assert "Output taken as **probabilities**" in text


def test_report_has_cost_and_latency_of_every_model_and_0644_files(files, tmp_path):
    report = run(_config(files, tmp_path / "w", budgets=(0.6, 0.4)))
    for row in [report["original"], *report["rows"]]:
        assert row["params"] > 0 and row["macs"] > 0 and row["file_bytes"] > 0
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b64"] > 0
    for row in report["rows"]:
        assert stat.S_IMODE(os.stat(row["model_path"]).st_mode) == 0o644
        assert row["macs"] < report["original"]["macs"]
    for name in ("report.png", "report_macs.png", "report_latency.png"):
        assert (tmp_path / "w" / name).stat().st_size > 1000
    table = (tmp_path / "w" / "report.md").read_text()
    assert "| original |" in table and "latency ms (batch 64)" in table


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"latency_runs": 0}, ValueError, "latency_runs=0"),
        ({"batch_size": 2.5}, TypeError, "batch_size=2.5"),
        ({"budgets": (1.5,)}, ValueError, "budget=1.5"),
        ({"budget_kind": "flops"}, ValueError, "budget_kind='flops'"),
    ],
)
def test_bad_options_are_refused_before_any_work(files, tmp_path, options, error, message):
    workdir = tmp_path / "w"
    with pytest.raises(error, match=message):
        run(_config(files, workdir, model=str(tmp_path / "missing.keras"), **options))
    assert not workdir.exists()


def test_workdir_that_is_a_file_is_refused_before_the_model_is_read(files, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    missing = str(tmp_path / "missing.keras")  # would fail later, if the folder were not first
    with pytest.raises(ValueError, match="workdir.*a file"):
        run(_config(files, a_file, model=missing))
    with pytest.raises(ValueError, match="Cannot create `workdir`"):
        run(_config(files, a_file / "sub", model=missing))


def test_infeasible_budget_has_its_own_class():
    c = Candidate("d", 8, 8, True, np.ones(8), floor=8)
    with pytest.raises(InfeasibleBudgetError, match="Impossible budget"):
        ParamFraction(0.1).select([c], fixed_params=0, original_params=72)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "compress", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_cli_truncated_npz_and_corrupt_model_give_one_line(files, tmp_path):
    data = open(files["data"], "rb").read()
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "bad.keras"
    corrupt.write_bytes(open(files["model"], "rb").read()[:500])
    common = ["--dataset=digits", "--method=weight_svd", f"--workdir={tmp_path / 'w'}"]
    for model, data_path, named in (
        (files["model"], truncated, "cut.npz"),
        (corrupt, files["data"], "bad.keras"),
    ):
        proc = _cli(f"--model={model}", f"--data_path={data_path}", *common)
        assert proc.returncode == 1, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_resume_keeps_finished_models_and_adds_new_budgets(files, tmp_path):
    workdir = tmp_path / "w"
    first = run(_config(files, workdir, budgets=(0.6,)))
    path = first["rows"][0]["model_path"]
    mtime = os.stat(path).st_mtime_ns
    lines = []
    second = run(_config(files, workdir, budgets=(0.6, 0.4)), progress=lines.append)
    assert any("budget 0.6: complete in an earlier run (resumed)" in line for line in lines)
    assert os.stat(path).st_mtime_ns == mtime  # not recomputed
    assert [r["budget"] for r in second["rows"]] == [0.6, 0.4]
    on_disk = json.loads((workdir / "report.json").read_text())
    assert all(os.path.isfile(r["model_path"]) for r in on_disk["rows"])
    # A model removed by hand is recomputed, never reported without its file.
    os.remove(path)
    third = run(_config(files, workdir, budgets=(0.6, 0.4)))
    assert os.path.isfile(path) and len(third["rows"]) == 2


def test_different_config_is_refused_without_touching_the_folder(files, tmp_path):
    workdir = tmp_path / "w"
    run(_config(files, workdir))
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    with pytest.raises(ConfigMismatch, match="finetune_epochs"):
        run(_config(files, workdir, finetune_epochs=1))
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert after == before


def test_locked_workdir_gives_a_clear_error(files, tmp_path):
    workdir = tmp_path / "w"
    with RunDirectory(workdir, {"holder": True}):
        with pytest.raises(RunDirectoryLocked, match=f"pid {os.getpid()}"):
            run(_config(files, workdir))
